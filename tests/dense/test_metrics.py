"""Dense metrics against hand-worked examples and independent implementations written here."""

import math

import numpy as np
import pytest

from pipelines.dense.metrics import (
    DepthSums, class_pixel_counts, confusion_matrix, eigen_crop_mask, grid_variant, harmonic_mean, majority_baseline,
    segmentation_scores,
)


def test_hand_worked_confusion_ignore_index_and_absent_class():
    # classes 0, 1, 2, 3; class 3 is in neither truth nor prediction; 255 pixels are ignored
    truth = np.array([[0, 0, 1, 255],
                      [1, 1, 2, 255]])
    pred = np.array([[0, 1, 1, 3],  # the 3 sits on an ignored pixel: not counted
                     [1, 2, 2, 0]])
    cm = confusion_matrix(truth, pred, 4)
    assert cm.tolist() == [[1, 1, 0, 0],
                           [0, 2, 1, 0],
                           [0, 0, 1, 0],
                           [0, 0, 0, 0]]
    s = segmentation_scores(cm, ["a", "b", "c", "d"])
    # IoU a = 1 / (1 + 1 + 0) ; b = 2 / (2 + 1 + 1) ; c = 1 / (1 + 1 + 0) ; d = 0 / 0 undefined
    assert s["per_class_iou"] == {"a": 0.5, "b": 0.5, "c": 0.5, "d": None}
    assert s["undefined_iou"] == ["d"] and s["miou_classes"] == 3
    assert s["miou"] == pytest.approx(0.5)
    assert s["pixel_accuracy"] == pytest.approx(4 / 6)
    assert "left out" in s["variant"]["miou"]


def test_a_class_predicted_but_absent_from_truth_counts_with_iou_zero():
    cm = confusion_matrix(np.array([0, 0, 0]), np.array([0, 0, 1]), 2)
    s = segmentation_scores(cm, ["bg", "fg"])
    assert s["per_class_iou"] == {"bg": pytest.approx(2 / 3), "fg": 0.0}
    assert s["miou"] == pytest.approx(1 / 3)


def reference_miou(truth, pred, k, ignore=255):
    """Per-class IoU from boolean masks, summed over images (the ddpm-segmentation compute_iou
    loop, without its 1e-8 that turns 0/0 into 0)."""
    inter, union = np.zeros(k), np.zeros(k)
    for t, p in zip(truth, pred):
        keep = t != ignore
        for c in range(k):
            inter[c] += ((t == c) & (p == c) & keep).sum()
            union[c] += (((t == c) | (p == c)) & keep).sum()
    iou = [inter[c] / union[c] if union[c] else None for c in range(k)]
    return iou, np.mean([v for v in iou if v is not None])


def test_random_masks_against_an_independent_numpy_implementation():
    rng = np.random.default_rng(0)
    k = 6
    truth = rng.integers(0, k - 1, (5, 17, 13))  # class 5 never in the truth
    truth[rng.random(truth.shape) < 0.2] = 255
    pred = rng.integers(0, k - 2, truth.shape)  # nor 4, 5 in the predictions: 5 undefined, 4 IoU 0
    s = segmentation_scores(confusion_matrix(truth, pred, k), [str(c) for c in range(k)])
    iou, miou = reference_miou(truth, pred, k)
    assert [s["per_class_iou"][str(c)] for c in range(k)] == pytest.approx(iou)
    assert iou[5] is None and iou[4] == 0
    assert s["miou"] == pytest.approx(miou)
    keep = truth != 255
    assert s["pixel_accuracy"] == pytest.approx((truth[keep] == pred[keep]).mean())


@pytest.mark.parametrize(("truth", "pred", "message"), [
    (np.array([0, 7]), np.array([0, 1]), "ground truth holds value 7"),
    (np.array([0, 1]), np.array([0, 9]), "prediction holds value 9"),
    (np.array([0, 1]), np.array([0, 1, 1]), "differ in shape"),
])
def test_bad_values_are_refused(truth, pred, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(truth, pred, 3)


def test_nothing_to_score_is_refused():
    with pytest.raises(ValueError, match="no test pixel"):
        segmentation_scores(confusion_matrix(np.full(4, 255), np.zeros(4, int), 2), ["a", "b"])


def test_majority_baseline_hand_worked():
    # training pixels: 5 of class a, 3 of b, 1 of c -> predict a everywhere; test truth: 2 a, 4 b, 0 c
    b = majority_baseline(np.array([5, 3, 1]), np.array([2, 4, 0]), ["a", "b", "c"])
    assert b["class"] == "a" and b["train_pixels"] == 9 and "most frequent training class" in b["name"]
    # IoU a = 2 / (2 + 4 false positives) = 1/3; IoU b = 0 / 4 = 0; c absent from both: undefined
    assert b["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 0.0, "c": None})
    assert b["miou"] == pytest.approx((1 / 3 + 0) / 2) and b["miou_classes"] == 2
    assert b["pixel_accuracy"] == pytest.approx(2 / 6)
    assert majority_baseline(np.array([1, 3, 3]), np.array([1, 1, 1]), ["a", "b", "c"])["class"] == "b"  # tie: lowest
    with pytest.raises(ValueError, match="no training pixel"):
        majority_baseline(np.zeros(3, np.int64), np.array([1, 1, 1]), ["a", "b", "c"])


def test_class_pixel_counts_skip_the_ignore_index_and_read_in_chunks():
    masks = np.array([[[0, 255], [2, 2]], [[1, 1], [255, 2]], [[2, 0], [0, 0]]], np.uint8)
    reads = []

    def read(rows):
        reads.append(list(rows))
        return masks[rows]

    counts = class_pixel_counts(read, np.array([0, 1, 2]), 3, chunk=2)
    assert counts.tolist() == [4, 2, 4] and reads == [[0, 1], [2]]
    with pytest.raises(ValueError, match="outside 0..1"):
        class_pixel_counts(read, np.array([0]), 2)


def test_harmonic_mean():
    assert harmonic_mean(0.5, 0.25) == pytest.approx(1 / 3)
    assert harmonic_mean(None, 0.3) is None and harmonic_mean(0.0, 0.0) == 0.0


def test_depth_hand_worked():
    truth = np.array([[1.0, 2.0, 4.0, 0.0]])  # one image; the 0 is invalid
    pred = np.array([[1.0, 3.0, 2.0, 5.0]])
    sums = DepthSums(average="pixel")
    sums.add(pred, truth)
    s = sums.scores()
    assert s["pixels"] == 3 and s["images"] == 1
    assert s["abs_rel"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert s["rmse"] == pytest.approx(math.sqrt((0 + 1 + 4) / 3))
    assert s["log10"] == pytest.approx((0 + math.log10(1.5) + math.log10(2)) / 3)
    # ratios 1, 1.5, 2: < 1.25 one; < 1.5625 two; < 1.953125 two
    assert (s["delta1"], s["delta2"], s["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))


def test_depth_cap_clip_and_pooled_batches_against_an_independent_implementation():
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.5, 12, (4, 9, 9))
    truth[rng.random(truth.shape) < 0.1] = 0
    pred = rng.uniform(-1, 14, truth.shape)  # negatives and values over the cap get clipped
    sums = DepthSums(max_depth=10.0, average="pixel")
    for i in range(0, 4, 2):  # batches pool their pixels
        sums.add(pred[i:i + 2], truth[i:i + 2])
    s = sums.scores()
    keep = (truth > 1e-3) & (truth < 10)
    g, d = truth[keep], np.minimum(np.maximum(pred[keep], 1e-3), 10)
    assert s["pixels"] == keep.sum()
    assert s["abs_rel"] == pytest.approx(np.mean(np.abs(d - g) / g))
    assert s["rmse"] == pytest.approx(np.sqrt(np.mean((d - g) ** 2)))
    assert s["log10"] == pytest.approx(np.mean(np.abs(np.log10(d) - np.log10(g))))
    thresh = np.maximum(d / g, g / d)
    assert [s["delta1"], s["delta2"], s["delta3"]] == pytest.approx([(thresh < 1.25 ** k).mean() for k in (1, 2, 3)])


def bts_compute_errors(gt: np.ndarray, pred: np.ndarray) -> dict:
    """BTS's compute_errors (cleinc/bts pytorch/bts_eval.py) for the metrics reported here, on one
    image's valid pixels."""
    thresh = np.maximum(gt / pred, pred / gt)
    return {"abs_rel": np.mean(np.abs(gt - pred) / gt), "rmse": np.sqrt(np.mean((gt - pred) ** 2)),
            "log10": np.mean(np.abs(np.log10(pred) - np.log10(gt))),
            **{f"delta{k}": (thresh < 1.25 ** k).mean() for k in (1, 2, 3)}}


def test_depth_image_average_is_the_mean_of_per_image_bts_errors():
    rng = np.random.default_rng(2)
    truth = rng.uniform(0.5, 12, (5, 6, 7))
    truth[rng.random(truth.shape) < 0.3] = 0
    truth[3] = 0  # an image without a valid pixel is left out, and counted
    truth[1, :4] = 0  # images differ in their number of valid pixels, so the two averages differ
    pred = rng.uniform(-1, 14, truth.shape)
    crop = np.zeros(truth.shape, bool)
    crop[:, 1:, 1:] = True
    sums = DepthSums(max_depth=10.0)  # the default average: per image
    sums.add(pred[:2], truth[:2], crop[:2])
    sums.add(pred[2:], truth[2:], crop[2:])
    s = sums.scores()
    per_image = []
    for i in range(5):
        # BTS eval: clip the prediction to [min_depth_eval, max_depth_eval], valid = min < gt < max, and the crop
        d = pred[i].copy()
        d[d < 1e-3], d[d > 10] = 1e-3, 10
        valid = (truth[i] > 1e-3) & (truth[i] < 10) & crop[i]
        if valid.any():
            per_image.append(bts_compute_errors(truth[i][valid], d[valid]))
    assert len(per_image) == 4 and s["images"] == 4 and s["images_without_valid_pixels"] == 1
    for key in ("abs_rel", "rmse", "log10", "delta1", "delta2", "delta3"):
        assert s[key] == pytest.approx(np.mean([e[key] for e in per_image])), key
    assert s["average"] == "image" and "per image" in s["variant"]["average"]
    pooled = DepthSums(max_depth=10.0, average="pixel")
    pooled.add(pred, truth, crop)
    assert pooled.scores()["rmse"] != pytest.approx(s["rmse"])  # the example tells the averages apart


def test_depth_without_valid_pixels_and_an_unknown_average_are_refused():
    sums = DepthSums()
    sums.add(np.ones((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="no valid depth pixel"):
        sums.scores()
    with pytest.raises(ValueError, match="--depth-average must be one of image, pixel, not 'median'"):
        DepthSums(average="median")


def test_grid_variant_names_the_grid_the_geometry_and_what_is_not_scored():
    crop = grid_variant("crop", 512, "crop-512")
    assert crop.startswith("scored on the 512x512 input grid (crop-512)")
    assert "outside the centre crop not scored" in crop and "not the original-resolution protocol" in crop
    assert "squashed" in grid_variant("squash", 768, "squash-768")
    with pytest.raises(ValueError, match="resize 'pad'"):
        grid_variant("pad", 8, "pad-8")


def test_eigen_crop_on_an_unscaled_nyu_image():
    # identity geometry on a 640 x 480 image stored at 640 (a crop of its top-left 640 x 640 is moot:
    # rows beyond 480 map outside the image and are outside the crop)
    mask = eigen_crop_mask(np.array([[1.0, 0.0, 1.0, 0.0]]), np.array([[640, 480]]), 640)[0]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (45, 471, 41, 601)


def test_eigen_crop_follows_a_squash_geometry():
    # 640 x 480 squashed to 64 x 64: sx = 0.1, sy = 64 / 480
    mask = eigen_crop_mask(np.array([[0.1, 0.0, 64 / 480, 0.0]]), np.array([[640, 480]]), 64)[0]
    cols = np.flatnonzero(mask.any(0))
    rows = np.flatnonzero(mask.any(1))
    # column j's centre is at x = (j + 0.5) * 10: inside [41, 601) for j = 4 .. 59
    assert (cols[0], cols[-1]) == (4, 59)
    # row i's centre is at y = (i + 0.5) * 7.5: inside [45, 471) for i = 6 .. 62
    assert (rows[0], rows[-1]) == (6, 62)
