"""Per-image targets of a manifest, decoded to arrays in the image's own pixels.

A manifest's target column ("mask", "depth", "keypoints", "bbox") holds one source per row: ""
(the row has none), a file relative to the root with an optional `#fragment`, or an inline value
`inline:<json>` (keypoints and bbox only). `target_info[column]["decode"]` names the decoder, a
function (path, fragment) -> np.ndarray registered here with `@register_decoder(name)`.

`target_info` per column:
- mask: {"decode": name, "classes": [names...], "ignore_index": 255}
- depth: {"decode": name, "unit": "m", "max_depth": metres, "eval_crop": "eigen" | None}
  (max_depth and eval_crop are evaluation settings; the decoded map is not capped or cropped)
- keypoints: {"decode": name or None, "names": [...] or None}
- bbox: {"decode": name or None}

Decoders of this module (the convention each one follows is in its docstring):
voc-palette, ade20k, cityscapes-labelids, coco-stuff-171, nyu-depth-mm, mnist-seg, quickdraw-seg.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from data_manifests.manifest import INLINE, Manifest, ManifestError
from data_manifests.sources import load_image

Decoder = Callable[[Path, "str | None"], np.ndarray]
DECODERS: dict[str, Decoder] = {}
IGNORE_INDEX = 255

# Cityscapes label id -> train id for the 19 evaluated classes (cityscapesScripts
# helpers/labels.py); every other id (void, parking, rail track, guard rail, bridge, tunnel,
# polegroup, caravan, trailer) is ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# COCO-Stuff-164k `stuffthingmaps` PNGs hold the COCO category id minus 1 (0..181; 255 unlabeled).
# These 11 values are ids COCO never uses; the other 171 become 0..170 in order, as in
# mmsegmentation's tools/dataset_converters/coco_stuff164k.py.
COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def register_decoder(name: str) -> Callable[[Decoder], Decoder]:
    """Decorator: add `decoder(path: Path, fragment: str | None) -> np.ndarray` to DECODERS as `name`.

    Raises ValueError when the name is taken (two decoders would silently disagree)."""

    def add(decoder: Decoder) -> Decoder:
        if name in DECODERS:
            raise ValueError(f"a target decoder named {name!r} is already registered")
        DECODERS[name] = decoder
        return decoder

    return add


def load_target(manifest: Manifest, column: str, i: int) -> np.ndarray | None:
    """Row i's target of `column`, in the original image's pixels; None when the row has none.

    - mask: (h, w) uint8 class index, target_info["ignore_index"] (255) = ignore
    - depth: (h, w) float32 metres, 0 = invalid
    - keypoints: (K, 3) float32 (x, y, visible), continuous pixel coordinates (the centre of the
      top-left pixel is (0.5, 0.5)); visible is 1 or 0
    - bbox: (4,) float32 (x0, y0, x1, y1) in the same coordinates

    A mask or depth map has the h, w of its image by the dataset's convention; it is not compared
    with the image here (that would decode the image too). Raises ManifestError, in one line naming
    the file, for an unknown column or row, an unreadable file or a value outside its column's range.
    """
    if column not in manifest.targets:
        raise ManifestError(f"manifest {manifest.name!r} has no target column {column!r} "
                            f"(it has: {', '.join(manifest.targets) or 'none'})")
    if not 0 <= i < len(manifest):
        raise ManifestError(f"manifest {manifest.name!r} has no row {i} (it has {len(manifest)})")
    source = manifest.targets[column][i]
    if not source:
        return None
    info = manifest.target_info[column]
    if source.startswith(INLINE):
        where = f"{column} of {manifest.ids[i]!r}"
        value = _inline(source[len(INLINE):], column, where)
    else:
        file, _, fragment = source.partition("#")
        path = manifest.root / file
        where = f"{path}{'#' + fragment if fragment else ''}"
        decode = DECODERS.get(info.get("decode"))
        if decode is None:
            raise ManifestError(f"{where}: unknown decoder {info.get('decode')!r} for {column}; "
                                f"known: {', '.join(sorted(DECODERS))}")
        try:
            value = decode(path, fragment or None)
        except (OSError, ValueError, IndexError, KeyError, SyntaxError, Image.DecompressionBombError) as e:
            message = " ".join(str(e).split())
            raise ManifestError(f"{where}: cannot read the {column}: {message}") from e
    _check(value, column, info, where)
    return value


def _inline(text: str, column: str, where: str) -> np.ndarray:
    """keypoints [[x, y, visible], ...] -> (K, 3) float32, bbox [x0, y0, x1, y1] -> (4,) float32."""
    try:
        value = np.asarray(json.loads(text), dtype=np.float32)
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise ManifestError(f"{where}: the inline value is not a JSON list of numbers: {e}") from None
    return value


def _check(value: np.ndarray, column: str, info: dict, where: str) -> None:
    """Refuse, in one line, a decoded target of the wrong shape, dtype or range for its column."""
    shapes = {"mask": "(h, w) uint8", "depth": "(h, w) float32", "keypoints": "(K, 3) float32",
              "bbox": "(4,) float32"}
    ok = isinstance(value, np.ndarray) and {
        "mask": lambda: value.ndim == 2 and value.dtype == np.uint8,
        "depth": lambda: value.ndim == 2 and value.dtype == np.float32,
        "keypoints": lambda: value.ndim == 2 and value.shape[1:] == (3,) and value.dtype == np.float32,
        "bbox": lambda: value.shape == (4,) and value.dtype == np.float32,
    }[column]()
    if not ok:
        got = f"{value.shape} {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
        raise ManifestError(f"{where}: the {column} must be {shapes[column]}, got {got}")
    if column == "mask":
        ignore = info["ignore_index"]
        bad = np.unique(value[(value >= len(info["classes"])) & (value != ignore)])
        if bad.size:
            raise ManifestError(f"{where}: mask values {bad[:5].tolist()} are neither class indices "
                                f"0..{len(info['classes']) - 1} nor the ignore index {ignore}")
    elif not np.isfinite(value).all():
        raise ManifestError(f"{where}: the {column} has NaN or infinite values")
    elif column == "depth" and (value < 0).any():
        raise ManifestError(f"{where}: negative depth (min {float(value.min())} m); 0 marks invalid pixels")
    elif column == "keypoints" and not np.isin(value[:, 2], (0, 1)).all():
        raise ManifestError(f"{where}: keypoint visibility (third value) must be 1 or 0")
    elif column == "bbox" and (value[2] < value[0] or value[3] < value[1]):
        raise ManifestError(f"{where}: bbox {value.tolist()} has x1 < x0 or y1 < y0 (expected x0, y0, x1, y1)")


def _index_png(path: Path, fragment: str | None) -> np.ndarray:
    """(h, w) uint8 of an 8-bit single-channel PNG, palette ("P") or grey ("L"), values as stored."""
    if fragment is not None:
        raise ValueError("a label image takes no '#fragment'")
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"expected an 8-bit palette or grey label image, got mode {image.mode} "
                             "(a colour rendering of the labels cannot be read as class indices)")
        return np.array(image, dtype=np.uint8)


def _lookup(values: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """uint8 values mapped through `table`; values absent from it become IGNORE_INDEX."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(table)] = list(table.values())
    return lut[values]


@register_decoder("voc-palette")
def voc_palette(path: Path, fragment: str | None) -> np.ndarray:
    """PASCAL VOC `SegmentationClass/*.png`: palette image whose indices are the 21 classes
    (0 = background) and 255 on object boundaries and difficult regions, kept as the ignore index."""
    return _index_png(path, fragment)


@register_decoder("ade20k")
def ade20k(path: Path, fragment: str | None) -> np.ndarray:
    """ADE20K (SceneParsing, ADEChallengeData2016) `annotations/*.png`: 0 = other/unlabelled -> 255,
    1..150 -> 0..149 (mmsegmentation's reduce_zero_label)."""
    values = _index_png(path, fragment)
    return np.where(values == 0, IGNORE_INDEX, values - 1).astype(np.uint8)


@register_decoder("cityscapes-labelids")
def cityscapes_labelids(path: Path, fragment: str | None) -> np.ndarray:
    """Cityscapes `gtFine/*_gtFine_labelIds.png` label ids -> the 19 train ids (CITYSCAPES_TRAIN_IDS,
    from cityscapesScripts), every other id -> 255."""
    return _lookup(_index_png(path, fragment), CITYSCAPES_TRAIN_IDS)


@register_decoder("coco-stuff-171")
def coco_stuff_171(path: Path, fragment: str | None) -> np.ndarray:
    """COCO-Stuff-164k `stuffthingmaps_trainval2017/*.png` (COCO id - 1, 255 unlabeled) -> the 171
    classes 0..170 (80 things then 91 stuff), as mmsegmentation converts them; 255 stays 255."""
    used = [v for v in range(182) if v not in COCO_STUFF_UNUSED]
    return _lookup(_index_png(path, fragment), dict(zip(used, range(len(used)))))


@register_decoder("nyu-depth-mm")
def nyu_depth_mm(path: Path, fragment: str | None) -> np.ndarray:
    """NYU Depth v2 `sync_depth_*.png` (the BTS layout): uint16 millimetres -> float32 metres
    (value / 1000, as BTS's data loader does); 0 stays 0 = invalid."""
    if fragment is not None:
        raise ValueError("a depth image takes no '#fragment'")
    with Image.open(path) as image:
        if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise ValueError(f"expected a 16-bit depth PNG in millimetres, got mode {image.mode}")
        millimetres = np.array(image)
    if millimetres.min() < 0 or millimetres.max() > 65535:
        raise ValueError(f"depth values outside 0..65535 mm (min {millimetres.min()}, max {millimetres.max()})")
    return (millimetres.astype(np.float32) / np.float32(1000.0)).astype(np.float32)


def _item_and_class(fragment: str | None) -> tuple[str, int]:
    """'<item>:<class index>' -> (item, class index): the image's fragment and its foreground class."""
    item, _, value = (fragment or "").rpartition(":")
    if not item or not value.isdigit() or not 0 < int(value) < IGNORE_INDEX:
        raise ValueError(f"the fragment must be '<item>:<class index 1..254>', got {fragment!r}")
    return item, int(value)


@register_decoder("mnist-seg")
def mnist_seg(path: Path, fragment: str | None) -> np.ndarray:
    """MNIST-seg: fragment '<item>:<1 + digit>' of an IDX or npz file of digits; pixels whose value
    is > 127 take 1 + the digit, all others 0 (background)."""
    item, value = _item_and_class(fragment)
    pixels = np.asarray(load_image(path, item))
    return np.where(pixels > 127, value, 0).astype(np.uint8)


@register_decoder("quickdraw-seg")
def quickdraw_seg(path: Path, fragment: str | None) -> np.ndarray:
    """Quick,Draw!-seg: fragment '<line>:<1 + class index>' of a `<class>.ndjson`; the drawing is
    rasterised exactly as its image is (sources.rasterise_strokes, black strokes on white), and every
    stroke pixel (not white) takes 1 + the class index, the rest 0 (background)."""
    item, value = _item_and_class(fragment)
    pixels = np.asarray(load_image(path, item))
    return np.where(pixels < 255, value, 0).astype(np.uint8)
