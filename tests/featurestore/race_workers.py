"""Writer processes for tests/featurestore/test_concurrency.py (started with the spawn method, so
they are real OS processes that share nothing but the store on disk).

Every value written is a function of (dataset, image id), so the parent can check what the store
holds without being told what each process did.
"""

from __future__ import annotations

import time

import numpy as np
from store_builders import manifest

from featurestore.store import FeatureStore

IMAGES = 24  # per dataset, added in APPENDS parts so the two writers' appends interleave
APPENDS = 4
CHUNK_ROWS = 4
BLOCK = (2, 1, 1)
CAPTIONS = "race-captioner"


def image_ids(dataset: str) -> list[str]:
    return [f"{dataset}-{i:03d}" for i in range(IMAGES)]


def labels(dataset: str) -> list[int]:
    return [i % 3 for i in range(IMAGES)]


def features(ids: np.ndarray) -> np.ndarray:
    """(n, 2, 1, 1) float32: the image's number and its dataset's number (a..z -> 0..25)."""
    values = [(int(i.split("-")[1]), ord(i[0]) - ord("a")) for i in ids.tolist()]
    return np.array(values, dtype=np.float32).reshape(len(ids), *BLOCK)


def spec(dataset: str) -> dict:
    return {"dataset": dataset, "backbone": "race", "timesteps": [5], "blocks": ["blk"]}


def write_dataset(path: str, dataset: str) -> None:
    """What one `extract` does at the store level: images (in parts), captions, a run, its chunks,
    a session and the finish mark."""
    store = FeatureStore.open(path, "a")
    ids, labs = image_ids(dataset), labels(dataset)
    step = IMAGES // APPENDS
    for k in range(APPENDS):
        part = slice(k * step, (k + 1) * step)
        rows = store.add_images(dataset, manifest(ids[part], labs[part]))
        store.write_captions(CAPTIONS, rows, [f"caption of {i}" for i in ids[part]], {"model": "race"})
    rows = store.add_images(dataset, manifest(ids, labs))
    run = store.create_run(spec(dataset), arrays={"blk": BLOCK}, timesteps=[5], rows=rows, chunk_rows=CHUNK_ROWS,
                           dtype="float32", provenance={})
    run_ids = store.images.id[run.rows]
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        run.write_chunk(c, {(5, "blk"): features(run_ids[s])}, np.zeros(s.stop - s.start, bool), [""] * (s.stop - s.start))
    run.record_session({"writer": dataset})
    run.mark_finished()


def race_datasets(paths: list[str], dataset: str, barrier, results) -> None:
    """Process body: for every store path, wait for the other writer, then write `dataset` into it;
    report (path, the error that stopped the writer or None)."""
    for path in paths:
        barrier.wait(60)
        try:
            write_dataset(path, dataset)
            results.put((path, None))
        except Exception as exc:  # noqa: BLE001 - a writer that fails is one outcome of the trial
            results.put((path, f"writer of {dataset} failed: {type(exc).__name__}: {exc}"))


SAME_SPEC = {"dataset": "toy", "backbone": "race", "timesteps": [5], "blocks": ["blk"]}
SAME_IMAGES = 40  # 20 chunks of 2 rows


def race_same_spec(paths: list[str], claim: bool, barrier, results) -> None:
    """Process body: for every store path, wait for the other writer, then extract the same spec
    chunk by chunk as the runner does; report (path, chunks this process wrote).

    `claim`: take each chunk's claim first (the runner's protocol); without it, every chunk that
    was not done when the process looked is written (the protocol before claims existed)."""
    ids = [f"toy-{i:03d}" for i in range(SAME_IMAGES)]
    for path in paths:
        barrier.wait(60)
        store = FeatureStore.open(path, "a")
        rows = store.add_images("toy", manifest(ids, [0] * len(ids)))
        run = store.create_run(SAME_SPEC, arrays={"blk": BLOCK}, timesteps=[5], rows=rows, chunk_rows=2,
                               dtype="float32", provenance={})
        todo = [c for c, done in enumerate(run.done_chunks()) if not done]
        written = []
        if claim:
            with run.claims() as claims:
                for c in todo:
                    if claims.take(c):
                        _write_slowly(run, c, ids)
                        written.append(c)
                        claims.release(c)
        else:
            for c in todo:
                _write_slowly(run, c, ids)
                written.append(c)
        if run.done_chunks().all():
            run.mark_finished()
        results.put((path, written))


def _write_slowly(run, c: int, ids: list[str]) -> None:
    s = run.chunk_slice(c)
    time.sleep(0.01)  # the model's time: long enough for the other process to reach the same chunk
    run.write_chunk(c, {(5, "blk"): features(np.array(ids[s]))}, np.zeros(2, bool), ["", ""])
