"""Reader: decode a chunk of manifest rows into the backbone's declared input.

A file that is missing or cannot be decoded fails that image only: its error is recorded and
the rest of the chunk goes on. So does an image longer than MAX_ASPECT_RATIO times its width (or
the reverse): the centre crop would keep little of it, and scaling its short side up to the
model's size would take memory in proportion to its length (decoding a 16000x1 PNG
took 3.5 GB at 224 pixels).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_manifests.manifest import Manifest
from data_manifests.sources import load_image
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


def to_input(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """Convert to the backbone's channels, resize the short side and centre-crop to size, scale.
    Returns (C, size, size) float32; raises ValueError for an aspect ratio over MAX_ASPECT_RATIO."""
    w, h = image.size
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ValueError(f"image is {w}x{h} pixels: its aspect ratio is over {MAX_ASPECT_RATIO}:1, "
                         "the limit of the resize and centre crop to the model's square input")
    image = image.convert("L" if spec.channels == 1 else "RGB")
    if (w, h) != (spec.size, spec.size):
        scale = spec.size / min(w, h)
        rw, rh = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
        left, top = (rw - spec.size) // 2, (rh - spec.size) // 2
        image = image.crop((left, top, left + spec.size, top + spec.size))
    pixels = np.asarray(image, dtype=np.float32).reshape(spec.size, spec.size, spec.channels)
    lo, hi = spec.value_range
    return (pixels / 255.0 * (hi - lo) + lo).transpose(2, 0, 1)


def read_chunk(manifest: Manifest, rows: range, spec: InputSpec, pool: ThreadPoolExecutor) -> Chunk:
    """Decode rows of the manifest in parallel threads (PIL releases the GIL while decoding)."""

    def one(i: int) -> tuple[np.ndarray | None, str]:
        try:
            return to_input(load_image(*manifest.path_of(i)), spec), ""
        except Exception as exc:  # noqa: BLE001 - any unreadable image is recorded, not fatal
            return None, f"{type(exc).__name__}: {exc}"

    results = list(pool.map(one, rows))
    pixels = np.zeros((len(rows), spec.channels, spec.size, spec.size), dtype=np.float32)
    for k, (x, _) in enumerate(results):
        if x is not None:
            pixels[k] = x
    failed = np.array([x is None for x, _ in results], dtype=bool)
    return Chunk(pixels, failed, [err for _, err in results])
