"""Dense-prediction builders on tiny layouts written here: each dataset's label convention checked
against values worked out by hand (VOC 255, ADE reduce-zero, Cityscapes id -> train id, COCO-Stuff
171, NYU millimetres) or computed directly with numpy, and a misnamed folder refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_manifests.builders import BUILDERS, DEMO_DIR
from data_manifests.manifest import ManifestError, list_datasets, load_dataset
from data_manifests.sources import load_image
from data_manifests.targets import load_target

DENSE = ("voc2012", "ade20k", "cityscapes", "coco-stuff", "nyu-depth-v2", "mnist-seg", "mnist-seg-demo",
         "quickdraw-seg")


def photo(path: Path, size: tuple[int, int] = (3, 2), suffix_mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(suffix_mode, size, (90, 120, 30)).save(path)


def label_png(path: Path, values: list[list[int]], palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.array(values, dtype=np.uint8), mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
    image.save(path)


def refused_in_one_line(build, match: str) -> str:
    with pytest.raises(ManifestError, match=match) as e:
        build()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_every_dense_dataset_is_listed_and_registered():
    assert set(DENSE) <= set(list_datasets())
    assert {"voc2012", "ade20k", "cityscapes", "coco_stuff", "nyu_depth_v2", "mnist_seg", "mnist_seg_demo",
            "quickdraw_seg"} <= set(BUILDERS)


def write_voc(root: Path) -> None:
    for id_, values in (("2007_000032", [[0, 1, 255], [15, 255, 0]]), ("2007_000033", [[20, 0, 0], [0, 0, 0]]),
                        ("2007_000039", [[255, 255, 255], [0, 0, 0]])):
        photo(root / "JPEGImages" / f"{id_}.jpg")
        label_png(root / "SegmentationClass" / f"{id_}.png", values, palette=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000039\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")


def test_voc2012_keeps_palette_indices_and_the_255_boundary(tmp_path):
    write_voc(tmp_path)
    m = load_dataset("voc2012", data_root=tmp_path)
    assert m.sources == ("JPEGImages/2007_000032.jpg", "JPEGImages/2007_000039.jpg", "JPEGImages/2007_000033.jpg")
    assert m.splits == ("train", "train", "val")
    assert m.targets["mask"][0] == "SegmentationClass/2007_000032.png"
    info = m.target_info["mask"]
    assert len(info["classes"]) == 21 and info["classes"][0] == "background" and info["classes"][20] == "tvmonitor"
    assert info["ignore_index"] == 255
    assert load_target(m, "mask", 0).tolist() == [[0, 1, 255], [15, 255, 0]]
    assert load_target(m, "mask", 2).tolist() == [[20, 0, 0], [0, 0, 0]]
    assert load_target(m, "mask", 0).shape == np.asarray(load_image(*m.path_of(0))).shape[:2]


def test_voc2012_misnamed_folder_and_missing_mask(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "SegmentationClass").rename(tmp_path / "SegmentationClassAug")
    message = refused_in_one_line(lambda: load_dataset("voc2012", data_root=tmp_path), "SegmentationClass does not exist")
    assert "expected the VOC2012 folder" in message
    (tmp_path / "SegmentationClassAug").rename(tmp_path / "SegmentationClass")
    (tmp_path / "SegmentationClass" / "2007_000033.png").unlink()
    refused_in_one_line(lambda: load_dataset("voc2012", data_root=tmp_path), r"1 image\(s\) without .*2007_000033")


def write_ade(root: Path) -> None:
    base = root / "ADEChallengeData2016"
    photo(base / "images" / "training" / "ADE_train_00000001.jpg")
    label_png(base / "annotations" / "training" / "ADE_train_00000001.png", [[0, 1, 2], [150, 75, 0]])
    photo(base / "images" / "validation" / "ADE_val_00000001.jpg")
    label_png(base / "annotations" / "validation" / "ADE_val_00000001.png", [[3, 3, 3], [0, 0, 150]])


def test_ade20k_reduces_zero_label(tmp_path):
    write_ade(tmp_path)
    m = load_dataset("ade20k", data_root=tmp_path)
    assert m.sources == ("ADEChallengeData2016/images/training/ADE_train_00000001.jpg",
                         "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg")
    assert m.splits == ("train", "val")
    classes = m.target_info["mask"]["classes"]
    assert len(classes) == 150 and classes[:3] == ["wall", "building", "sky"] and classes[7] == "bed"
    assert classes[149] == "flag"
    assert load_target(m, "mask", 0).tolist() == [[255, 0, 1], [149, 74, 255]]
    assert load_target(m, "mask", 1).tolist() == [[2, 2, 2], [255, 255, 149]]


def test_ade20k_misnamed_folders(tmp_path):
    write_ade(tmp_path)
    refused_in_one_line(lambda: load_dataset("ade20k", data_root=tmp_path / "ADEChallengeData2016"),
                        "ADEChallengeData2016/ADEChallengeData2016 does not exist; expected the folder holding")
    (tmp_path / "ADEChallengeData2016" / "images" / "validation").rename(
        tmp_path / "ADEChallengeData2016" / "images" / "val")
    refused_in_one_line(lambda: load_dataset("ade20k", data_root=tmp_path), "images/validation does not exist")


def write_cityscapes(root: Path) -> None:
    # label ids -> train ids as in cityscapesScripts' labels.py table
    for split, city, stem, ids in (
        ("train", "aachen", "aachen_000000_000019", [[7, 8, 0, 26], [33, 24, 9, 23]]),
        ("train", "bochum", "bochum_000000_000313", [[11, 12, 13, 17], [19, 20, 21, 22]]),
        ("val", "frankfurt", "frankfurt_000000_000294", [[25, 27, 28, 31], [32, 29, 30, 1]]),
    ):
        photo(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", size=(4, 2))
        label_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
        label_png(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", ids)  # not read


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path):
    write_cityscapes(tmp_path)
    m = load_dataset("cityscapes", data_root=tmp_path)
    assert m.classes == ("aachen", "bochum", "frankfurt") and m.labels == (0, 1, 2)
    assert m.splits == ("train", "train", "val")
    assert m.targets["mask"][0] == "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    assert m.target_info["mask"]["classes"][13] == "car" and len(m.target_info["mask"]["classes"]) == 19
    assert load_target(m, "mask", 0).tolist() == [[0, 1, 255, 13], [18, 11, 255, 10]]
    assert load_target(m, "mask", 1).tolist() == [[2, 3, 4, 5], [6, 7, 8, 9]]
    assert load_target(m, "mask", 2).tolist() == [[12, 14, 15, 16], [17, 255, 255, 255]]


def test_cityscapes_misnamed_folder(tmp_path):
    write_cityscapes(tmp_path)
    (tmp_path / "gtFine").rename(tmp_path / "gtfine")
    refused_in_one_line(lambda: load_dataset("cityscapes", data_root=tmp_path), r"gtFine/train does not exist")


def write_coco_stuff(root: Path) -> None:
    photo(root / "images" / "train2017" / "000000000009.jpg", size=(4, 2))
    label_png(root / "annotations" / "train2017" / "000000000009.png", [[0, 11, 12, 90], [91, 181, 255, 26]])
    label_png(root / "annotations" / "train2017" / "000000000009_labelTrainIds.png", [[1, 1, 1, 1], [1, 1, 1, 1]])
    photo(root / "images" / "val2017" / "000000000139.jpg", size=(4, 2))
    label_png(root / "annotations" / "val2017" / "000000000139.png", [[92, 10, 25, 30], [24, 27, 44, 45]])


def test_coco_stuff_171_classes(tmp_path):
    write_coco_stuff(tmp_path)
    m = load_dataset("coco-stuff", data_root=tmp_path)
    assert m.sources == ("images/train2017/000000000009.jpg", "images/val2017/000000000139.jpg")
    assert m.splits == ("train", "val") and m.targets["mask"][0] == "annotations/train2017/000000000009.png"
    classes = m.target_info["mask"]["classes"]
    assert len(classes) == 171 and classes[0] == "person" and classes[79] == "toothbrush"
    assert classes[80] == "banner" and classes[170] == "wood"
    # stuffthingmaps value -> class, from mmsegmentation's clsID_to_trID table (11, 25, 90, 44 unused)
    assert load_target(m, "mask", 0).tolist() == [[0, 255, 11, 255], [80, 170, 255, 24]]
    assert load_target(m, "mask", 1).tolist() == [[81, 10, 255, 26], [23, 25, 255, 40]]
    (tmp_path / "annotations").rename(tmp_path / "stuffthingmaps_trainval2017")
    refused_in_one_line(lambda: load_dataset("coco-stuff", data_root=tmp_path), "annotations/train2017 does not exist")


def write_nyu(root: Path) -> None:
    depth = np.array([[0, 1000], [2500, 9999]], dtype=np.uint16)
    for folder in ("sync/kitchen_0028b", "official_splits/test/bathroom"):
        photo(root / folder / "rgb_00045.jpg")
        Image.fromarray(depth).save(root / folder / "sync_depth_00045.png")
    photo(root / "sync" / "living_room_0038" / "rgb_00001.jpg")  # no depth: the row has none


def test_nyu_depth_v2_millimetres_become_metres(tmp_path):
    write_nyu(tmp_path)
    m = load_dataset("nyu-depth-v2", data_root=tmp_path)
    assert m.sources == ("sync/kitchen_0028b/rgb_00045.jpg", "sync/living_room_0038/rgb_00001.jpg",
                         "official_splits/test/bathroom/rgb_00045.jpg")
    assert m.splits == ("train", "train", "test")
    assert m.classes == ("bathroom", "kitchen", "living_room") and m.labels == (1, 2, 0)
    assert m.targets["depth"] == ("sync/kitchen_0028b/sync_depth_00045.png", "",
                                  "official_splits/test/bathroom/sync_depth_00045.png")
    assert m.target_info["depth"] == {"decode": "nyu-depth-mm", "unit": "m", "max_depth": 10.0, "eval_crop": "eigen"}
    depth = load_target(m, "depth", 0)
    assert depth.dtype == np.float32
    np.testing.assert_allclose(depth, [[0.0, 1.0], [2.5, 9.999]], rtol=1e-6)
    assert load_target(m, "depth", 1) is None
    shutil.move(tmp_path / "official_splits", tmp_path / "official_split")
    refused_in_one_line(lambda: load_dataset("nyu-depth-v2", data_root=tmp_path), "official_splits/test does not exist")


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def test_mnist_seg_masks_are_the_thresholded_digits(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    labels = np.array([7, 0, 9, 3], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", 2051, images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 2049, labels)
    m = load_dataset("mnist-seg", data_root=tmp_path)
    assert m.target_info["mask"]["classes"] == ["background"] + [str(d) for d in range(10)]
    for i in range(4):
        expected = np.zeros((28, 28), dtype=np.uint8)
        expected[images[i] >= 128] = labels[i] + 1
        assert np.array_equal(load_target(m, "mask", i), expected)


def test_mnist_seg_demo_is_the_embedded_demo_split_with_masks():
    m = load_dataset("mnist-seg-demo")
    assert len(m) == 2000 and m.splits.count("train") == 1000 and m.splits[:1000] == ("train",) * 1000
    assert m.root == DEMO_DIR.resolve()
    with np.load(DEMO_DIR / "mnist-demo.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    assert m.labels == tuple(labels.tolist())
    for i in (0, 1234, 1999):
        assert np.array_equal(load_target(m, "mask", i), np.where(images[i] > 127, labels[i] + 1, 0))


def test_quickdraw_seg_masks_the_stroke_pixels_with_the_class(tmp_path):
    drawings = {"cat": [[[0, 40, 90], [0, 60, 10]]], "dog": [[[5, 5], [0, 100]], [[50], [50]]]}
    for cls, strokes in drawings.items():
        (tmp_path / f"{cls}.ndjson").write_text(json.dumps({"drawing": strokes, "recognized": True}) + "\n")
    m = load_dataset("quickdraw-seg", data_root=tmp_path)
    assert m.target_info["mask"]["classes"] == ["background", "cat", "dog"]
    assert m.targets["mask"] == ("cat.ndjson#0:1", "dog.ndjson#0:2")
    for i, value in ((0, 1), (1, 2)):
        image = np.asarray(load_image(*m.path_of(i)))
        mask = load_target(m, "mask", i)
        assert mask.shape == image.shape and np.array_equal(mask, np.where(image == 0, value, 0))
        assert set(np.unique(image).tolist()) == {0, 255}
