"""The manifest: which images a dataset holds, where they are, and what their labels are.

A manifest is a table with the columns of `COLUMNS` plus a root folder and the ordered class
list. `source` is a path relative to the root, optionally with a `#fragment` naming an item
inside a container file (`t10k-images-idx3-ubyte.gz#123`, `cat.ndjson#5`, `mnist-demo.npz#17`).
The id of a row is its source string, which is stable and unique by construction.

A manifest may also carry per-image targets (`TARGET_COLUMNS`: a segmentation mask, a depth map,
keypoints, a bounding box), one source string per row in the same form as an image source, or an
inline value `inline:<json>`, with per-column `target_info` saying how to decode them (see
data_manifests/targets.py), and image `pairs` for correspondence.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import inspect
import io
import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

COLUMNS = ("id", "source", "label", "class_name", "split", "domain")
DATASETS_DIR = Path(__file__).resolve().parent
_CLASSES_PREFIX = "# classes:"
_YAML_KEYS = ("name", "builder", "root_env", "root", "options")
_SHOWN = 5  # offenders listed per problem in an error message
TARGET_COLUMNS = ("mask", "depth", "keypoints", "bbox")
INLINE = "inline:"  # a target source that holds its value as JSON instead of naming a file
_TARGET_INFO_PREFIX = "# target_info:"
_PAIRS_PREFIX = "# pairs:"


class ManifestError(ValueError):
    """Anything wrong with a manifest, its files or its dataset YAML; the message says what to fix."""


def _listing(items: list) -> str:
    """The first few items and how many more, so a message stays short on a 1M-row manifest."""
    shown = ", ".join(str(item) for item in items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


@dataclass(frozen=True)
class Manifest:
    """An ordered table of images; row i is (ids[i], sources[i], labels[i], splits[i], domains[i]).

    Optional targets: `targets[column][i]` is row i's target source ("" = none) for a column of
    TARGET_COLUMNS, `target_info[column]` how to read it ({"decode": decoder name, ...}; the keys
    per column are listed in data_manifests/targets.py), and `pairs`, tuples (source id, target id,
    category, split) naming images of this manifest.
    """

    name: str
    root: Path
    classes: tuple[str, ...]
    ids: tuple[str, ...] = field(repr=False)
    sources: tuple[str, ...] = field(repr=False)
    labels: tuple[int, ...] = field(repr=False)
    splits: tuple[str, ...] = field(repr=False)
    domains: tuple[str, ...] = field(repr=False)
    targets: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False, hash=False)
    target_info: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False, hash=False)
    pairs: tuple[tuple[str, str, str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        # The root is always absolute so that path_of() does not depend on a later chdir.
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())
        # Plain dicts and tuples (from lists, e.g. JSON); anything else is left for validate() to name.
        object.__setattr__(self, "targets", {c: _tuple(v) for c, v in self.targets.items()})
        object.__setattr__(self, "target_info", {c: dict(v) if isinstance(v, Mapping) else v
                                                 for c, v in self.target_info.items()})
        object.__setattr__(self, "pairs", tuple(_tuple(p) for p in self.pairs))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def class_names(self) -> tuple[str, ...]:
        """class_name of every row, looked up from its label."""
        return tuple(self.classes[label] for label in self.labels)

    def digest(self) -> str:
        """sha256 of the content (classes, rows and, when present, targets, target_info and pairs),
        not of the name or root: moved data keeps its digest, and a manifest without targets has
        the digest it had before targets existed."""
        rows = zip(self.ids, self.sources, self.labels, self.splits, self.domains)
        content: dict[str, Any] = {"classes": list(self.classes), "rows": [list(row) for row in rows]}
        if self.targets:
            content["targets"] = {c: list(v) for c, v in self.targets.items()}
        if self.target_info:
            content["target_info"] = self.target_info
        if self.pairs:
            content["pairs"] = [list(p) for p in self.pairs]
        text = json.dumps(content, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def head(self, n: int) -> Manifest:
        """The first n rows (all of them when n > len), for quick runs such as --limit (`take`)."""
        if n < 1:
            raise ManifestError(f"head(n) needs n >= 1, got {n}")
        return self.take(range(min(n, len(self))))

    def take(self, rows: Iterable[int]) -> Manifest:
        """The rows at positions `rows`, in that order, with their targets, and the pairs whose
        both images are among them."""
        pick = [int(i) for i in rows]
        kept = {self.ids[i] for i in pick}
        return dataclasses.replace(
            self,
            **{name: tuple(getattr(self, name)[i] for i in pick)
               for name in ("ids", "sources", "labels", "splits", "domains")},
            targets={c: tuple(v[i] for i in pick) for c, v in self.targets.items()},
            pairs=tuple(p for p in self.pairs if p[0] in kept and p[1] in kept),
        )

    def validate(self) -> None:
        """Raise ManifestError listing every structural problem, up to a few offenders each."""
        where = f"manifest {self.name!r} (root {self.root})"
        lengths = {
            "id": len(self.ids),
            "source": len(self.sources),
            "label": len(self.labels),
            "split": len(self.splits),
            "domain": len(self.domains),
        }
        if len(set(lengths.values())) != 1:
            raise ManifestError(f"{where}: columns have different lengths {lengths}")
        if not self.ids:
            raise ManifestError(f"{where} has no rows")

        problems: list[str] = []

        def check(what: str, offenders: list) -> None:
            if offenders:
                problems.append(f"{what} ({len(offenders)}): {_listing(offenders)}")

        def name(i: int) -> str:
            return repr(self.ids[i]) if self.ids[i] else f"row {i}"

        rows = range(len(self))
        counts = Counter(self.ids)
        check("duplicate ids", [repr(i) for i, count in counts.items() if count > 1 and i])
        check("empty id", [f"row {i}" for i in rows if not self.ids[i]])
        check(
            f"label outside [0, {len(self.classes)}) (classes {_listing(list(self.classes))})",
            [f"{name(i)} (label {self.labels[i]})" for i in rows if not 0 <= self.labels[i] < len(self.classes)],
        )
        def source(i: int) -> str:
            same = self.sources[i] == self.ids[i]
            return name(i) if same else f"{name(i)} (source {self.sources[i]!r})"

        files = [s.split("#", 1)[0] for s in self.sources]
        check("empty source file", [source(i) for i in rows if not files[i]])
        check("absolute source (must be relative to the root)", [source(i) for i in rows if posixpath.isabs(files[i])])
        check(
            "source outside the root (after resolving '..')",
            [source(i) for i in rows if files[i] and _escapes(files[i])],
        )
        check(
            "file or folder name that is not valid UTF-8 (rename it)",
            [source(i) for i in rows if not _is_utf8(self.ids[i]) or not _is_utf8(self.sources[i])]
            + [f"class {c!r}" for c in self.classes if not _is_utf8(c)],
        )
        check("empty split", [name(i) for i in rows if not self.splits[i]])
        check("empty domain", [name(i) for i in rows if not self.domains[i]])
        if problems:
            raise ManifestError(f"{where} is invalid:\n  - " + "\n  - ".join(problems))
        self._validate_targets(where)

    def _validate_targets(self, where: str) -> None:
        """One-line ManifestError for the first problem in targets, target_info or pairs."""
        if not (self.targets or self.target_info or self.pairs):
            return
        from data_manifests.targets import DECODERS  # targets.py imports this module

        unknown = sorted(set(self.targets) - set(TARGET_COLUMNS))
        if unknown:
            raise ManifestError(f"{where}: unknown target column(s) {', '.join(unknown)}; "
                                f"allowed: {', '.join(TARGET_COLUMNS)}")
        if set(self.target_info) != set(self.targets):
            raise ManifestError(f"{where}: target_info must describe exactly the target columns "
                                f"({', '.join(sorted(self.targets)) or 'none'}), it describes "
                                f"{', '.join(sorted(self.target_info)) or 'none'}")
        try:
            json.dumps(self.target_info)
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{where}: target_info must hold JSON values only (it is part of the digest): {e}") from None
        for column, sources in self.targets.items():
            at = f"{where}: target column {column!r}"
            if not isinstance(sources, tuple):
                raise ManifestError(f"{at} must be a list of strings, one per row")
            if not isinstance(self.target_info[column], Mapping):
                raise ManifestError(f"{at}: target_info must be a mapping such as {{\"decode\": ...}}")
            if len(sources) != len(self):
                raise ManifestError(f"{at} has {len(sources)} entries for {len(self)} rows")
            if not all(isinstance(s, str) for s in sources):
                raise ManifestError(f"{at}: every entry must be a string ('' = no target)")
            info = self.target_info[column]
            decode = info.get("decode")
            files = [s.split("#", 1)[0] for s in sources if s and not s.startswith(INLINE)]
            if decode is None and files:
                raise ManifestError(f"{at}: {len(files)} entries name files but target_info gives no 'decode'")
            if decode is not None and decode not in DECODERS:
                raise ManifestError(f"{at}: unknown decoder {decode!r}; known: {', '.join(sorted(DECODERS))}")
            if any(s.startswith(INLINE) for s in sources) and column not in ("keypoints", "bbox"):
                raise ManifestError(f"{at}: inline values are for keypoints and bbox only")
            bad = [f for f in files if not f or posixpath.isabs(f) or _escapes(f)]
            if bad:
                raise ManifestError(f"{at}: entries must be files relative to the root, inside it: {_listing(bad)}")
            if column == "mask":
                classes, ignore = info.get("classes"), info.get("ignore_index")
                if not (isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes)):
                    raise ManifestError(f"{at}: target_info 'classes' must be a non-empty list of class names")
                if not (isinstance(ignore, int) and len(classes) <= ignore <= 255):
                    raise ManifestError(f"{at}: target_info 'ignore_index' must be an integer in "
                                        f"[{len(classes)}, 255] (outside the class indices), got {ignore!r}")
            if column == "depth" and info.get("unit") != "m":
                raise ManifestError(f"{at}: target_info 'unit' must be 'm' (depth is decoded to metres)")
            if column == "depth" and info.get("eval_crop") not in (None, "eigen"):
                raise ManifestError(f"{at}: target_info 'eval_crop' must be 'eigen' or absent, got {info['eval_crop']!r}")
        known = set(self.ids)
        for k, pair in enumerate(self.pairs):
            if not isinstance(pair, tuple) or len(pair) != 4 or not all(isinstance(x, str) for x in pair):
                raise ManifestError(f"{where}: pair {k} is {pair!r}, expected (source id, target id, category, split)")
            absent = [x for x in pair[:2] if x not in known]
            if absent:
                raise ManifestError(f"{where}: pair {k} names unknown id(s) {', '.join(map(repr, absent))}")

    def outside_root(self) -> list[str]:
        """Ids whose file (the image's or a target's), once symbolic links are resolved, is not under
        the resolved root: a link inside the root that points out of it is refused like a '..' path."""
        inside: dict[str, bool] = {}
        result = []
        columns = list(self.targets.values())
        for i, (id_, source) in enumerate(zip(self.ids, self.sources)):
            files = [source] + [v[i] for v in columns if v[i] and not v[i].startswith(INLINE)]
            for file in (f.split("#", 1)[0] for f in files):
                if file not in inside:
                    inside[file] = (self.root / file).resolve().is_relative_to(self.root)
            if not all(inside[f.split("#", 1)[0]] for f in files):
                result.append(id_)
        return result

    def missing(self) -> list[str]:
        """Ids whose file does not exist under the root; each distinct file is looked at once."""
        exists: dict[str, bool] = {}
        result = []
        for id_, source in zip(self.ids, self.sources):
            file = source.split("#", 1)[0]
            if file not in exists:
                exists[file] = (self.root / file).is_file()
            if not exists[file]:
                result.append(id_)
        return result

    def path_of(self, i: int) -> tuple[Path, str | None]:
        """(absolute file path, fragment or None) of row i."""
        file, _, fragment = self.sources[i].partition("#")
        return self.root / file, fragment or None

    def to_csv(self, path: str | Path) -> None:
        """Write a first line `# classes: <json list>`, then, when the manifest has them, lines
        `# target_info: <json>` and `# pairs: <json>`, then the header COLUMNS (plus one column per
        target column) and one line per row."""
        columns = list(self.targets)
        with open(path, "w", newline="", encoding="utf-8") as f:
            f.write(f"{_CLASSES_PREFIX} {json.dumps(list(self.classes), ensure_ascii=False)}\n")
            if self.target_info:
                f.write(f"{_TARGET_INFO_PREFIX} {json.dumps(self.target_info, ensure_ascii=False)}\n")
            if self.pairs:
                f.write(f"{_PAIRS_PREFIX} {json.dumps([list(p) for p in self.pairs], ensure_ascii=False)}\n")
            writer = csv.writer(f)
            writer.writerow(COLUMNS + tuple(columns))
            rows = zip(self.ids, self.sources, self.labels, self.class_names, self.splits, self.domains,
                       *(self.targets[c] for c in columns))
            for row in rows:
                writer.writerow(row)

    @staticmethod
    def from_csv(path: str | Path, root: str | Path | None = None, name: str | None = None) -> Manifest:
        """Read a CSV written by to_csv or by hand.

        The class list comes from a first line `# classes: [...]`; without it, label i takes the
        class_name of its rows, so every label 0..max must occur. Columns named like
        TARGET_COLUMNS are target columns, described by a line `# target_info: {...}`; a line
        `# pairs: [...]` gives the pairs. Other extra columns are ignored.
        The root defaults to the CSV's folder; the name to the file's stem.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError(f"cannot read manifest CSV {path}: {e}") from e

        lines = text.splitlines(keepends=True)
        comments = 0
        classes: list[str] | None = None
        target_info: dict = {}
        pairs: list = []
        while comments < len(lines) and lines[comments].startswith("#"):
            line = lines[comments]
            comments += 1
            if line.startswith(_CLASSES_PREFIX):
                classes = _parse_classes(line[len(_CLASSES_PREFIX):], f"{path}:{comments}")
            elif line.startswith(_TARGET_INFO_PREFIX):
                target_info = _parse_json(line[len(_TARGET_INFO_PREFIX):], dict, f"{path}:{comments}: target_info")
            elif line.startswith(_PAIRS_PREFIX):
                pairs = _parse_json(line[len(_PAIRS_PREFIX):], list, f"{path}:{comments}: pairs")

        reader = csv.reader(io.StringIO("".join(lines[comments:]), newline=""))
        header = next(reader, None)
        if header is None:
            raise ManifestError(f"{path}: no header line; expected the columns {', '.join(COLUMNS)}")
        absent = [c for c in COLUMNS if c not in header]
        if absent:
            raise ManifestError(
                f"{path}:{comments + 1}: header lacks column(s) {', '.join(absent)}; "
                f"expected {', '.join(COLUMNS)}, got {', '.join(header)}"
            )
        target_columns = [c for c in header if c in TARGET_COLUMNS]
        index = {c: header.index(c) for c in COLUMNS + tuple(target_columns)}

        columns: dict[str, list] = {c: [] for c in index}
        line_of_row: list[int] = []
        for cells in reader:
            line = comments + reader.line_num
            if not cells:
                continue
            if len(cells) != len(header):
                raise ManifestError(f"{path}:{line}: {len(cells)} cells, the header has {len(header)}")
            row = {c: cells[i] for c, i in index.items()}
            try:
                row["label"] = int(row["label"])
            except ValueError:
                raise ManifestError(f"{path}:{line}: label {row['label']!r} is not an integer") from None
            for c in index:
                columns[c].append(row[c])
            line_of_row.append(line)

        if classes is None:
            classes = _classes_from_rows(columns["label"], columns["class_name"], path)
        for label, class_name, line in zip(columns["label"], columns["class_name"], line_of_row):
            if 0 <= label < len(classes) and class_name != classes[label]:
                raise ManifestError(
                    f"{path}:{line}: class_name {class_name!r} disagrees with label {label}, "
                    f"which is class {classes[label]!r}"
                )

        root = _existing_root(Path(root) if root is not None else path.parent, "pass --data-root PATH (root=...)")
        manifest = Manifest(
            name=name or path.stem,
            root=root,
            classes=tuple(classes),
            ids=tuple(columns["id"]),
            sources=tuple(columns["source"]),
            labels=tuple(columns["label"]),
            splits=tuple(columns["split"]),
            domains=tuple(columns["domain"]),
            targets={c: tuple(columns[c]) for c in target_columns},
            target_info=target_info,
            pairs=tuple(pairs),
        )
        _validate_from(manifest, path)
        return manifest


def _tuple(value: Any) -> Any:
    """A list or tuple as a tuple; any other value unchanged."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _validate_from(manifest: Manifest, path: Path) -> None:
    """validate(), with the file the manifest came from at the front of the message."""
    try:
        manifest.validate()
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None


def _is_utf8(text: str) -> bool:
    """False for a name Python decoded from undecodable bytes (surrogate escapes, e.g. b"\\xff.png")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escapes(file: str) -> bool:
    """True when a relative path leaves (or is) the root once '..' and '.' are resolved."""
    norm = posixpath.normpath(file)
    return norm in (".", "..") or norm.startswith("../")


def _parse_classes(text: str, where: str) -> list[str]:
    try:
        classes = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: the classes line is not a JSON list: {e}") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ManifestError(f"{where}: the classes line must be a JSON list of strings")
    return classes


def _parse_json(text: str, kind: type, where: str) -> Any:
    """A JSON value of the given kind (dict or list) from a comment line of a manifest CSV."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where} is not JSON: {e}") from None
    if not isinstance(value, kind):
        raise ManifestError(f"{where} must be a JSON {'object' if kind is dict else 'list'}")
    return value


def _classes_from_rows(labels: list[int], class_names: list[str], path: Path) -> list[str]:
    """The class list of a CSV without a classes line: label i -> the class_name of its rows."""
    negative = sorted({label for label in labels if label < 0})
    if negative:
        raise ManifestError(
            f"{path}: negative label(s) {_listing(negative)}; labels are class indices 0, 1, ... "
            f'(or, after a first line \'{_CLASSES_PREFIX} ["name0", "name1", ...]\', indices into that list)'
        )
    by_label: dict[int, str] = {}
    for label, class_name in zip(labels, class_names):
        by_label.setdefault(label, class_name)
    absent = [label for label in range(max(by_label, default=-1) + 1) if label not in by_label]
    if absent:
        raise ManifestError(
            f"{path}: no rows with label(s) {_listing(absent)}, so their class names are unknown; "
            f'add a first line \'{_CLASSES_PREFIX} ["name0", "name1", ...]\''
        )
    return [by_label[label] for label in range(len(by_label))]


def _existing_root(root: Path, hint: str) -> Path:
    """The resolved root, or a ManifestError saying how to point at the right folder."""
    resolved = root.expanduser().resolve()
    if not resolved.is_dir():
        raise ManifestError(f"data root {resolved} does not exist or is not a folder; {hint}")
    return resolved


def list_datasets() -> list[str]:
    """Names of the datasets shipped as data_manifests/<name>.yaml."""
    return sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))


def dataset_description(name: str) -> str:
    """The title of data_manifests/<name>.yaml: its header comment up to the first colon or full
    stop (e.g. `CIFAR-10 test set`); '' when the file has no header comment."""
    header = []
    for line in (DATASETS_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.removeprefix("#").strip())
    return re.split(r":\s|\.(?:\s+(?=[A-Z])|$)", " ".join(header), maxsplit=1)[0].strip()


def load_dataset(name: str, data_root: str | Path | None = None) -> Manifest:
    """The manifest of a shipped dataset; data_root overrides the YAML's env var and default root."""
    known = list_datasets()
    if name not in known:
        raise ManifestError(f"unknown dataset {name!r}; known datasets: {', '.join(known)}")
    return _load_yaml(DATASETS_DIR / f"{name}.yaml", data_root)


def load_manifest(path: str | Path, data_root: str | Path | None = None) -> Manifest:
    """A manifest from a dataset YAML (same schema as the shipped ones) or a CSV."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return _load_yaml(path, data_root)
    if suffix == ".csv":
        return Manifest.from_csv(path, root=data_root)
    raise ManifestError(f"{path}: a manifest is a .yaml/.yml dataset file or a .csv table, not {suffix or 'no suffix'}")


def _load_yaml(path: Path, data_root: str | Path | None) -> Manifest:
    """Resolve the root (data_root > $root_env > root > the builder's embedded data), then build."""
    from data_manifests.builders import BUILDERS, EMBEDDED_ROOTS  # builders import this module

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ManifestError(f"cannot read dataset file {path}: {e}") from e
    if not isinstance(spec, dict):
        raise ManifestError(f"{path}: expected a mapping with keys {', '.join(_YAML_KEYS)}")
    unknown = sorted(set(spec) - set(_YAML_KEYS))
    if unknown:
        raise ManifestError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_YAML_KEYS)}")
    for key in ("name", "builder"):
        if not isinstance(spec.get(key), str):
            raise ManifestError(f"{path}: '{key}' must be given as a string")
    name, builder_name = spec["name"], spec["builder"]
    if builder_name not in BUILDERS:
        raise ManifestError(f"{path}: unknown builder {builder_name!r}; known builders: {', '.join(BUILDERS)}")
    builder = BUILDERS[builder_name]
    options = spec.get("options") or {}
    if not isinstance(options, dict):
        raise ManifestError(f"{path}: 'options' must be a mapping of keyword arguments for {builder_name!r}")

    root_env = spec.get("root_env")
    hint = (f"set {root_env}=PATH or " if root_env else "") + "pass --data-root PATH (with make extract: DATA_ROOT=PATH)"
    if data_root is not None:
        root = Path(data_root)
    elif root_env and os.environ.get(root_env):
        root = Path(os.environ[root_env])
    elif spec.get("root") is not None:
        root = Path(str(spec["root"]))
    elif builder_name in EMBEDDED_ROOTS:
        root = EMBEDDED_ROOTS[builder_name]
    else:
        raise ManifestError(f"dataset {name!r} ({path}) has no data root; {hint}")
    root = _existing_root(root, f"dataset {name!r} ({path}): {hint}")

    try:
        inspect.signature(builder).bind(root, name, **options)
    except TypeError as e:
        raise ManifestError(f"{path}: options {options} do not fit builder {builder_name!r}: {e}") from None
    manifest = builder(root, name, **options)
    _validate_from(manifest, path)
    return manifest
