"""The Python API: featurestore.open, read-only objects, split, to_pandas, to_xarray, xarray.open_zarr
on a run's groups, FeatureDataset(split=), reprs, and import costs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

import featurestore
from featurestore.store import IMAGE_COLUMNS, FeatureStore, IncompleteRunError, StoreError, WritableRun, WritableStore

# Image k of the builder's table gets SPLITS[k] (n + 4 = 14 images); the run holds 10 of them.
SPLITS = ("train", "test", "train", "val", "test", "train", "train", "test", "train", "test",
          "train", "val", "train", "test")
COMPLETE = {"done": (0, 1, 2), "undone_failed": {}, "splits": SPLITS}  # rows 1 and 9 failed
WRITERS = ("add_images", "write_captions", "create_run", "remove_run", "lock")
RUN_WRITERS = ("write_chunk", "record_session", "mark_finished", "redo", "claims")


def usable(w) -> list[int]:
    return w.usable_rows().tolist()


def of_split(w, split: str) -> list[int]:
    return [r for r in usable(w) if w.splits[r] == split]


# -- open and the read/write separation -----------------------------------------------------------
def test_open_is_read_only_by_default_and_read_only_objects_have_no_writer_methods(make_run):
    w = make_run(**COMPLETE)
    store = featurestore.open(w.path)
    run = store.run(w.run.run_id)
    assert type(store) is FeatureStore and type(run) is featurestore.Run
    for name in WRITERS:
        assert not hasattr(store, name), name
    for name in RUN_WRITERS:
        assert not hasattr(run, name), name
    assert all(type(r) is featurestore.Run for r in store.runs())

    writable = featurestore.open(w.path, mode="a")
    assert isinstance(writable, WritableStore) and isinstance(writable.run(w.run.run_id), WritableRun)
    assert all(hasattr(writable, name) for name in WRITERS)
    assert all(hasattr(writable.run(w.run.run_id), name) for name in RUN_WRITERS)
    assert isinstance(FeatureStore.open(w.path, "a"), WritableStore)  # the classmethod, as existing code calls it


@pytest.mark.parametrize("mode", ["w", "r+", "x"])
def test_open_refuses_other_modes_in_one_line_and_touches_nothing(make_run, mode):
    w = make_run(**COMPLETE)
    before = sorted(p.name for p in w.path.iterdir())
    with pytest.raises(StoreError, match=r"mode .*'r' \(read-only\) or 'a'") as err:
        featurestore.open(w.path, mode)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in w.path.iterdir()) == before
    np.testing.assert_array_equal(featurestore.open(w.path).run(w.run.run_id).numpy(10, "mid", w.usable_rows()),
                                  w.data[(10, "mid")][w.usable_rows()])


def test_open_read_only_does_not_create_a_store(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        featurestore.open(tmp_path / "missing.zarr")
    assert not (tmp_path / "missing.zarr").exists()


# -- split ----------------------------------------------------------------------------------------
def test_split_returns_the_split_rows_features_and_labels(make_run):
    w = make_run(**COMPLETE)
    run = featurestore.open(w.path).run(w.run.run_id)
    for split in ("train", "test", "val"):
        rows = of_split(w, split)
        assert run.split_rows(split).tolist() == rows
        X, y = run.split(split, t=10, block="down0")
        assert X.dtype == np.float32 and y.dtype == np.int64
        np.testing.assert_array_equal(X, w.data[(10, "down0")][rows].reshape(len(rows), -1))
        np.testing.assert_array_equal(y, w.labels[rows])
    X, _ = run.split("test", t=None, block="mid")  # the expert timestep of the builder's run
    np.testing.assert_array_equal(X, w.data[(None, "mid")][of_split(w, "test")].reshape(-1, 4))


def test_split_never_returns_rows_of_another_split_nor_failed_ones(make_run):
    w = make_run(**COMPLETE)
    run = featurestore.open(w.path).run(w.run.run_id)
    parts = {s: set(run.split_rows(s).tolist()) for s in ("train", "test", "val")}
    assert sum(len(rows) for rows in parts.values()) == len(set().union(*parts.values()))  # pairwise disjoint
    assert set().union(*parts.values()) == set(usable(w))
    assert not set().union(*parts.values()) & set(w.failed)  # rows 1 and 9 failed
    for split, rows in parts.items():
        assert {str(s) for s in w.splits[sorted(rows)]} == {split}
        assert {str(s) for s in run.images.split[sorted(rows)]} == {split}


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_split_pools_as_torch_adaptive_average_pooling(make_run, pool):
    w = make_run(**COMPLETE, blocks={"down0": (3, 5, 5), "mid": (4, 1, 1)})
    run = featurestore.open(w.path).run(w.run.run_id)
    rows = of_split(w, "train")
    X, y = run.split("train", t=10, block="down0", pool=pool)
    stored = torch.from_numpy(w.data[(10, "down0")][rows].astype(np.float32))
    expected = F.adaptive_avg_pool2d(stored, pool).reshape(len(rows), -1).numpy()
    assert X.shape == (len(rows), 3 * pool * pool)
    np.testing.assert_allclose(X, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(y, w.labels[rows])
    small, _ = run.split("train", t=10, block="mid", pool=pool)  # a 1x1 map stays as it is
    np.testing.assert_array_equal(small, w.data[(10, "mid")][rows].reshape(len(rows), 4))


def test_split_refuses_an_unknown_split_naming_the_runs_splits(make_run):
    w = make_run(**COMPLETE)
    run = featurestore.open(w.path).run(w.run.run_id)
    with pytest.raises(StoreError) as err:
        run.split("validation", t=10, block="down0")
    message = str(err.value)
    assert "\n" not in message and "'validation'" in message
    splits, counts = np.unique(w.splits, return_counts=True)  # of the run's 10 images
    assert all(f"{s} ({n})" in message for s, n in zip(splits, counts))
    with pytest.raises(StoreError, match="has no block 'up9'"):
        run.split("train", t=10, block="up9")
    with pytest.raises(ValueError, match="positive size"):
        run.split("train", t=10, block="down0", pool=0)


def test_split_refuses_an_incomplete_run_unless_allowed(make_run):
    w = make_run(splits=SPLITS)  # chunk 1 pending
    run = featurestore.open(w.path).run(w.run.run_id)
    with pytest.raises(IncompleteRunError, match="pending"):
        run.split("train", t=10, block="down0")
    rows = of_split(w, "train")
    assert all(w.chunk_of(r) != 1 for r in rows)
    X, y = run.split("train", t=10, block="down0", allow_incomplete=True)
    np.testing.assert_array_equal(X, w.data[(10, "down0")][rows].reshape(len(rows), -1))
    np.testing.assert_array_equal(y, w.labels[rows])


# -- torch view -----------------------------------------------------------------------------------
def test_feature_dataset_of_a_split_holds_only_that_split(make_run):
    w = make_run(**COMPLETE)
    run = featurestore.open(w.path).run(w.run.run_id)
    train = featurestore.FeatureDataset(run, [(10, "down0")], split="train")
    assert train.rows.tolist() == of_split(w, "train")
    for i, row in enumerate(train.rows):
        x, label = train[i]
        np.testing.assert_array_equal(x.numpy(), w.data[(10, "down0")][row])
        assert label == w.labels[row] and w.splits[row] == "train"
    test_row = of_split(w, "test")[0]
    with pytest.raises(ValueError, match="not of split 'train'"):
        featurestore.FeatureDataset(run, [(10, "down0")], rows=np.array([test_row]), split="train")
    with pytest.raises(StoreError, match="no images of split 'dev'"):
        featurestore.FeatureDataset(run, [(10, "down0")], split="dev")
    assert featurestore.FeatureDataset(run, [(10, "down0")]).rows.tolist() == usable(w)  # no split: all


# -- pandas ---------------------------------------------------------------------------------------
def test_images_to_pandas_is_indexed_by_store_row(make_run):
    w = make_run(**COMPLETE)
    store = featurestore.open(w.path)
    df = store.images.to_pandas()
    assert list(df.columns) == list(IMAGE_COLUMNS) and df.index.name == "store_row"
    assert df.index.tolist() == list(range(w.n + 4)) and str(df["label"].dtype) == "int64"
    assert df["id"].tolist() == [f"im{k:03d}" for k in range(w.n + 4)]  # table row k holds image k
    assert df["split"].tolist() == list(SPLITS)
    run = store.run(w.run.run_id)
    of_run = run.images.to_pandas()
    assert of_run.index.tolist() == run.rows.tolist() and of_run["id"].tolist() == w.ids.tolist()
    assert of_run["label"].tolist() == w.labels.tolist()


# -- xarray ---------------------------------------------------------------------------------------
def test_to_xarray_is_lazy_named_and_equals_numpy(make_run):
    w = make_run(**COMPLETE)
    run = featurestore.open(w.path).run(w.run.run_id)
    rows = w.usable_rows()
    one = run.to_xarray(10, block="down0")
    assert isinstance(one.data, da.Array)  # lazy
    assert one.dims == ("image", "channel", "y", "x") and one.dtype == np.float32
    np.testing.assert_array_equal(one.values, run.numpy(10, "down0", rows))
    np.testing.assert_array_equal(one.values, w.data[(10, "down0")][rows])
    assert one["image"].values.tolist() == rows.tolist()
    assert one["store_row"].values.tolist() == run.rows[rows].tolist()
    assert one["label"].values.tolist() == w.labels[rows].tolist()
    assert one["id"].values.tolist() == w.ids[rows].tolist()
    assert one["split"].values.tolist() == w.splits[rows].tolist()
    assert one["timestep"].item() == 10 and one["block"].item() == "down0"
    train = one.where(one["split"] == "train", drop=True)
    assert train["image"].values.tolist() == of_split(w, "train")

    both = run.to_xarray([10, None], block="mid")
    assert both.dims == ("timestep", "image", "channel", "y", "x") and both.sizes["timestep"] == 2
    np.testing.assert_array_equal(both.values[0], w.data[(10, "mid")][rows])
    np.testing.assert_array_equal(both.values[1], w.data[(None, "mid")][rows])
    assert run.to_xarray(block="mid").dims == both.dims  # t=None: every timestep of the run


def test_to_xarray_refuses_an_incomplete_run_unless_allowed_and_never_reads_pending_chunks(make_run):
    w = make_run()  # chunk 1 pending, with a failure flag written in it
    run = featurestore.open(w.path).run(w.run.run_id)
    with pytest.raises(IncompleteRunError):
        run.to_xarray(10, block="down0")
    part = run.to_xarray(10, block="down0", allow_incomplete=True)
    assert part["image"].values.tolist() == usable(w)
    np.testing.assert_array_equal(part.values, w.data[(10, "down0")][w.usable_rows()])
    with pytest.raises(StoreError, match="no timestep 7"):
        run.to_xarray(7, block="down0")


def test_xarray_open_zarr_on_a_run_group_equals_run_numpy(make_run):
    w = make_run(**COMPLETE)
    run = featurestore.open(w.path).run(w.run.run_id)
    rows = w.usable_rows()
    t10 = xr.open_zarr(w.path / "runs" / run.run_id / "t10", consolidated=False)
    assert t10["down0"].dims == ("image", "down0_channel", "down0_y", "down0_x")
    assert t10["mid"].dims == ("image", "mid_channel", "mid_y", "mid_x")
    for block in ("down0", "mid"):
        np.testing.assert_array_equal(t10[block].values[rows], run.numpy(10, block, rows))
    tnone = xr.open_zarr(w.path, group=f"runs/{run.run_id}/tnone", consolidated=False)
    np.testing.assert_array_equal(tnone["mid"].values[rows], run.numpy(None, "mid", rows))
    group = xr.open_zarr(w.path / "runs" / run.run_id, consolidated=False)
    assert group["rows"].dims == ("image",) and group["done"].dims == ("chunk",)
    np.testing.assert_array_equal(group["rows"].values, run.rows)
    np.testing.assert_array_equal(group["failed"].values.astype(bool), run.failed)
    images = xr.open_zarr(w.path, group="images", consolidated=False)
    assert images["id"].dims == ("store_row",)
    assert [str(v) for v in images["split"].values] == list(SPLITS)


def _drop_dimension_names(root: Path) -> int:
    """Rewrite every zarr.json under `root` without `dimension_names`, as stores written before
    they were stored; returns how many arrays had them."""
    dropped = 0
    for meta in root.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.pop("dimension_names", None) is not None:
            meta.write_text(json.dumps(doc))
            dropped += 1
    return dropped


def test_a_store_written_without_dimension_names_still_reads_everywhere(make_run):
    w = make_run(**COMPLETE)
    assert _drop_dimension_names(w.path) == 7 + 2 * 2 + 5  # images columns, features, run arrays
    store = featurestore.open(w.path)
    run = store.run(w.run.run_id)
    rows = w.usable_rows()
    np.testing.assert_array_equal(run.to_xarray(10, block="down0").values, w.data[(10, "down0")][rows])
    X, _ = run.split("train", t=10, block="down0")
    np.testing.assert_array_equal(X, w.data[(10, "down0")][of_split(w, "train")].reshape(-1, 12))
    assert store.images.to_pandas()["split"].tolist() == list(SPLITS)
    assert "complete" in repr(store)


# -- reprs ----------------------------------------------------------------------------------------
def test_reprs_state_the_key_facts(make_run):
    w = make_run(splits=SPLITS)  # chunk 1 pending
    store = featurestore.open(w.path)
    run = store.run(w.run.run_id)
    pending = sum(1 for r in range(w.n) if w.chunk_of(r) not in w.done_chunks)
    done = w.n - pending - len(w.failed)
    counts = f"{done} done, {len(w.failed)} failed, {pending} pending"

    text = repr(store)
    assert f"'{w.path}'" in text and "read-only" in text and f"{w.n + 4} images, 1 run" in text
    assert all(f in text for f in (w.run.run_id, "tiny", "t=10,none", "blocks=down0,mid", "incomplete", counts))

    text = repr(run)
    assert all(f in text for f in (w.run.run_id, "read-only", "backbone tiny", "dataset toy", f"{w.n} images",
                                   counts, "timesteps: 10, none", "down0 3x2x2", "mid 4x1x1", "float32",
                                   f"{w.chunk_rows} rows per chunk"))
    assert "writable" in repr(featurestore.open(w.path, "a").run(w.run.run_id))

    text = repr(store.images)
    n_classes = len(set(store.images.label.tolist()))
    assert f"{w.n + 4} rows" in text and "toy (14)" in text
    assert "splits: train (7), test (5), val (2)" in text and f"{n_classes} classes" in text


# -- the package ------------------------------------------------------------------------------------
def test_the_public_names_are_documented():
    for name in featurestore.__all__:
        obj = getattr(featurestore, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), name
    assert featurestore.__version__ == featurestore.store.package_version()
    assert featurestore.FeatureDataset is __import__("featurestore.torch_view").torch_view.FeatureDataset


def test_import_featurestore_does_not_import_torch():
    code = ("import sys, featurestore, featurestore.store, featurestore.inspect, featurestore.verify; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
