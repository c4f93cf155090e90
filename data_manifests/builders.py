"""Builders turn a dataset root into a Manifest; a dataset YAML names one in BUILDERS.

Every builder is `build(root: Path, name: str, **options) -> Manifest`, lists files in sorted
order (so the same folder always gives the same manifest and digest) and uses each row's source
string as its id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from data_manifests.manifest import Manifest, ManifestError
from data_manifests.sources import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    IMAGE_EXTENSIONS,
    read_idx,
    read_ndjson_lines,
)

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_FILE = "mnist-demo.npz"


def _manifest(name: str, root: Path, classes: Iterable[str], rows: list[tuple[str, int, str, str]]) -> Manifest:
    """A Manifest from (source, label, split, domain) rows; the id of a row is its source."""
    if not rows:
        raise ManifestError(f"dataset {name!r}: no images found under {root}")
    sources, labels, splits, domains = zip(*rows)
    return Manifest(
        name=name,
        root=root,
        classes=tuple(classes),
        ids=sources,
        sources=sources,
        labels=tuple(int(label) for label in labels),
        splits=splits,
        domains=domains,
    )


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of `folder`, each one a class."""
    if not folder.is_dir():
        raise ManifestError(f"{folder} does not exist; expected a folder with one subfolder per class")
    with os.scandir(folder) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ManifestError(f"{folder} has no class subfolders (expected {folder}/<class>/<image>)")
    return classes


def _image_files(folder: Path) -> list[str]:
    """Sorted names of the image files directly in `folder` (other files are ignored)."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:  # DirEntry.is_file() avoids a stat per file on large trees
        names = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    bad = [n for n in names if "#" in n]
    if bad:
        raise ManifestError(f"{folder}: '#' in file names is not supported (it starts a fragment): {bad[:5]}")
    return names


def mnist_idx(root: Path, name: str, prefix: str = "t10k", split: str | None = None) -> Manifest:
    """MNIST-style IDX pair `<prefix>-images-idx3-ubyte[.gz]` + `<prefix>-labels-idx1-ubyte[.gz]`.

    The split defaults to "test" for t10k and "train" for train.
    """

    def find(stem: str) -> str:
        for file in (stem, stem + ".gz"):
            if (root / file).is_file():
                return file
        raise ManifestError(f"dataset {name!r}: neither {stem} nor {stem}.gz is in {root}")

    images_file = find(f"{prefix}-images-idx3-ubyte")
    labels = read_idx(root / find(f"{prefix}-labels-idx1-ubyte"), IDX_LABELS_MAGIC)
    count = read_idx(root / images_file, IDX_IMAGES_MAGIC).shape[0]
    if count != len(labels):
        raise ManifestError(f"dataset {name!r} in {root}: {count} images but {len(labels)} labels")
    split = split or {"t10k": "test", "train": "train"}.get(prefix, "all")
    rows = [(f"{images_file}#{i}", label, split, "digit") for i, label in enumerate(labels.tolist())]
    return _manifest(name, root, [str(d) for d in range(10)], rows)


def image_folder(root: Path, name: str, split: str = "all", domain: str = "photo") -> Manifest:
    """`root/<class>/<image>`; classes are the sorted subfolder names (the torchvision ImageFolder order)."""
    classes = _class_folders(root)
    rows = [
        (f"{cls}/{file}", label, split, domain)
        for label, cls in enumerate(classes)
        for file in _image_files(root / cls)
    ]
    return _manifest(name, root, classes, rows)


def pacs(root: Path, name: str, domains: tuple[str, ...] = ("photo", "sketch")) -> Manifest:
    """PACS `root/<domain>/<class>/<image>`; classes are the sorted union over the chosen domains."""
    per_domain = {domain: _class_folders(root / domain) for domain in domains}
    classes = sorted(set().union(*per_domain.values()))
    label_of = {cls: label for label, cls in enumerate(classes)}
    rows = [
        (f"{domain}/{cls}/{file}", label_of[cls], "all", domain)
        for domain, domain_classes in per_domain.items()
        for cls in domain_classes
        for file in _image_files(root / domain / cls)
    ]
    return _manifest(name, root, classes, rows)


def quickdraw(root: Path, name: str, recognized_only: bool = False) -> Manifest:
    """Quick, Draw! `root/<class>.ndjson`, one drawing per line; `#i` is the i-th non-blank line."""
    files = sorted(p.name for p in root.glob("*.ndjson"))
    if not files:
        raise ManifestError(f"dataset {name!r}: no <class>.ndjson files in {root}")
    rows = []
    for label, file in enumerate(files):
        for i, line in enumerate(read_ndjson_lines(root / file)):
            try:
                recognized = json.loads(line).get("recognized", True)
            except (ValueError, AttributeError):
                raise ManifestError(f"{root / file}: drawing {i} is not a JSON object") from None
            if recognized or not recognized_only:
                rows.append((f"{file}#{i}", label, "all", "sketch"))
    return _manifest(name, root, [Path(f).stem for f in files], rows)


def imagenet(root: Path, name: str, splits: tuple[str, ...] = ("train", "val")) -> Manifest:
    """ILSVRC-2012 `root/<split>/<wnid>/*.JPEG` (val sorted into wnid folders, as torchvision expects).

    Labels index the sorted wnids (the torchvision order). Class names are the first name of each
    synset in LOC_synset_mapping.txt or synset_words.txt when present, else the wnid; a few first
    names repeat (e.g. "crane", "maillot"), so the label, not the name, identifies a class.
    """
    per_split = {split: _class_folders(root / split) for split in splits}
    wnids = sorted(set().union(*per_split.values()))
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    names = _synset_names(root)
    rows = [
        (f"{split}/{wnid}/{file}", label_of[wnid], split, "photo")
        for split, split_wnids in per_split.items()
        for wnid in split_wnids
        for file in _image_files(root / split / wnid)
    ]
    return _manifest(name, root, [names.get(wnid, wnid) for wnid in wnids], rows)


def _synset_names(root: Path) -> dict[str, str]:
    """wnid -> first name from lines like "n01440764 tench, Tinca tinca"; {} when no mapping file."""
    for file in ("LOC_synset_mapping.txt", "synset_words.txt"):
        if (root / file).is_file():
            names = {}
            for line in (root / file).read_text(encoding="utf-8").splitlines():
                wnid, _, words = line.strip().partition(" ")
                if wnid:
                    names[wnid] = words.split(",")[0].strip() or wnid
            return names
    return {}


def demo(root: Path, name: str, n_train: int = 1000) -> Manifest:
    """The embedded default (`demo/mnist-demo.npz`): the first n_train rows are "train", the rest "test"."""
    path = root / DEMO_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            labels = npz["labels"].tolist()
    except (OSError, KeyError, ValueError) as e:
        raise ManifestError(f"dataset {name!r}: cannot read the labels of {path}: {e}") from e
    rows = [
        (f"{DEMO_FILE}#{i}", label, "train" if i < n_train else "test", "digit") for i, label in enumerate(labels)
    ]
    return _manifest(name, root, [str(d) for d in range(10)], rows)


BUILDERS: dict[str, Callable[..., Manifest]] = {
    "mnist_idx": mnist_idx,
    "image_folder": image_folder,
    "pacs": pacs,
    "quickdraw": quickdraw,
    "imagenet": imagenet,
    "demo": demo,
}
# Builders that ship their data: the root used when neither --data-root, an env var nor the YAML gives one.
EMBEDDED_ROOTS = {"demo": DEMO_DIR}

import data_manifests.zs_sbir  # noqa: E402,F401  (registers sketch_photo and quickdraw_photos in BUILDERS)
import data_manifests.coop  # noqa: E402,F401  (registers coop_split, coop_fgvc_aircraft and coop_imagenet in BUILDERS)
import data_manifests.dense  # noqa: E402,F401  (registers the dense-prediction builders: voc2012, ade20k, cityscapes, ...)
import data_manifests.pairs  # noqa: E402,F401  (registers the image-pair builders: spair, pf_willow, pf_pascal, cub_parts, warps)
