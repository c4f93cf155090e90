"""The demo's segmentation step: its manifest takes the real train and test splits of
mnist-seg-demo, and it writes its own store, results and page, leaving store.zarr alone."""

import json

import numpy as np
import pytest

from data_manifests.builders import DEMO_DIR, DEMO_FILE
import pipelines.report.demo as demo
from data_manifests.manifest import load_dataset
from featurestore.store import FeatureStore
from pipelines.report.demo import segment_demo, split_spread


def test_split_spread_takes_the_first_rows_of_each_split_with_their_masks():
    full = load_dataset("mnist-seg-demo")
    spread = split_spread(full, 3)
    assert spread.ids == full.ids[:3] + full.ids[1000:1003]  # rows 0..999 are train, 1000..1999 test
    assert spread.splits == ("train",) * 3 + ("test",) * 3
    assert spread.targets["mask"] == full.targets["mask"][:3] + full.targets["mask"][1000:1003]
    assert spread.labels == full.labels[:3] + full.labels[1000:1003]
    with pytest.raises(ValueError, match="fewer than 1001 rows"):
        split_spread(full, 1001)


def test_segment_demo_writes_its_own_store_and_page(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_SEG_PER_SPLIT", 8)
    monkeypatch.setattr(demo, "DEMO_SEG_EPOCHS", 1)
    lines: list[str] = []
    page = segment_demo(tmp_path, 16, False, lines.append)
    assert page == tmp_path / "mnist-seg.html" and page.is_file()
    store = FeatureStore.open(str(tmp_path / "mnist-seg.zarr"))
    (run_id,) = store.run_ids()
    assert len(store.run(run_id)) == 16
    assert not (tmp_path / "store.zarr").exists()
    (folder,) = (tmp_path / "mnist-seg.zarr.results").glob("segment-hypercolumn-*")
    doc = json.loads((folder / "results.json").read_text())
    assert doc["images"]["train"] == doc["images"]["test"] == 8
    with np.load(DEMO_DIR / DEMO_FILE) as npz:  # test digits: rows 1000..1007; masks are 0 where pixel <= 127
        background = (npz["images"][1000:1008] <= 127).mean()
    assert doc["baseline"]["class"] == "background"
    assert doc["baseline"]["pixel_accuracy"] == pytest.approx(background)
    text = "\n".join(lines)
    assert "8 train / 8 test digits" in text
    assert "| majority-class baseline: predict the most frequent training class everywhere (background) | " in text
