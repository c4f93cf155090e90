"""The papers' analysis on the real MNIST DDPM and the embedded digits: a sweep from the cache."""

from featurestore.store import FeatureStore
from pipelines.analysis.sweep import sweep_run
from pipelines.extract.runner import ExtractConfig, extract


def test_mid_blocks_beat_the_outer_ones_at_low_t_and_accuracy_falls_with_t(tmp_path):
    store = str(tmp_path / "s.zarr")
    run_id = extract(ExtractConfig(store=store, backbone="ddpm-mnist", dataset="demo", timesteps=[0, 500],
                                   batch_size=100, progress=False)).run_id
    result = sweep_run(FeatureStore.open(store), run_id, pool=4)
    linear = {(r.timestep, r.block): r.linear_top1 for r in result.rows}
    assert len(result.rows) == 8 and all(r.train == r.test == 1000 for r in result.rows)
    assert min(linear[(0, "block1")], linear[(0, "block2")]) > max(linear[(0, "block0")], linear[(0, "block3")])
    for block in ("block0", "block1", "block2", "block3"):
        assert linear[(0, block)] > 0.9 and linear[(500, block)] < 0.3  # chance is 0.1
