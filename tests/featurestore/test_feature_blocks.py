"""Run.feature_blocks: the run's blocks without its `<block>.attn` cross-attention maps."""

from __future__ import annotations

from featurestore.store import FeatureStore


def test_feature_blocks_leave_out_attention_maps(tmp_path):
    store = FeatureStore.open(str(tmp_path / "s.zarr"), mode="a")
    rows = store.add_images("d", {"id": ["a"], "label": [0], "class_name": ["x"], "split": ["test"],
                                  "domain": ["photo"], "source": ["a"]})
    blocks = {"down0": (2, 4, 4), "down0.attn": (7, 4, 4), "mid": (3, 2, 2), "up0.attn": (7, 2, 2), "up0": (2, 2, 2)}
    run_id = store.create_run({"dataset": "d"}, arrays=blocks, timesteps=[5], rows=rows, chunk_rows=1,
                              dtype="float32", provenance={}).run_id
    run = FeatureStore.open(str(tmp_path / "s.zarr")).run(run_id)
    assert run.feature_blocks == ["down0", "mid", "up0"]
    assert list(run.blocks) == list(blocks)  # the full table is unchanged
