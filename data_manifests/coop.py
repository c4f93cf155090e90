"""Builders for the 11 datasets of the CoOp few-shot protocol (Zhou et al. 2022), with CoOp's fixed
train/val/test splits in the manifest's split column, so that `featurestore fewshot` samples its
shots from CoOp's train images and tests on CoOp's test images.

- `coop_split`: the `split_zhou_<Dataset>.json` files of nine datasets.
- `coop_fgvc_aircraft`: FGVC-Aircraft, whose split comes with the data (`images_variant_*.txt`).
- `coop_imagenet`: the ILSVRC folders of the `imagenet` builder with CoOp's `classnames.txt`.

This module adds its builders to `BUILDERS` when imported; builders.py imports it at its end, so
the dataset YAMLs find them.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from pathlib import Path

from data_manifests.builders import BUILDERS, _manifest, imagenet
from data_manifests.manifest import Manifest, ManifestError

SPLITS = ("train", "val", "test")


def coop_split(root: Path, name: str, split_file: str, images_dir: str = "") -> Manifest:
    """`root/<split_file>`: {"train"|"val"|"test": [[path, label, classname], ...]} with paths
    relative to `root/<images_dir>` (CoOp's `read_split`). Rows keep the file's order, train then
    val then test; the class list comes from the (label, classname) pairs, and a label given two
    names, or labels with gaps, are refused (the file would not describe one class list)."""
    path = root / split_file
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ManifestError(f"dataset {name!r}: cannot read the CoOp split file {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"dataset {name!r}: {path} is not JSON: {e}") from e
    if not isinstance(doc, dict) or any(not isinstance(doc.get(s), list) for s in SPLITS):
        raise ManifestError(f"dataset {name!r}: {path} must map each of {', '.join(SPLITS)} to a list "
                            "of [path, label, classname]")
    _images_folder(root, images_dir, name)
    named: dict[int, str] = {}
    rows = []
    for split in SPLITS:
        for i, item in enumerate(doc[split]):
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and item[0]
                    and isinstance(item[1], int) and not isinstance(item[1], bool) and isinstance(item[2], str)):
                raise ManifestError(f"dataset {name!r}: {path} {split}[{i}] is {item!r}, expected [path, label, classname]")
            image, label, classname = item
            if named.setdefault(label, classname) != classname:
                raise ManifestError(f"dataset {name!r}: {path} {split}[{i}] names label {label} {classname!r}, "
                                    f"earlier rows name it {named[label]!r}")
            rows.append((_source(images_dir, image, name), label, split, "photo"))
    return _manifest(name, root, _class_list(named, f"dataset {name!r}: {path}"), rows)


def coop_fgvc_aircraft(root: Path, name: str, images_dir: str = "images", variants: str = "variants.txt") -> Manifest:
    """FGVC-Aircraft `data/` as CoOp reads it: classes are the lines of `variants.txt` in order, and
    `images_variant_{train,val,test}.txt` hold lines `<image id> <variant>` (the variant may contain
    spaces) for `images/<image id>.jpg`."""
    classes = _lines(root / variants, name)
    label_of = {c: label for label, c in enumerate(classes)}
    _images_folder(root, images_dir, name)
    rows = []
    for split in SPLITS:
        path = root / f"images_variant_{split}.txt"
        for number, line in enumerate(_lines(path, name), start=1):
            image, _, variant = line.partition(" ")
            if variant not in label_of:
                raise ManifestError(f"dataset {name!r}: {path}:{number}: variant {variant!r} is not in {variants}")
            rows.append((_source(images_dir, f"{image}.jpg", name), label_of[variant], split, "photo"))
    return _manifest(name, root, classes, rows)


def coop_imagenet(root: Path, name: str, images_dir: str = "images", classnames: str = "classnames.txt") -> Manifest:
    """CoOp's ImageNet: `root/<images_dir>/{train,val}/<wnid>/*` read by the `imagenet` builder
    (labels index the sorted wnids, as in CoOp), named by `root/<classnames>` (lines `<wnid> <name>`,
    CLIP's class names). CoOp tests on the ILSVRC val images, so their split is `test` here."""
    built = imagenet(root / images_dir, name, splits=("train", "val"))
    names = {}
    for line in _lines(root / classnames, name):
        wnid, _, classname = line.partition(" ")
        names[wnid] = classname
    wnid_of = {label: source.split("/")[1] for source, label in zip(built.sources, built.labels)}  # <split>/<wnid>/<file>
    wnids = [wnid_of[label] for label in range(len(built.classes))]
    missing = [wnid for wnid in wnids if wnid not in names]
    if missing:
        raise ManifestError(f"dataset {name!r}: {root / classnames} lacks {len(missing)} class folder(s): "
                            f"{', '.join(missing[:5])}")
    return dataclasses.replace(
        built, classes=tuple(names[wnid] for wnid in wnids),
        splits=tuple("test" if split == "val" else split for split in built.splits),
    )


def _images_folder(root: Path, images_dir: str, name: str) -> None:
    if not (root / images_dir).is_dir():
        raise ManifestError(f"dataset {name!r}: the images folder {root / images_dir} does not exist")


def _source(images_dir: str, image: str, name: str) -> str:
    """The image's path relative to the root; '#' would start a fragment, so it is refused."""
    if "#" in image:
        raise ManifestError(f"dataset {name!r}: '#' in image paths is not supported (it starts a fragment): {image!r}")
    return posixpath.normpath(posixpath.join(images_dir, image))


def _class_list(named: dict[int, str], where: str) -> list[str]:
    """Class names in label order; every label 0..max must have rows, or its name is unknown."""
    odd = sorted(set(named) ^ set(range(max(named, default=-1) + 1)))
    if odd:
        raise ManifestError(f"{where}: labels must run from 0 without gaps; missing or negative: "
                            f"{', '.join(map(str, odd[:5]))}")
    return [named[label] for label in range(len(named))]


def _lines(path: Path, name: str) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"dataset {name!r}: cannot read {path}: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


BUILDERS.update({"coop_split": coop_split, "coop_fgvc_aircraft": coop_fgvc_aircraft, "coop_imagenet": coop_imagenet})
