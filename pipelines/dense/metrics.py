"""Dense metrics on numpy arrays: semantic segmentation (confusion matrix, IoU, mIoU, pixel
accuracy) and monocular depth (AbsRel, RMSE, log10, delta thresholds).

Segmentation follows the standard protocol (mmsegmentation `intersect_and_union`, the PASCAL VOC
devkit): one K x K confusion matrix is accumulated over ALL test pixels whose ground truth is not
the ignore index (never averaged per image); IoU_k = TP / (TP + FP + FN). A class absent from both
prediction and ground truth has 0 / 0: its IoU is undefined, reported as null and LEFT OUT of the
mean (mmsegmentation's nanmean); the output says how many classes the mean covers.

Depth follows the evaluation of Eigen et al. 2014 as coded in BTS / AdaBins (`compute_errors`):
on valid pixels (MIN_DEPTH < ground truth, and < max_depth when a cap is set, inside the Eigen crop
when asked; 0 marks an invalid pixel), predictions clipped to [MIN_DEPTH, max_depth]:
AbsRel = mean |d - g| / g, RMSE = sqrt(mean (d - g)^2), log10 = mean |log10 d - log10 g|,
delta_k = fraction of pixels with max(d / g, g / d) < 1.25^k, k = 1, 2, 3. Two averages
(`DEPTH_AVERAGES`): "image" (BTS / AdaBins: each metric over one image's valid pixels, RMSE the
root of that image's mean square, then the mean over the test images that have a valid pixel) and
"pixel" (one mean over every valid pixel of the test set, RMSE the root of the pooled mean square).

Both tasks are scored on the S x S input grid (`grid_variant`): the stored targets are the ground
truth nearest-resampled through the reader's geometry, so with `--resize crop` the image borders
outside the centre crop are not scored. This is not the original-resolution protocol of mmseg or
BTS, which score at the ground truth's own resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255
MIOU_VARIANT = ("confusion matrix over all test pixels (ground truth == ignore index skipped); IoU = TP / (TP + FP "
                "+ FN) per class; mIoU = mean over the classes whose IoU is defined (a class absent from both "
                "prediction and ground truth has no IoU and is left out)")
PIXEL_ACCURACY_VARIANT = "correct / all non-ignored test pixels"
MIN_DEPTH = 1e-3  # metres: predictions are clipped to [MIN_DEPTH, max_depth] (BTS / AdaBins evaluation)
# The Eigen crop of NYUv2 (BTS eval: rows 45:471, columns 41:601 of a 480 x 640 image), as fractions
# of the image's height and width, so that it applies to any image size and geometry.
EIGEN_CROP = (45 / 480, 471 / 480, 41 / 640, 601 / 640)  # top, bottom, left, right
DEPTH_VARIANT = ("valid test pixels: 0.001 < ground truth, < max_depth when capped, inside the Eigen crop when "
                 "set; predictions clipped to [0.001, max_depth]; AbsRel = mean |d-g|/g, RMSE = sqrt(mean (d-g)^2) "
                 "in the depth unit, log10 = mean |log10 d - log10 g|, delta<1.25^k = fraction with max(d/g, g/d) < "
                 "1.25^k (Eigen et al. 2014, as BTS/AdaBins compute_errors)")
DEPTH_AVERAGES = {
    "image": ("per image, then the mean over test images (BTS/AdaBins eval: compute_errors on each image's valid "
              "pixels; RMSE = mean of per-image RMSEs); images without a valid pixel are left out and counted"),
    "pixel": "pixel-pooled: one mean over all valid test pixels (RMSE = root of the pooled mean square)",
}
# How `--resize` decides which part of the original image the S x S grid covers.
_GRID_COVERS = {"crop": "image borders outside the centre crop not scored",
                "squash": "the whole image scored, squashed to a square (aspect ratio not kept)"}


def grid_variant(resize: str, size: int, key: str) -> str:
    """The grid a dense score is computed on, in words, for every dense result: the S x S input
    grid of geometry key `key` (`featurestore.targets.geometry_key`, "crop-512") for `resize`
    ("crop" | "squash"). ValueError for another resize."""
    if resize not in _GRID_COVERS:
        raise ValueError(f"targets at geometry {key} have resize {resize!r}, not one of {', '.join(_GRID_COVERS)}")
    return (f"scored on the {size}x{size} input grid ({key}): ground truth nearest-resampled through the reader's "
            f"geometry, {_GRID_COVERS[resize]}; not the original-resolution protocol")


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(K, K) int64 counts of pixels, row = ground-truth class, column = predicted class, over
    every pixel whose ground truth is not `ignore_index`. `truth` and `pred` are integer arrays of
    one shape (any number of images and pixels). ValueError when shapes differ, a ground-truth
    value is neither a class (0..K-1) nor the ignore index, or a prediction of a counted pixel is
    not a class."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"ground truth {truth.shape} and prediction {pred.shape} differ in shape")
    keep = truth != ignore_index
    t, p = truth[keep].astype(np.int64), pred[keep].astype(np.int64)
    for name, values in (("ground truth", t), ("prediction", p)):
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            raise ValueError(f"{name} holds value {int(values[bad][0])}, not a class index 0..{num_classes - 1}"
                             f"{' or the ignore index ' + str(ignore_index) if name == 'ground truth' else ''}")
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray, classes: Sequence[str]) -> dict:
    """Scores of a (K, K) confusion matrix (`confusion_matrix`'s layout), K = len(classes):
    {"miou", "miou_classes" (how many classes the mean covers), "pixel_accuracy",
    "per_class_iou" {class: IoU or None when undefined}, "undefined_iou" [classes left out],
    "variant"}. ValueError when no pixel was counted (every score would be undefined)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix {confusion.shape} for {len(classes)} classes")
    total = int(confusion.sum())
    if total == 0:
        raise ValueError("no test pixel to score: every ground-truth pixel is the ignore index")
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = {c: (float(tp[k] / union[k]) if union[k] else None) for k, c in enumerate(classes)}
    defined = [v for v in iou.values() if v is not None]
    return {
        "miou": float(np.mean(defined)),
        "miou_classes": len(defined),
        "pixel_accuracy": float(tp.sum() / total),
        "per_class_iou": iou,
        "undefined_iou": [c for c, v in iou.items() if v is None],
        "pixels": total,
        "variant": {"miou": MIOU_VARIANT, "pixel_accuracy": PIXEL_ACCURACY_VARIANT},
    }


MAJORITY_BASELINE = "majority-class baseline: predict the most frequent training class everywhere"


def class_pixel_counts(read: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, num_classes: int,
                       ignore_index: int = IGNORE_INDEX, chunk: int = 256) -> np.ndarray:
    """(K,) int64 pixels of each class over the masks of `rows` (ignore_index skipped), read
    `chunk` images at a time by `read(rows) -> (n, S, S)` class indices. ValueError for a value
    that is neither a class nor the ignore index."""
    counts = np.zeros(num_classes, np.int64)
    for start in range(0, len(rows), chunk):
        masks = np.asarray(read(rows[start:start + chunk]))
        values = masks[masks != ignore_index].astype(np.int64)
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"mask holds a value outside 0..{num_classes - 1} and the ignore index {ignore_index}")
        counts += np.bincount(values, minlength=num_classes)
    return counts


def majority_baseline(train_counts: np.ndarray, test_counts: np.ndarray, classes: Sequence[str]) -> dict:
    """The scores (`segmentation_scores`, same variants) of predicting, on every test pixel, the
    class with the most training pixels (the lowest class index on a tie), from (K,) per-class
    pixel counts of the training and test ground truth (ignored pixels excluded). Returns those
    scores plus "name" (MAJORITY_BASELINE), "class" and "train_pixels". ValueError when the
    training masks have no counted pixel."""
    train_counts = np.asarray(train_counts, dtype=np.int64)
    if train_counts.sum() == 0:
        raise ValueError("no training pixel to take the majority class from: every one is the ignore index")
    majority = int(np.argmax(train_counts))
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    confusion[:, majority] = test_counts  # every test pixel of class k is predicted as the majority class
    return {"name": MAJORITY_BASELINE, "class": classes[majority], "train_pixels": int(train_counts.sum()),
            **segmentation_scores(confusion, classes)}


def subset_miou(per_class_iou: dict[str, float | None], classes: Sequence[str]) -> float | None:
    """Mean IoU over `classes` whose IoU is defined; None when none is."""
    values = [per_class_iou[c] for c in classes if per_class_iou[c] is not None]
    return float(np.mean(values)) if values else None


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """2ab / (a + b) (the zero-shot segmentation summary of seen and unseen mIoU, as in ZS3Net /
    SPNet); None when either is undefined, 0 when both are 0."""
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def eigen_crop_mask(geometry: np.ndarray, image_size: np.ndarray, size: int) -> np.ndarray:
    """(n, S, S) bool: the stored pixels whose centre falls inside the Eigen crop of their image.
    `geometry` (n, 4) float64 [sx, ox, sy, oy] maps original pixels to the S x S input
    (x_in = sx * x + ox), `image_size` (n, 2) (w, h); the crop is EIGEN_CROP as fractions of h, w."""
    centres = np.arange(size) + 0.5
    top, bottom, left, right = EIGEN_CROP
    sx, ox, sy, oy = (geometry[:, i, None] for i in range(4))
    w, h = image_size[:, 0, None].astype(np.float64), image_size[:, 1, None].astype(np.float64)
    x = (centres[None] - ox) / sx  # (n, S): original x of each stored column
    y = (centres[None] - oy) / sy
    cols = (x >= left * w) & (x < right * w)
    rows = (y >= top * h) & (y < bottom * h)
    return rows[:, :, None] & cols[:, None, :]


@dataclass
class DepthSums:
    """Running sums of the depth metrics (see the module) under `average` ("image" | "pixel",
    DEPTH_AVERAGES); `add` test batches, `scores` at the end."""

    max_depth: float | None = None
    average: str = "image"
    pixels: int = 0  # valid pixels added
    images: int = 0  # images with a valid pixel
    empty_images: int = 0  # images without one (left out of the image average)
    # abs_rel, squared error (pixel) or RMSE (image), log10, delta1..3: summed over pixels or images
    sums: np.ndarray = field(default_factory=lambda: np.zeros(6))

    def __post_init__(self) -> None:
        if self.average not in DEPTH_AVERAGES:
            raise ValueError(f"--depth-average must be one of {', '.join(DEPTH_AVERAGES)}, not {self.average!r}")

    def add(self, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add a batch of images: `pred`, `truth` float (B, S, S) (any shape whose first axis is the
        image), metres; `valid` an optional extra (B, S, S) bool mask (the Eigen crop). Pixels count
        where MIN_DEPTH < truth (< max_depth when capped) and `valid`. ValueError for shapes that
        differ or a non-finite prediction on a counted pixel."""
        pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
        if pred.shape != truth.shape or pred.ndim < 1:
            raise ValueError(f"depth prediction {pred.shape} and ground truth {truth.shape} differ in shape")
        keep = truth > MIN_DEPTH
        if self.max_depth is not None:
            keep &= truth < self.max_depth
        if valid is not None:
            keep &= valid
        for p, t, k in zip(pred, truth, keep):
            g = t[k]
            if not len(g):
                self.empty_images += 1
                continue
            d = np.clip(p[k], MIN_DEPTH, self.max_depth if self.max_depth is not None else np.inf)
            if not np.isfinite(d).all():
                raise ValueError("depth predictions hold non-finite values")
            ratio = np.maximum(d / g, g / d)
            errors = np.stack([np.abs(d - g) / g, (d - g) ** 2, np.abs(np.log10(d) - np.log10(g)),
                               *(ratio < 1.25 ** k for k in (1, 2, 3))])
            self.pixels += len(g)
            self.images += 1
            if self.average == "pixel":
                self.sums += errors.sum(axis=1)
            else:
                per_image = errors.mean(axis=1)
                per_image[1] = math.sqrt(per_image[1])  # this image's RMSE
                self.sums += per_image

    def scores(self) -> dict:
        """{"abs_rel", "rmse", "log10", "delta1", "delta2", "delta3", "pixels", "images",
        "images_without_valid_pixels", "max_depth", "average", "variant" {"depth", "average"}};
        ValueError when no pixel was valid."""
        if self.pixels == 0:
            raise ValueError("no valid depth pixel to score (ground truth invalid or beyond max_depth everywhere)")
        mean = self.sums / (self.pixels if self.average == "pixel" else self.images)
        rmse = math.sqrt(mean[1]) if self.average == "pixel" else mean[1]
        return {"abs_rel": float(mean[0]), "rmse": float(rmse), "log10": float(mean[2]),
                "delta1": float(mean[3]), "delta2": float(mean[4]), "delta3": float(mean[5]),
                "pixels": self.pixels, "images": self.images, "images_without_valid_pixels": self.empty_images,
                "max_depth": self.max_depth, "average": self.average,
                "variant": {"depth": DEPTH_VARIANT, "average": DEPTH_AVERAGES[self.average]}}
