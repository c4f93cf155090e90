"""CoOp builders: split_zhou files, FGVC-Aircraft's variant lists, ImageNet with classnames.txt, and
the 11 dataset YAMLs (files written by the tests; the real datasets are not here)."""

import inspect
import json
from pathlib import Path

import pytest
import yaml

from data_manifests import coop
from data_manifests.builders import BUILDERS
from data_manifests.manifest import DATASETS_DIR, ManifestError, load_dataset

COOP_DATASETS = ["coop-caltech101", "coop-dtd", "coop-eurosat", "coop-fgvc-aircraft", "coop-flowers102",
                 "coop-food101", "coop-imagenet", "coop-oxford-pets", "coop-stanford-cars", "coop-sun397",
                 "coop-ucf101"]


def touch(root: Path, *files: str) -> None:
    for file in files:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_bytes(b"")


def write_split(root: Path, doc: dict, name: str = "split_zhou_Caltech101.json") -> None:
    (root / name).write_text(json.dumps(doc))


SPLIT = {
    "train": [["face/a.jpg", 0, "face"], ["leopard/b.jpg", 1, "leopard"], ["face/c.jpg", 0, "face"]],
    "val": [["leopard/d.jpg", 1, "leopard"]],
    "test": [["face/e.jpg", 0, "face"], ["leopard/f.jpg", 1, "leopard"]],
}


def test_builders_are_registered():
    assert BUILDERS["coop_split"] is coop.coop_split
    assert BUILDERS["coop_fgvc_aircraft"] is coop.coop_fgvc_aircraft
    assert BUILDERS["coop_imagenet"] is coop.coop_imagenet


def test_split_file_gives_exact_rows(tmp_path):
    touch(tmp_path / "101_ObjectCategories", *(item[0] for split in SPLIT.values() for item in split))
    write_split(tmp_path, SPLIT)
    m = coop.coop_split(tmp_path, "caltech", split_file="split_zhou_Caltech101.json", images_dir="101_ObjectCategories")
    prefix = "101_ObjectCategories/"
    assert m.classes == ("face", "leopard")
    assert m.ids == m.sources == tuple(prefix + f for f in
                                       ("face/a.jpg", "leopard/b.jpg", "face/c.jpg", "leopard/d.jpg", "face/e.jpg", "leopard/f.jpg"))
    assert m.labels == (0, 1, 0, 1, 0, 1)
    assert m.splits == ("train", "train", "train", "val", "test", "test")
    assert set(m.domains) == {"photo"} and m.missing() == []


def test_split_file_through_the_yaml_and_images_at_the_root(tmp_path):
    touch(tmp_path / "101_ObjectCategories", "face/a.jpg")
    write_split(tmp_path, {"train": [["face/a.jpg", 0, "face"]], "val": [], "test": []})
    m = load_dataset("coop-caltech101", data_root=tmp_path)
    assert m.name == "coop-caltech101" and m.ids == ("101_ObjectCategories/face/a.jpg",) and m.missing() == []
    touch(tmp_path, "cars_train/00001.jpg")  # Stanford Cars: paths relative to the root itself
    write_split(tmp_path, {"train": [["cars_train/00001.jpg", 0, "2012 Tesla Model S"]], "val": [], "test": []},
                "split_zhou_StanfordCars.json")
    cars = load_dataset("coop-stanford-cars", data_root=tmp_path)
    assert cars.ids == ("cars_train/00001.jpg",) and cars.classes == ("2012 Tesla Model S",) and cars.missing() == []


@pytest.mark.parametrize(("doc", "message"), [
    ({**SPLIT, "val": [["leopard/d.jpg", 1, "cheetah"]]}, r"val\[0\] names label 1 'cheetah', earlier rows name it 'leopard'"),
    ({**SPLIT, "test": [["x/e.jpg", 3, "x"]]}, "labels must run from 0 without gaps; missing or negative: 2"),
    ({**SPLIT, "test": [["x/e.jpg", -1, "x"]]}, "missing or negative: -1"),
    ({**SPLIT, "train": [["face/a.jpg", "0", "face"]]}, r"train\[0\] is \['face/a.jpg', '0', 'face'\], expected \[path, label, classname\]"),
    ({**SPLIT, "train": [["face/a#1.jpg", 0, "face"]]}, "'#' in image paths is not supported"),
    ({"train": [], "test": []}, "must map each of train, val, test to a list"),
])
def test_split_file_contradictions_are_refused(tmp_path, doc, message):
    (tmp_path / "images").mkdir()
    write_split(tmp_path, doc)
    with pytest.raises(ManifestError, match=message):
        coop.coop_split(tmp_path, "caltech", split_file="split_zhou_Caltech101.json", images_dir="images")


def test_missing_split_file_or_images_folder(tmp_path):
    with pytest.raises(ManifestError, match="cannot read the CoOp split file"):
        coop.coop_split(tmp_path, "x", split_file="split_zhou_X.json")
    write_split(tmp_path, SPLIT, "split_zhou_X.json")
    with pytest.raises(ManifestError, match="the images folder .*jpg does not exist"):
        coop.coop_split(tmp_path, "x", split_file="split_zhou_X.json", images_dir="jpg")


def test_fgvc_aircraft_variant_lists(tmp_path):
    (tmp_path / "variants.txt").write_text("707-320\nCessna 172\nF/A-18\n")
    (tmp_path / "images_variant_train.txt").write_text("0034309 707-320\n1025794 Cessna 172\n")
    (tmp_path / "images_variant_val.txt").write_text("0000001 F/A-18\n")
    (tmp_path / "images_variant_test.txt").write_text("\n0000002 Cessna 172\n")
    touch(tmp_path / "images", "0034309.jpg", "1025794.jpg", "0000001.jpg", "0000002.jpg")
    m = load_dataset("coop-fgvc-aircraft", data_root=tmp_path)
    assert m.classes == ("707-320", "Cessna 172", "F/A-18")
    assert m.ids == ("images/0034309.jpg", "images/1025794.jpg", "images/0000001.jpg", "images/0000002.jpg")
    assert m.labels == (0, 1, 2, 1) and m.splits == ("train", "train", "val", "test") and m.missing() == []
    (tmp_path / "images_variant_test.txt").write_text("0000002 Cessna 182\n")
    with pytest.raises(ManifestError, match=r"images_variant_test.txt:1: variant 'Cessna 182' is not in variants.txt"):
        coop.coop_fgvc_aircraft(tmp_path, "aircraft")


def test_imagenet_with_coop_classnames(tmp_path):
    touch(tmp_path / "images", "train/n02/a.JPEG", "train/n01/b.JPEG", "val/n01/c.JPEG", "val/n02/d.JPEG")
    (tmp_path / "classnames.txt").write_text("n01 tench\nn02 great white shark\n")
    m = load_dataset("coop-imagenet", data_root=tmp_path)
    assert m.classes == ("tench", "great white shark")  # labels index the sorted wnids, as in CoOp
    assert m.ids == ("train/n01/b.JPEG", "train/n02/a.JPEG", "val/n01/c.JPEG", "val/n02/d.JPEG")
    assert m.labels == (0, 1, 0, 1) and m.splits == ("train", "train", "test", "test") and m.missing() == []
    (tmp_path / "classnames.txt").write_text("n01 tench\n")
    with pytest.raises(ManifestError, match="lacks 1 class folder"):
        coop.coop_imagenet(tmp_path, "imagenet")


@pytest.mark.parametrize("name", COOP_DATASETS)
def test_coop_yamls(name):
    path = DATASETS_DIR / f"{name}.yaml"
    text = path.read_text()
    assert f"make extract DATASET={name}" in text and f"name: {name}\n" in text
    spec = yaml.safe_load(text)
    assert spec["root_env"].startswith("FEATURESTORE_COOP_") and spec["builder"].startswith("coop_")
    inspect.signature(BUILDERS[spec["builder"]]).bind(Path("."), name, **spec["options"])
    if spec["builder"] == "coop_split":
        assert spec["options"]["split_file"].startswith("split_zhou_")
