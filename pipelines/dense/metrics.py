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
delta_k = fraction of pixels with max(d / g, g / d) < 1.25^k, k = 1, 2, 3. All are means over
every valid pixel of the test set: pixel-pooled, where BTS averages per-image means.
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
DEPTH_VARIANT = ("pixel-pooled over all valid test pixels (0.001 < ground truth, < max_depth when capped, inside "
                 "the Eigen crop when set); predictions clipped to [0.001, max_depth]; AbsRel = mean |d-g|/g, RMSE = "
                 "sqrt(mean (d-g)^2) in the depth unit, log10 = mean |log10 d - log10 g|, delta<1.25^k = fraction "
                 "with max(d/g, g/d) < 1.25^k (Eigen et al. 2014, as BTS/AdaBins compute_errors)")


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
    """Running sums of the depth metrics over valid pixels; `add` batches, `scores` at the end."""

    max_depth: float | None = None
    pixels: int = 0
    abs_rel: float = 0.0
    squared: float = 0.0
    log10: float = 0.0
    within: list[int] = field(default_factory=lambda: [0, 0, 0])

    def add(self, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add a batch: `pred`, `truth` float (same shape, metres), `valid` an optional extra bool
        mask (the Eigen crop). Pixels count where MIN_DEPTH < truth (< max_depth when capped) and `valid`."""
        pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
        if pred.shape != truth.shape:
            raise ValueError(f"depth prediction {pred.shape} and ground truth {truth.shape} differ in shape")
        keep = truth > MIN_DEPTH
        if self.max_depth is not None:
            keep &= truth < self.max_depth
        if valid is not None:
            keep &= valid
        g = truth[keep]
        d = np.clip(pred[keep], MIN_DEPTH, self.max_depth if self.max_depth is not None else np.inf)
        if not np.isfinite(d).all():
            raise ValueError("depth predictions hold non-finite values")
        ratio = np.maximum(d / g, g / d)
        self.pixels += len(g)
        self.abs_rel += float((np.abs(d - g) / g).sum())
        self.squared += float(((d - g) ** 2).sum())
        self.log10 += float(np.abs(np.log10(d) - np.log10(g)).sum())
        for k in range(3):
            self.within[k] += int((ratio < 1.25 ** (k + 1)).sum())

    def scores(self) -> dict:
        """{"abs_rel", "rmse", "log10", "delta1", "delta2", "delta3", "pixels", "variant"};
        ValueError when no pixel was valid."""
        n = self.pixels
        if n == 0:
            raise ValueError("no valid depth pixel to score (ground truth invalid or beyond max_depth everywhere)")
        return {"abs_rel": self.abs_rel / n, "rmse": math.sqrt(self.squared / n), "log10": self.log10 / n,
                "delta1": self.within[0] / n, "delta2": self.within[1] / n, "delta3": self.within[2] / n,
                "pixels": n, "max_depth": self.max_depth, "variant": DEPTH_VARIANT}


def depth_scores(pred: np.ndarray, truth: np.ndarray, max_depth: float | None = None,
                 valid: np.ndarray | None = None) -> dict:
    """`DepthSums` of one batch: the depth metrics of `pred` against `truth` (see the module)."""
    sums = DepthSums(max_depth)
    sums.add(pred, truth, valid)
    return sums.scores()
