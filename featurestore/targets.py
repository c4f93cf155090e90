"""Per-image targets (masks, depth maps, keypoints, boxes) and image pairs, stored beside the images
table and keyed like it (by store row), so that every dense or correspondence task reads one place.

Layout (zarr arrays under the store's root)::

    targets/                     attrs: keypoint names, datasets
      keypoints                  (N, K, 3) float32 (x, y, visible) in ORIGINAL image pixels (continuous
                                 coordinates: the centre of the top-left pixel is (0.5, 0.5)); a row
                                 with fewer than K points (or none) is NaN beyond them
      bbox                       (N, 4) float32 (x0, y0, x1, y1), original pixels; NaN: no box
      <resize>-<size>/           one group per geometry key ("crop-28", "squash-768"); attrs: resize,
                                 size, datasets, mask {classes, ignore_index}, depth {unit,
                                 max_depth, eval_crop}
        mask                     (N, S, S) uint8 class index at the backbone's input pixels (nearest
                                 resampling through the geometry); ignore_index (255) = ignore, also
                                 outside the image and for rows without a mask
        depth                    (N, S, S) float32 metres likewise; 0 = invalid
        geometry                 (N, 4) float64 [sx, ox, sy, oy]: x_in = sx * x + ox, y_in = sy * y + oy
        image_size               (N, 2) int64 (w, h) of the original image
        done, failed             (N,) uint8: the row's targets were written / could not be read
        error                    (N,) str: why a row failed
      pairs/{dataset,source,target,category,split}   one row per image pair (source and target as
                                 store rows); attribute `rows` is the committed count

N is the number of rows of the images table when the targets were last written (arrays grow with
it). Everything is written under the store lock, `done` last, so a killed writer leaves rows not
done, which the next extraction writes. This module knows nothing of torch, nor of how targets
are decoded or transformed (pipelines/extract/reader.py does that).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from featurestore.store import FeatureStore, Run, StoreError, WritableStore

TARGETS = "targets"
TARGET_COLUMNS = ("mask", "depth", "keypoints", "bbox")
# what the store records of each column's manifest `target_info` (its decoder name is not kept)
STORED_INFO = {"mask": ("classes", "ignore_index"), "depth": ("unit", "max_depth", "eval_crop"),
               "keypoints": ("names",), "bbox": ()}
IGNORE_INDEX = 255
PAIR_COLUMNS = ("dataset", "source", "target", "category", "split")
_TARGET_BYTES = 8 << 20  # an (S, S) array's zarr chunk holds about this many bytes
_TABLE_CHUNK = 65536
_WRITE_BATCH = 256  # rows decoded between two writes (and two takes of the store lock)
_LOAD_THREADS = 4


def geometry_key(resize: str, size: int) -> str:
    """The group name of targets at one geometry: f"{resize}-{size}" ("crop-28", "squash-768")."""
    return f"{resize}-{int(size)}"


@dataclass
class RowTargets:
    """One image's targets as stored: per-pixel ones already at the input (size x size), points
    and boxes in original pixels. None: the row has none of that kind."""

    image_size: tuple[int, int]  # (w, h) of the original image
    geometry: np.ndarray  # (4,) float64 [sx, ox, sy, oy]
    mask: np.ndarray | None = None  # (S, S) uint8
    depth: np.ndarray | None = None  # (S, S) float32 metres, 0 invalid
    keypoints: np.ndarray | None = None  # (K, 3) float32 (x, y, visible)
    bbox: np.ndarray | None = None  # (4,) float32 (x0, y0, x1, y1)


def write_targets(
    store: WritableStore,
    dataset: str,
    rows: np.ndarray,
    *,
    resize: str,
    size: int,
    info: Mapping[str, Mapping[str, Any]],
    load: Callable[[int], RowTargets],
    advance: Callable[[int], None] | None = None,
    retry_failed: bool = False,
) -> int:
    """Write the targets of images-table rows `rows` (row k is manifest row k, read by `load(k)`)
    at geometry (resize, size), skipping rows already done (and, unless `retry_failed`, rows that
    failed before); returns how many rows were written.

    `info`: per target column the dataset has ("mask", "depth", "keypoints", "bbox"), its
    attributes (a manifest's `target_info`), of which the store records STORED_INFO: mask
    {"classes", "ignore_index"}, depth {"unit", "max_depth", "eval_crop"}, keypoints {"names"}.
    An exception from `load(k)` fails that row only: its message is stored and the row is marked
    failed (like an image that cannot be decoded). `load` runs in _LOAD_THREADS threads (image
    decoders release the GIL), outside the store lock; each batch of rows is written under it,
    `done` last.

    Raises StoreError (one line, before anything is written) when the store's targets at this
    geometry record other mask classes, another ignore index or other depth conventions than
    `info`, or other keypoint names."""
    unknown = sorted(set(info) - set(TARGET_COLUMNS))
    if unknown:
        raise StoreError(f"unknown target column {', '.join(unknown)}; targets are {', '.join(TARGET_COLUMNS)}")
    info = {column: {k: _plain(v) for k, v in info[column].items() if k in STORED_INFO[column]} for column in info}
    if "mask" in info:
        info["mask"].setdefault("ignore_index", IGNORE_INDEX)
        if info["mask"]["ignore_index"] != IGNORE_INDEX:
            raise StoreError(f"dataset {dataset!r} declares ignore index {info['mask']['ignore_index']}; stored masks "
                             f"use {IGNORE_INDEX} (map its ignored pixels to {IGNORE_INDEX} in the decoder)")
    rows = np.asarray(rows, dtype=np.int64)
    key = geometry_key(resize, size)
    with store.lock.held():
        group = _prepare(store, dataset, key, resize, size, info)
        redo = np.zeros(len(rows), dtype=bool)
        if len(rows):
            redo = group["done"].get_coordinate_selection(rows) == 0
            if retry_failed:
                redo |= group["failed"].get_coordinate_selection(rows) == 1
        todo = np.flatnonzero(redo)

    def one(k: int) -> RowTargets | str:
        try:
            return _checked(load(k), int(size))
        except Exception as exc:  # noqa: BLE001 - an unreadable target fails its row only
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(_LOAD_THREADS) as pool:
        for start in range(0, len(todo), _WRITE_BATCH):
            batch = todo[start : start + _WRITE_BATCH]
            loaded = list(pool.map(one, batch.tolist()))
            with store.lock.held():
                _write_batch(store, key, rows[batch], loaded, size)
            if advance is not None:
                advance(len(batch))
    return len(todo)


def write_pairs(store: WritableStore, dataset: str, pairs: Sequence[tuple[int, int, str, str]]) -> int:
    """Append image pairs (source store row, target store row, category, split) of `dataset` to
    the pairs table, leaving out those it already holds; returns how many were added. Under the
    store lock; the row count is committed last."""
    with store.lock.held():
        g = store.group.require_group(TARGETS).require_group("pairs")
        if "rows" not in g.attrs:
            for c in PAIR_COLUMNS:
                g.create_array(c, shape=(0,), dtype="int64" if c in ("source", "target") else str,
                               chunks=(_TABLE_CHUNK,), dimension_names=("pair",), overwrite=True)
            g.attrs["rows"] = 0
        n = int(g.attrs["rows"])
        have = set(zip(*(g[c][:n].tolist() for c in PAIR_COLUMNS))) if n else set()
        new = [row for row in dict.fromkeys((dataset, int(s), int(t), str(c), str(sp)) for s, t, c, sp in pairs)
               if row not in have]
        if not new:
            return 0
        for i, c in enumerate(PAIR_COLUMNS):
            g[c].resize((n + len(new),))
            g[c][n:] = np.asarray([row[i] for row in new], dtype=np.int64 if c in ("source", "target") else str)
        g.attrs["rows"] = n + len(new)  # the commit
        return len(new)


def _prepare(store: WritableStore, dataset: str, key: str, resize: str, size: int,
             info: Mapping[str, Mapping[str, Any]]) -> zarr.Group:
    """The group of `key`, created or grown to the images table, after checking that `info`
    agrees with what it records (StoreError otherwise); records `dataset` and `info`."""
    root = store.group.require_group(TARGETS)
    group = root.require_group(key)
    attrs = group.attrs.asdict()
    for column in ("mask", "depth"):
        if column in info and column in attrs and dict(attrs[column]) != _plain(info[column]):
            raise StoreError(f"the store's {column} targets at {key} are {attrs[column]} (datasets "
                             f"{', '.join(attrs.get('datasets', []))}); dataset {dataset!r} has {_plain(info[column])}: "
                             "use another store for it")
    names = _plain(info.get("keypoints", {})).get("names")
    if "keypoints" in info and root.attrs.get("keypoint_names", names) != names:
        raise StoreError(f"the store's keypoints are named {root.attrs['keypoint_names']}; dataset {dataset!r} "
                         f"names them {names}: use another store for it")
    n = len(store.images)
    s = int(size)
    plane_rows = max(1, _TARGET_BYTES // (s * s * 4))
    arrays = [  # (group, name, trailing shape, dtype, fill, chunk rows, dimension names)
        (group, "done", (), "uint8", 0, _TABLE_CHUNK, ("store_row",)),
        (group, "failed", (), "uint8", 0, _TABLE_CHUNK, ("store_row",)),
        (group, "error", (), str, "", _TABLE_CHUNK, ("store_row",)),
        (group, "geometry", (4,), "float64", np.nan, _TABLE_CHUNK, ("store_row", "geometry")),
        (group, "image_size", (2,), "int64", 0, _TABLE_CHUNK, ("store_row", "wh")),
        *([(group, "mask", (s, s), "uint8", IGNORE_INDEX, plane_rows, ("store_row", "y", "x"))] if "mask" in info else []),
        *([(group, "depth", (s, s), "float32", 0.0, plane_rows, ("store_row", "y", "x"))] if "depth" in info else []),
        *([(root, "keypoints", (1, 3), "float32", np.nan, _TABLE_CHUNK, ("store_row", "keypoint", "xyv"))]
          if "keypoints" in info else []),
        *([(root, "bbox", (4,), "float32", np.nan, _TABLE_CHUNK, ("store_row", "xyxy"))] if "bbox" in info else []),
    ]
    for parent, name, shape, dtype, fill, chunk_rows, dims in arrays:
        if name not in parent:
            parent.create_array(name, shape=(n, *shape), dtype=dtype, chunks=(chunk_rows, *shape), fill_value=fill,
                                dimension_names=dims)
    # every target array reaches the images table, also those written for another dataset (whose
    # new rows then hold the fill: none); `RunTargets._read` relies on it
    for _, array in [*group.arrays(), *((name, root[name]) for name in ("keypoints", "bbox") if name in root)]:
        if array.shape[0] < n:
            array.resize((n, *array.shape[1:]))
    if "keypoints" in info and "keypoint_names" not in root.attrs:
        root.attrs["keypoint_names"] = names
    group.attrs.update({
        "resize": resize, "size": s, "datasets": sorted({*attrs.get("datasets", []), dataset}),
        **{column: _plain(info[column]) for column in ("mask", "depth") if column in info},
    })
    root.attrs["datasets"] = sorted({*root.attrs.get("datasets", []), dataset})
    return group


def _plain(value: Any) -> Any:
    """`value` as it reads back from zarr attributes (JSON): tuples as lists, mappings as dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _checked(row: RowTargets, size: int) -> RowTargets:
    """`row`, after checking the shape of each target it has (ValueError naming the first wrong one)."""
    shapes = {"mask": (size, size), "depth": (size, size), "bbox": (4,), "geometry": (4,)}
    for name, shape in shapes.items():
        value = getattr(row, name)
        if value is not None and np.shape(value) != shape:
            raise ValueError(f"its {name} has shape {np.shape(value)}, not {shape}")
    if row.keypoints is not None and (np.ndim(row.keypoints) != 2 or np.shape(row.keypoints)[1] != 3):
        raise ValueError(f"its keypoints have shape {np.shape(row.keypoints)}, not (K, 3)")
    return row


def _write_batch(store: WritableStore, key: str, rows: np.ndarray, loaded: list[RowTargets | str], size: int) -> None:
    """Write the loaded rows (a RowTargets, or the error message of a row that failed), `done` last."""
    root = store.group[TARGETS]
    group = root[key]
    order = np.argsort(rows)
    rows, loaded = rows[order], [loaded[i] for i in order]
    ok = np.array([not isinstance(x, str) for x in loaded], dtype=bool)
    good = [x for x in loaded if not isinstance(x, str)]
    group["failed"].set_coordinate_selection(rows, (~ok).astype(np.uint8))
    errors = np.asarray([x if isinstance(x, str) else "" for x in loaded], dtype=str)
    group["error"].set_coordinate_selection(rows, errors)
    if good:
        at = (rows[ok],)
        group["geometry"].set_orthogonal_selection(at, np.stack([np.asarray(x.geometry, np.float64) for x in good]))
        group["image_size"].set_orthogonal_selection(at, np.asarray([x.image_size for x in good], dtype=np.int64))
        for name, fill, dtype in (("mask", IGNORE_INDEX, np.uint8), ("depth", 0.0, np.float32)):
            if name in group:
                values = np.full((len(good), size, size), fill, dtype=dtype)
                for i, x in enumerate(good):
                    if getattr(x, name) is not None:
                        values[i] = getattr(x, name)
                group[name].set_orthogonal_selection(at, values)
        if "bbox" in root:
            boxes = np.full((len(good), 4), np.nan, dtype=np.float32)
            for i, x in enumerate(good):
                if x.bbox is not None:
                    boxes[i] = x.bbox
            root["bbox"].set_orthogonal_selection(at, boxes)
        if "keypoints" in root:
            k = max((len(x.keypoints) for x in good if x.keypoints is not None), default=0)
            array = root["keypoints"]
            if k > array.shape[1]:
                array.resize((array.shape[0], k, 3))
            points = np.full((len(good), array.shape[1], 3), np.nan, dtype=np.float32)
            for i, x in enumerate(good):
                if x.keypoints is not None:
                    points[i, : len(x.keypoints)] = x.keypoints
            array.set_orthogonal_selection(at, points)
    group["done"].set_coordinate_selection(rows, np.ones(len(rows), dtype=np.uint8))  # the commit


# -- reading ------------------------------------------------------------------------------------

class RunTargets:
    """The targets of one run's images at the run's geometry (`run_targets(run)`). Methods take
    `rows`: positions in the run (as `Run.read_rows`), any order; each raises StoreError (one
    line) for rows whose targets were not written or failed (`usable_rows` gives those that
    were), and for a kind of target the store does not hold."""

    def __init__(self, run: Run, group: zarr.Group, key: str):
        self.run = run
        self.key = key
        self._group = group
        self._root = run.store.group[TARGETS]
        attrs = group.attrs.asdict()
        self.size: int = int(attrs["size"])
        self.resize: str = attrs["resize"]
        mask = attrs.get("mask", {})
        self.classes: list[str] = list(mask.get("classes", []))
        self.ignore_index: int = int(mask.get("ignore_index", IGNORE_INDEX))
        self.depth_info: dict[str, Any] = dict(attrs.get("depth", {}))
        self.keypoint_names: list[str] | None = self._root.attrs.get("keypoint_names")
        self._store_rows = run.rows
        n = group["done"].shape[0]
        inside = self._store_rows < n
        self.done = np.zeros(len(run), dtype=bool)
        self.failed = np.zeros(len(run), dtype=bool)
        self.done[inside] = group["done"].get_coordinate_selection(self._store_rows[inside]).astype(bool)
        self.failed[inside] = group["failed"].get_coordinate_selection(self._store_rows[inside]).astype(bool)

    def usable_rows(self) -> np.ndarray:
        """Sorted int64 run positions whose targets were written and did not fail."""
        return np.flatnonzero(self.done & ~self.failed)

    @property
    def errors(self) -> dict[str, str]:
        """Image id -> why its targets could not be read, for the rows of the run that failed."""
        at = np.flatnonzero(self.failed)
        messages = self._group["error"].get_coordinate_selection(self._store_rows[at]) if len(at) else []
        ids = self.run.images.id
        return {str(ids[i]): str(m) for i, m in zip(at, messages)}

    def masks(self, rows: np.ndarray) -> np.ndarray:
        """(n, S, S) uint8 class indices at the input pixels; ignore_index where ignored."""
        return self._read(self._group, "mask", rows)

    def depth(self, rows: np.ndarray) -> np.ndarray:
        """(n, S, S) float32 metres at the input pixels; 0 = invalid."""
        return self._read(self._group, "depth", rows)

    def geometry(self, rows: np.ndarray) -> np.ndarray:
        """(n, 4) float64 [sx, ox, sy, oy]: x_in = sx * x + ox, y_in = sy * y + oy."""
        return self._read(self._group, "geometry", rows)

    def image_size(self, rows: np.ndarray) -> np.ndarray:
        """(n, 2) int64 (w, h) of the original images."""
        return self._read(self._group, "image_size", rows)

    def keypoints(self, rows: np.ndarray) -> np.ndarray:
        """(n, K, 3) float32 (x, y, visible) in original pixels; points a row does not have are
        (NaN, NaN, 0). Raises StoreError for a row without keypoints."""
        points = self._read(self._root, "keypoints", rows)
        visible = points[..., 2]
        absent = np.isnan(visible).all(axis=1)
        if absent.any():
            raise StoreError(f"{int(absent.sum())} of the {len(points)} images asked for have no keypoints "
                             f"(run positions {', '.join(map(str, np.asarray(rows)[absent][:5]))})")
        points[..., 2] = np.nan_to_num(visible, nan=0.0)
        return points

    def bbox(self, rows: np.ndarray) -> np.ndarray:
        """(n, 4) float32 (x0, y0, x1, y1) in original pixels. Raises StoreError for a row without one."""
        boxes = self._read(self._root, "bbox", rows)
        absent = np.isnan(boxes).any(axis=1)
        if absent.any():
            raise StoreError(f"{int(absent.sum())} of the {len(boxes)} images asked for have no bounding box "
                             f"(run positions {', '.join(map(str, np.asarray(rows)[absent][:5]))})")
        return boxes

    def pairs(self) -> list[tuple[int, int, str, str]]:
        """(source run position, target run position, category, split) of every stored pair of the
        run's dataset whose two images are both in the run, in the table's order."""
        g = self._root["pairs"] if "pairs" in self._root else None
        n = 0 if g is None else int(g.attrs.get("rows", 0))
        if not n:
            return []
        position = {int(r): i for i, r in enumerate(self._store_rows.tolist())}
        dataset = self.run.spec.get("dataset")
        columns = {c: g[c][:n] for c in PAIR_COLUMNS}
        return [
            (position[s], position[t], str(c), str(sp))
            for d, s, t, c, sp in zip(*(columns[c].tolist() for c in PAIR_COLUMNS))
            if d == dataset and s in position and t in position
        ]

    def _read(self, group: zarr.Group, name: str, rows: np.ndarray) -> np.ndarray:
        if name not in group:
            raise StoreError(f"the store holds no {name} targets (run {self.run.run_id}, dataset "
                             f"{self.run.spec.get('dataset')!r}); the dataset's manifest declares none")
        index = np.asarray(rows, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self.run)):
            raise StoreError(f"run {self.run.run_id} has positions 0..{len(self.run) - 1}; asked for {int(index.max())}")
        pending = int((~self.done[index]).sum())
        if pending:
            raise StoreError(f"targets ({self.key}) of {pending} of the {len(index)} images asked for are not "
                             "written; run the same `featurestore extract` again to write them")
        failed = int(self.failed[index].sum())
        if failed:
            raise StoreError(f"targets of {failed} of the {len(index)} images asked for could not be read "
                             "(RunTargets.errors says why); read rows=usable_rows()")
        array = group[name]  # it reaches every done row (`_prepare`)
        unique, inverse = np.unique(self._store_rows[index], return_inverse=True)
        values = array.get_orthogonal_selection((unique,)) if len(unique) else \
            np.zeros((0, *array.shape[1:]), dtype=array.dtype)
        return values[inverse]


def run_targets(run: Run) -> RunTargets:
    """The targets of `run`'s images at the geometry its images were read with: the group
    f"{resize}-{size}" where resize is the spec's "resize" ("crop" when absent) and size the
    backbone's input size. Raises StoreError (one line) when the store holds no targets there
    for any image of the run."""
    size = int(run.provenance["backbone"]["input"]["size"])
    key = geometry_key(run.spec.get("resize", "crop"), size)
    root = run.store.group.get(TARGETS)
    group = None if root is None else root.get(key)
    if group is None or "done" not in group:
        raise StoreError(f"run {run.run_id} ({run.spec.get('dataset')!r}) has no targets in {run.store.url} at "
                         f"{key}: its manifest declares no target columns, or they were never written "
                         "(extracting the same run again writes them)")
    targets = RunTargets(run, group, key)
    if not targets.done.any():
        raise StoreError(f"run {run.run_id} ({run.spec.get('dataset')!r}) has no targets at {key} for any of its "
                         "images: its manifest declares no target columns, or extracting it again writes them")
    return targets


def describe_targets(store: FeatureStore) -> list[dict[str, Any]]:
    """Every target array of the store as {"path", "shape", "dtype"} (for `inspect --json`)."""
    root = store.group.get(TARGETS)
    if root is None:
        return []
    out = []
    for path, node in sorted(root.members(max_depth=None), key=lambda m: m[0]):
        if isinstance(node, zarr.Array):
            dtype = "str" if node.dtype.kind in "TUO" else str(node.dtype)  # zarr's strings read as StringDType
            out.append({"path": f"{TARGETS}/{path}", "shape": list(node.shape), "dtype": dtype})
    return out
