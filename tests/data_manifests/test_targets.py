"""Manifest target columns (digest, head, validation, CSV) and load_target with every decoder,
checked against hand-worked values and direct numpy computations written here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_manifests.manifest import Manifest, ManifestError, load_manifest
from data_manifests.sources import rasterise_strokes
from data_manifests.targets import DECODERS, load_target, register_decoder

MASK_INFO = {"decode": "voc-palette", "classes": ["background", "cat", "dog"], "ignore_index": 255}


def manifest(root: Path, n: int = 3, **extra) -> Manifest:
    sources = tuple(f"img{i}.png" for i in range(n))
    return Manifest(name="t", root=root, classes=("a", "b"), ids=sources, sources=sources,
                    labels=tuple(i % 2 for i in range(n)), splits=("train",) * n, domains=("photo",) * n, **extra)


def save_index_png(path: Path, values: np.ndarray, mode: str = "P") -> None:
    image = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
        assert np.array_equal(np.asarray(image), values)
    image.save(path)


# --- Manifest fields --------------------------------------------------------------------------------

def test_digest_without_targets_is_the_formula_from_before_targets(tmp_path):
    m = manifest(tmp_path)
    rows = [[m.ids[i], m.sources[i], m.labels[i], m.splits[i], m.domains[i]] for i in range(3)]
    text = json.dumps({"classes": ["a", "b"], "rows": rows}, ensure_ascii=False, separators=(",", ":"))
    assert m.digest() == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_digest_covers_targets_info_and_pairs(tmp_path):
    base = manifest(tmp_path)
    masked = manifest(tmp_path, targets={"mask": ("m0.png", "", "m2.png")}, target_info={"mask": MASK_INFO})
    other_info = manifest(tmp_path, targets={"mask": ("m0.png", "", "m2.png")},
                          target_info={"mask": {**MASK_INFO, "decode": "ade20k"}})
    paired = manifest(tmp_path, pairs=(("img0.png", "img1.png", "a", "test"),))
    digests = {m.digest() for m in (base, masked, other_info, paired)}
    assert len(digests) == 4
    # key order of target_info does not matter
    reordered = manifest(tmp_path, targets={"mask": ("m0.png", "", "m2.png")},
                         target_info={"mask": dict(reversed(list(MASK_INFO.items())))})
    assert reordered.digest() == masked.digest()


def test_head_keeps_targets_and_the_pairs_of_surviving_images(tmp_path):
    m = manifest(tmp_path, n=4, targets={"bbox": ("inline:[0,0,1,1]", "", "inline:[1,1,2,2]", "")},
                 target_info={"bbox": {"decode": None}},
                 pairs=(("img0.png", "img1.png", "a", "test"), ("img0.png", "img3.png", "a", "test")))
    m.validate()
    h = m.head(2)
    assert h.targets == {"bbox": ("inline:[0,0,1,1]", "")}
    assert h.pairs == (("img0.png", "img1.png", "a", "test"),)
    h.validate()


@pytest.mark.parametrize("extra, message", [
    ({"targets": {"segmentation": ("", "", "")}, "target_info": {"segmentation": {}}}, "unknown target column"),
    ({"targets": {"mask": ("m0.png", "")}, "target_info": {"mask": MASK_INFO}}, "has 2 entries for 3 rows"),
    ({"targets": {"mask": ("m0.png", "", "")}}, "target_info must describe exactly"),
    ({"targets": {"mask": ("m0.png", "", "")}, "target_info": {"mask": {**MASK_INFO, "decode": "nope"}}},
     "unknown decoder 'nope'"),
    ({"targets": {"mask": ("m0.png", "", "")}, "target_info": {"mask": {**MASK_INFO, "ignore_index": 1}}},
     "'ignore_index' must be an integer in [3, 255]"),
    ({"targets": {"mask": ("/abs/m0.png", "", "")}, "target_info": {"mask": MASK_INFO}}, "relative to the root"),
    ({"targets": {"mask": ("../m0.png", "", "")}, "target_info": {"mask": MASK_INFO}}, "relative to the root"),
    ({"targets": {"mask": ("inline:[1]", "", "")}, "target_info": {"mask": MASK_INFO}}, "keypoints and bbox only"),
    ({"targets": {"bbox": ("b.json", "", "")}, "target_info": {"bbox": {"decode": None}}}, "gives no 'decode'"),
    ({"targets": {"depth": ("d.png", "", "")}, "target_info": {"depth": {"decode": "nyu-depth-mm", "unit": "mm"}}},
     "'unit' must be 'm'"),
    ({"targets": {"mask": ("m0.png", "", "")}, "target_info": {"mask": {**MASK_INFO, "max": np.float32(1)}}},
     "target_info must hold JSON values only"),
    ({"pairs": (("img0.png", "gone.png", "a", "test"),)}, "pair 0 names unknown id(s) 'gone.png'"),
    ({"pairs": (("img0.png", "img1.png"),)}, "expected (source id, target id, category, split)"),
])
def test_validation_refuses_bad_targets_in_one_line(tmp_path, extra, message):
    with pytest.raises(ManifestError) as e:
        manifest(tmp_path, **extra).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_csv_round_trip_keeps_target_columns_info_and_pairs(tmp_path):
    m = manifest(tmp_path, targets={"mask": ("m0.png", "", "m2.png"), "keypoints": ("inline:[[1.5,2.5,1]]", "", "")},
                 target_info={"mask": MASK_INFO, "keypoints": {"decode": None, "names": ["nose"]}},
                 pairs=(("img0.png", "img2.png", "a", "test"),))
    m.to_csv(tmp_path / "m.csv")
    back = load_manifest(tmp_path / "m.csv")
    assert back.targets == m.targets and back.target_info == m.target_info and back.pairs == m.pairs
    assert back.digest() == m.digest()
    plain = manifest(tmp_path)
    plain.to_csv(tmp_path / "p.csv")
    assert "target" not in (tmp_path / "p.csv").read_text() and load_manifest(tmp_path / "p.csv").targets == {}


def test_csv_with_a_mask_column_but_no_target_info_line_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text('# classes: ["a"]\nid,source,label,class_name,split,domain,mask\n'
                                    "x.png,x.png,0,a,all,photo,x_mask.png\n")
    with pytest.raises(ManifestError, match="target_info must describe exactly"):
        load_manifest(tmp_path / "m.csv")


# --- load_target ------------------------------------------------------------------------------------

def masked(root: Path, decode: str, files: tuple[str, ...], classes: list[str]) -> Manifest:
    info = {"decode": decode, "classes": classes, "ignore_index": 255}
    m = manifest(root, n=len(files), targets={"mask": files}, target_info={"mask": info})
    m.validate()
    return m


def test_inline_keypoints_and_bbox_need_no_decoder(tmp_path):
    m = manifest(tmp_path, targets={"keypoints": ("inline:[[0.5,0.5,1],[3,4,0]]", "", ""),
                                    "bbox": ("inline:[1,2,3.5,4]", "", "inline:[1,2,0,4]")},
                 target_info={"keypoints": {"decode": None, "names": None}, "bbox": {"decode": None}})
    m.validate()
    keypoints = load_target(m, "keypoints", 0)
    assert keypoints.dtype == np.float32 and keypoints.tolist() == [[0.5, 0.5, 1], [3, 4, 0]]
    assert load_target(m, "bbox", 0).tolist() == [1, 2, 3.5, 4]
    assert load_target(m, "keypoints", 1) is None and load_target(m, "bbox", 1) is None
    with pytest.raises(ManifestError, match=r"has x1 < x0"):
        load_target(m, "bbox", 2)
    with pytest.raises(ManifestError, match="no target column 'mask'"):
        load_target(m, "mask", 0)


def test_voc_palette_keeps_indices_and_the_255_boundary(tmp_path):
    values = np.array([[0, 0, 255], [15, 255, 20]], dtype=np.uint8)
    save_index_png(tmp_path / "m.png", values)
    m = masked(tmp_path, "voc-palette", ("m.png",), [f"c{i}" for i in range(21)])
    mask = load_target(m, "mask", 0)
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 0, 255], [15, 255, 20]]


def test_mask_values_outside_the_classes_are_refused_naming_the_file(tmp_path):
    save_index_png(tmp_path / "m.png", np.array([[0, 21]]))
    m = masked(tmp_path, "voc-palette", ("m.png",), [f"c{i}" for i in range(21)])
    with pytest.raises(ManifestError, match=r"m\.png: mask values \[21\] are neither class indices 0\.\.20"):
        load_target(m, "mask", 0)


def test_colour_label_image_and_missing_file_are_one_line_errors(tmp_path):
    Image.new("RGB", (2, 2), (128, 0, 0)).save(tmp_path / "rgb.png")
    m = masked(tmp_path, "voc-palette", ("rgb.png", "gone.png"), ["a", "b"])
    with pytest.raises(ManifestError, match=r"rgb\.png: cannot read the mask: expected an 8-bit palette or grey"):
        load_target(m, "mask", 0)
    with pytest.raises(ManifestError) as e:
        load_target(m, "mask", 1)
    assert str(tmp_path / "gone.png") in str(e.value) and "\n" not in str(e.value)


def test_ade20k_reduces_zero_to_ignore(tmp_path):
    values = np.array([[0, 1, 2], [150, 75, 0]], dtype=np.uint8)
    save_index_png(tmp_path / "a.png", values, mode="L")
    m = masked(tmp_path, "ade20k", ("a.png",), [f"c{i}" for i in range(150)])
    expected = [[255, 0, 1], [149, 74, 255]]  # 0 -> ignore, k -> k - 1
    assert load_target(m, "mask", 0).tolist() == expected


def test_cityscapes_label_ids_become_train_ids(tmp_path):
    # label ids and their train ids, read off cityscapesScripts' labels.py table
    ids = np.array([[0, 1, 6, 7, 8, 9], [10, 11, 14, 17, 18, 19], [23, 24, 26, 29, 31, 33]], dtype=np.uint8)
    expected = [[255, 255, 255, 0, 1, 255], [255, 2, 255, 5, 255, 6], [10, 11, 13, 255, 16, 18]]
    save_index_png(tmp_path / "c_gtFine_labelIds.png", ids, mode="L")
    m = masked(tmp_path, "cityscapes-labelids", ("c_gtFine_labelIds.png",), [f"c{i}" for i in range(19)])
    assert load_target(m, "mask", 0).tolist() == expected


def test_coco_stuff_171_mapping(tmp_path):
    # stuffthingmaps value -> class, from mmsegmentation's clsID_to_trID table
    pairs = {0: 0, 10: 10, 11: 255, 12: 11, 25: 255, 26: 24, 30: 26, 90: 255, 91: 80, 92: 81, 181: 170, 255: 255}
    save_index_png(tmp_path / "s.png", np.array([list(pairs)]), mode="L")
    m = masked(tmp_path, "coco-stuff-171", ("s.png",), [f"c{i}" for i in range(171)])
    assert load_target(m, "mask", 0).tolist() == [list(pairs.values())]


def test_nyu_depth_millimetres_become_metres(tmp_path):
    millimetres = np.array([[0, 1000, 1234], [9999, 65535, 1]], dtype=np.uint16)
    Image.fromarray(millimetres).save(tmp_path / "sync_depth_00000.png")
    Image.new("L", (3, 2)).save(tmp_path / "eight_bit.png")
    info = {"decode": "nyu-depth-mm", "unit": "m", "max_depth": 10.0, "eval_crop": "eigen"}
    m = manifest(tmp_path, n=2, targets={"depth": ("sync_depth_00000.png", "eight_bit.png")},
                 target_info={"depth": info})
    m.validate()
    depth = load_target(m, "depth", 0)
    assert depth.dtype == np.float32
    np.testing.assert_allclose(depth, [[0.0, 1.0, 1.234], [9.999, 65.535, 0.001]], rtol=1e-6)
    with pytest.raises(ManifestError, match="expected a 16-bit depth PNG in millimetres, got mode L"):
        load_target(m, "depth", 1)


def test_mnist_seg_labels_bright_pixels_with_one_plus_the_digit(tmp_path):
    images = np.array([[[0, 127, 128], [255, 200, 3]], [[130, 0, 0], [0, 0, 0]]], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([7, 0]))
    m = masked(tmp_path, "mnist-seg", ("d.npz#0:8", "d.npz#1:1"), ["background"] + [str(d) for d in range(10)])
    assert load_target(m, "mask", 0).tolist() == [[0, 0, 8], [8, 8, 0]]
    assert load_target(m, "mask", 1).tolist() == [[1, 0, 0], [0, 0, 0]]
    bad = masked(tmp_path, "mnist-seg", ("d.npz#0",), ["background", "x"])
    with pytest.raises(ManifestError, match=r"d\.npz#0: cannot read the mask: the fragment must be '<item>:<class"):
        load_target(bad, "mask", 0)


def test_quickdraw_seg_marks_exactly_the_stroke_pixels_of_the_image(tmp_path):
    strokes = [[[0, 50, 100], [0, 80, 20]], [[10], [90]]]
    (tmp_path / "cat.ndjson").write_text(json.dumps({"drawing": strokes}) + "\n")
    m = masked(tmp_path, "quickdraw-seg", ("cat.ndjson#0:3",), ["background", "a", "b", "cat"])
    mask = load_target(m, "mask", 0)
    image = np.asarray(rasterise_strokes(strokes))
    assert mask.shape == image.shape == (256, 256)
    assert set(np.unique(image).tolist()) == {0, 255}  # strokes are drawn without anti-aliasing
    assert np.array_equal(mask == 3, image == 0) and np.array_equal(mask == 0, image == 255)


def test_register_decoder_adds_a_decoder_and_refuses_a_taken_name(tmp_path):
    @register_decoder("test-ones")
    def ones(path, fragment):
        return np.ones((2, 2), dtype=np.uint8)

    try:
        m = masked(tmp_path, "test-ones", ("anything.bin",), ["a", "b"])
        assert load_target(m, "mask", 0).tolist() == [[1, 1], [1, 1]]
        with pytest.raises(ValueError, match="already registered"):
            register_decoder("test-ones")(ones)
    finally:
        del DECODERS["test-ones"]


def test_a_target_file_linked_outside_the_root_marks_its_row(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir(), outside.mkdir()
    save_index_png(outside / "m.png", np.zeros((2, 2)))
    (root / "linked.png").symlink_to(outside / "m.png")
    m = manifest(root, targets={"mask": ("", "linked.png", "inline-free.png")}, target_info={"mask": MASK_INFO})
    assert m.outside_root() == ["img1.png"]


def test_a_corrupt_label_file_is_a_one_line_error(tmp_path):
    (tmp_path / "m.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    m = masked(tmp_path, "voc-palette", ("m.png",), ["a", "b"])
    with pytest.raises(ManifestError) as e:
        load_target(m, "mask", 0)
    assert str(e.value).startswith(f"{tmp_path / 'm.png'}: cannot read the mask") and "\n" not in str(e.value)
