"""Concurrent writers in real OS processes: store-level changes are serialised by the store lock,
and writers of one spec split the chunks through per-chunk claims."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import race_workers as rw

from featurestore.store import IMAGE_COLUMNS, FeatureStore, run_id_of

TRIALS = 10
DATASETS = ("a", "b")


def _race(target, args_per_process: list[tuple], reports: int) -> list:
    """Start one spawned process per args tuple (each gets a shared barrier and a result queue
    appended) and collect `reports` results from them."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(args_per_process)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results), daemon=True) for args in args_per_process]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=120) for _ in range(reports)]
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * len(procs)
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def _problems_with_two_datasets(path: Path) -> list[str]:
    """Everything that is not exactly what two uninterrupted writers of datasets a and b leave."""
    store = FeatureStore.open(path)
    lengths = {c: store.group["images"][c].shape[0] for c in IMAGE_COLUMNS}
    table = store.images
    problems = []
    if set(lengths.values()) != {len(table)}:
        problems.append(f"images columns of lengths {lengths}, table of {len(table)} rows")
    keys = list(zip(table.dataset.tolist(), table.id.tolist()))
    expected = {(d, i) for d in DATASETS for i in rw.image_ids(d)}
    if len(keys) != len(set(keys)) or set(keys) != expected:
        problems.append(f"images table holds {len(set(keys))} distinct of {len(keys)} rows, "
                        f"{len(expected - set(keys))} images missing")
    for d in DATASETS:
        run = store.run(run_id_of(rw.spec(d)))
        images = run.images
        if images.dataset.tolist() != [d] * rw.IMAGES or images.id.tolist() != rw.image_ids(d):
            problems.append(f"run of {d} points at rows of other images")
        if run.attrs["finished"] is None or [s["writer"] for s in run.attrs.get("sessions", [])] != [d]:
            problems.append(f"run of {d}: finished {run.attrs['finished']}, sessions {run.attrs.get('sessions')}")
        if not np.array_equal(run.numpy(5, "blk"), rw.features(np.array(rw.image_ids(d)))):
            problems.append(f"run of {d} reads back other values")
    text, done = store.captions(rw.CAPTIONS)
    if not done.all() or text.tolist() != [f"caption of {i}" for i in table.id.tolist()]:
        problems.append(f"captions: {int((~done).sum())} of {len(done)} missing or misplaced")
    return problems


@pytest.mark.slow
def test_two_writers_of_different_datasets_race_on_one_store(tmp_path):
    paths = [str(tmp_path / f"trial{k}.zarr") for k in range(TRIALS)]
    outcomes: dict[str, list[str]] = {p: [] for p in paths}
    for path, error in _race(rw.race_datasets, [(paths, d) for d in DATASETS], reports=2 * TRIALS):
        outcomes[path] += [error] if error else []
    for path in paths:
        try:
            outcomes[path] += _problems_with_two_datasets(Path(path))
        except Exception as exc:  # noqa: BLE001 - a store too damaged to check is a failed trial too
            outcomes[path].append(f"{type(exc).__name__}: {exc}")
    failed = {Path(p).name: msgs for p, msgs in outcomes.items() if msgs}
    assert not failed, f"{len(failed)} of {TRIALS} trials corrupted: {failed}"


def _race_same_spec(tmp_path, claim: bool) -> dict[str, list[list[int]]]:
    paths = [str(tmp_path / f"trial{k}.zarr") for k in range(TRIALS)]
    written: dict[str, list[list[int]]] = {p: [] for p in paths}
    for path, chunks in _race(rw.race_same_spec, [(paths, claim)] * 2, reports=2 * TRIALS):
        written[path].append(chunks)
    return written


@pytest.mark.slow
def test_two_writers_of_one_spec_split_the_chunks(tmp_path):
    written = _race_same_spec(tmp_path, claim=True)
    n_chunks = rw.SAME_IMAGES // 2
    ids = np.array([f"toy-{i:03d}" for i in range(rw.SAME_IMAGES)])
    twice = {Path(p).name: sorted(set(a) & set(b)) for p, (a, b) in written.items() if set(a) & set(b)}
    assert not twice, f"chunks written by both processes: {twice}"
    for path, (a, b) in written.items():
        assert sorted(a + b) == list(range(n_chunks)), path
        store = FeatureStore.open(path)
        (run,) = store.runs()
        assert run.done_chunks().all() and run.attrs["finished"] is not None
        np.testing.assert_array_equal(run.numpy(5, "blk"), rw.features(ids))
        assert len(store.images) == rw.SAME_IMAGES
    shared = sum(1 for a, b in written.values() if a and b)
    assert shared > 0, "the two processes never ran at the same time: the test shows nothing"
