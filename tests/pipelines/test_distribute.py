"""Extraction on a two-worker dask LocalCluster equals the local run bit for bit."""

import numpy as np

from featurestore.store import FeatureStore
from pipelines.extract.distribute import shards
from pipelines.extract.runner import ExtractConfig, extract


def test_shards_are_contiguous_and_cover_everything():
    todo = [0, 1, 2, 5, 6, 7, 9]
    parts = shards(todo, 3)
    assert parts == [[0, 1, 2], [5, 6], [7, 9]]
    assert shards(todo, 50) == [[c] for c in todo]
    assert shards([4], 2) == [[4]]


def test_two_dask_workers_write_what_a_local_run_writes(tmp_path):
    common = dict(backbone="ddpm-mnist", dataset="demo", limit=96, timesteps=[10, 300], chunk_rows=16, progress=False)
    local = extract(ExtractConfig(store=str(tmp_path / "local.zarr"), **common))
    dask = extract(ExtractConfig(store=str(tmp_path / "dask.zarr"), workers=2, batch_size=5, **common))
    assert dask.run_id == local.run_id and dask.done == 96 and dask.seconds["workers"] == 2
    a = FeatureStore.open(str(tmp_path / "local.zarr")).run(local.run_id)
    b = FeatureStore.open(str(tmp_path / "dask.zarr")).run(dask.run_id)
    for t in a.timesteps:
        for block in a.blocks:
            assert a.numpy(t, block).tobytes() == b.numpy(t, block).tobytes(), (t, block)
    assert np.array_equal(a.labels, b.labels)
    assert b.attrs["finished"] is not None and len(b.attrs["sessions"]) == 1
