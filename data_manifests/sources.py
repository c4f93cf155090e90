"""Turn a manifest row's (file, fragment) into a PIL image.

Container files (IDX, npz, ndjson) are decoded once and kept in a small LRU cache, because a
dataset of thousands of rows hits the same file thousands of times. Cache keys include the file's
mtime and size, so a rewritten file is read again.

Image files are decoded to mode "L" (grey sources) or "RGB" by these rules:

- the EXIF orientation tag is applied (the image is turned upright, as viewers show it);
- 16-bit grey (I;16, I;16B, ...) is scaled to 8 bits: round(value / 257), so 65535 -> 255;
- 32-bit integer grey (I) is taken as 16-bit data, as PNG and TIFF 16-bit files often decode to
  it: round(value / 257); values outside 0..65535 fail the image (no range can be assumed);
- float grey (F) is taken as [0, 1] when every value is in it (x 255), else as [0, 255]; values
  outside [0, 255] or NaN fail the image;
- transparency (LA, RGBA, PA, P or RGB with a transparent colour) is put on white; "1" is 0/255;
  CMYK and other colour modes use Pillow's conversion to RGB;
- an image over Pillow's MAX_IMAGE_PIXELS (its decompression-bomb limit, ~89M pixels) fails.

An image file may take one fragment, a known warp: `photo/dog/x.jpg#warp=rot:R,scale:S,tx:X,ty:Y,flip:F`
is x.jpg warped by `warp_matrix` (R degrees, S, X and Y pixels, F 0 or 1; all five, in this order,
as `warp_fragment` writes them), the same size as x.jpg, bilinear, black outside the source
(`warp_image`). Points map through it exactly with `warp_points`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from data_manifests.manifest import ManifestError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IDX_IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions (count, rows, cols)
IDX_LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension (count)
SKETCH_SIZE = 256  # Quick, Draw! drawings are rasterised onto a canvas this wide and high
SKETCH_MARGIN = 16
SKETCH_LINE_WIDTH = 3
_CACHED_FILES = 4
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
T = TypeVar("T")


def _file_key(path: Path) -> tuple[str, int, int]:
    """(path, mtime, size): raises FileNotFoundError for a missing file, and changes when it is rewritten."""
    stat = Path(path).stat()
    return str(path), stat.st_mtime_ns, stat.st_size


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file (optionally .gz) whose magic number must be `magic`; read-only, cached."""
    return _read_idx(_file_key(path), magic)


@lru_cache(maxsize=_CACHED_FILES)
def _read_idx(key: tuple[str, int, int], magic: int) -> np.ndarray:
    path = key[0]
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises these for corrupt or cut-short archives
        raise ManifestError(f"{path}: cannot read IDX file: {e}") from e
    found = int.from_bytes(data[:4], "big")
    if len(data) < 4 or found != magic:
        raise ManifestError(f"{path}: IDX magic number is {found}, expected {magic}; not the right IDX file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ManifestError(f"{path}: IDX header says shape {shape} ({expected} bytes), the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_ndjson_lines(path: Path) -> tuple[str, ...]:
    """The non-blank lines of an ndjson file; a row's fragment is an index into this tuple. Cached."""
    return _read_ndjson_lines(_file_key(path))


@lru_cache(maxsize=_CACHED_FILES)
def _read_ndjson_lines(key: tuple[str, int, int]) -> tuple[str, ...]:
    with open(key[0], encoding="utf-8") as f:
        return tuple(line for line in f.read().splitlines() if line.strip())


@lru_cache(maxsize=_CACHED_FILES)
def _read_npz_images(key: tuple[str, int, int]) -> np.ndarray:
    with np.load(key[0], allow_pickle=False) as npz:
        if "images" not in npz.files:
            raise ValueError(f"{key[0]}: no 'images' array (it has {', '.join(npz.files)})")
        return npz["images"]


def _item(items: Sequence[T], fragment: str, path: Path) -> T:
    """items[int(fragment)], with a message naming the file when the fragment is bad."""
    try:
        index = int(fragment)
    except ValueError:
        raise ValueError(f"{path}#{fragment}: the fragment must be an integer index") from None
    if not 0 <= index < len(items):
        raise IndexError(f"{path}#{fragment}: index out of range, the file holds {len(items)} items")
    return items[index]


def _kind(path: Path) -> str:
    """'idx', 'npz', 'ndjson' or 'image', from the file name."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith("-ubyte") or name.endswith(".idx"):
        return "idx"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".ndjson"):
        return "ndjson"
    return "image"


def load_image(path: Path, fragment: str | None) -> Image.Image:
    """The image a manifest row names, decoded now (so a broken file fails here), mode "L" or "RGB"."""
    path = Path(path)
    kind = _kind(path)
    if kind == "image":
        if fragment is not None and fragment.startswith(WARP_PREFIX):
            image = _open_image_file(path)
            return warp_image(image, parse_warp(fragment, f"{path}#{fragment}"))
        if fragment is not None:
            raise ValueError(f"{path}#{fragment}: an image file takes no '#fragment' but "
                             f"'#{WARP_PREFIX}{','.join(f'{k}:...' for k in WARP_KEYS)}'")
        return _open_image_file(path)
    if fragment is None:
        raise ValueError(f"{path}: a {kind} file holds many images; name one with '#<index>'")
    if kind == "idx":
        return Image.fromarray(_item(read_idx(path, IDX_IMAGES_MAGIC), fragment, path).copy())
    if kind == "npz":
        array = _item(_read_npz_images(_file_key(path)), fragment, path)
        if array.dtype != np.uint8:
            raise ValueError(f"{path}: 'images' must be uint8, it is {array.dtype}")
        return Image.fromarray(array.copy())
    line = _item(read_ndjson_lines(path), fragment, path)
    try:
        strokes = json.loads(line)["drawing"]
        return rasterise_strokes(strokes)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path}#{fragment}: not a Quick, Draw! drawing ({type(e).__name__}: {e})") from e


def _open_image_file(path: Path) -> Image.Image:
    """Decode fully, turn upright and reduce to "L" or "RGB" (the rules in the module docstring).
    Raises OSError naming the file for an undecodable, oversized or out-of-range image."""
    try:
        with Image.open(path) as opened:
            # Pillow refuses over twice MAX_IMAGE_PIXELS and only warns above it: refuse both, before decoding
            if Image.MAX_IMAGE_PIXELS and opened.width * opened.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{opened.width}x{opened.height} is "
                                                   f"{opened.width * opened.height:,} pixels, over {Image.MAX_IMAGE_PIXELS:,}")
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)
            image = opened
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as e:
        raise OSError(f"{path}: refused as a possible decompression bomb: {e} (PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unknown, corrupt or cut-short files
        raise OSError(f"{path}: cannot decode image: {e}") from e
    try:
        return to_l_or_rgb(image)
    except ValueError as e:
        raise OSError(f"{path}: {e}") from None


def to_l_or_rgb(image: Image.Image) -> Image.Image:
    """An image of any Pillow mode as "L" or "RGB" by the rules of the module docstring.
    Raises ValueError for 32-bit or float grey values outside the range they are read in."""
    if image.mode in ("L", "RGB") and "transparency" not in image.info:
        return image
    if image.mode in (*_SIXTEEN_BIT, "I", "F"):
        return Image.fromarray(_grey_to_8_bits(np.asarray(image), image.mode))
    grey = image.mode in ("1", "L", "LA", "La")
    if image.mode in ("LA", "La", "RGBA", "RGBa", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("L" if grey else "RGB")


def _grey_to_8_bits(values: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) uint8 from 16-bit, 32-bit integer or float grey values (rules in the module docstring)."""
    if mode == "F":
        finite = np.isfinite(values)
        if not finite.all():
            raise ValueError(f"float image with {int((~finite).sum())} NaN or infinite pixels; save it as 8 or 16 bits")
        if values.min() < 0 or values.max() > 255:
            raise ValueError(f"float image with values outside [0, 255] (min {values.min()}, max {values.max()}); "
                             "save it as 8 or 16 bits")
        scaled = values * 255.0 if values.max() <= 1 else values
    else:
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"32-bit image with values outside 0..65535 (min {values.min()}, max {values.max()}); "
                             "save it as 8 or 16 bits")
        scaled = values / 257.0
    return np.rint(scaled).astype(np.uint8)


def rasterise_strokes(strokes: list) -> Image.Image:
    """Draw Quick, Draw! strokes ([[x...], [y...], [t...]] each) black on white, mode "L".

    The drawing's bounding box is scaled (aspect kept) and centred into the canvas inside a margin.
    """
    points = [list(zip(stroke[0], stroke[1])) for stroke in strokes]
    xs = [x for stroke in points for x, _ in stroke]
    ys = [y for stroke in points for _, y in stroke]
    if not xs:
        raise ValueError("the drawing has no points")
    width, height = max(xs) - min(xs), max(ys) - min(ys)
    inner = SKETCH_SIZE - 1 - 2 * SKETCH_MARGIN
    scale = inner / max(width, height) if max(width, height) > 0 else 1.0
    left = SKETCH_MARGIN + (inner - width * scale) / 2 - min(xs) * scale
    top = SKETCH_MARGIN + (inner - height * scale) / 2 - min(ys) * scale

    image = Image.new("L", (SKETCH_SIZE, SKETCH_SIZE), 255)
    draw = ImageDraw.Draw(image)
    radius = SKETCH_LINE_WIDTH / 2
    for stroke in points:
        xy = [(left + x * scale, top + y * scale) for x, y in stroke]
        if len(xy) == 1:  # a tap: a dot as wide as a line
            (x, y), = xy
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=0)
        elif xy:
            draw.line(xy, fill=0, width=SKETCH_LINE_WIDTH, joint="curve")
    return image


# -- known warps ------------------------------------------------------------------------------------
WARP_PREFIX = "warp="
WARP_KEYS = ("rot", "scale", "tx", "ty", "flip")


def warp_fragment(rot: float, scale: float, tx: float, ty: float, flip: bool) -> str:
    """The fragment naming a warp, `warp=rot:R,scale:S,tx:X,ty:Y,flip:F`, its numbers written with
    repr (so `parse_warp` reads back exactly these floats)."""
    return WARP_PREFIX + f"rot:{float(rot)!r},scale:{float(scale)!r},tx:{float(tx)!r},ty:{float(ty)!r},flip:{int(flip)}"


def parse_warp(fragment: str, where: str) -> dict[str, float]:
    """{"rot", "scale", "tx", "ty", "flip"} of a warp fragment; ValueError naming `where` when a key
    is missing, unknown, out of order or not a finite number, the scale is not positive or flip is
    not 0 or 1."""
    items = [item.partition(":") for item in fragment.removeprefix(WARP_PREFIX).split(",")]
    if tuple(key for key, _, _ in items) != WARP_KEYS:
        raise ValueError(f"{where}: a warp is '{WARP_PREFIX}" + ",".join(f"{k}:..." for k in WARP_KEYS) + "' "
                         "with all five keys in this order")
    try:
        params = {key: float(value) for key, _, value in items}
    except ValueError:
        raise ValueError(f"{where}: warp values must be numbers") from None
    if not all(np.isfinite(list(params.values()))) or params["scale"] <= 0 or params["flip"] not in (0, 1):
        raise ValueError(f"{where}: a warp needs finite numbers, scale > 0 and flip 0 or 1")
    return params


def warp_matrix(params: dict[str, float], w: int, h: int) -> np.ndarray:
    """(2, 3) float64 affine map A of a w x h image's continuous pixel coordinates (the centre of
    the top-left pixel at (0.5, 0.5)) onto the warped image's: p' = A[:, :2] @ p + A[:, 2] with

        p' = c + (tx, ty) + scale * R(rot) @ M @ (p - c),  c = (w / 2, h / 2)

    M mirrors x about the vertical centre line when flip is 1 (the flip comes first: content on the
    left ends up on the right, and a keypoint moves with the content under it); R(rot) turns by rot
    degrees counter-clockwise as seen on screen (y points down): [[cos, sin], [-sin, cos]]."""
    angle = np.deg2rad(params["rot"])
    # rounded to 1e-12 so that quarter turns are exact (cos 90 degrees is 6e-17 in floating point)
    rotate = np.round(np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]]), 12)
    linear = params["scale"] * rotate @ np.diag([-1.0 if params["flip"] else 1.0, 1.0])
    centre = np.array([w / 2, h / 2])
    shift = centre + np.array([params["tx"], params["ty"]]) - linear @ centre
    return np.column_stack([linear, shift])


def warp_points(points: np.ndarray, params: dict[str, float], w: int, h: int) -> np.ndarray:
    """(n, 2) float64: original points (n, 2) of a w x h image mapped by `warp_matrix`."""
    a = warp_matrix(params, w, h)
    return np.asarray(points, dtype=np.float64) @ a[:, :2].T + a[:, 2]


def warp_image(image: Image.Image, params: dict[str, float]) -> Image.Image:
    """The image warped by `warp_matrix`, same size and mode, bilinear, black (0) outside the source.
    Pillow's AFFINE transform takes the inverse map and samples in the same continuous coordinates."""
    a = warp_matrix(params, *image.size)
    inverse = np.linalg.inv(np.vstack([a, [0.0, 0.0, 1.0]]))[:2]
    return image.transform(image.size, Image.Transform.AFFINE, tuple(inverse.ravel()),
                           resample=Image.Resampling.BILINEAR, fillcolor=0)
