"""FeatureStore / Run: open, images table, run ids, layout, chunk writing and bookkeeping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from store_builders import BLOCKS, SPEC, TIMESTEPS, age_files, file_stamps, manifest, write_random_chunk

import featurestore.store as store_module
from featurestore.store import (
    FORMAT_VERSION,
    FeatureStore,
    IncompleteRunError,
    Run,
    StoreError,
    run_id_of,
    timestep_key,
)


def _run_kwargs(n=6, chunk_rows=4, dtype="float32", blocks=BLOCKS, timesteps=TIMESTEPS):
    return dict(arrays=blocks, timesteps=list(timesteps), rows=np.arange(n), chunk_rows=chunk_rows,
                dtype=dtype, provenance={"weights": "random"})


@pytest.fixture
def store(store_path):
    s = FeatureStore.open(store_path, "a")
    s.add_images("toy", manifest([f"im{i}" for i in range(6)], [0, 1, 2, 0, 1, 2]))
    return s


# -- open ---------------------------------------------------------------------------------------
def test_open_read_missing_path_raises(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path / "missing.zarr", "r")
    assert not (tmp_path / "missing.zarr").exists()


def test_open_read_plain_directory_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("not zarr")
    with pytest.raises(StoreError):
        FeatureStore.open(tmp_path, "r")


def test_open_append_creates_empty_store(store_path):
    s = FeatureStore.open(store_path, "a")
    assert (store_path / "zarr.json").is_file()
    assert s.group.attrs["format_version"] == FORMAT_VERSION
    assert len(s.images) == 0
    assert s.run_ids() == []
    again = FeatureStore.open(store_path, "r")
    assert again.group.attrs["format_version"] == FORMAT_VERSION
    assert len(again.images) == 0


def test_open_append_existing_store_writes_nothing(store):
    before = age_files(store.url)
    FeatureStore.open(store.url, "a")
    assert file_stamps(store.url) == before


@pytest.mark.parametrize("mode", ["r", "a"])
def test_open_refuses_group_that_is_not_a_feature_store(tmp_path, mode):
    path = tmp_path / "other.zarr"
    g = zarr.open_group(str(path), mode="w")
    g.create_array("weights", shape=(3,), dtype="float32")
    g.attrs["owner"] = "someone else"
    with pytest.raises(StoreError):
        FeatureStore.open(path, mode)
    g = zarr.open_group(str(path), mode="r")
    assert dict(g.attrs) == {"owner": "someone else"}  # nothing was added to the foreign group
    assert sorted(g.keys()) == ["weights"]


@pytest.mark.parametrize("mode", ["r", "a"])
@pytest.mark.parametrize("other_version", [0, FORMAT_VERSION + 1, str(FORMAT_VERSION)])
def test_open_refuses_other_format_version(store_path, mode, other_version):
    FeatureStore.open(store_path, "a")
    zarr.open_group(str(store_path), mode="a").attrs["format_version"] = other_version
    with pytest.raises(StoreError, match="format"):
        FeatureStore.open(store_path, mode)


@pytest.mark.parametrize("mode", ["r", "a"])
def test_open_refuses_zarr_array_path(tmp_path, mode):
    path = tmp_path / "array.zarr"
    zarr.create_array(str(path), shape=(3,), dtype="int32")
    with pytest.raises(StoreError):
        FeatureStore.open(path, mode)


# -- images table ---------------------------------------------------------------------------------
def _table(s: FeatureStore) -> list[tuple]:
    return _tuples(s.images)


def _tuples(t) -> list[tuple]:
    return list(zip(t.dataset.tolist(), t.id.tolist(), t.label.tolist(), t.class_name.tolist(),
                    t.split.tolist(), t.domain.tolist(), t.source.tolist(), strict=True))


def _rows(dataset, m) -> list[tuple]:
    return [(dataset, i, lab, c, s, d, src) for i, lab, c, s, d, src in
            zip(m["id"], m["label"], m["class_name"], m["split"], m["domain"], m["source"], strict=True)]


def test_add_images_returns_row_indices(store_path):
    s = FeatureStore.open(store_path, "a")
    m = manifest(["a", "b", "c"], [2, 0, 1], split="test", domain="sketch")
    rows = s.add_images("toy", m)
    assert rows.tolist() == [0, 1, 2]
    assert _table(s) == _rows("toy", m)


def test_add_overlapping_manifest_reuses_rows_and_appends_new(store_path):
    s = FeatureStore.open(store_path, "a")
    first = manifest(["a", "b", "c", "d"], [0, 1, 0, 1])
    s.add_images("toy", first)
    second = manifest(["c", "x", "a", "y", "d"], [0, 3, 0, 4, 1])
    rows = s.add_images("toy", second)
    assert rows.tolist() == [2, 4, 0, 5, 3]
    x_y = manifest(["x", "y"], [3, 4])
    t = s.images
    assert _tuples(t) == _rows("toy", first) + _rows("toy", x_y)
    # every returned row points at the manifest's image
    assert t.id[rows].tolist() == second["id"]
    assert t.label[rows].tolist() == second["label"]
    # the same manifest again adds nothing, and the table persists
    assert s.add_images("toy", second).tolist() == rows.tolist()
    assert _table(FeatureStore.open(store_path, "r")) == _tuples(t)


def test_same_id_in_another_dataset_is_another_image(store_path):
    s = FeatureStore.open(store_path, "a")
    s.add_images("mnist", manifest(["0001", "0002"], [1, 2]))
    rows = s.add_images("cifar", manifest(["0002", "0001"], [5, 6]))
    assert rows.tolist() == [2, 3]
    assert _table(s) == _rows("mnist", manifest(["0001", "0002"], [1, 2])) + _rows(
        "cifar", manifest(["0002", "0001"], [5, 6]))


def test_known_image_with_different_metadata_is_refused(store_path):
    s = FeatureStore.open(store_path, "a")
    s.add_images("toy", manifest(["a", "b-17", "c"], [0, 1, 0]))
    before = _table(s)
    changes = [("label", 9), ("class_name", "zebra"), ("split", "val"), ("domain", "cartoon"),
               ("source", "elsewhere.png")]
    for column, value in changes:
        changed = manifest(["new1", "b-17", "new2"], [3, 1, 4])
        changed[column][1] = value
        with pytest.raises(StoreError, match="b-17") as err:
            s.add_images("toy", changed)
        assert column in str(err.value), column
    assert _table(s) == before  # refused as a whole: no new row was appended


def test_label_as_string_of_same_number_is_the_same_image(store_path):
    s = FeatureStore.open(store_path, "a")
    s.add_images("toy", manifest(["a"], [3]))
    m = manifest(["a"], [3])
    m["label"] = ["3"]
    assert s.add_images("toy", m).tolist() == [0]


def test_string_columns_are_numpy_unicode(store_path):
    s = FeatureStore.open(store_path, "a")
    empty = s.images
    s.add_images("toy", manifest(["a", "bb"], [0, 1]))
    for table in (empty, s.images, FeatureStore.open(store_path, "r").images):
        for column in ("dataset", "id", "class_name", "split", "domain", "source"):
            values = getattr(table, column)
            assert type(values) is np.ndarray
            assert values.dtype.kind == "U", (column, values.dtype)
        assert table.label.dtype == np.int64
    assert s.images.id.tolist() == ["a", "bb"]


def test_id_repeated_within_one_manifest_is_one_image(store_path):
    s = FeatureStore.open(store_path, "a")
    try:
        rows = s.add_images("toy", manifest(["a", "b", "a"], [0, 1, 0]))
    except StoreError:
        return  # refusing the manifest is fine too
    assert rows.tolist() == [0, 1, 0]
    assert s.images.id.tolist() == ["a", "b"]


# -- run ids --------------------------------------------------------------------------------------
def test_run_id_ignores_key_order():
    a = {"backbone": "sd15", "timesteps": [10, 100], "pool": {"down0": 2, "mid": 1}, "seed": 0}
    b = {"seed": 0, "pool": {"mid": 1, "down0": 2}, "timesteps": [10, 100], "backbone": "sd15"}
    assert list(a) != list(b)
    assert run_id_of(a) == run_id_of(b)
    assert len(run_id_of(a)) == 16
    int(run_id_of(a), 16)  # hex


@pytest.mark.parametrize(
    "key, value",
    [("backbone", "sd21"), ("timesteps", [10, 101]), ("timesteps", [100, 10]), ("pool", {"down0": 2, "mid": 2}),
     ("seed", 1), ("seed", "0"), ("prompt", None), ("noise", "ddim-inversion")],
)
def test_run_id_changes_with_any_value(key, value):
    spec = {"backbone": "sd15", "timesteps": [10, 100], "pool": {"down0": 2, "mid": 1}, "seed": 0, "noise": "ddpm"}
    changed = {**spec, key: value}
    assert run_id_of(changed) != run_id_of(spec)


def test_create_run_same_spec_returns_existing_run_and_writes_nothing(make_run):
    w = make_run()
    status = w.run.status()
    before = age_files(w.path)
    same_spec_other_order = dict(reversed(list(SPEC.items())))
    run = FeatureStore.open(w.path, "a").create_run(same_spec_other_order, **_run_kwargs(n=w.n))
    assert file_stamps(w.path) == before
    assert run.run_id == w.run.run_id
    assert w.store.run_ids() == [w.run.run_id]
    assert run.status() == status
    usable = w.usable_rows()
    np.testing.assert_array_equal(run.numpy(10, "down0", usable), w.data[(10, "down0")][usable])


def test_create_run_with_changed_spec_makes_a_second_run(make_run):
    w = make_run()
    other = w.store.create_run({**SPEC, "seed": 1}, **_run_kwargs(n=w.n))
    assert other.run_id != w.run.run_id
    assert other.run_id == run_id_of({**SPEC, "seed": 1})
    assert w.store.run_ids() == sorted([w.run.run_id, other.run_id])
    status = other.status()
    assert (status.done, status.failed, status.pending) == (0, 0, w.n)
    # the first run is untouched
    first = FeatureStore.open(w.path, "r").run(w.run.run_id)
    usable = w.usable_rows()
    for key, expected in w.data.items():
        np.testing.assert_array_equal(first.numpy(*key, usable), expected[usable])
    assert first.done_chunks().tolist() == [True, False, True]


def test_run_records_spec_blocks_timesteps_and_provenance(make_run):
    w = make_run()
    run = FeatureStore.open(w.path, "r").run(w.run.run_id)
    assert run.run_id == run_id_of(SPEC)
    assert run.spec == SPEC
    assert run.blocks == {b: list(chw) for b, chw in BLOCKS.items()}
    assert run.timesteps == list(TIMESTEPS)
    assert run.chunk_rows == 4
    assert run.provenance["backbone"] == {"name": "tiny"}
    assert run.provenance["package_version"] == store_module.package_version()
    assert run.attrs["created"] and run.attrs["finished"] is None


def test_interrupted_run_creation_is_refused_then_rebuilt(make_run):
    w = make_run()
    del w.run.group.attrs["created"]
    store = FeatureStore.open(w.path, "a")
    with pytest.raises(StoreError, match="never fully created"):
        store.run(w.run.run_id)
    with pytest.raises(StoreError):
        Run(store.group["runs"][w.run.run_id], store)
    run = store.create_run(SPEC, **_run_kwargs(n=w.n))
    assert run.run_id == w.run.run_id
    assert "created" in run.group.attrs
    assert run.done_chunks().tolist() == [False, False, False]
    assert run.status().pending == w.n and run.status().failed == 0
    assert not run.failed.any()
    with pytest.raises(IncompleteRunError):
        run.numpy(10, "down0")
    assert store.run(run.run_id).run_id == run.run_id  # usable again


def test_hand_made_run_group_is_rebuilt(store):
    run_id = run_id_of(SPEC)
    zarr.open_group(str(store.url), mode="a").require_group("runs").require_group(run_id).attrs["spec"] = SPEC
    with pytest.raises(StoreError):
        store.run(run_id)
    with pytest.raises(StoreError):
        Run(store.group["runs"][run_id], store)
    run = store.create_run(SPEC, **_run_kwargs(n=6, chunk_rows=4))
    assert run.run_id == run_id
    assert run.array(10, "down0").shape == (6, *BLOCKS["down0"])
    assert FeatureStore.open(store.url, "r").run(run_id).n_chunks == 2


# -- layout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_arrays_have_shape_chunks_and_dtype(make_run, dtype):
    w = make_run(n=10, chunk_rows=4, dtype=dtype)
    for t in TIMESTEPS:
        for block, chw in BLOCKS.items():
            arr = w.run.array(t, block)
            assert arr.shape == (10, *chw)
            assert arr.chunks == (4, *chw)
            assert arr.dtype == np.dtype(dtype)
    assert w.run.n_chunks == 3
    assert [w.run.chunk_slice(c) for c in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert [w.run.chunk_len(c) for c in range(3)] == [4, 4, 2]
    assert len(w.run) == 10


def test_array_path_is_where_the_array_is(make_run):
    w = make_run()
    for t in TIMESTEPS:
        for block in BLOCKS:
            path = w.run.array_path(t, block)
            assert (w.path / path / "zarr.json").is_file()
            arr = zarr.open_array(str(w.path), path=path, mode="r")
            assert arr.shape == w.data[(t, block)].shape
            np.testing.assert_array_equal(arr[:], w.data[(t, block)])
            assert zarr.open_group(str(w.path), mode="r")[path].shape == arr.shape


def test_timestep_none_maps_to_tnone(make_run):
    assert timestep_key(None) == "tnone"
    assert timestep_key(10) == "t10"
    assert timestep_key(np.int64(300)) == "t300"
    w = make_run()
    assert w.run.array_path(None, "mid") == f"runs/{w.run.run_id}/tnone/mid"
    assert w.run.array_path(10, "mid") == f"runs/{w.run.run_id}/t10/mid"
    assert sorted(w.run.group.group_keys()) == ["t10", "tnone"]


def test_unknown_block_lists_the_valid_ones(make_run):
    w = make_run()
    with pytest.raises(StoreError, match="up3") as err:
        w.run.array(10, "up3")
    assert "down0" in str(err.value) and "mid" in str(err.value)
    with pytest.raises(StoreError):
        w.run.numpy(10, "up3")


@pytest.mark.parametrize("t", [11, 0, "10"])
def test_unknown_timestep_lists_the_valid_ones(make_run, t):
    w = make_run()
    with pytest.raises(StoreError, match="timestep") as err:
        w.run.array(t, "mid")
    assert "10" in str(err.value) and "none" in str(err.value)


def test_run_rows_map_to_images(make_run):
    w = make_run()
    run = w.run
    assert run.rows.dtype == np.int64
    images = run.images
    assert images.id.tolist() == w.ids.tolist()
    assert images.label.tolist() == w.labels.tolist()
    assert images.dataset.tolist() == ["toy"] * w.n
    assert images.source.tolist() == [f"img/{i}.png" for i in w.ids]
    labels = run.labels
    assert labels.dtype == np.int64
    assert labels.tolist() == w.labels.tolist()


# -- write_chunk / status ------------------------------------------------------------------------
def test_status_counts_done_failed_pending(make_run):
    w = make_run()  # chunks 0, 2 done (6 rows), rows 1 and 9 failed, row 5 flagged in undone chunk 1
    status = w.run.status()
    assert status.images == 10
    assert status.done == 4
    assert status.failed == 2
    assert status.pending == 4
    assert status.failed_ids == {w.ids[1]: "decode error: truncated file", w.ids[9]: "CUDA out of memory"}
    assert w.ids[5] not in status.failed_ids
    assert w.run.failed[5]  # the raw flag is there, but an undone chunk does not count


def test_rows_done(make_run):
    w = make_run()
    assert w.run.done_chunks().tolist() == [True, False, True]
    assert w.run.rows_done().tolist() == [True] * 4 + [False] * 4 + [True] * 2


def test_status_after_the_last_chunk_and_of_an_empty_run(make_run):
    w = make_run()
    # finishing chunk 1 replaces the stale flag of row 5 with this chunk's own failures
    write_random_chunk(w, 1, np.random.default_rng(3), {6: "bad"})
    status = w.run.status()
    assert (status.images, status.done, status.failed, status.pending) == (10, 7, 3, 0)
    assert status.failed_ids == {w.ids[1]: "decode error: truncated file", w.ids[6]: "bad",
                                 w.ids[9]: "CUDA out of memory"}
    assert w.run.failed.tolist() == [r in (1, 6, 9) for r in range(10)]
    untouched = w.store.create_run({**SPEC, "seed": 2}, **_run_kwargs(n=9, chunk_rows=3))
    s = untouched.status()
    assert (s.images, s.done, s.failed, s.pending, s.failed_ids) == (9, 0, 0, 9, {})


def test_errors_column(make_run):
    w = make_run()
    errors = w.run.errors
    assert errors.dtype.kind == "U"
    expected = [""] * 10
    expected[1], expected[9], expected[5] = "decode error: truncated file", "CUDA out of memory", "killed"
    assert errors.tolist() == expected


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_numpy_returns_what_was_written(make_run, dtype):
    w = make_run(dtype=dtype)  # usable rows 0, 2, 3, 8 (chunk 1 is not done, rows 1 and 9 failed)
    rng = np.random.default_rng(1)
    usable = w.usable_rows()
    assert usable.tolist() == [0, 2, 3, 8]
    for (t, block), expected in w.data.items():
        assert np.abs(expected[usable]).min() > 0  # real data, not the fill value
        got = w.run.numpy(t, block, usable)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, expected[usable])
        np.testing.assert_array_equal(w.run.numpy(t, block, slice(2, 4)), expected[2:4])
        np.testing.assert_array_equal(w.run.numpy(t, block, slice(8, 9)), expected[8:9])
        index = np.sort(rng.choice(usable, 3, replace=False))
        np.testing.assert_array_equal(w.run.numpy(t, block, index), expected[index])
        unsorted = np.array([8, 0, 3, 2])
        np.testing.assert_array_equal(w.run.numpy(t, block, unsorted), expected[unsorted])
    # rows of the undone chunk and failed rows are refused, not read as the fill value
    with pytest.raises(IncompleteRunError):
        w.run.numpy(10, "down0", slice(4, 8))
    with pytest.raises(StoreError, match="failed"):
        w.run.numpy(10, "down0", np.array([0, 1]))


def test_numpy_after_reopening(make_run):
    w = make_run()
    run = FeatureStore.open(w.path, "r").run(w.run.run_id)
    usable = w.usable_rows()
    for key, expected in w.data.items():
        np.testing.assert_array_equal(run.numpy(*key, usable), expected[usable])


def test_rewriting_a_chunk_replaces_it(make_run):
    w = make_run()
    rng = np.random.default_rng(5)
    features = {key: rng.standard_normal((4, *e.shape[1:])).astype(np.float32) for key, e in w.data.items()}
    w.run.write_chunk(0, features, np.zeros(4, bool), [""] * 4)
    for key, expected in w.data.items():
        expected[:4] = features[key]
        np.testing.assert_array_equal(w.run.numpy(*key, w.run.usable_rows(allow_incomplete=True)),
                                      expected[[0, 1, 2, 3, 8]])
    status = w.run.status()
    assert (status.done, status.failed, status.pending) == (5, 1, 4)
    assert w.run.errors[:4].tolist() == [""] * 4


def test_dask_view(make_run):
    w = make_run()
    for key, expected in w.data.items():
        lazy = w.run.dask(*key)
        assert lazy.shape == expected.shape
        assert lazy.dtype == expected.dtype
        assert lazy.chunks == ((4, 4, 2), *((c,) for c in expected.shape[1:]))
        np.testing.assert_array_equal(lazy[:4].compute(), expected[:4])  # failed row 1 reads as stored: zeros
        np.testing.assert_array_equal(lazy[8:].mean(axis=(1, 2, 3)).compute(), expected[8:].mean(axis=(1, 2, 3)))
        with pytest.raises(IncompleteRunError):
            lazy.compute()  # chunk 1 is not done


def _fake_clock(monkeypatch):
    ticks = iter(f"2030-01-01T00:00:{s:02d}+0000" for s in range(60))
    monkeypatch.setattr(store_module, "_now", lambda: next(ticks))


def test_mark_finished_sets_time_once(make_run, monkeypatch):
    w = make_run()
    _fake_clock(monkeypatch)
    assert w.run.attrs["finished"] is None
    w.run.mark_finished()
    first = w.run.attrs["finished"]
    assert first == "2030-01-01T00:00:00+0000"
    w.run.mark_finished()
    assert w.run.attrs["finished"] == first
    reopened = FeatureStore.open(w.path, "a").run(w.run.run_id)
    assert reopened.attrs["finished"] == first
    reopened.mark_finished()
    assert FeatureStore.open(w.path, "r").run(w.run.run_id).attrs["finished"] == first


def test_record_session_appends(make_run, monkeypatch):
    w = make_run()
    _fake_clock(monkeypatch)
    assert "sessions" not in w.run.attrs
    w.run.record_session({"chunks": 2, "seconds": {"read": 0.5}})
    w.run.record_session({"chunks": 1})
    reopened = FeatureStore.open(w.path, "a").run(w.run.run_id)
    reopened.record_session({"chunks": 0})
    sessions = FeatureStore.open(w.path, "r").run(w.run.run_id).attrs["sessions"]
    assert sessions == [
        {"ended": "2030-01-01T00:00:00+0000", "chunks": 2, "seconds": {"read": 0.5}},
        {"ended": "2030-01-01T00:00:01+0000", "chunks": 1},
        {"ended": "2030-01-01T00:00:02+0000", "chunks": 0},
    ]
    json.dumps(sessions)


def test_record_session_through_two_handles_keeps_both(make_run):
    w = make_run()
    first = w.store.run(w.run.run_id)
    second = w.store.run(w.run.run_id)
    first.record_session({"worker": 1})
    second.record_session({"worker": 2})
    sessions = FeatureStore.open(w.path, "r").run(w.run.run_id).attrs["sessions"]
    assert [s["worker"] for s in sessions] == [1, 2]


def test_a_missing_timestep_is_named_as_the_cli_spells_it(tmp_path):
    store = FeatureStore.open(str(tmp_path / "s.zarr"), mode="a")
    rows = store.add_images("x", {"id": ["a"], "label": [0], "class_name": ["c"], "split": ["train"], "domain": ["d"],
                                  "source": ["a"]})
    run = store.create_run({"name": "t"}, arrays={"b": (1, 1, 1)}, timesteps=[10, 20], rows=rows, chunk_rows=1,
                           dtype="float16", provenance={})
    with pytest.raises(StoreError, match=r"^run \w+ has no timestep none; timesteps: 10, 20$"):
        run.array(None, "b")
