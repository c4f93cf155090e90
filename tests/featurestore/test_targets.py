"""Targets in the store (featurestore/targets.py): written once per geometry, read per run position."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import pipelines.extract.runner as runner
from cli.main import app
from data_manifests.manifest import Manifest
from featurestore.store import FeatureStore, StoreError
from featurestore.targets import RowTargets, describe_targets, run_targets, write_pairs, write_targets
from pipelines.extract.runner import ExtractConfig, extract

S = 4
MASK_INFO = {"mask": {"decode": "png-index", "classes": ["background", "digit"], "ignore_index": 255}}


def make_store(tmp_path, n=5, dataset="toy", resize=None):
    store = FeatureStore.open(str(tmp_path / "s.zarr"), mode="a")
    ids = [f"img{i}" for i in range(n)]
    rows = store.add_images(dataset, {"id": ids, "label": [0] * n, "class_name": ["a"] * n, "split": ["train"] * n,
                                      "domain": ["photo"] * n, "source": ids})
    spec = {"dataset": dataset, "backbone": "toy", **({"resize": resize} if resize else {})}
    run = store.create_run(spec, arrays={"b": (1, 1, 1)}, timesteps=[0], rows=rows, chunk_rows=2, dtype="float32",
                           provenance={"backbone": {"input": {"size": S}}})
    return store, run, rows


def mask_of(k: int) -> np.ndarray:
    return (np.arange(S * S).reshape(S, S) % 3 == k % 3).astype(np.uint8) * (k % 2)


def test_masks_round_trip_once_per_geometry(tmp_path):
    store, run, rows = make_store(tmp_path)
    calls = []

    def load(k):
        calls.append(k)
        if k == 3:
            raise OSError("cannot read mask img3.png")
        return RowTargets(image_size=(10 + k, 8), geometry=np.array([0.5, -1.0, 0.5, 0.0]), mask=mask_of(k))

    assert write_targets(store, "toy", rows, resize="crop", size=S, info=MASK_INFO, load=load) == 5
    assert write_targets(store, "toy", rows, resize="crop", size=S, info=MASK_INFO, load=load) == 0
    assert calls == [0, 1, 2, 3, 4]  # the second call read nothing: every row was done

    tg = run_targets(FeatureStore.open(store.url).run(run.run_id))
    assert (tg.size, tg.key, tg.classes, tg.ignore_index) == (S, "crop-4", ["background", "digit"], 255)
    assert tg.usable_rows().tolist() == [0, 1, 2, 4]
    assert tg.errors == {"img3": "OSError: cannot read mask img3.png"}
    masks = tg.masks(np.array([4, 0, 2]))
    assert masks.dtype == np.uint8 and masks.shape == (3, S, S)
    for got, k in zip(masks, [4, 0, 2]):
        assert np.array_equal(got, mask_of(k))
    assert tg.image_size(np.array([1, 4])).tolist() == [[11, 8], [14, 8]]
    assert tg.geometry(np.array([0])).tolist() == [[0.5, -1.0, 0.5, 0.0]]
    with pytest.raises(StoreError, match="could not be read"):
        tg.masks(np.array([3]))
    # once the file is fixed, --retry-failed reads that row again (only it)
    calls.clear()
    fixed = lambda k: RowTargets((10 + k, 8), np.array([0.5, -1.0, 0.5, 0.0]), mask=mask_of(k))  # noqa: E731
    assert write_targets(store, "toy", rows, resize="crop", size=S, info=MASK_INFO, load=fixed, retry_failed=True) == 1
    tg = run_targets(run)
    assert tg.usable_rows().tolist() == [0, 1, 2, 3, 4] and tg.errors == {}
    assert np.array_equal(tg.masks(np.array([3]))[0], mask_of(3))
    with pytest.raises(StoreError, match="holds no depth targets"):
        tg.depth(np.array([0]))
    assert [a["path"] for a in describe_targets(store)] == [
        "targets/crop-4/done", "targets/crop-4/error", "targets/crop-4/failed", "targets/crop-4/geometry",
        "targets/crop-4/image_size", "targets/crop-4/mask"]
    assert {a["path"]: (a["shape"], a["dtype"]) for a in describe_targets(store)}["targets/crop-4/mask"] == \
        ([5, S, S], "uint8")


def test_rows_without_targets_and_other_geometries(tmp_path):
    store, run, rows = make_store(tmp_path, resize="squash")
    with pytest.raises(StoreError, match="has no targets .* at squash-4"):
        run_targets(run)
    # crop targets do not serve a squash run
    write_targets(store, "toy", rows, resize="crop", size=S, info=MASK_INFO,
                  load=lambda k: RowTargets((S, S), np.array([1.0, 0, 1, 0]), mask=mask_of(k)))
    with pytest.raises(StoreError, match="squash-4"):
        run_targets(run)
    depth = {"depth": {"decode": "png-mm", "unit": "m", "max_depth": 10.0, "eval_crop": "eigen"}}
    plane = np.full((S, S), 2.5, dtype=np.float32)
    write_targets(store, "toy", rows[:3], resize="squash", size=S, info=depth,
                  load=lambda k: RowTargets((S, S), np.array([1.0, 0, 1, 0]), depth=plane if k != 1 else None))
    tg = run_targets(run)
    assert tg.depth_info == {"unit": "m", "max_depth": 10.0, "eval_crop": "eigen"}
    assert tg.depth(np.array([0])).tolist() == [plane.tolist()]
    assert not tg.depth(np.array([1])).any()  # a row without a depth map: all invalid (0)
    with pytest.raises(StoreError, match="of 1 of the 1 images asked for are not written"):
        tg.depth(np.array([4]))


def test_another_dataset_with_other_classes_is_refused(tmp_path):
    store, _, rows = make_store(tmp_path)
    load = lambda k: RowTargets((S, S), np.array([1.0, 0, 1, 0]), mask=mask_of(k))  # noqa: E731
    write_targets(store, "toy", rows, resize="crop", size=S, info=MASK_INFO, load=load)
    other = {"mask": {"classes": ["background", "cat"], "ignore_index": 255}}
    with pytest.raises(StoreError, match=r"mask targets at crop-4 are .*'digit'.* dataset 'voc' has .*'cat'"):
        write_targets(store, "voc", rows, resize="crop", size=S, info=other, load=load)
    # a decoder giving a wrongly sized plane fails that row only, with the shapes in its message
    more = store.add_images("toy", {"id": ["late"], "label": [0], "class_name": ["a"], "split": ["train"],
                                    "domain": ["photo"], "source": ["late"]})
    write_targets(store, "toy", more, resize="crop", size=S, info=MASK_INFO,
                  load=lambda k: RowTargets((S, S), np.array([1.0, 0, 1, 0]), mask=np.zeros((S, S + 1), np.uint8)))
    late = store.create_run({"dataset": "toy", "late": True}, arrays={"b": (1, 1, 1)}, timesteps=[0], rows=more,
                            chunk_rows=1, dtype="float32", provenance={"backbone": {"input": {"size": S}}})
    assert run_targets(late).errors == {"late": "ValueError: its mask has shape (4, 5), not (4, 4)"}
    with pytest.raises(StoreError, match="ignore index 0"):
        write_targets(store, "toy", rows, resize="crop", size=S,
                      info={"mask": {"classes": ["background", "digit"], "ignore_index": 0}}, load=load)


def test_keypoints_boxes_and_pairs(tmp_path):
    store, run, rows = make_store(tmp_path, n=4)
    points = {0: [[1.5, 2.5, 1], [3.0, 4.0, 0]], 1: [[5, 6, 1], [7, 8, 1], [9, 10, 1]], 2: None, 3: [[0.5, 0.5, 1]]}
    info = {"keypoints": {"decode": "json", "names": None}, "bbox": {"decode": "json"}}

    def load(k):
        kp = None if points[k] is None else np.asarray(points[k], dtype=np.float32)
        box = None if k == 2 else np.array([k, k, k + 10, k + 20], dtype=np.float32)
        return RowTargets((20, 30), np.array([1.0, 0, 1, 0]), keypoints=kp, bbox=box)

    # rows 0 and 1 first, so the keypoint array grows from 2 to 3 points after row 0 is stored
    write_targets(store, "toy", rows[:1], resize="crop", size=S, info=info, load=load)
    write_targets(store, "toy", rows, resize="crop", size=S, info=info, load=lambda k: load(k))
    tg = run_targets(run)
    kp = tg.keypoints(np.array([0, 1, 3]))
    assert kp.shape == (3, 3, 3)
    assert kp[0, :2].tolist() == points[0] and np.isnan(kp[0, 2, :2]).all() and kp[0, 2, 2] == 0
    assert kp[1].tolist() == points[1]
    assert kp[2, 0].tolist() == points[3][0] and (kp[2, 1:, 2] == 0).all()
    with pytest.raises(StoreError, match="1 of the 2 images asked for have no keypoints"):
        tg.keypoints(np.array([0, 2]))
    assert tg.bbox(np.array([3, 1])).tolist() == [[3, 3, 13, 23], [1, 1, 11, 21]]
    with pytest.raises(StoreError, match="have no bounding box"):
        tg.bbox(np.array([2]))

    assert tg.pairs() == []
    # images of another dataset added later, with masks only: no keypoints or boxes of theirs are read
    n = 2
    more = store.add_images("other", {"id": ["p", "q"], "label": [0] * n, "class_name": ["a"] * n,
                                      "split": ["train"] * n, "domain": ["photo"] * n, "source": ["p", "q"]})
    write_targets(store, "other", more, resize="crop", size=S, info=MASK_INFO,
                  load=lambda k: RowTargets((S, S), np.array([1.0, 0, 1, 0]), mask=mask_of(k)))
    other = store.create_run({"dataset": "other"}, arrays={"b": (1, 1, 1)}, timesteps=[0], rows=more, chunk_rows=2,
                             dtype="float32", provenance={"backbone": {"input": {"size": S}}})
    with pytest.raises(StoreError, match="2 of the 2 images asked for have no keypoints"):
        run_targets(other).keypoints(np.array([0, 1]))
    assert np.array_equal(run_targets(other).masks(np.array([1]))[0], mask_of(1))
    assert write_pairs(store, "toy", [(rows[0], rows[1], "cat", "test"), (rows[3], rows[0], "dog", "test")]) == 2
    assert write_pairs(store, "toy", [(rows[0], rows[1], "cat", "test")]) == 0  # already there
    assert write_pairs(store, "other", [(rows[0], rows[1], "cat", "test")]) == 1  # another dataset's: not this run's
    assert run_targets(run).pairs() == [(0, 1, "cat", "test"), (3, 0, "dog", "test")]


# -- through `extract` ---------------------------------------------------------------------------

def toy_manifest(root, n=4, w=40, h=30, broken=()):
    """Grey w x h images with VOC-style index masks (classes 0..2, 255 on a border), a bbox
    inline, and one pair; rows in `broken` name a mask file that does not exist."""
    rng = np.random.default_rng(0)
    masks = {}
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L").save(root / f"im{i}.png")
        mask = rng.integers(0, 3, (h, w), dtype=np.uint8)
        mask[0] = 255
        masks[i] = mask
        Image.fromarray(mask, mode="L").save(root / f"m{i}.png")
    ids = tuple(f"im{i}.png" for i in range(n))
    manifest = Manifest(
        name="toy-seg", root=root, classes=("a",), ids=ids, sources=ids, labels=(0,) * n, splits=("test",) * n,
        domains=("photo",) * n,
        targets={"mask": tuple("missing.png" if i in broken else f"m{i}.png" for i in range(n)),
                 "bbox": tuple(f"inline:[{i}, 1, {i + 20}, 25]" for i in range(n))},
        target_info={"mask": {"decode": "voc-palette", "classes": ["bg", "x", "y"], "ignore_index": 255},
                     "bbox": {"decode": None}},
        pairs=(("im0.png", "im2.png", "x", "test"),),
    )
    return manifest, masks


def test_extract_stores_the_masks_at_the_images_geometry(tmp_path, monkeypatch):
    manifest, masks = toy_manifest(tmp_path, broken=(1,))
    monkeypatch.setattr(runner, "_load_manifest", lambda cfg: manifest)
    store = tmp_path / "s.zarr"
    cfg = ExtractConfig(store=str(store), backbone="ddpm-mnist", manifest=tmp_path / "unused.csv", timesteps=[10],
                        blocks=["block0"], progress=False, chunk_rows=2)
    result = extract(cfg)
    assert result.failed == {}  # a target that cannot be read fails the targets, not the image
    run = FeatureStore.open(str(store)).run(result.run_id)
    assert "resize" not in run.spec  # crop, the default, leaves the spec (and old run ids) as they were
    tg = run_targets(run)
    assert tg.key == "crop-28" and tg.usable_rows().tolist() == [0, 2, 3]
    assert "missing.png" in tg.errors["im1.png"]
    # 40 x 30 to 28: 37 x 28 (round(40 * 28 / 30)), crop from x = (37 - 28) // 2 = 4; each input
    # pixel centre traced back to the original pixel that holds it
    cols = np.floor((np.arange(28) + 0.5 + 4) * 40 / 37).astype(int)
    rows = np.floor((np.arange(28) + 0.5) * 30 / 28).astype(int)
    for got, k in zip(tg.masks(np.array([3, 0])), [3, 0]):
        assert np.array_equal(got, masks[k][np.ix_(rows, cols)])
    assert np.allclose(tg.geometry(np.array([0])), [[37 / 40, -4, 28 / 30, 0]])
    assert tg.image_size(np.array([2])).tolist() == [[40, 30]]
    assert tg.bbox(np.array([2])).tolist() == [[2, 1, 22, 25]]
    assert tg.pairs() == [(0, 2, "x", "test")]

    squash = extract(replace(cfg, resize="squash"))
    run = FeatureStore.open(str(store)).run(squash.run_id)
    assert run.spec["resize"] == "squash" and squash.run_id != result.run_id
    tg = run_targets(run)
    assert tg.key == "squash-28"
    cols = np.floor((np.arange(28) + 0.5) * 40 / 28).astype(int)
    assert np.array_equal(tg.masks(np.array([2]))[0], masks[2][np.ix_(rows, cols)])

    doc = CliRunner().invoke(app, ["inspect", str(store), "--json"])
    listed = {a["path"]: a for a in json.loads(doc.stdout)["targets"]}
    assert listed["targets/crop-28/mask"]["shape"] == [4, 28, 28] and listed["targets/crop-28/mask"]["dtype"] == "uint8"
    assert listed["targets/squash-28/geometry"]["shape"] == [4, 4] and listed["targets/bbox"]["shape"] == [4, 4]

