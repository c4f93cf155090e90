"""The reader's geometry: `--resize crop` (today's short-side resize and centre crop, unchanged) and
`squash` (DIFT's), the affine map `geometry_of`, and masks brought to the input through it."""

from __future__ import annotations

from fractions import Fraction
from math import floor

import numpy as np
import pytest
from PIL import Image

from pipelines.extract.backbone import InputSpec
from pipelines.extract.reader import geometry_of, to_input, warp_nearest

GREY = InputSpec(32, 1, (0.0, 1.0))


def blob_image(w: int, h: int, x0: float, y0: float, sigma: float = 3.0) -> Image.Image:
    """An 8-bit grey image holding a Gaussian blob centred at continuous pixel coordinates (x0, y0)."""
    x = np.arange(w) + 0.5
    y = np.arange(h) + 0.5
    values = 250 * np.exp(-((x[None, :] - x0) ** 2 + (y[:, None] - y0) ** 2) / (2 * sigma**2))
    return Image.fromarray(np.round(values).astype(np.uint8), mode="L")


def centroid(pixels: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centre of a (H, W) map, in continuous coordinates (pixel centres at +0.5)."""
    weights = np.clip(pixels, 0, None)
    ys, xs = np.mgrid[: pixels.shape[0], : pixels.shape[1]] + 0.5
    return float((weights * xs).sum() / weights.sum()), float((weights * ys).sum() / weights.sum())


def test_geometry_by_hand():
    # 90 x 60 to 32: crop scales the short side 60 to 32, so the image becomes 48 x 32 and the
    # crop starts at (48 - 32) // 2 = 8; squash scales each side on its own
    assert np.allclose(geometry_of(90, 60, 32, "crop"), [48 / 90, -8, 32 / 60, 0])
    assert np.allclose(geometry_of(90, 60, 32, "squash"), [32 / 90, 0, 32 / 60, 0])
    # 33 x 100 to 32: 32 x round(100 * 32 / 33) = 32 x 97, crop top (97 - 32) // 2 = 32
    assert np.allclose(geometry_of(33, 100, 32, "crop"), [32 / 33, 0, 97 / 100, -32])
    assert np.allclose(geometry_of(32, 32, 32, "crop"), [1, 0, 1, 0])
    with pytest.raises(ValueError, match="resize must be one of crop, squash"):
        geometry_of(32, 32, 32, "pad")


def test_crop_is_todays_resize_and_centre_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 77, 3), dtype=np.uint8))
    spec = InputSpec(32, 3, (-1.0, 1.0))
    # the reader before --resize existed: short side to 32 (long side rounded), bicubic, centre crop
    resized = image.resize((round(77 * 32 / 50), 32), Image.Resampling.BICUBIC)
    left = (resized.width - 32) // 2
    expected = np.asarray(resized.crop((left, 0, left + 32, 32)), dtype=np.float32) / 255.0 * 2 - 1
    assert np.array_equal(to_input(image, spec), expected.transpose(2, 0, 1))
    assert np.array_equal(to_input(image, spec, "crop"), expected.transpose(2, 0, 1))


def test_squash_resizes_both_sides():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (50, 77), dtype=np.uint8), mode="L")
    expected = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    assert np.array_equal(to_input(image, GREY, "squash")[0], expected)
    # squash has no aspect-ratio limit (nothing is cropped away); crop keeps its refusal
    long = Image.new("L", (400, 20))
    assert to_input(long, GREY, "squash").shape == (1, 32, 32)
    with pytest.raises(ValueError, match="aspect ratio is over 10:1"):
        to_input(long, GREY, "crop")


@pytest.mark.parametrize("resize", ["crop", "squash"])
@pytest.mark.parametrize(("w", "h", "x0", "y0"), [(90, 60, 45.0, 20.5), (60, 120, 22.25, 70.0), (24, 20, 12.0, 9.5)])
def test_a_keypoint_lands_where_the_geometry_says(resize, w, h, x0, y0):
    """A blob centred at a known point of the original image is centred, in the input, at the
    point the geometry maps it to (the resize is symmetric, so it keeps centres)."""
    sx, ox, sy, oy = geometry_of(w, h, 32, resize)
    pixels = to_input(blob_image(w, h, x0, y0), GREY, resize)[0]
    cx, cy = centroid(pixels)
    assert abs(cx - (sx * x0 + ox)) < 0.2 and abs(cy - (sy * y0 + oy)) < 0.2


def nearest_by_hand(mask: np.ndarray, size: int, resize: str) -> np.ndarray:
    """Each input pixel's centre traced back to the original image with exact fractions, from the
    resized size and crop corner (not from the geometry): its pixel's value; a centre on a border
    between two pixels takes the right / lower one."""
    h, w = mask.shape
    if resize == "squash":
        rw, rh, left, top = size, size, 0, 0
    else:
        short = min(w, h)
        rw = max(size, round(w * size / short))
        rh = max(size, round(h * size / short))
        left, top = (rw - size) // 2, (rh - size) // 2
    out = np.empty((size, size), dtype=mask.dtype)
    for r in range(size):
        for c in range(size):
            x = (Fraction(2 * c + 1, 2) + left) * Fraction(w, rw)
            y = (Fraction(2 * r + 1, 2) + top) * Fraction(h, rh)
            out[r, c] = mask[floor(y), floor(x)]
    return out


@pytest.mark.parametrize("resize", ["crop", "squash"])
@pytest.mark.parametrize(("w", "h"), [(64, 48), (90, 60), (20, 31), (32, 32)])
def test_masks_follow_the_image_geometry(resize, w, h):
    rng = np.random.default_rng(w * h)
    mask = rng.integers(0, 21, (h, w), dtype=np.uint8)
    warped = warp_nearest(mask, geometry_of(w, h, 32, resize), 32, 255)
    assert warped.dtype == np.uint8
    assert np.array_equal(warped, nearest_by_hand(mask, 32, resize))
    depth = rng.random((h, w), dtype=np.float32)
    assert np.array_equal(warp_nearest(depth, geometry_of(w, h, 32, resize), 32, 0.0), nearest_by_hand(depth, 32, resize))


def test_points_outside_the_image_take_the_fill():
    mask = np.arange(16, dtype=np.uint8).reshape(4, 4)
    # shifted 2 input pixels right and 1 down at scale 1: the first columns and row lie outside
    warped = warp_nearest(mask, np.array([1.0, 2.0, 1.0, 1.0]), 4, 255)
    expected = np.full((4, 4), 255, dtype=np.uint8)
    expected[1:, 2:] = mask[:3, :2]
    assert np.array_equal(warped, expected)
