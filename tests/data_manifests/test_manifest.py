"""Manifest table: validation, digest, head, missing files, CSV round trip, YAML/dataset loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from data_manifests.manifest import (
    COLUMNS,
    DATASETS_DIR,
    Manifest,
    ManifestError,
    list_datasets,
    load_dataset,
    load_manifest,
)

DATASETS = ["ade20k", "cifar10-test", "cityscapes", "coco-stuff", "coop-caltech101", "coop-dtd", "coop-eurosat",
            "coop-fgvc-aircraft", "coop-flowers102", "coop-food101", "coop-imagenet", "coop-oxford-pets",
            "coop-stanford-cars", "coop-sun397", "coop-ucf101", "cub-200", "demo", "imagenet", "mnist-seg",
            "mnist-seg-demo", "mnist-test", "nyu-depth-v2", "pacs", "pf-pascal", "pf-willow", "quickdraw",
            "quickdraw-pacs", "quickdraw-sbir", "quickdraw-seg", "sketchy", "spair-71k", "tu-berlin", "voc2012",
            "warps-cifar10", "warps-pacs"]
HEADER = "id,source,label,class_name,split,domain\n"
REST = ("img/a1.png", "img/a2.png", "img/a3.png")  # rows 1-3 of make_manifest's sources


def make_manifest(root: Path, n: int = 4) -> Manifest:
    """n image files a{i}.png under root (created empty), alternating classes cat/dog."""
    root.mkdir(parents=True, exist_ok=True)
    sources = tuple(f"img/a{i}.png" for i in range(n))
    (root / "img").mkdir(exist_ok=True)
    for source in sources:
        (root / source).write_bytes(b"")
    return Manifest(
        name="toy",
        root=root,
        classes=("cat", "dog"),
        ids=sources,
        sources=sources,
        labels=tuple(i % 2 for i in range(n)),
        splits=("train",) * n,
        domains=("photo",) * n,
    )


def test_basic_accessors(tmp_path):
    m = make_manifest(tmp_path)
    m.validate()
    assert len(m) == 4
    assert m.class_names == ("cat", "dog", "cat", "dog")
    assert m.root.is_absolute()
    assert m.path_of(1) == (tmp_path.resolve() / "img/a1.png", None)
    with_fragment = dataclasses.replace(m, sources=("f.npz#7",) + m.sources[1:])
    assert with_fragment.path_of(0) == (tmp_path.resolve() / "f.npz", "7")


def test_digest_ignores_root_and_name_but_not_labels(tmp_path):
    m = make_manifest(tmp_path / "a")
    moved = dataclasses.replace(m, root=tmp_path / "b", name="other")
    assert m.digest() == moved.digest()
    assert len(m.digest()) == 64
    relabelled = dataclasses.replace(m, labels=(1,) + m.labels[1:])
    assert relabelled.digest() != m.digest()


def test_head(tmp_path):
    m = make_manifest(tmp_path)
    assert m.head(2).ids == ("img/a0.png", "img/a1.png")
    assert m.head(2).labels == (0, 1)
    assert len(m.head(100)) == 4
    with pytest.raises(ManifestError, match="n >= 1"):
        m.head(0)


@pytest.mark.parametrize(
    "change, message, offender",
    [
        ({"ids": ("img/a0.png",) * 4}, "duplicate ids", "img/a0.png"),
        ({"labels": (0, 1, 2, 0)}, "label outside [0, 2)", "img/a2.png"),
        ({"labels": (0, -1, 0, 0)}, "label outside [0, 2)", "label -1"),
        ({"sources": ("../x.png",) + REST}, "outside the root", "'img/a0.png' (source '../x.png')"),
        ({"sources": ("img/../../x.png#3",) + REST}, "outside the root", "img/a0.png"),
        ({"sources": ("/etc/passwd",) + REST}, "absolute source", "img/a0.png"),
        ({"sources": ("",) + REST}, "empty source", "img/a0.png"),
        ({"ids": ("", "b", "c", "d")}, "empty id", "row 0"),
        ({"splits": ("train", "", "train", "train")}, "empty split", "img/a1.png"),
        ({"domains": ("photo", "photo", "", "photo")}, "empty domain", "img/a2.png"),
        ({"labels": (0, 1)}, "different lengths", "label"),
    ],
)
def test_validate_names_problem_and_offender(tmp_path, change, message, offender):
    bad = dataclasses.replace(make_manifest(tmp_path), **change)
    with pytest.raises(ManifestError) as info:
        bad.validate()
    assert message in str(info.value)
    assert offender in str(info.value)


def test_validate_empty_and_lists_at_most_five_offenders(tmp_path):
    m = make_manifest(tmp_path, n=8)
    with pytest.raises(ManifestError, match="no rows"):
        dataclasses.replace(m, ids=(), sources=(), labels=(), splits=(), domains=()).validate()
    bad = dataclasses.replace(m, labels=(5,) * 8)
    with pytest.raises(ManifestError) as info:
        bad.validate()
    text = str(info.value)
    assert "(8)" in text and "3 more" in text and "img/a4.png" in text and "img/a5.png" not in text


def test_missing_lists_deleted_file(tmp_path):
    m = make_manifest(tmp_path)
    assert m.missing() == []
    (tmp_path / "img/a2.png").unlink()
    assert m.missing() == ["img/a2.png"]


def test_csv_round_trip(tmp_path):
    m = make_manifest(tmp_path / "data")
    m.to_csv(tmp_path / "toy.csv")
    lines = (tmp_path / "toy.csv").read_text().splitlines()
    assert lines[0] == '# classes: ["cat", "dog"]'
    assert lines[1] == ",".join(COLUMNS)
    back = Manifest.from_csv(tmp_path / "toy.csv", root=tmp_path / "data")
    assert back == dataclasses.replace(m, name="toy")
    assert back.digest() == m.digest()
    # The root defaults to the CSV's folder, the name to its stem.
    default = Manifest.from_csv(tmp_path / "toy.csv", name="named")
    assert default.root == tmp_path.resolve() and default.name == "named"


def test_csv_without_classes_line_takes_names_from_rows(tmp_path):
    (tmp_path / "m.csv").write_text(
        "id,source,label,class_name,split,domain,note\n"
        "a,a.png,1,dog,test,photo,extra columns are ignored\n"
        "b,b.png,0,cat,test,photo,\n"
    )
    m = Manifest.from_csv(tmp_path / "m.csv")
    assert m.classes == ("cat", "dog") and m.labels == (1, 0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,source,label,split,domain\na,a.png,0,test,photo\n", "m.csv:1: header lacks column(s) class_name"),
        (HEADER + "a,a.png,zero,cat,test,photo\n", "m.csv:2: label 'zero' is not an integer"),
        ('# classes: ["cat"]\n' + HEADER + "a,a.png,0,cat,test,photo\nb,b.png,0,dog,test,photo\n",
         "m.csv:4: class_name 'dog' disagrees with label 0"),
        (HEADER + "a,a.png,0,cat,test\n", "m.csv:2: 5 cells, the header has 6"),
        (HEADER + "a,a.png,1,dog,test,photo\n", "label(s) 0"),
        ("", "no header line"),
        ("# classes: cat, dog\n" + HEADER, "m.csv:1: the classes line is not a JSON list"),
        (HEADER + "a,../a.png,0,cat,test,photo\n", "outside the root"),
    ],
)
def test_malformed_csv(tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ManifestError) as info:
        Manifest.from_csv(tmp_path / "m.csv")
    assert message in str(info.value)


def test_from_csv_missing_root_and_file(tmp_path):
    make_manifest(tmp_path).to_csv(tmp_path / "m.csv")
    with pytest.raises(ManifestError, match="does not exist.*--data-root"):
        Manifest.from_csv(tmp_path / "m.csv", root=tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="cannot read manifest CSV"):
        Manifest.from_csv(tmp_path / "absent.csv")


def test_dataset_names_are_the_contract():
    assert list_datasets() == DATASETS


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_yaml_header_and_name(name):
    text = (DATASETS_DIR / f"{name}.yaml").read_text()
    assert f"make extract DATASET={name}" in text
    assert f"name: {name}\n" in text


def test_load_dataset_unknown_lists_known():
    with pytest.raises(ManifestError) as info:
        load_dataset("mnist")
    assert "unknown dataset 'mnist'" in str(info.value)
    for name in DATASETS:
        assert name in str(info.value)


def test_load_dataset_demo():
    m = load_dataset("demo")
    assert len(m) == 2000
    assert m.splits.count("train") == 1000 and m.splits.count("test") == 1000
    assert m.splits[:1000] == ("train",) * 1000
    assert m.classes == tuple("0123456789")
    assert set(m.domains) == {"digit"}
    assert m.ids[17] == m.sources[17] == "mnist-demo.npz#17"
    assert m.missing() == []


def test_imagenet_without_root_says_what_to_set(monkeypatch):
    monkeypatch.delenv("FEATURESTORE_IMAGENET_ROOT", raising=False)
    with pytest.raises(ManifestError, match="set FEATURESTORE_IMAGENET_ROOT=PATH or pass --data-root"):
        load_dataset("imagenet")


def write_folder_yaml(tmp_path: Path) -> Path:
    """A user YAML for an image_folder dataset with an env var and a default root that does not exist."""
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\nbuilder: image_folder\nroot_env: TEST_MINE_ROOT\n"
        f"root: {tmp_path / 'default'}\noptions: {{split: val, domain: art}}\n"
    )
    return path


def make_tree(root: Path, classes: dict[str, int]) -> None:
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            (root / cls / f"{i}.png").write_bytes(b"")


def test_root_precedence(tmp_path, monkeypatch):
    path = write_folder_yaml(tmp_path)
    make_tree(tmp_path / "from_env", {"a": 1})
    make_tree(tmp_path / "from_arg", {"a": 1, "b": 1})
    monkeypatch.delenv("TEST_MINE_ROOT", raising=False)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)  # the default root does not exist
    assert "set TEST_MINE_ROOT=PATH or pass --data-root" in str(info.value)
    assert str(tmp_path / "default") in str(info.value)

    monkeypatch.setenv("TEST_MINE_ROOT", str(tmp_path / "from_env"))
    from_env = load_manifest(path)
    assert from_env.root == (tmp_path / "from_env").resolve() and from_env.classes == ("a",)
    from_arg = load_manifest(path, data_root=tmp_path / "from_arg")
    assert from_arg.root == (tmp_path / "from_arg").resolve() and from_arg.classes == ("a", "b")
    assert set(from_arg.splits) == {"val"} and set(from_arg.domains) == {"art"}
    assert from_env.name == "mine"


def test_load_manifest_csv_and_bad_inputs(tmp_path):
    m = make_manifest(tmp_path)
    m.to_csv(tmp_path / "m.csv")
    assert load_manifest(tmp_path / "m.csv").digest() == m.digest()
    with pytest.raises(ManifestError, match="not .txt"):
        load_manifest(tmp_path / "m.txt")
    (tmp_path / "bad.yaml").write_text("name: x\nbuilder: image_folder\nroot: .\nroots: typo\n")
    with pytest.raises(ManifestError, match="unknown key.*roots"):
        load_manifest(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("name: x\nbuilder: nope\nroot: .\n")
    with pytest.raises(ManifestError, match="unknown builder 'nope'.*image_folder"):
        load_manifest(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("name: x\nbuilder: image_folder\nroot: .\noptions: {colour: red}\n")
    with pytest.raises(ManifestError, match="do not fit builder 'image_folder'.*colour"):
        load_manifest(tmp_path / "bad.yaml")
