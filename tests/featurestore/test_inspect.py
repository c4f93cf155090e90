"""inspect_store: the JSON document `featurestore inspect STORE --json` prints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from store_builders import BLOCKS, SPEC, TIMESTEPS

from featurestore.inspect import FAILED_IDS_SHOWN, inspect_store
from featurestore.store import FORMAT_VERSION, StoreError, run_id_of


def test_document_describes_the_run(make_run):
    w = make_run()  # N=10 in chunks of 4: chunks 0 and 2 done, rows 1 and 9 failed
    doc = inspect_store(str(w.path))
    assert doc["format_version"] == FORMAT_VERSION
    assert doc["images"] == 14
    (run,) = doc["runs"]
    assert run["run_id"] == run_id_of(SPEC) == w.run.run_id
    assert run["spec"] == SPEC
    assert run["blocks"] == {b: list(chw) for b, chw in BLOCKS.items()}
    assert run["timesteps"] == list(TIMESTEPS)
    assert (run["images"], run["done"], run["failed"], run["pending"]) == (10, 4, 2, 4)
    assert run["failed_ids"] == {w.ids[1]: "decode error: truncated file", w.ids[9]: "CUDA out of memory"}
    assert run["complete"] is False
    assert run["finished"] is None
    assert run["provenance"]["backbone"] == {"name": "tiny"}


def test_every_array_entry_opens_at_its_path_with_its_shape(make_run):
    w = make_run(dtype="float16")
    (run,) = inspect_store(str(w.path))["runs"]
    keys = [(a["timestep"], a["block"]) for a in run["arrays"]]
    assert sorted(keys, key=repr) == sorted(((t, b) for t in TIMESTEPS for b in BLOCKS), key=repr)
    for entry in run["arrays"]:
        arr = zarr.open_array(str(w.path), path=entry["path"], mode="r")
        key = (entry["timestep"], entry["block"])
        assert entry["shape"] == [10, *BLOCKS[entry["block"]]] == list(arr.shape)
        assert entry["dtype"] == "float16" == str(arr.dtype)
        assert entry["chunks"] == [4, *BLOCKS[entry["block"]]] == list(arr.chunks)
        np.testing.assert_array_equal(arr[:], w.data[key])


def test_document_is_plain_json(make_run):
    w = make_run()
    w.run.record_session({"chunks": 2, "seconds": {"read": 0.25}})
    w.run.mark_finished()
    doc = inspect_store(str(w.path))
    text = json.dumps(doc)
    assert json.loads(text) == doc
    (run,) = doc["runs"]
    assert [s["chunks"] for s in run["sessions"]] == [2]
    assert run["finished"] is not None
    assert {a["timestep"] for a in run["arrays"]} == {10, None}


def test_two_runs_and_a_complete_one(make_run):
    w = make_run()
    other_spec = {**SPEC, "seed": 1}
    other = w.store.create_run(other_spec, arrays={"mid": (4, 1, 1)}, timesteps=[50], rows=np.arange(6),
                               chunk_rows=3, dtype="float32", provenance={})
    for c in range(2):
        other.write_chunk(c, {(50, "mid"): np.ones((3, 4, 1, 1), np.float32)}, np.zeros(3, bool), [""] * 3)
    doc = inspect_store(str(w.path))
    by_id = {r["run_id"]: r for r in doc["runs"]}
    assert set(by_id) == {w.run.run_id, run_id_of(other_spec)}
    second = by_id[run_id_of(other_spec)]
    assert second["spec"] == other_spec
    assert [(a["timestep"], a["block"], a["shape"]) for a in second["arrays"]] == [(50, "mid", [6, 4, 1, 1])]
    assert second["arrays"][0]["path"] == f"runs/{other.run_id}/t50/mid"
    assert (second["images"], second["done"], second["failed"], second["pending"]) == (6, 6, 0, 0)
    assert second["complete"] is True
    assert by_id[w.run.run_id]["done"] == 4


def test_failed_ids_are_capped(make_run):
    failed = {r: f"error {r}" for r in range(60) if r % 10 != 0}  # 54 failures, 6 successes
    w = make_run(n=60, chunk_rows=30, done=(0, 1), failed=failed, undone_failed={},
                 blocks={"mid": (1, 1, 1)}, timesteps=(10,))
    (run,) = inspect_store(str(w.path))["runs"]
    assert (run["images"], run["done"], run["failed"], run["pending"]) == (60, 6, 54, 0)
    assert len(run["failed_ids"]) == FAILED_IDS_SHOWN == 50
    expected = {w.ids[r]: m for r, m in failed.items()}
    assert all(expected[i] == m for i, m in run["failed_ids"].items())


def test_missing_store(tmp_path):
    with pytest.raises(StoreError):
        inspect_store(str(tmp_path / "nothing.zarr"))


def test_empty_store(store_path):
    from featurestore.store import FeatureStore

    FeatureStore.open(store_path, "a")
    assert inspect_store(str(store_path)) == {
        "store": str(store_path), "format_version": FORMAT_VERSION, "images": 0, "runs": [], "incomplete_runs": [],
        "broken_runs": {},
    }


def test_store_with_an_interrupted_run_can_still_be_inspected(make_run):
    w = make_run()
    broken = w.store.create_run({**SPEC, "seed": 1}, arrays={"mid": (4, 1, 1)}, timesteps=[10],
                                rows=np.arange(3), chunk_rows=3, dtype="float32", provenance={})
    del broken.group.attrs["created"]
    doc = inspect_store(str(w.path))
    assert w.run.run_id in [r["run_id"] for r in doc["runs"]]
