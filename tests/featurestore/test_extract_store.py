"""The store through the real `featurestore extract` (MNIST DDPM on the embedded demo digits): a
store of an earlier version is continued, not recomputed; a repaired chunk is recomputed; two
extractions of one spec at once split the chunks; xarray opens the groups of a run it wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore, run_id_of

cli = CliRunner()
ARGS = ["--dataset", "demo", "--backbone", "ddpm-mnist", "--limit", "64", "--timesteps", "10", "--chunk-rows", "16"]


def _extract(store: Path) -> dict:
    result = cli.invoke(app, ["extract", *ARGS, "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _arrays(store: Path) -> dict:
    (run,) = FeatureStore.open(store).runs()
    return {(t, b): run.numpy(t, b, run.usable_rows()) for t in run.timesteps for b in run.blocks}


def _file_times(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> tuple[Path, dict]:
    """A store extracted once, its result document (copy it before changing it)."""
    store = tmp_path_factory.mktemp("extracted") / "s.zarr"
    return store, _extract(store)


def test_xarray_opens_the_groups_of_a_run_written_by_extract(extracted):
    store, doc = extracted
    run = FeatureStore.open(store).run(doc["run_id"])
    rows = run.usable_rows()
    features = xr.open_zarr(store / "runs" / run.run_id / "t10", consolidated=False)
    assert sorted(features.data_vars) == sorted(run.blocks)
    for block, (c, h, w) in run.blocks.items():
        assert features[block].dims == ("image", f"{block}_channel", f"{block}_y", f"{block}_x")
        assert features[block].shape == (len(run), c, h, w)
        np.testing.assert_array_equal(features[block].values[rows], run.numpy(10, block, rows))
        np.testing.assert_array_equal(run.to_xarray(10, block=block).values, run.numpy(10, block, rows))
    bookkeeping = xr.open_zarr(store / "runs" / run.run_id, consolidated=False)
    np.testing.assert_array_equal(bookkeeping["rows"].values, run.rows)


def test_a_run_written_before_autocast_existed_is_continued_not_recomputed(extracted, tmp_path):
    source, first = extracted
    store = tmp_path / "old.zarr"
    shutil.copytree(source, store)
    expected = _arrays(store)
    # the layout an earlier version wrote: no autocast in the spec (so another id), no non-finite counts
    runs = zarr.open_group(str(store), mode="a")["runs"]
    attrs = runs[first["run_id"]].attrs.asdict()
    spec = {k: v for k, v in attrs["spec"].items() if k != "autocast"}
    old_id = run_id_of(spec)
    (store / "runs" / first["run_id"]).rename(store / "runs" / old_id)
    old = zarr.open_group(str(store), mode="a")["runs"][old_id]
    del old["nonfinite"]
    old.attrs.clear()
    old.attrs.update({k: v for k, v in attrs.items() if k not in ("nonfinite_keys", "every_chunk_stored")}
                     | {"spec": spec, "run_id": old_id})
    before = _file_times(store)

    again = _extract(store)
    assert (again["run_id"], again["chunks_written"], again["chunks_skipped"]) == (old_id, 0, 4)
    assert FeatureStore.open(store).run_ids() == [old_id]
    assert _file_times(store) == before
    for key, values in _arrays(store).items():
        np.testing.assert_array_equal(values, expected[key])


def test_a_chunk_repaired_by_verify_is_recomputed_by_extract(extracted, tmp_path):
    source, first = extracted
    store = tmp_path / "damaged.zarr"
    shutil.copytree(source, store)
    expected = _arrays(store)
    (store / "runs" / first["run_id"] / "t10" / "block2" / "c" / "2" / "0" / "0" / "0").unlink()
    assert cli.invoke(app, ["verify", str(store), "--repair"]).exit_code == 1
    again = _extract(store)
    assert (again["chunks_written"], again["chunks_skipped"]) == (1, 3)
    assert cli.invoke(app, ["verify", str(store)]).exit_code == 0
    for key, values in _arrays(store).items():
        assert values.tobytes() == expected[key].tobytes(), key


@pytest.mark.slow
def test_two_extractions_of_one_spec_at_once_split_the_chunks(tmp_path):
    store = tmp_path / "shared.zarr"
    args = ["--dataset", "demo", "--backbone", "ddpm-mnist", "--limit", "128", "--timesteps", "10",
            "--chunk-rows", "8", "--batch-size", "8", "--store", str(store)]
    child = Path(__file__).with_name("extract_child.py")
    logs = [tmp_path / f"writer{k}.log" for k in range(2)]
    procs = [subprocess.Popen([sys.executable, str(child), str(log), "extract", *args, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for log in logs]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out))
    written = [[int(c) for c in log.read_text().split()] if log.exists() else [] for log in logs]
    assert not set(written[0]) & set(written[1]), written
    assert sorted(written[0] + written[1]) == list(range(16))
    assert written[0] and written[1], "the two extractions did not overlap: the test shows nothing"
    # each reports the chunks it wrote itself, and neither ends while the other still writes one
    assert [r["chunks_written"] for r in results] == [len(w) for w in written]
    assert [r["done"] for r in results] == [128, 128]
    (run,) = FeatureStore.open(store).runs()
    assert run.done_chunks().all() and run.attrs["finished"] is not None
    clean = tmp_path / "clean.zarr"
    assert cli.invoke(app, ["extract", *args[:-1], str(clean)]).exit_code == 0
    for key, values in _arrays(clean).items():
        assert run.numpy(*key, run.usable_rows()).tobytes() == values.tobytes(), key
