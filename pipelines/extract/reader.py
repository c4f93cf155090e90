"""Reader: decode a chunk of manifest rows into the backbone's declared input.

A file that is missing or cannot be decoded fails that image only: its error is recorded and
the rest of the chunk goes on. So does an image longer than MAX_ASPECT_RATIO times its width (or
the reverse): the centre crop would keep little of it, and scaling its short side up to the
model's size would take memory in proportion to its length (decoding a 16000x1 PNG
took 3.5 GB at 224 pixels).

`geometry_of` is the map from an original image's pixels to the input's, for `--resize crop`
(short side to the input size, centre crop; the default) or `squash` (both sides to it, as DIFT
does); masks and depth maps are brought to the input through the same map by `warp_nearest`, and
`write_manifest_targets` stores a manifest's targets that way (featurestore/targets.py).
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_manifests.manifest import Manifest, ManifestError
from data_manifests.sources import load_image
from featurestore.store import WritableStore
from featurestore.targets import IGNORE_INDEX, RowTargets, geometry_key, write_pairs, write_targets
from pipelines.extract.backbone import InputSpec

# Pillow warns on opening an image over MAX_IMAGE_PIXELS (and refuses over twice that); load_image
# refuses both as a failed image with one line, so the warning would only repeat it on stderr.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

MAX_ASPECT_RATIO = 10  # long side / short side; the resized image is at most this many squares of the input size


@dataclass
class Chunk:
    """Decoded images of one chunk of rows; rows that failed hold zeros and an error message."""

    pixels: np.ndarray  # (n, C, H, W) float32 in the backbone's value range
    failed: np.ndarray  # (n,) bool
    errors: list[str]


RESIZES = ("crop", "squash")


def geometry_of(w: int, h: int, size: int, resize: str = "crop") -> np.ndarray:
    """The per-axis affine map from an original w x h image to the size x size input, in continuous
    pixel coordinates (the centre of the top-left pixel is (0.5, 0.5)): x_in = sx * x + ox,
    y_in = sy * y + oy. Returns (4,) float64 [sx, ox, sy, oy].

    `crop` (the default): the short side is resized to `size` (the long one to
    max(size, round(side * size / short))), then the centre size x size is cut out. `squash`
    (DIFT's, Tang et al. 2023, sd_featurizer_spair.py `SDFeaturizer.forward`: `img.resize` of
    both sides to the input size, 768 x 768 for SD 2.1, with PIL's default filter, bicubic, as
    here): sx = size / w, sy = size / h, no offset. Raises ValueError for another `resize`."""
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, not {resize!r}")
    if resize == "squash":
        return np.array([size / w, 0.0, size / h, 0.0])
    rw, rh, left, top = _crop_box(w, h, size)
    return np.array([rw / w, -float(left), rh / h, -float(top)])


def _crop_box(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """(rw, rh, left, top): the size the image is resized to and the corner of the centre crop."""
    if (w, h) == (size, size):
        return w, h, 0, 0
    scale = size / min(w, h)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    return rw, rh, (rw - size) // 2, (rh - size) // 2


def to_input(image: Image.Image, spec: InputSpec, resize: str = "crop") -> np.ndarray:
    """Convert to the backbone's channels, bring to spec.size x spec.size by `resize` (bicubic;
    `geometry_of` gives the map), scale to the value range. Returns (C, size, size) float32;
    raises ValueError for a crop of an image whose aspect ratio is over MAX_ASPECT_RATIO, or
    another `resize`."""
    w, h = image.size
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, not {resize!r}")
    if resize == "crop" and max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ValueError(f"image is {w}x{h} pixels: its aspect ratio is over {MAX_ASPECT_RATIO}:1, "
                         "the limit of the resize and centre crop to the model's square input")
    image = image.convert("L" if spec.channels == 1 else "RGB")
    if resize == "squash":
        if (w, h) != (spec.size, spec.size):
            image = image.resize((spec.size, spec.size), Image.Resampling.BICUBIC)
    elif (w, h) != (spec.size, spec.size):
        rw, rh, left, top = _crop_box(w, h, spec.size)
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
        image = image.crop((left, top, left + spec.size, top + spec.size))
    pixels = np.asarray(image, dtype=np.float32).reshape(spec.size, spec.size, spec.channels)
    lo, hi = spec.value_range
    return (pixels / 255.0 * (hi - lo) + lo).transpose(2, 0, 1)


def warp_nearest(values: np.ndarray, geometry: np.ndarray, size: int, fill: float) -> np.ndarray:
    """A per-pixel target (h, w) (a mask, a depth map) brought to the size x size input through
    `geometry` ([sx, ox, sy, oy], `geometry_of`) by nearest resampling: input pixel (r, c) takes
    the original pixel that holds the point ((c + 0.5 - ox) / sx, (r + 0.5 - oy) / sy); a point on
    a pixel border takes the pixel right of / below it, one outside the image takes `fill`.
    Returns (size, size) of the dtype of `values`."""
    sx, ox, sy, oy = (float(v) for v in geometry)
    h, w = values.shape
    centres = np.arange(size) + 0.5
    # 1e-9 of a pixel settles points that float rounding puts a hair before a border
    cols = np.floor((centres - ox) / sx + 1e-9).astype(np.int64)
    rows = np.floor((centres - oy) / sy + 1e-9).astype(np.int64)
    out = np.full((size, size), fill, dtype=values.dtype)
    keep_r, keep_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    out[np.ix_(keep_r, keep_c)] = values[np.ix_(rows[keep_r], cols[keep_c])]
    return out


def read_chunk(manifest: Manifest, rows: range, spec: InputSpec, pool: ThreadPoolExecutor,
               resize: str = "crop") -> Chunk:
    """Decode rows of the manifest in parallel threads (PIL releases the GIL while decoding),
    each brought to the input by `resize` (`to_input`)."""

    def one(i: int) -> tuple[np.ndarray | None, str]:
        try:
            return to_input(load_image(*manifest.path_of(i)), spec, resize), ""
        except Exception as exc:  # noqa: BLE001 - any unreadable image is recorded, not fatal
            return None, f"{type(exc).__name__}: {exc}"

    results = list(pool.map(one, rows))
    pixels = np.zeros((len(rows), spec.channels, spec.size, spec.size), dtype=np.float32)
    for k, (x, _) in enumerate(results):
        if x is not None:
            pixels[k] = x
    failed = np.array([x is None for x, _ in results], dtype=bool)
    return Chunk(pixels, failed, [err for _, err in results])


def row_targets(manifest: Manifest, i: int, size: int, resize: str) -> RowTargets:
    """Manifest row i's targets as the store keeps them: its mask (fill: the ignore index) and
    depth map (fill: 0, invalid) brought to the size x size input through the image's geometry
    (`warp_nearest`), its keypoints and box as decoded (original pixels). The image is decoded
    for its size (w, h). Raises ManifestError (one line) for a mask or depth map whose size is
    not the image's, and whatever decoding the image or a target raises."""
    from data_manifests.targets import load_target

    w, h = load_image(*manifest.path_of(i)).size
    geometry = geometry_of(w, h, size, resize)
    out = RowTargets(image_size=(w, h), geometry=geometry)
    for column in manifest.targets:
        value = load_target(manifest, column, i)
        if value is not None and column in ("mask", "depth"):
            if value.shape != (h, w):
                raise ManifestError(f"row {manifest.ids[i]!r}: its {column} is {value.shape[1]}x{value.shape[0]} "
                                    f"pixels, its image {w}x{h}")
            value = warp_nearest(value, geometry, size, IGNORE_INDEX if column == "mask" else 0.0)
        setattr(out, column, value)
    return out


def write_manifest_targets(store: WritableStore, manifest: Manifest, rows: np.ndarray, size: int, resize: str,
                           progress: bool = False, retry_failed: bool = False) -> int:
    """Store the targets of a manifest that declares target columns (`manifest.targets`) at the
    geometry (resize, size), for its images at images-table rows `rows`, skipping rows already
    written (`featurestore.targets.write_targets`; rows that failed are read again with
    `retry_failed`), and its image pairs (`manifest.pairs`). Returns how many rows' targets were
    written; a row whose targets cannot be read is recorded as failed. Nothing happens for a
    manifest without targets or pairs."""
    from pipelines.progress import bar

    written = 0
    if manifest.targets:
        info = {column: manifest.target_info.get(column, {}) for column in manifest.targets}
        with (bar("extract", f"targets {geometry_key(resize, size)}", len(rows)) if progress
              else contextlib.nullcontext(None)) as advance:
            written = write_targets(store, manifest.name, rows, resize=resize, size=size, info=info,
                                    load=lambda k: row_targets(manifest, k, size, resize), advance=advance,
                                    retry_failed=retry_failed)
    if manifest.pairs:
        row_of = dict(zip(manifest.ids, np.asarray(rows).tolist()))
        write_pairs(store, manifest.name, [(row_of[s], row_of[t], category, split)
                                           for s, t, category, split in manifest.pairs])
    return written
