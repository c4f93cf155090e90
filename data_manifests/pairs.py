"""Builders of image-pair datasets for semantic correspondence: manifests with a `keypoints` and a
`bbox` target column (inline values) and `pairs` (source id, target id, category, split).

Keypoints are (x, y, visible) in continuous pixel coordinates (the centre of the top-left pixel is
(0.5, 0.5)); a row holds every keypoint index of its category (K of them), invisible ones as
(0, 0, 0). A pair is scored on the keypoints visible in both of its images.

- `spair` (SPair-71k, Min et al. 2019): `JPEGImages/<category>/<image>.jpg` and
  `PairAnnotation/<split>/<pair>.json` with `src_imname`, `trg_imname`, `category`, `src_kps`,
  `trg_kps`, `kps_ids` (the keypoint index of each listed point), `src_bndbox` and `trg_bndbox`
  (x0, y0, x1, y1). Points and boxes are integer pixel indices, as DIFT's eval_spair.py indexes
  the upsampled map with them: they are read as the centres of those pixels (+ 0.5), so that a
  box's max(x1 - x0, y1 - y0) is DIFT's PCK threshold unchanged. An image's points are gathered
  from all its pairs (the same keypoint index must have the same point in every pair).
- `pf_willow` (PF-WILLOW, Ham et al. 2016) and `pf_pascal` (PF-PASCAL, Ham et al. 2018): the pair
  CSVs of the NCNet/WeakAlign releases. PF-WILLOW `test_pairs_pf.csv`: imageA, imageB, then XA1..10,
  YA1..10, XB1..10, YB1..10; the category is the image's folder (e.g. `car(G)`). PF-PASCAL
  `test_pairs_pf_pascal.csv`: source_image, target_image, class (1..20, PASCAL_CLASSES), XA, YA,
  XB, YB (each a ';'-separated list). Image paths are relative to the root as the CSV writes them.
  Coordinates are MATLAB's 1-based pixel coordinates (Proposal Flow's annotations): - 0.5. The
  CSVs give no object box: an image's bbox is its keypoints' bounding box (the reference length of
  the PF papers' PCK, which take it on the source image; we take it on the target, like SPair).
  PF-PASCAL lists, per pair, only the points both images show, so one image can have different
  points in different pairs: each distinct point list of an image is its own row, the first with
  the image path as id, the next ones `<path>~2`, `<path>~3`, ... (same image file).
- `cub_parts` (CUB-200-2011, Wah et al. 2011): `images.txt`, `classes.txt`,
  `image_class_labels.txt`, `train_test_split.txt`, `bounding_boxes.txt` (x, y, width, height)
  and `parts/part_locs.txt` (image, part 1..15, x, y, visible), coordinates taken as given. CUB
  has no pairs: within each class, the images of the chosen split in images.txt order are paired
  consecutively (1st with 2nd, 2nd with 3rd, ...), up to `pairs_per_class` pairs.
- `warps`: a real offline set made here, `n` photos per class of an `<class>/<image>` folder and a
  known warp of each (data_manifests/sources.py `#warp=` fragment: rotation, scale, translation,
  and a horizontal flip on every other pair, i.e. half of them), with a grid of keypoints on the
  source mapped exactly through the warp (invisible where they leave the image). The flip
  convention: keypoint k of the warped image is where the content under source keypoint k went,
  so a flipped pair asks for the mirrored position (not SPair's left/right swap of part names).
  The source's bbox is the whole image, the warped image's the bounding box of the warped source
  rectangle, clipped to the image.
"""

from __future__ import annotations

import csv
import json
import posixpath
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_manifests.builders import BUILDERS, _class_folders, _image_files
from data_manifests.manifest import INLINE, Manifest, ManifestError
from data_manifests.sources import load_image, parse_warp, warp_fragment, warp_points

PASCAL_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                  "tvmonitor")
CUB_PARTS = 15  # parts/parts.txt: back, beak, belly, ..., throat
TARGET_INFO = {"keypoints": {"decode": None, "names": None}, "bbox": {"decode": None}}


def inline(values: np.ndarray) -> str:
    """`inline:<json>` of a float array (keypoints (K, 3), a bbox (4,)), numbers as repr writes them."""
    return INLINE + json.dumps(np.asarray(values, dtype=np.float64).tolist(), separators=(",", ":"))


def _keypoint_row(points: dict[int, tuple[float, float]], k: int) -> np.ndarray:
    """(k, 3) (x, y, visible) from {index: (x, y)}; absent indices are (0, 0, 0)."""
    row = np.zeros((k, 3))
    for index, (x, y) in points.items():
        row[index] = (x, y, 1.0)
    return row


def _pair_manifest(name: str, root: Path, classes: Sequence[str], images: list[tuple[str, str, int, str]],
                   keypoints: Sequence[np.ndarray], boxes: Sequence[np.ndarray | None],
                   pairs: list[tuple[str, str, str, str]]) -> Manifest:
    """A Manifest from (id, source, label, split) rows, their keypoints and boxes, and the pairs."""
    if not pairs:
        raise ManifestError(f"dataset {name!r}: no image pairs found under {root}")
    ids, sources, labels, splits = zip(*images)
    return Manifest(
        name=name, root=root, classes=tuple(classes), ids=ids, sources=sources, labels=labels, splits=splits,
        domains=("photo",) * len(ids),
        targets={"keypoints": tuple(inline(k) for k in keypoints),
                 "bbox": tuple("" if b is None else inline(b) for b in boxes)},
        target_info=TARGET_INFO, pairs=tuple(pairs),
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: cannot read the pair annotation: {e}") from None


def spair(root: Path, name: str, splits: Sequence[str] = ("test",)) -> Manifest:
    """SPair-71k pairs of `splits` (PairAnnotation/<split>/*.json, sorted), images under JPEGImages/."""
    classes = _class_folders(root / "JPEGImages")
    points: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    box: dict[str, np.ndarray] = {}
    split_of: dict[str, str] = {}
    category_of: dict[str, str] = {}
    pairs = []
    for split in splits:
        folder = root / "PairAnnotation" / split
        if not folder.is_dir():
            raise ManifestError(f"dataset {name!r}: {folder} does not exist (splits are trn, val, test)")
        for path in sorted(folder.glob("*.json")):
            data = _read_json(path)
            try:
                category = data["category"]
                ids = [posixpath.join("JPEGImages", category, data[f"{s}_imname"]) for s in ("src", "trg")]
                kps_ids = [int(k) for k in data["kps_ids"]]
                for side, image in zip(("src", "trg"), ids):
                    kps = np.asarray(data[f"{side}_kps"], dtype=np.float64).reshape(-1, 2) + 0.5
                    if len(kps) != len(kps_ids):
                        raise ValueError(f"{len(kps)} {side}_kps for {len(kps_ids)} kps_ids")
                    for k, (x, y) in zip(kps_ids, kps.tolist()):
                        if points[image].setdefault(k, (x, y)) != (x, y):
                            raise ValueError(f"keypoint {k} of {image} is {points[image][k]} in another pair")
                    box[image] = np.asarray(data[f"{side}_bndbox"], dtype=np.float64) + 0.5
                    split_of.setdefault(image, split)
                    category_of[image] = category
            except (KeyError, TypeError, ValueError) as e:
                raise ManifestError(f"{path}: not an SPair-71k pair annotation ({type(e).__name__}: {e})") from None
            if category not in classes:
                raise ManifestError(f"{path}: category {category!r} has no folder JPEGImages/{category}")
            pairs.append((ids[0], ids[1], category, split))
    k_of = defaultdict(int)
    for image, kps in points.items():
        k_of[category_of[image]] = max(k_of[category_of[image]], max(kps) + 1)
    images = sorted(points)
    return _pair_manifest(
        name, root, classes, [(i, i, classes.index(category_of[i]), split_of[i]) for i in images],
        [_keypoint_row(points[i], k_of[category_of[i]]) for i in images], [box[i] for i in images], pairs)


def _csv_rows(path: Path) -> list[list[str]]:
    """The data rows of a CSV with a header line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise ManifestError(f"cannot read the pair list {path}: {e}") from None
    if len(rows) < 2:
        raise ManifestError(f"{path}: no pairs (expected a header line and one line per pair)")
    return [row for row in rows[1:] if row]


def _pf_manifest(name: str, root: Path, path: Path,
                 parsed: list[tuple[str, str, str, np.ndarray, np.ndarray]]) -> Manifest:
    """Rows and pairs of PF pairs (image A, image B, category, points A (n, 2), points B (n, 2)) in
    MATLAB pixel coordinates; one row per distinct point list of an image, its bbox the points'
    bounding box (module docstring)."""
    classes = sorted({category for _, _, category, _, _ in parsed})
    rows: dict[tuple[str, bytes], str] = {}  # (image, points) -> id
    images, keypoints, boxes, pairs = [], [], [], []
    for a, b, category, *both in parsed:
        ids = []
        for image, pts in zip((a, b), both):
            pts = pts - 0.5
            key = (image, pts.tobytes())
            if key not in rows:
                copies = sum(1 for other, _ in rows if other == image)
                rows[key] = image if copies == 0 else f"{image}~{copies + 1}"
                images.append((rows[key], image, classes.index(category), "test"))
                keypoints.append(np.column_stack([pts, np.ones(len(pts))]))
                boxes.append(np.concatenate([pts.min(axis=0), pts.max(axis=0)]))
            ids.append(rows[key])
        pairs.append((ids[0], ids[1], category, "test"))
    missing = sorted({source for _, source, _, _ in images if not (root / source).is_file()})
    if missing:
        raise ManifestError(f"{path}: {len(missing)} images not under {root}, e.g. {missing[0]}")
    return _pair_manifest(name, root, classes, images, keypoints, boxes, pairs)


def _numbers(cells: Sequence[str], path: Path, line: int) -> np.ndarray:
    try:
        return np.asarray([float(c) for c in cells], dtype=np.float64)
    except ValueError:
        raise ManifestError(f"{path}:{line}: point coordinates must be numbers") from None


def pf_willow(root: Path, name: str, csv_file: str = "test_pairs_pf.csv") -> Manifest:
    """PF-WILLOW pairs of `root/csv_file` (10 points per image); the category is the image's folder.
    The CSV has no boxes: each image's `bbox` target is its keypoints' bounding box (module docstring),
    so the bbox PCK threshold is alpha times the target keypoints' larger extent."""
    path = root / csv_file
    parsed = []
    for line, row in enumerate(_csv_rows(path), start=2):
        if len(row) != 42:
            raise ManifestError(f"{path}:{line}: {len(row)} cells; expected imageA, imageB and 40 coordinates")
        xy = _numbers(row[2:], path, line).reshape(4, 10)
        category = posixpath.basename(posixpath.dirname(row[0]))
        parsed.append((row[0], row[1], category, xy[:2].T, xy[2:].T))
    return _pf_manifest(name, root, path, parsed)


def pf_pascal(root: Path, name: str, csv_file: str = "test_pairs_pf_pascal.csv") -> Manifest:
    """PF-PASCAL pairs of `root/csv_file`; the category is PASCAL_CLASSES[class - 1]. The CSV has no
    boxes: each row's `bbox` target is the bounding box of its keypoints (the points of that pair's
    list), so the bbox PCK threshold is alpha times the target keypoints' larger extent."""
    path = root / csv_file
    parsed = []
    for line, row in enumerate(_csv_rows(path), start=2):
        if len(row) != 7:
            raise ManifestError(f"{path}:{line}: {len(row)} cells; expected source_image, target_image, class, "
                                "XA, YA, XB, YB")
        try:
            category = PASCAL_CLASSES[int(float(row[2])) - 1]
        except (ValueError, IndexError):
            raise ManifestError(f"{path}:{line}: class {row[2]!r} is not 1..20") from None
        xa, ya, xb, yb = (_numbers(cell.split(";"), path, line) for cell in row[3:])
        if not len(xa) == len(ya) == len(xb) == len(yb):
            raise ManifestError(f"{path}:{line}: XA, YA, XB and YB must list as many points")
        parsed.append((row[0], row[1], category, np.column_stack([xa, ya]), np.column_stack([xb, yb])))
    return _pf_manifest(name, root, path, parsed)


def _table(path: Path, columns: int) -> dict[int, list[str]]:
    """`<image id> v1 v2 ...` lines of a CUB text file: {image id: [v1, ...]} (columns values)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e}") from None
    out = {}
    for n, line in enumerate(lines, start=1):
        cells = line.split()
        if not cells:
            continue
        if len(cells) != columns + 1 or not cells[0].isdigit():
            raise ManifestError(f"{path}:{n}: expected an image id and {columns} values, got {line!r}")
        out[int(cells[0])] = cells[1:]
    return out


def cub_parts(root: Path, name: str, split: str = "test", pairs_per_class: int = 25) -> Manifest:
    """CUB-200-2011 images of `split` (train_test_split.txt: 1 train, 0 test) with their 15 part
    locations and boxes, paired within each class (module docstring). Sources `images/<path>`."""
    if split not in ("train", "test"):
        raise ManifestError(f"dataset {name!r}: split must be train or test, got {split!r}")
    paths = _table(root / "images.txt", 1)
    labels = _table(root / "image_class_labels.txt", 1)
    in_train = _table(root / "train_test_split.txt", 1)
    boxes = _table(root / "bounding_boxes.txt", 4)
    classes = [cells[0] for _, cells in sorted(_table(root / "classes.txt", 1).items())]
    parts: dict[int, dict[int, tuple[float, float]]] = defaultdict(dict)
    try:
        for line in (root / "parts" / "part_locs.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                image, part, x, y, visible = line.split()[:5]
                if not 1 <= int(part) <= CUB_PARTS:
                    raise ValueError(f"part {part} is not 1..{CUB_PARTS}")
                if float(visible) > 0:
                    parts[int(image)][int(part) - 1] = (float(x), float(y))
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read {root / 'parts' / 'part_locs.txt'}: {e}") from None
    chosen = [i for i in sorted(paths) if in_train.get(i) == [{"train": "1", "test": "0"}[split]]]
    by_class = defaultdict(list)
    for i in chosen:
        by_class[int(labels[i][0]) - 1].append(i)
    pairs, used = [], set()
    for label, members in sorted(by_class.items()):
        for a, b in list(zip(members, members[1:]))[:pairs_per_class]:
            pairs.append((f"images/{paths[a][0]}", f"images/{paths[b][0]}", classes[label], split))
            used.update((a, b))
    images = sorted(used)
    return _pair_manifest(
        name, root, classes, [(f"images/{paths[i][0]}",) * 2 + (int(labels[i][0]) - 1, split) for i in images],
        [_keypoint_row(parts[i], CUB_PARTS) for i in images],
        [_corners(*map(float, boxes[i])) for i in images], pairs)


def _corners(x: float, y: float, width: float, height: float) -> np.ndarray:
    """(x0, y0, x1, y1) of a box given as (x, y, width, height)."""
    return np.array([x, y, x + width, y + height])


def warp_keypoints(w: int, h: int, grid: int) -> np.ndarray:
    """(grid * grid, 2) float64 source keypoints: x, y at fractions 1/(grid+1) .. grid/(grid+1) of
    the image, row-major."""
    fractions = np.arange(1, grid + 1) / (grid + 1)
    yy, xx = np.meshgrid(fractions * h, fractions * w, indexing="ij")
    return np.column_stack([xx.ravel(), yy.ravel()])


def warps(root: Path, name: str, folder: str = ".", per_class: int = 20, grid: int = 5, seed: int = 0,
          max_rotation: float = 30.0, scale: Sequence[float] = (0.8, 1.25), max_shift: float = 0.1) -> Manifest:
    """Known warps of the first `per_class` images (sorted) of each class of `root/folder/<class>/`.

    Pair k warps its photo by: rotation uniform in [-max_rotation, max_rotation] degrees (0.1 degree
    steps), scale log-uniform in `scale` (steps of 0.001), translation uniform in +-max_shift of the
    width and height (0.01 px steps), and a horizontal flip when k is odd; drawn from
    numpy's default_rng(seed) in pair order. Keypoints: `warp_keypoints` (grid x grid) on the source,
    their warped positions on the warped image, visible when inside it (0 <= x <= w, 0 <= y <= h)."""
    if per_class < 1 or grid < 1:
        raise ManifestError(f"dataset {name!r}: per_class and grid must be >= 1")
    lo, hi = scale
    if not 0 < lo <= hi:
        raise ManifestError(f"dataset {name!r}: scale must be [low, high] with 0 < low <= high, got {list(scale)}")
    base = root / folder
    classes = _class_folders(base)
    rng = np.random.default_rng(seed)
    images, keypoints, boxes, pairs = [], [], [], []
    for label, cls in enumerate(classes):
        for file in _image_files(base / cls)[:per_class]:
            source = posixpath.normpath(posixpath.join(folder, cls, file))
            w, h = load_image(root / source, None).size
            flip = len(pairs) % 2 == 1
            rot, s, tx, ty = (rng.uniform(-max_rotation, max_rotation), np.exp(rng.uniform(np.log(lo), np.log(hi))),
                              rng.uniform(-max_shift, max_shift) * w, rng.uniform(-max_shift, max_shift) * h)
            fragment = warp_fragment(round(rot, 1), round(s, 3), round(tx, 2), round(ty, 2), flip)
            params = parse_warp(fragment, source)  # the numbers the image loader will use
            points = warp_keypoints(w, h, grid)
            moved = warp_points(points, params, w, h)
            inside = np.all((moved >= 0) & (moved <= [w, h]), axis=1)
            corners = warp_points(np.array([[0, 0], [w, 0], [0, h], [w, h]], float), params, w, h)
            box = np.concatenate([np.clip(corners.min(axis=0), 0, [w, h]), np.clip(corners.max(axis=0), 0, [w, h])])
            warped = f"{source}#{fragment}"
            images += [(source, source, label, "test"), (warped, warped, label, "test")]
            keypoints += [np.column_stack([points, np.ones(len(points))]),
                          np.column_stack([np.where(inside[:, None], moved, 0.0), inside])]
            boxes += [np.array([0.0, 0.0, w, h]), box]
            pairs.append((source, warped, cls, "test"))
    return _pair_manifest(name, root, classes, images, keypoints, boxes, pairs)


BUILDERS.update({"spair": spair, "pf_willow": pf_willow, "pf_pascal": pf_pascal, "cub_parts": cub_parts,
                 "warps": warps})
