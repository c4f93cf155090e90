"""Zero-shot splits: the classes a model may have been trained on (seen) and the classes it is
evaluated on (unseen). ZS-SBIR retrieval uses unseen-class queries and gallery items only.

A split file is JSON: {"name": str, "seen": [class, ...], "unseen": [class, ...]}, optionally with
"source" and "note" strings saying where the lists come from. The shipped ones live in
data_manifests/splits/ and can be named without folder or suffix (`--split pacs-unseen3`).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from data_manifests.manifest import DATASETS_DIR

SPLITS_DIR = DATASETS_DIR / "splits"
_KEYS = {"name", "seen", "unseen", "source", "note"}


class SplitError(ValueError):
    """A split file that cannot be read, or that does not fit the data; the message says why."""


@dataclass(frozen=True)
class Split:
    name: str
    seen: tuple[str, ...]
    unseen: tuple[str, ...]
    path: str

    def check(self, query_classes: Collection[str], gallery_classes: Collection[str]) -> None:
        """Refuse a split that does not describe the data: classes it names that the data lacks,
        classes of the data it does not name (often a spelling difference), and unseen classes
        without queries or without gallery items (their AP would be undefined or trivially 0)."""
        data = set(query_classes) | set(gallery_classes)
        listed = set(self.seen) | set(self.unseen)
        where = f"split {self.name!r} ({self.path})"
        problems = [
            ("names classes absent from the data", sorted(listed - data)),
            ("does not list classes of the data", sorted(data - listed)),
            ("has unseen classes without queries", sorted(set(self.unseen) - set(query_classes) - (listed - data))),
            ("has unseen classes without gallery items",
             sorted(set(self.unseen) - set(gallery_classes) - (listed - data))),
        ]
        found = [f"{what}: {_shown(items)}" for what, items in problems if items]
        if found:
            raise SplitError(f"{where} " + "; ".join(found))


def list_splits() -> list[str]:
    """Names of the split files shipped in data_manifests/splits/."""
    return sorted(p.stem for p in SPLITS_DIR.glob("*.json"))


def load_split(name_or_path: str | Path) -> Split:
    """A split from a file path, or from the name of a shipped split; validated on its own
    (structure, duplicates, seen/unseen overlap). Fit to the data is `Split.check`."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        if str(name_or_path) not in list_splits():
            raise SplitError(f"no split file {name_or_path!r}; shipped splits: {', '.join(list_splits()) or 'none'}")
        path = SPLITS_DIR / f"{name_or_path}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SplitError(f"cannot read split file {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise SplitError(f"{path}: not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise SplitError(f"{path}: expected an object with keys name, seen, unseen")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise SplitError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}")
    if not isinstance(doc.get("name"), str) or not doc["name"]:
        raise SplitError(f"{path}: 'name' must be a non-empty string")
    lists = {}
    for key in ("seen", "unseen"):
        value = doc.get(key)
        if not isinstance(value, list) or not all(isinstance(c, str) and c for c in value):
            raise SplitError(f"{path}: '{key}' must be a list of class names")
        repeated = sorted({c for c in value if value.count(c) > 1})
        if repeated:
            raise SplitError(f"{path}: '{key}' lists classes more than once: {_shown(repeated)}")
        lists[key] = tuple(value)
    if not lists["unseen"]:
        raise SplitError(f"{path}: 'unseen' is empty; retrieval needs unseen classes")
    both = sorted(set(lists["seen"]) & set(lists["unseen"]))
    if both:
        raise SplitError(f"{path}: classes both seen and unseen: {_shown(both)}")
    return Split(doc["name"], lists["seen"], lists["unseen"], str(path))


def _shown(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
