"""Semantic correspondence from feature maps, on arrays (no store): DIFT's nearest-neighbour matching
and PCK.

Coordinates. Points are (x, y) in continuous pixel coordinates of an image, the centre of the
top-left pixel at (0.5, 0.5). The reader maps an original image to the backbone's S x S input by
x_in = sx * x + ox, y_in = sy * y + oy (`geometry` [sx, ox, sy, oy]); a map of H x W positions
covers the input, x_feat = x_in * W / S, and cell j has its centre at x_feat = j + 0.5.

Sampling. A map is read at a continuous feature point bilinearly with PyTorch's
`align_corners=False` rule: index u = x_feat - 0.5 clamped to [0, W - 1], between cells floor(u)
and min(floor(u) + 1, W - 1). Upsampling a map this way onto the pixel centres of an image is
exactly `nn.Upsample(size=(h, w), mode="bilinear")` when the geometry squashes the image (DIFT,
github.com/Tsingularity/dift eval_spair.py: the map is upsampled to the original image size).

Matching (`match_upsampled`, DIFT): each source keypoint's feature (the map sampled at the
keypoint), L2-normalised, against every pixel of the target map upsampled onto the target's
original pixel grid, each pixel's feature L2-normalised (F.normalize, eps 1e-12); the prediction
is the centre of the most similar pixel (the first in row-major order on ties, as numpy's argmax).
Only pixels whose centre lies inside the backbone input (0 <= x_in, y_in <= S) are candidates: with
`resize=crop` the cropped-off pixels were never seen. `match_soft_argmax` instead compares with the
H x W cells of the map and refines the best cell by a soft-argmax over its window (our variant, not
a paper's: softmax(cos / temperature) over the (2r + 1)^2 cells around the best, weighting the
cell centres), then maps the point back to original pixels.

PCK (`pck`): a point is correct when its distance to the true target point is <= alpha * max(h, w)
of the target image's box (its `bbox` target as the dataset's builder writes it: the annotated object
box, or where a dataset has none the keypoints' bounding box; data_manifests/pairs.py) or of the
target image (DIFT uses <= and the bbox). The box may instead be the source image's (`BBOX_OF`):
NCNet's PF-PASCAL protocol (github.com/ignacio-rocco/ncnet lib/pf_dataset.py, pck_procedure="pf",
and lib/eval_util.py `pck`) takes L_pck = max side of the extent of its image A's annotated points
and scores image B's points transferred into A; note that there A, the image the predictions land
in, plays the part of our target. Per image: the mean over pairs of each pair's fraction of
correct points (DIFT's "per image PCK"); per point: correct points over all points pooled (DIFT's
"per point PCK").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ALPHAS = (0.05, 0.1, 0.15)
THRESHOLDS = {
    "bbox": "alpha * max(x1 - x0, y1 - y0) of the target image's box in the dataset's bbox target column (its "
            "annotated object box; the keypoints' bounding box for datasets without boxes: pf-pascal, pf-willow), "
            "original target pixels",
    "image": "alpha * max(height, width) of the target image, original target pixels",
}
AVERAGES = {
    "per_image": "mean over pairs of the fraction of the pair's points within the threshold (DIFT 'per image')",
    "per_point": "points within the threshold over all points pooled (DIFT 'per point')",
}
BBOX_OF = {
    "target": THRESHOLDS["bbox"],
    "source": "alpha * max(x1 - x0, y1 - y0) of the source image's box in the dataset's bbox target column (its "
              "annotated object box; the keypoints' bounding box for pf-pascal, pf-willow), original source pixels",
}
CORRECT = "a point is correct when its distance to the true target point is <= the threshold"
_EPS = 1e-12  # F.normalize's eps
_BAND_VALUES = 1 << 24  # float32 values of an upsampled band of target rows (64 MiB)


def to_input(points: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    """(n, 2) float64 input coordinates of (n, 2) original coordinates under [sx, ox, sy, oy]."""
    sx, ox, sy, oy = np.asarray(geometry, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return np.stack([sx * p[:, 0] + ox, sy * p[:, 1] + oy], axis=1)


def to_original(points: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    """The inverse of `to_input`: (n, 2) float64 original coordinates of (n, 2) input coordinates."""
    sx, ox, sy, oy = np.asarray(geometry, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return np.stack([(p[:, 0] - ox) / sx, (p[:, 1] - oy) / sy], axis=1)


def interpolation_matrix(coords: np.ndarray, n: int) -> np.ndarray:
    """(m, n) float64 weights that read a length-n axis at m continuous feature coordinates by the
    align_corners=False rule of the module docstring (each row sums to 1, at most two non-zeros)."""
    u = np.clip(np.asarray(coords, dtype=np.float64) - 0.5, 0.0, n - 1)
    lo = np.floor(u).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = u - lo
    weights = np.zeros((len(u), n))
    rows = np.arange(len(u))
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def normalized(x: np.ndarray, axis: int) -> np.ndarray:
    """x / max(||x||, 1e-12) along `axis` (torch.nn.functional.normalize)."""
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), _EPS)


def sample_features(fmap: np.ndarray, points: np.ndarray, geometry: np.ndarray, size: int) -> np.ndarray:
    """(n, C) float32 features of a (C, H, W) map at (n, 2) original keypoints: the bilinear sample
    at each keypoint mapped through `geometry` into the size x size input and onto the map."""
    c, h, w = fmap.shape
    p = to_input(points, geometry)
    wx = interpolation_matrix(p[:, 0] * w / size, w)  # (n, W)
    wy = interpolation_matrix(p[:, 1] * h / size, h)  # (n, H)
    return np.einsum("chw,nh,nw->nc", fmap.astype(np.float64), wy, wx).astype(np.float32)


def inside_input(points: np.ndarray, geometry: np.ndarray, size: int) -> np.ndarray:
    """(n,) bool: whether each original point falls inside the size x size input (0 <= x_in, y_in <= size)."""
    p = to_input(points, geometry)
    return np.all((p >= 0) & (p <= size), axis=1)


def match_upsampled(queries: np.ndarray, fmap: np.ndarray, geometry: np.ndarray, image_size: Sequence[int],
                    size: int) -> np.ndarray:
    """DIFT's match: (K, 2) float64 predicted original target points for (K, C) source features.

    `fmap` (C, H, W) is the target's map, upsampled onto the centres of the target's original
    w x h pixels (image_size = (w, h)) through `geometry`; only pixels inside the input are
    candidates. The cosine's numerator is the upsampled map of the K projections q . f (the same
    by linearity), its denominator each upsampled pixel's norm, computed band by band of rows.
    Raises ValueError when no target pixel is inside the input."""
    c, h, w = fmap.shape
    width, height = (int(v) for v in image_size)
    sx, ox, sy, oy = np.asarray(geometry, dtype=np.float64)
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    xs = xs[(sx * xs + ox >= 0) & (sx * xs + ox <= size)]
    ys = ys[(sy * ys + oy >= 0) & (sy * ys + oy <= size)]
    if not len(xs) or not len(ys):
        raise ValueError(f"no pixel of the {width}x{height} target image lies inside the {size}x{size} input")
    wx = interpolation_matrix((sx * xs + ox) * w / size, w).astype(np.float32)  # (w', W)
    wy = interpolation_matrix((sy * ys + oy) * h / size, h).astype(np.float32)  # (h', H)
    q = normalized(np.asarray(queries, dtype=np.float32), axis=1)
    fmap = fmap.astype(np.float32)
    # q . upsampled(f) = upsampled(q . f): the numerators need only the K projected maps
    dots = wy @ (q @ fmap.reshape(c, h * w)).reshape(len(q), h, w) @ wx.T  # (K, h', w')
    # each pixel's norm needs its upsampled feature: interpolate x once, then bands of rows, as
    # single matrix products over (H, C * w')
    columns = (fmap.reshape(c * h, w) @ wx.T).reshape(c, h, -1).transpose(1, 0, 2).reshape(h, -1)
    norms = np.empty((len(ys), len(xs)), dtype=np.float32)
    band = max(1, _BAND_VALUES // max(1, c * len(xs)))
    for start in range(0, len(ys), band):
        up = (wy[start:start + band] @ columns).reshape(-1, c, len(xs))  # (band, C, w')
        norms[start:start + band] = np.linalg.norm(up, axis=1)
    sims = (dots / np.maximum(norms, _EPS)).reshape(len(q), -1)  # F.normalize's denominator
    arg = sims.argmax(axis=1)  # the first best in row-major order
    return np.column_stack([xs[arg % len(xs)], ys[arg // len(xs)]])


def match_soft_argmax(queries: np.ndarray, fmap: np.ndarray, geometry: np.ndarray, size: int, radius: int = 1,
                      temperature: float = 0.05) -> np.ndarray:
    """(K, 2) float64 predicted original target points for (K, C) source features, at feature
    resolution: cosine with each of the H x W cells of the target map `fmap` (C, H, W), then the
    soft-argmax (weights softmax(cos / temperature)) of the cell centres within `radius` cells of
    the best cell (radius 0: the best cell's centre), mapped from the input back to original
    pixels through `geometry`. Raises ValueError for a negative radius or temperature <= 0."""
    if radius < 0:
        raise ValueError(f"--soft-radius must be >= 0 cells, got {radius}")
    if not temperature > 0:
        raise ValueError(f"--soft-temperature must be positive, got {temperature}")
    c, h, w = fmap.shape
    q = normalized(np.asarray(queries, dtype=np.float32), axis=1)
    cells = normalized(fmap.astype(np.float32).reshape(c, -1), axis=0)
    sims = (q @ cells).reshape(len(q), h, w).astype(np.float64)
    points = np.zeros((len(q), 2))
    for k, sim in enumerate(sims):
        i, j = np.unravel_index(sim.argmax(), sim.shape)
        rows = slice(max(0, i - radius), min(h, i + radius + 1))
        cols = slice(max(0, j - radius), min(w, j + radius + 1))
        window = sim[rows, cols]
        weight = np.exp((window - window.max()) / temperature)
        weight /= weight.sum()
        yy, xx = np.mgrid[rows, cols]
        points[k] = ((weight * (xx + 0.5)).sum() * size / w, (weight * (yy + 0.5)).sum() * size / h)
    return to_original(points, geometry)


@dataclass(frozen=True)
class Matches:
    """One row per evaluated source keypoint (the `--save-matches` CSV): pair index, category,
    keypoint index, source point, true and predicted target point (original target pixels), the
    width and height of the box that sets the bbox threshold (the target's, or the source's in its
    own pixels; NaN when it has none) and the target image's width and height."""

    pair: np.ndarray  # (n,) int64
    category: np.ndarray  # (n,) str
    kp: np.ndarray  # (n,) int64
    source: np.ndarray  # (n, 2) float64
    true: np.ndarray  # (n, 2) float64
    pred: np.ndarray  # (n, 2) float64
    bbox_wh: np.ndarray  # (n, 2) float64
    image_wh: np.ndarray  # (n, 2) float64

    def __len__(self) -> int:
        return len(self.pair)


def pck(matches: Matches, alphas: Sequence[float] = ALPHAS) -> dict:
    """PCK of `matches` for each alpha, threshold and average (THRESHOLDS, AVERAGES), overall and per
    category: {"overall": scores, "per_category": {category: scores}} where scores is
    {threshold: {average: {str(alpha): value}}, "pairs": count, "points": count}. A threshold's
    entry is None (undefined) when a point of the selection has no box (bbox_wh NaN), per selection:
    a category whose points all have one keeps its bbox PCK while the overall one is None.
    Raises ValueError for no matches or an alpha <= 0."""
    if not len(matches):
        raise ValueError("no keypoint pairs to score (no pair has a keypoint visible in both images)")
    if min(alphas) <= 0:
        raise ValueError(f"PCK alphas must be positive, got {list(alphas)}")
    dist = np.hypot(*(matches.pred - matches.true).T)

    def scores(select: np.ndarray) -> dict:
        pairs, per_pair = np.unique(matches.pair[select], return_inverse=True)
        out = {}
        for name, wh in (("bbox", matches.bbox_wh), ("image", matches.image_wh)):
            side = wh[select].max(axis=1)
            if not np.isfinite(side).all():
                out[name] = None
                continue
            out[name] = {"per_image": {}, "per_point": {}}
            for alpha in alphas:
                correct = dist[select] <= alpha * side
                fraction = np.bincount(per_pair, correct) / np.bincount(per_pair)
                out[name]["per_image"][str(alpha)] = float(fraction.mean())
                out[name]["per_point"][str(alpha)] = float(correct.mean())
        return {**out, "pairs": len(pairs), "points": int(select.sum())}

    categories = sorted(set(matches.category.tolist()))
    return {"overall": scores(np.ones(len(matches), bool)),
            "per_category": {c: scores(matches.category == c) for c in categories}}
