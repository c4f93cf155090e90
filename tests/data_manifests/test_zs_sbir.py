"""ZS-SBIR builders: the photo/sketch folder layout, Quick, Draw! drawings with photo folders, the
dataset YAMLs, and (when ../shared/data is there) the real Quick, Draw! + PACS / CIFAR-10 data."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_manifests import zs_sbir
from data_manifests.builders import BUILDERS
from data_manifests.manifest import ManifestError, load_dataset
from pipelines.analysis.splits import SplitError, load_split


def make_folders(root: Path, layout: dict[str, dict[str, int]]) -> None:
    for domain, classes in layout.items():
        for cls, n in classes.items():
            (root / domain / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (8, 8), 255).save(root / domain / cls / f"{i}.png")


def drawing(word: str) -> str:
    return json.dumps({"word": word, "recognized": True, "drawing": [[[0, 10, 20], [0, 15, 5], [0, 1, 2]]]})


def test_builders_are_registered():
    assert BUILDERS["sketch_photo"] is zs_sbir.sketch_photo
    assert BUILDERS["quickdraw_photos"] is zs_sbir.quickdraw_photos


@pytest.mark.parametrize("dataset", ["sketchy", "tu-berlin", "quickdraw-sbir"])
def test_sketch_photo_layout_through_the_yaml(tmp_path, dataset):
    make_folders(tmp_path, {"photo": {"bat": 3, "cow": 2}, "sketch": {"bat": 1, "cow": 4}})
    m = load_dataset(dataset, data_root=tmp_path)
    assert m.name == dataset and m.classes == ("bat", "cow")
    assert Counter(zip(m.class_names, m.domains)) == {("bat", "photo"): 3, ("cow", "photo"): 2,
                                                      ("bat", "sketch"): 1, ("cow", "sketch"): 4}
    assert m.ids[0] == m.sources[0] == "photo/bat/0.png" and m.missing() == []


@pytest.mark.parametrize("dataset, split, n_seen, n_unseen", [
    ("sketchy", "sketchy-unseen25", 100, 25), ("sketchy", "sketchy-unseen21", 104, 21),
    ("tu-berlin", "tu-berlin-unseen30", 220, 30), ("quickdraw-sbir", "quickdraw-unseen30", 80, 30)])
def test_paper_splits_fit_their_dataset_layout(tmp_path, dataset, split, n_seen, n_unseen):
    """A copy of the dataset whose class folders carry the split's names (spaces, parentheses and
    all) builds through the YAML and passes the split's check; one misspelt folder does not."""
    zero_shot = load_split(split)
    assert (len(zero_shot.seen), len(zero_shot.unseen)) == (n_seen, n_unseen)
    classes = zero_shot.seen + zero_shot.unseen
    make_folders(tmp_path, {"photo": dict.fromkeys(classes, 1), "sketch": dict.fromkeys(classes, 1)})
    m = load_dataset(dataset, data_root=tmp_path)
    assert len(m.classes) == n_seen + n_unseen and m.missing() == []
    zero_shot.check(set(m.class_names), set(m.class_names))
    renamed = sorted(zero_shot.unseen)[0]
    for domain in ("photo", "sketch"):
        (tmp_path / domain / renamed).rename(tmp_path / domain / (renamed.upper() + "_"))
    m = load_dataset(dataset, data_root=tmp_path)
    with pytest.raises(SplitError, match=f"absent from the data: {re.escape(renamed)}.*"
                                         f"does not list classes of the data: {re.escape(renamed.upper())}_"):
        zero_shot.check(set(m.class_names), set(m.class_names))


def test_both_sketchy_splits_cover_the_same_125_classes():
    s25, s21 = load_split("sketchy-unseen25"), load_split("sketchy-unseen21")
    assert set(s25.seen + s25.unseen) == set(s21.seen + s21.unseen) and len(set(s25.seen + s25.unseen)) == 125
    assert set(s25.unseen) & set(s21.unseen) == {"scissors", "tree", "wheelchair", "windmill"}


def test_sketch_photo_refuses_different_classes(tmp_path):
    make_folders(tmp_path, {"photo": {"bat": 1, "cow": 1}, "sketch": {"bat": 1, "Cow": 1}})
    with pytest.raises(ManifestError, match="only in photo/: cow; only in sketch/: Cow"):
        zs_sbir.sketch_photo(tmp_path, "x")
    with pytest.raises(ManifestError, match="does not exist"):
        zs_sbir.sketch_photo(tmp_path / "nowhere", "x")


def test_quickdraw_with_photos(tmp_path):
    (tmp_path / "qd").mkdir()
    for word, n in (("car", 2), ("cat", 3), ("sailboat", 1), ("cruise_ship", 2), ("violin", 1)):
        (tmp_path / "qd" / f"{word}.ndjson").write_text("\n".join(drawing(word) for _ in range(n)) + "\n")
    make_folders(tmp_path / "photos", {"train": {"automobile": 2, "cat": 1, "ship": 2, "dog": 1}})
    m = zs_sbir.quickdraw_photos(tmp_path, "mix", sketches="qd", photos="photos/train",
                                 rename={"car": "automobile", "sailboat": "ship", "cruise_ship": "ship"})
    assert m.classes == ("automobile", "cat", "ship")  # violin and dog have no counterpart
    assert Counter(zip(m.class_names, m.domains)) == {
        ("automobile", "sketch"): 2, ("cat", "sketch"): 3, ("ship", "sketch"): 3,
        ("automobile", "photo"): 2, ("cat", "photo"): 1, ("ship", "photo"): 2,
    }
    assert "qd/cruise_ship.ndjson#1" in m.ids and "photos/train/ship/0.png" in m.ids and m.missing() == []
    with pytest.raises(ManifestError, match="rename names classes without drawings: plane"):
        zs_sbir.quickdraw_photos(tmp_path, "mix", sketches="qd", photos="photos/train", rename={"plane": "airplane"})
    with pytest.raises(ManifestError, match="share no class"):
        zs_sbir.quickdraw_photos(tmp_path, "mix", sketches="qd", photos="photos/train",
                                 rename={"cat": "kitten", "car": "x", "sailboat": "y", "cruise_ship": "z"})


@pytest.mark.shared
def test_real_quickdraw_with_pacs_and_cifar10(shared_data):
    pacs = zs_sbir.quickdraw_photos(shared_data, "quickdraw-pacs")
    assert pacs.classes == ("dog", "elephant", "giraffe", "guitar", "horse", "house")
    counts = Counter(pacs.domains)
    assert counts["sketch"] == 135 and counts["photo"] == 1238 and pacs.missing() == []
    load_split("quickdraw-pacs-unseen3").check(set(pacs.class_names), set(pacs.class_names))
    cifar = zs_sbir.quickdraw_photos(shared_data, "quickdraw-cifar10", photos="cifar10-test",
                                     rename={"car": "automobile", "cruise_ship": "ship", "sailboat": "ship"})
    assert len(cifar.classes) == 9 and Counter(cifar.domains)["photo"] == 9000
    load_split("quickdraw-cifar10-unseen3").check(set(cifar.class_names), set(cifar.class_names))
