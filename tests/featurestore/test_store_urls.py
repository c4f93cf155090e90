"""Stores at fsspec URLs: the same API on an in-memory filesystem and on file:// URLs."""

import numpy as np
import pytest

from featurestore.inspect import inspect_store
from featurestore.store import FeatureStore


@pytest.mark.parametrize("url", ["memory://featurestore-test/s.zarr", "file://{tmp}/s.zarr"])
def test_round_trip_at_a_url(tmp_path, url):
    url = url.format(tmp=tmp_path)
    store = FeatureStore.open(url, "a")
    rows = store.add_images("d", {"id": ["a", "b", "c"], "label": [0, 1, 0], "class_name": ["x", "y", "x"],
                                  "split": ["s"] * 3, "domain": ["p"] * 3, "source": ["a", "b", "c"]})
    run = store.create_run({"k": url}, arrays={"blk": (2, 1, 1)}, timesteps=[3], rows=rows, chunk_rows=2,
                           dtype="float16", provenance={})
    values = np.arange(6, dtype=np.float16).reshape(3, 2, 1, 1)
    run.write_chunk(0, {(3, "blk"): values[:2]}, np.zeros(2, bool), ["", ""])
    run.write_chunk(1, {(3, "blk"): values[2:]}, np.array([True]), ["IOError: gone"])
    again = FeatureStore.open(url).run(run.run_id)
    np.testing.assert_array_equal(again.numpy(3, "blk", again.usable_rows()), values[:2])
    np.testing.assert_array_equal(again.read_chunk(3, "blk", 1), values[2:])  # the failed row, as written
    doc = inspect_store(url)
    assert (doc["images"], doc["runs"][0]["done"], doc["runs"][0]["failed"]) == (3, 2, 1)
    assert doc["runs"][0]["failed_ids"] == {"c": "IOError: gone"}


def test_a_writer_marker_at_a_url_is_waited_for_then_refused(monkeypatch):
    import fsspec

    import featurestore.store as store_module

    url = "memory://featurestore-marker/s.zarr"
    store = FeatureStore.open(url, "a")
    fs, root = fsspec.core.url_to_fs(url)
    marker = f"{root}/{store_module.MARKER}"
    assert not fs.exists(marker)  # a change removes its marker when done
    fs.pipe_file(marker, b'{"host": "elsewhere", "pid": 12}')
    monkeypatch.setattr(store_module, "MARKER_WAIT_S", 0.3)
    with pytest.raises(store_module.StoreError, match=f"elsewhere.*delete {url}/.featurestore-writer"):
        store.add_images("d", {"id": ["a"], "label": [0], "class_name": ["x"], "split": ["s"], "domain": ["p"],
                               "source": ["a"]})
    assert len(FeatureStore.open(url).images) == 0
    fs.rm_file(marker)  # what the message tells the user to do
    store.add_images("d", {"id": ["a"], "label": [0], "class_name": ["x"], "split": ["s"], "domain": ["p"],
                           "source": ["a"]})
    assert FeatureStore.open(url).images.id.tolist() == ["a"]
