"""Damaged stores: missing or truncated chunk files are refused, never read as values;
`featurestore verify` finds them and --repair marks them to redo; corrupt metadata is named and
one broken run does not hide the others."""

from __future__ import annotations

import json

import numpy as np
import pytest
from store_builders import BLOCKS, SPEC, TIMESTEPS, write_random_chunk
from typer.testing import CliRunner

from cli.main import app
from featurestore.inspect import inspect_store
from featurestore.store import DamagedChunkError, FeatureStore, IncompleteRunError, StoreError, run_id_of
from featurestore.verify import verify_store

cli = CliRunner()


def _chunk_file(w, name: str, chunk: int):
    """The file of chunk `chunk` of array `name` ("t10/down0", "failed", ...) of the run."""
    array = w.run.group[name]
    return w.path / "runs" / w.run.run_id / name / "c" / "/".join(["0"] * array.ndim).replace("0", str(chunk), 1)


def test_deleted_chunk_file_is_refused_not_read_as_zeros(make_run):
    w = make_run()
    _chunk_file(w, "t10/down0", 0).unlink()
    with pytest.raises(DamagedChunkError, match="chunk 0 is marked done but its file is missing"):
        w.run.numpy(10, "down0", np.array([0]))
    np.testing.assert_array_equal(w.run.numpy(10, "down0", np.array([8])), w.data[(10, "down0")][[8]])
    np.testing.assert_array_equal(w.run.numpy(10, "mid", np.array([0])), w.data[(10, "mid")][[0]])


def test_truncated_chunk_file_is_refused(make_run):
    w = make_run()
    path = _chunk_file(w, "t10/mid", 2)
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(DamagedChunkError, match="chunk 2 cannot be decoded"):
        w.run.numpy(10, "mid", np.array([8]))
    with pytest.raises(DamagedChunkError):
        w.run.dask(10, "mid")[8:].compute()


def test_deleted_failure_flags_are_refused(make_run):
    """Without its flags a chunk's failed rows would pass as images whose features are zero."""
    w = make_run()
    _chunk_file(w, "failed", 0).unlink()
    with pytest.raises(DamagedChunkError, match="array failed chunk 0"):
        w.run.read_chunk(10, "down0", 0)


def test_a_chunk_of_zeros_keeps_its_file_and_reads_back(make_run):
    """zarr skips chunks equal to the fill value unless told per handle: a done chunk of zeros
    must still have its file, or it would read as damaged."""
    w = make_run()
    zeros = {key: np.zeros((4, *v.shape[1:]), np.float32) for key, v in w.data.items()}
    w.run.write_chunk(1, zeros, np.zeros(4, bool), [""] * 4)
    for name in ("t10/down0", "tnone/mid", "failed", "error", "nonfinite"):
        assert _chunk_file(w, name, 1).is_file(), name
    np.testing.assert_array_equal(w.run.numpy(10, "down0", np.arange(4, 8)), 0)


def test_verify_finds_reports_and_repairs(make_run):
    w = make_run()
    w.run.mark_finished()
    assert verify_store(str(w.path)).ok
    _chunk_file(w, "t10/down0", 0).unlink()
    truncated = _chunk_file(w, "tnone/mid", 2)
    truncated.write_bytes(truncated.read_bytes()[:5])
    _chunk_file(w, "error", 2).write_bytes(b"garbage")

    result = verify_store(str(w.path))
    assert not result.ok and result.chunks_checked == 2
    found = sorted((d.run_id, d.array, d.chunk) for d in result.damaged)
    assert found == [(w.run.run_id, "error", 2), (w.run.run_id, "t10/down0", 0), (w.run.run_id, "tnone/mid", 2)]
    assert {d.array: d.problem.split(" (")[0] for d in result.damaged} == {
        "t10/down0": "is marked done but its file is missing", "tnone/mid": "cannot be decoded",
        "error": "cannot be decoded"}
    assert w.run.done_chunks().tolist() == [True, False, True]  # without --repair nothing changes

    repaired = verify_store(str(w.path), repair=True)
    assert repaired.repaired == {w.run.run_id: [0, 2]}
    run = FeatureStore.open(w.path).run(w.run.run_id)
    assert run.done_chunks().tolist() == [False, False, False]
    assert run.attrs["finished"] is None
    assert verify_store(str(w.path)).ok  # nothing done is damaged any more
    with pytest.raises(IncompleteRunError):
        run.numpy(10, "down0", np.array([0]))

    # what extracting again does: rewrite the chunks; the run reads back what was written
    rng = np.random.default_rng(7)
    w.done_chunks.clear()
    w.failed.clear()
    for chunk in range(3):
        write_random_chunk(w, chunk, rng, {})
    usable = FeatureStore.open(w.path).run(w.run.run_id).usable_rows()
    assert usable.tolist() == list(range(10))
    for key, expected in w.data.items():
        np.testing.assert_array_equal(w.run.numpy(*key, usable), expected)


def test_verify_command_lines_json_and_exit_codes(make_run):
    w = make_run()
    ok = cli.invoke(app, ["verify", str(w.path)])
    assert ok.exit_code == 0, ok.output
    assert "2 done chunks checked, 0 damaged, 0 broken runs" in ok.output
    _chunk_file(w, "t10/down0", 2).unlink()
    bad = cli.invoke(app, ["verify", str(w.path)])
    assert bad.exit_code == 1
    assert f"damaged: run {w.run.run_id} array t10/down0 chunk 2: is marked done but its file is missing" in bad.output
    doc = json.loads(cli.invoke(app, ["verify", str(w.path), "--json", "--run", w.run.run_id]).output)
    assert doc["ok"] is False and [(d["array"], d["chunk"]) for d in doc["damaged"]] == [("t10/down0", 2)]
    fixed = cli.invoke(app, ["verify", str(w.path), "--repair"])
    assert fixed.exit_code == 1 and "marked 1 chunks not done" in fixed.output
    assert cli.invoke(app, ["verify", str(w.path)]).exit_code == 0
    missing = cli.invoke(app, ["verify", str(w.path / "nothing")])
    assert missing.exit_code == 1 and missing.output.startswith("error: no feature store")


def _two_runs(make_run):
    w = make_run()
    other = w.store.create_run({**SPEC, "seed": 1}, arrays={"mid": (4, 1, 1)}, timesteps=[10], rows=np.arange(4),
                               chunk_rows=4, dtype="float32", provenance={})
    values = np.arange(16, dtype=np.float32).reshape(4, 4, 1, 1)
    other.write_chunk(0, {(10, "mid"): values}, np.zeros(4, bool), [""] * 4)
    return w, other, values


def test_one_run_with_corrupt_metadata_does_not_block_the_others(make_run):
    w, other, values = _two_runs(make_run)
    meta = w.path / "runs" / w.run.run_id / "zarr.json"
    meta.write_text('{"zarr_format": 3, "node_ty')
    store = FeatureStore.open(w.path)
    assert store.run_ids() == [other.run_id]
    np.testing.assert_array_equal(store.run(other.run_id).numpy(10, "mid"), values)
    with pytest.raises(StoreError, match=f"{meta} is corrupt") as err:
        store.run(w.run.run_id)
    assert "\n" not in str(err.value)
    doc = inspect_store(str(w.path))
    assert [r["run_id"] for r in doc["runs"]] == [other.run_id]
    assert list(doc["broken_runs"]) == [w.run.run_id] and str(meta) in doc["broken_runs"][w.run.run_id]
    result = verify_store(str(w.path))
    assert not result.ok and list(result.broken_runs) == [w.run.run_id] and result.runs == [other.run_id]
    # extracting the broken run's spec again is refused, not silently started over
    with pytest.raises(StoreError, match="corrupt"):
        FeatureStore.open(w.path, "a").create_run(SPEC, arrays={"mid": (4, 1, 1)}, timesteps=[10],
                                                  rows=np.arange(4), chunk_rows=4, dtype="float32", provenance={})


def test_corrupt_array_metadata_is_named_and_the_run_listed_as_broken(make_run):
    w, other, _ = _two_runs(make_run)
    meta = w.path / "runs" / w.run.run_id / "t10" / "down0" / "zarr.json"
    meta.write_text("")
    with pytest.raises(StoreError, match=f"{meta} is corrupt"):
        w.run.numpy(10, "down0", np.array([0]))
    doc = inspect_store(str(w.path))
    assert [r["run_id"] for r in doc["runs"]] == [other.run_id]
    assert str(meta) in doc["broken_runs"][w.run.run_id]
    # extracting that spec again is refused while the array cannot be read (before: "done", nothing written)
    with pytest.raises(StoreError, match=f"{meta} is corrupt"):
        FeatureStore.open(w.path, "a").create_run(SPEC, arrays=BLOCKS, timesteps=list(TIMESTEPS), rows=w.run.rows,
                                                  chunk_rows=w.chunk_rows, dtype="float16", provenance={})


@pytest.mark.parametrize("broken", [("zarr.json",), ("t10", "down0", "zarr.json")], ids=["run", "array"])
def test_verify_repair_removes_a_broken_run_so_extracting_again_rebuilds_it(make_run, broken):
    w, other, values = _two_runs(make_run)
    rows = w.run.rows
    w.path.joinpath("runs", w.run.run_id, *broken).write_text("{broken")
    result = cli.invoke(app, ["verify", str(w.path), "--repair"])
    assert result.exit_code == 1  # damage was found (and repaired)
    assert f"removed broken runs {w.run.run_id}: extract the same spec again to rebuild them" in result.output
    store = FeatureStore.open(w.path)
    assert store.run_ids() == [other.run_id] and store.broken_runs() == {}
    np.testing.assert_array_equal(store.run(other.run_id).numpy(10, "mid"), values)
    rebuilt = FeatureStore.open(w.path, "a").create_run(
        SPEC, arrays=BLOCKS, timesteps=list(TIMESTEPS), rows=rows, chunk_rows=w.chunk_rows,
        dtype="float16", provenance={})
    assert rebuilt.run_id == w.run.run_id and not rebuilt.done_chunks().any()
    assert cli.invoke(app, ["verify", str(w.path)]).exit_code == 0


@pytest.mark.parametrize("command", [["inspect", "--json"], ["verify"]])
def test_corrupt_root_metadata_is_one_line_naming_the_file(store_path, command):
    FeatureStore.open(store_path, "a")
    (store_path / "zarr.json").write_text("{not json")
    result = cli.invoke(app, [command[0], str(store_path), *command[1:]])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {store_path / 'zarr.json'} is corrupt")
    assert result.output.count("\n") == 1
    with pytest.raises(StoreError, match="zarr.json is corrupt"):
        FeatureStore.open(store_path, "a")


def test_inspect_gives_nonfinite_counts_per_array(make_run):
    w = make_run()
    values = np.ones((4, 4, 1, 1), np.float32)
    values[1, 0] = np.inf
    values[2, :2] = np.nan
    w.run.write_chunk(1, {(10, "mid"): values}, np.zeros(4, bool), [""] * 4, nonfinite_computed={(10, "mid"): 5})
    (run,) = inspect_store(str(w.path))["runs"]
    counts = {(a["timestep"], a["block"]): a["nonfinite"] for a in run["arrays"]}
    assert counts == {(10, "mid"): {"computed": 5, "stored": 3}, (10, "down0"): {"computed": 0, "stored": 0},
                      (None, "mid"): {"computed": 0, "stored": 0}, (None, "down0"): {"computed": 0, "stored": 0}}
    assert (run["done"], run["failed"], run["pending"]) == (8, 2, 0)


def test_run_of_an_earlier_version_without_nonfinite_counts(make_run):
    """Runs written before non-finite counts (and every chunk's file) existed still read, write
    and verify; their counts are None (null in inspect)."""
    w = make_run()
    write_random_chunk(w, 1, np.random.default_rng(1), {})  # a chunk without failures
    group = w.run.group
    del group["nonfinite"]
    attrs = group.attrs.asdict()
    for key in ("nonfinite_keys", "every_chunk_stored"):
        del attrs[key]
    group.attrs.clear()
    group.attrs.update(attrs)
    for name in ("failed", "error"):
        _chunk_file(w, name, 1).unlink()  # earlier versions stored no file for an all-zero (empty) chunk
    run = w.run = FeatureStore.open(w.path, "a").run(w.run.run_id)
    assert run.nonfinite() is None
    usable = w.usable_rows()
    np.testing.assert_array_equal(run.numpy(10, "down0", usable), w.data[(10, "down0")][usable])
    assert all(a["nonfinite"] is None for a in inspect_store(str(w.path))["runs"][0]["arrays"])
    assert run.status().failed_ids == {w.ids[1]: "decode error: truncated file", w.ids[9]: "CUDA out of memory"}
    assert verify_store(str(w.path)).ok
    write_random_chunk(w, 1, np.random.default_rng(2), {5: "bad"})
    np.testing.assert_array_equal(run.numpy(None, "mid", np.array([4, 6, 7])), w.data[(None, "mid")][[4, 6, 7]])
    assert run.nonfinite() is None


def test_spec_without_keys_added_since_finds_the_old_run(make_run):
    """A run written before `autocast` existed is the run of the same spec with autocast none."""
    w = make_run()
    assert "autocast" not in SPEC
    status = w.run.status()
    run = FeatureStore.open(w.path, "a").create_run(
        {**SPEC, "autocast": "none", "ddim": None, "captions": None}, arrays={"mid": (4, 1, 1)}, timesteps=[10],
        rows=np.arange(10), chunk_rows=4, dtype="float32", provenance={})
    assert run.run_id == w.run.run_id == run_id_of(SPEC)
    assert run.status() == status
    assert FeatureStore.open(w.path).run_ids() == [w.run.run_id]
    other = FeatureStore.open(w.path, "a").create_run(
        {**SPEC, "autocast": "bf16"}, arrays={"mid": (4, 1, 1)}, timesteps=[10], rows=np.arange(10),
        chunk_rows=4, dtype="float32", provenance={})
    assert other.run_id != w.run.run_id
