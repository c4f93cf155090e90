"""Image-pair datasets for correspondence: the `#warp=` image fragment against numpy's own rotations,
flips and shifts, the warps builder's keypoints against the pixels they land on, and the SPair-71k,
PF-WILLOW, PF-PASCAL and CUB-200 builders on tiny layouts written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_manifests.manifest import ManifestError, load_dataset
from data_manifests.pairs import cub_parts, pf_pascal, pf_willow, spair, warps
from data_manifests.sources import load_image, parse_warp, warp_fragment, warp_points
from data_manifests.targets import load_target


def write_image(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def square(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (9, 9), dtype=np.uint8)
    write_image(tmp_path / "a.png", pixels)
    return tmp_path / "a.png", pixels


@pytest.mark.parametrize(("warp", "expected"), [
    ((90, 1, 0, 0, False), lambda a: np.rot90(a)),  # counter-clockwise as displayed
    ((-90, 1, 0, 0, False), lambda a: np.rot90(a, -1)),
    ((0, 1, 0, 0, True), lambda a: a[:, ::-1]),
    ((90, 1, 0, 0, True), lambda a: np.rot90(a[:, ::-1])),  # the flip comes first
    ((0, 1, 2, -1, False), lambda a: np.pad(a, ((0, 1), (2, 0)))[1:, :-2]),  # 2 right, 1 up; black fill
])
def test_a_warp_fragment_is_the_exact_pixel_map(square, warp, expected):
    path, pixels = square
    warped = np.asarray(load_image(path, warp_fragment(*warp)))
    np.testing.assert_array_equal(warped, expected(pixels))


def test_warped_points_follow_the_pixels(square):
    """Pixel (row 1, column 6) of a 9x9 image, centre (6.5, 1.5), under each warp of the table above."""
    point = np.array([[6.5, 1.5]])
    for warp, (x, y) in [((90, 1, 0, 0, False), (1.5, 2.5)), ((0, 1, 0, 0, True), (2.5, 1.5)),
                         ((90, 1, 0, 0, True), (1.5, 6.5)), ((0, 2, 0, 0, False), (8.5, -1.5))]:
        params = parse_warp(warp_fragment(*warp), "x")
        np.testing.assert_allclose(warp_points(point, params, 9, 9), [[x, y]], atol=1e-12)


@pytest.mark.parametrize("fragment", ["warp=rot:1,scale:1,tx:0,ty:0", "warp=scale:1,rot:1,tx:0,ty:0,flip:0",
                                      "warp=rot:a,scale:1,tx:0,ty:0,flip:0", "warp=rot:1,scale:0,tx:0,ty:0,flip:0",
                                      "warp=rot:1,scale:1,tx:0,ty:0,flip:2", "other"])
def test_a_bad_fragment_is_refused_in_one_line(square, fragment):
    with pytest.raises(ValueError) as info:
        load_image(square[0], fragment)
    assert "\n" not in str(info.value) and "a.png#" in str(info.value)


def smooth(h: int, w: int, phase: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] + 0.5
    return (127.5 + 60 * np.sin(x / 5 + phase) + 60 * np.cos(y / 7 - phase)).astype(np.uint8)


def bilinear(image: np.ndarray, x: float, y: float) -> float:
    """The image at continuous (x, y) (pixel centres at + 0.5), written out here."""
    u, v = x - 0.5, y - 0.5
    x0, y0 = int(np.floor(u)), int(np.floor(v))
    fx, fy = u - x0, v - y0
    a = image.astype(float)
    return ((1 - fx) * (1 - fy) * a[y0, x0] + fx * (1 - fy) * a[y0, x0 + 1]
            + (1 - fx) * fy * a[y0 + 1, x0] + fx * fy * a[y0 + 1, x0 + 1])


def test_warps_builder_keypoints_land_on_the_same_content(tmp_path):
    for c, cls in enumerate(("cat", "dog")):
        for i in range(3):
            write_image(tmp_path / "photo" / cls / f"{i}.png", smooth(40, 48, c + i))
    m = warps(tmp_path, "w", folder="photo", per_class=2, grid=4, seed=3)
    m.validate()
    assert len(m) == 8 and len(m.pairs) == 4 and [p[2] for p in m.pairs] == ["cat", "cat", "dog", "dog"]
    assert all(p[1] == p[0] + "#" + p[1].split("#")[1] for p in m.pairs)
    assert ["flip:1" in p[1] for p in m.pairs] == [False, True, False, True]
    index = {id_: i for i, id_ in enumerate(m.ids)}
    seen = 0
    for source, target, _, _ in m.pairs:
        s, t = index[source], index[target]
        src, trg = (np.asarray(load_image(*m.path_of(i)), dtype=float) for i in (s, t))
        ks, kt = load_target(m, "keypoints", s), load_target(m, "keypoints", t)
        assert ks[:, 2].all() and len(ks) == len(kt) == 16
        np.testing.assert_allclose(ks[:4, 0], [48 / 5 * j for j in range(1, 5)], rtol=1e-6)
        for (xs, ys, _), (xt, yt, visible) in zip(ks, kt):
            inside = 0 <= xt <= 48 and 0 <= yt <= 40
            assert visible == inside
            if 1 <= xt <= 47 and 1 <= yt <= 39:  # away from the black fill at the border
                assert abs(bilinear(src, xs, ys) - bilinear(trg, xt, yt)) < 6
                seen += 1
        np.testing.assert_array_equal(load_target(m, "bbox", s), [0, 0, 48, 40])
    assert seen > 30


def write_spair(root, pairs: list[dict]) -> None:
    for cat in ("cat", "dog"):
        (root / "JPEGImages" / cat).mkdir(parents=True)
    (root / "PairAnnotation" / "test").mkdir(parents=True)
    for k, pair in enumerate(pairs):
        (root / "PairAnnotation" / "test" / f"{k:06d}-{pair['category']}.json").write_text(json.dumps(pair))


def spair_pair(category, src, trg, src_kps, trg_kps, kps_ids, src_box=(0, 0, 9, 9), trg_box=(1, 2, 30, 20)):
    return {"category": category, "src_imname": src, "trg_imname": trg, "src_kps": src_kps, "trg_kps": trg_kps,
            "kps_ids": [str(k) for k in kps_ids], "src_bndbox": list(src_box), "trg_bndbox": list(trg_box),
            "src_imsize": [40, 30, 3], "trg_imsize": [40, 30, 3]}


def test_spair_gathers_each_images_points_by_keypoint_index(tmp_path):
    write_spair(tmp_path, [
        spair_pair("cat", "a.jpg", "b.jpg", [[1, 2], [3, 4]], [[5, 6], [7, 8]], [0, 3]),
        spair_pair("cat", "a.jpg", "c.jpg", [[3, 4], [9, 9]], [[1, 1], [2, 2]], [3, 1]),
        spair_pair("dog", "d.jpg", "e.jpg", [[0, 0]], [[10, 10]], [0]),
    ])
    m = spair(tmp_path, "spair-71k")
    m.validate()
    assert m.ids == ("JPEGImages/cat/a.jpg", "JPEGImages/cat/b.jpg", "JPEGImages/cat/c.jpg",
                     "JPEGImages/dog/d.jpg", "JPEGImages/dog/e.jpg")
    assert m.pairs[1] == ("JPEGImages/cat/a.jpg", "JPEGImages/cat/c.jpg", "cat", "test")
    # a: keypoint 0 at (1, 2), 1 at (9, 9), 3 at (3, 4); K = 4 for cat (index 2 never seen); + 0.5
    np.testing.assert_array_equal(load_target(m, "keypoints", 0),
                                  [[1.5, 2.5, 1], [9.5, 9.5, 1], [0, 0, 0], [3.5, 4.5, 1]])
    np.testing.assert_array_equal(load_target(m, "keypoints", 2), [[0, 0, 0], [2.5, 2.5, 1], [0, 0, 0], [1.5, 1.5, 1]])
    assert load_target(m, "keypoints", 3).shape == (1, 3)
    np.testing.assert_array_equal(load_target(m, "bbox", 1), [1.5, 2.5, 30.5, 20.5])
    assert m.labels == (0, 0, 0, 1, 1)


def test_spair_refuses_one_keypoint_at_two_places(tmp_path):
    write_spair(tmp_path, [spair_pair("cat", "a.jpg", "b.jpg", [[1, 2]], [[5, 6]], [0]),
                           spair_pair("cat", "a.jpg", "c.jpg", [[1, 3]], [[5, 6]], [0])])
    with pytest.raises(ManifestError, match="keypoint 0 of JPEGImages/cat/a.jpg"):
        spair(tmp_path, "spair-71k")


def test_pf_willow(tmp_path):
    for name in ("car(G)/a.png", "car(G)/b.png", "duck(S)/c.png", "duck(S)/d.png"):
        write_image(tmp_path / "PF-dataset" / name, np.zeros((4, 4), np.uint8))
    header = ["imageA", "imageB"] + [f"{c}{i}" for c in ("XA", "YA", "XB", "YB") for i in range(1, 11)]
    xa, ya, xb, yb = (list(range(o, o + 10)) for o in (1, 21, 41, 61))
    lines = [",".join(header),
             ",".join(["PF-dataset/car(G)/a.png", "PF-dataset/car(G)/b.png", *map(str, xa + ya + xb + yb)]),
             ",".join(["PF-dataset/duck(S)/c.png", "PF-dataset/duck(S)/d.png", *map(str, xa + ya + xb + yb)])]
    (tmp_path / "test_pairs_pf.csv").write_text("\n".join(lines) + "\n")
    m = pf_willow(tmp_path, "pf-willow")
    m.validate()
    assert m.classes == ("car(G)", "duck(S)") and len(m.pairs) == 2 and m.pairs[1][2] == "duck(S)"
    kb = load_target(m, "keypoints", 1)  # image B of pair 0: MATLAB 1-based -> - 0.5
    np.testing.assert_array_equal(kb[:, :2], np.column_stack([xb, yb]) - 0.5)
    np.testing.assert_array_equal(load_target(m, "bbox", 1), [40.5, 60.5, 49.5, 69.5])


def test_pf_pascal_gives_an_image_one_row_per_distinct_point_list(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / "JPEGImages" / f"{name}.jpg", np.zeros((4, 4, 3), np.uint8))
    lines = ["source_image,target_image,class,XA,YA,XB,YB",
             "JPEGImages/a.jpg,JPEGImages/b.jpg,8,1;2,3;4,5;6,7;8",
             "JPEGImages/a.jpg,JPEGImages/c.jpg,8,1;2,3;4,9;9,9;9",
             "JPEGImages/a.jpg,JPEGImages/c.jpg,12,10,10,5,5"]
    (tmp_path / "test_pairs_pf_pascal.csv").write_text("\n".join(lines) + "\n")
    m = pf_pascal(tmp_path, "pf-pascal")
    m.validate()
    assert m.ids == ("JPEGImages/a.jpg", "JPEGImages/b.jpg", "JPEGImages/c.jpg", "JPEGImages/a.jpg~2",
                     "JPEGImages/c.jpg~2")
    assert m.sources[3] == "JPEGImages/a.jpg" and m.classes == ("cat", "dog")
    assert m.pairs == (("JPEGImages/a.jpg", "JPEGImages/b.jpg", "cat", "test"),
                       ("JPEGImages/a.jpg", "JPEGImages/c.jpg", "cat", "test"),
                       ("JPEGImages/a.jpg~2", "JPEGImages/c.jpg~2", "dog", "test"))
    np.testing.assert_array_equal(load_target(m, "keypoints", 1), [[4.5, 6.5, 1], [5.5, 7.5, 1]])
    (tmp_path / "test_pairs_pf_pascal.csv").write_text("source_image,target_image,class,XA,YA,XB,YB\n"
                                                       "JPEGImages/a.jpg,JPEGImages/b.jpg,21,1,1,1,1\n")
    with pytest.raises(ManifestError, match="class '21' is not 1..20"):
        pf_pascal(tmp_path, "pf-pascal")


def test_cub_parts_pairs_consecutive_images_of_a_class(tmp_path):
    files = {"images.txt": "1 001.Albatross/a.jpg\n2 001.Albatross/b.jpg\n3 001.Albatross/c.jpg\n"
                           "4 002.Auklet/d.jpg\n5 002.Auklet/e.jpg\n",
             "classes.txt": "1 001.Albatross\n2 002.Auklet\n",
             "image_class_labels.txt": "1 1\n2 1\n3 1\n4 2\n5 2\n",
             "train_test_split.txt": "1 0\n2 1\n3 0\n4 0\n5 0\n",
             "bounding_boxes.txt": "1 1 2 10 20\n2 0 0 5 5\n3 3 3 4 4\n4 0 0 1 1\n5 2 2 2 2\n",
             "parts/part_locs.txt": "".join(f"{i} {p} {i * 10 + p}.0 {p}.5 {int(p != 2)}\n"
                                           for i in range(1, 6) for p in range(1, 16))}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    m = cub_parts(tmp_path, "cub-200")
    m.validate()
    assert m.pairs == (("images/001.Albatross/a.jpg", "images/001.Albatross/c.jpg", "001.Albatross", "test"),
                       ("images/002.Auklet/d.jpg", "images/002.Auklet/e.jpg", "002.Auklet", "test"))
    k = load_target(m, "keypoints", 0)
    assert k.shape == (15, 3) and k[1].tolist() == [0, 0, 0] and k[0].tolist() == [11.0, 1.5, 1.0]
    np.testing.assert_array_equal(load_target(m, "bbox", 0), [1, 2, 11, 22])


@pytest.mark.shared
def test_the_shipped_warp_sets_on_the_real_photos(shared_data):
    m = load_dataset("warps-cifar10", shared_data / "cifar10-test")
    assert len(m) == 400 and len(m.pairs) == 200 and len(set(p[2] for p in m.pairs)) == 10
    assert np.asarray(load_image(*m.path_of(1))).shape == (32, 32, 3)
    m = load_dataset("warps-pacs", shared_data / "pacs")
    assert len(m.pairs) == 210 and m.sources[0].startswith("photo/")
