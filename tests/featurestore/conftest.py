"""Fixtures for tests/featurestore (helpers live in store_builders.py)."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from featurestore.store import FeatureStore

# The test modules here are not a package (the folder name would shadow `featurestore`), so make
# the helper module next to them importable by its own name.
if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))

from store_builders import BLOCKS, SPEC, TIMESTEPS, Written, manifest, write_random_chunk


@pytest.fixture
def store_path(tmp_path) -> Path:
    return tmp_path / "features.zarr"


def _build(
    store_path: Path,
    *,
    n: int = 10,
    chunk_rows: int = 4,
    dtype: str = "float32",
    blocks=BLOCKS,
    timesteps=TIMESTEPS,
    done=(0, 2),
    failed: dict[int, str] | None = None,
    undone_failed: dict[int, str] | None = None,
    seed: int = 0,
    spec=None,
    splits: tuple[str, ...] | None = None,
) -> Written:
    rng = np.random.default_rng(seed)
    failed = {1: "decode error: truncated file", 9: "CUDA out of memory"} if failed is None else failed
    undone_failed = {5: "killed"} if undone_failed is None else undone_failed
    store = FeatureStore.open(store_path, "a")
    n_images = n + 4
    all_ids = np.array([f"im{i:03d}" for i in range(n_images)])
    all_labels = rng.integers(0, 5, n_images)
    all_splits = np.array(splits or ("train",) * n_images)
    table_rows = store.add_images("toy", manifest(all_ids, all_labels, split=all_splits))  # table row k holds image k
    run_rows = rng.permutation(n_images)[:n]
    run = store.create_run(
        spec or SPEC, arrays=blocks, timesteps=list(timesteps), rows=table_rows[run_rows],
        chunk_rows=chunk_rows, dtype=dtype, provenance={"backbone": {"name": "tiny"}},
    )
    data = {(t, b): np.zeros((n, *chw), dtype=dtype) for t in timesteps for b, chw in blocks.items()}
    w = Written(store_path, store, run, chunk_rows, data, all_ids[run_rows], all_labels[run_rows],
                all_splits[run_rows], [])
    for chunk in done:
        in_chunk = {r: m for r, m in failed.items() if w.chunk_of(r) == chunk}
        write_random_chunk(w, chunk, rng, in_chunk)
    for r, message in undone_failed.items():
        assert w.chunk_of(r) not in done
        run.group["failed"][r] = 1
        run.group["error"][r : r + 1] = np.array([message])
        w.undone_failed[r] = message
    return w


@pytest.fixture(scope="session")
def _templates(tmp_path_factory) -> dict:
    return {"root": tmp_path_factory.mktemp("store-templates")}


@pytest.fixture
def make_run(store_path, _templates):
    """Factory: a store with n+4 images (`splits`: the split of each, default all "train") and one
    run over n of them in a shuffled order, so that run rows and table rows differ. By default
    chunks 0 and 2 of N=10, chunk_rows=4 are written (chunk 2 is the partial last one), rows 1 and
    9 failed, and chunk 1 is not done but has a failure flag on row 5 (as if killed between the
    failure columns and the done flag).

    Each distinct set of arguments is built once per session and copied into the test's tmp_path."""

    def build(**kwargs) -> Written:
        key = repr(sorted(kwargs.items()))
        if key not in _templates:
            path = _templates["root"] / f"t{len(_templates)}.zarr"
            _templates[key] = _build(path, **kwargs)
        template: Written = _templates[key]
        shutil.copytree(template.path, store_path)
        store = FeatureStore.open(store_path, "a")
        return dataclasses.replace(
            template, path=store_path, store=store, run=store.run(template.run.run_id),
            data={k: v.copy() for k, v in template.data.items()}, done_chunks=list(template.done_chunks),
            failed=dict(template.failed), undone_failed=dict(template.undone_failed),
        )

    return build
