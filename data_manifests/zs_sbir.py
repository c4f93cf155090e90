"""Builders for zero-shot sketch-based image retrieval (ZS-SBIR): sketches and photos of the same
classes, domain `sketch` and `photo`. Which classes are unseen is not part of the manifest but of a
split file (data_manifests/splits/, read by `featurestore retrieve --split`).

This module adds its builders to `BUILDERS` when imported; builders.py imports it at its end, so
the dataset YAMLs find them. (Registering here rather than there lets either module be imported first.)
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from pathlib import Path

from data_manifests.builders import (
    BUILDERS,
    _class_folders,
    _manifest,
    image_folder,
    pacs,
    quickdraw,
)
from data_manifests.manifest import Manifest, ManifestError

DOMAINS = ("photo", "sketch")


def sketch_photo(root: Path, name: str) -> Manifest:
    """`root/photo/<class>/*` and `root/sketch/<class>/*`, the layout the ZS-SBIR releases of
    Sketchy extended, TU-Berlin extended and QuickDraw-Extended share (read like PACS).

    Both domains must hold the same classes: a class with sketches but no photos would give queries
    without any relevant item, and a spelling difference would split one class in two.
    """
    photo, sketch = (set(_class_folders(root / domain)) for domain in DOMAINS)
    if photo != sketch:
        raise ManifestError(
            f"dataset {name!r} in {root}: photo/ and sketch/ must hold the same class folders; "
            f"only in photo/: {_few(photo - sketch)}; only in sketch/: {_few(sketch - photo)}"
        )
    return pacs(root, name, domains=DOMAINS)


def quickdraw_photos(
    root: Path, name: str, sketches: str = "quickdraw", photos: str = "pacs/photo",
    rename: Mapping[str, str] | None = None, recognized_only: bool = False,
) -> Manifest:
    """Quick, Draw! drawings `root/<sketches>/<class>.ndjson` (domain sketch) with the photos
    `root/<photos>/<class>/*` (domain photo) of the classes both have. `rename` maps drawing
    classes onto photo classes (several may map onto one), e.g. {car: automobile} for CIFAR-10.
    Sources are relative to root, so one root holds both (e.g. ../shared/data)."""
    rename = dict(rename or {})
    drawn = quickdraw(root / sketches, name, recognized_only=recognized_only)
    shot = image_folder(root / photos, name, domain="photo")
    unknown = sorted(set(rename) - set(drawn.classes))
    if unknown:
        raise ManifestError(f"dataset {name!r}: rename names classes without drawings: {_few(set(unknown))}")
    drawn_class = {c: rename.get(c, c) for c in drawn.classes}
    classes = sorted(set(drawn_class.values()) & set(shot.classes))
    if not classes:
        raise ManifestError(f"dataset {name!r}: the drawings ({_few(set(drawn_class.values()))}) and the photos "
                            f"({_few(set(shot.classes))}) share no class; map names with rename")
    label = {c: i for i, c in enumerate(classes)}
    parts = ((drawn, sketches, [drawn_class[c] for c in drawn.classes]), (shot, photos, list(shot.classes)))
    rows = [
        (posixpath.join(folder, source), label[names[lab]], "all", domain)
        for part, folder, names in parts
        for source, lab, domain in zip(part.sources, part.labels, part.domains)
        if names[lab] in label
    ]
    return _manifest(name, root, classes, rows)


def _few(names: set[str], n: int = 8) -> str:
    shown = sorted(names)
    return (", ".join(shown[:n]) + (f", ... ({len(shown) - n} more)" if len(shown) > n else "")) or "none"


BUILDERS.update({"sketch_photo": sketch_photo, "quickdraw_photos": quickdraw_photos})
