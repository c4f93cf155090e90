"""Correspondence on arrays: DIFT's upsampled matching against torch's own nn.Upsample and
F.normalize, bilinear keypoint features against grid_sample, the soft-argmax, and PCK on a
hand-worked example."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.correspond.compute import (
    Matches, match_soft_argmax, match_upsampled, pck, sample_features, to_input, to_original
)


def squash(w: int, h: int, size: int) -> np.ndarray:
    return np.array([size / w, 0.0, size / h, 0.0])


def test_upsampled_match_is_difts_nn_upsample_to_the_original_size():
    """eval_spair.py: nn.Upsample(size=(h, w), bilinear) of the map, F.normalize per pixel, argmax."""
    rng = np.random.default_rng(0)
    fmap = rng.standard_normal((5, 4, 6)).astype(np.float32)
    w, h, size = 13, 9, 24
    queries = rng.standard_normal((7, 5)).astype(np.float32)
    up = F.interpolate(torch.from_numpy(fmap)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    cos = F.normalize(torch.from_numpy(queries), dim=1) @ F.normalize(up.reshape(5, -1), dim=0)
    flat = cos.argmax(dim=1).numpy()
    expected = np.stack([flat % w + 0.5, flat // w + 0.5], axis=1)
    got = match_upsampled(queries, fmap, squash(w, h, size), (w, h), size)
    np.testing.assert_array_equal(got, expected)


def test_upsampled_match_in_bands_equals_one_band(monkeypatch):
    import pipelines.correspond.compute as compute

    rng = np.random.default_rng(1)
    fmap = rng.standard_normal((3, 5, 5)).astype(np.float32)
    queries = rng.standard_normal((9, 3)).astype(np.float32)
    whole = match_upsampled(queries, fmap, squash(17, 11, 20), (17, 11), 20)
    monkeypatch.setattr(compute, "_BAND_VALUES", 3 * 17)  # one row per band
    np.testing.assert_array_equal(match_upsampled(queries, fmap, squash(17, 11, 20), (17, 11), 20), whole)


def test_crop_geometry_keeps_only_pixels_inside_the_input():
    """A 10x4 image centre-cropped to 4x4 (left 3): the best pixel is searched in columns 3..6 only."""
    fmap = np.zeros((1, 2, 2), np.float32)
    fmap[0] = [[1, 2], [3, 4]]
    geometry = np.array([1.0, -3.0, 1.0, 0.0])
    got = match_upsampled(np.ones((1, 1), np.float32), fmap, geometry, (10, 4), 4)
    # every value is positive, so every pixel's cosine with +1 is 1: the first candidate (row-major) wins
    np.testing.assert_array_equal(got, [[3.5, 0.5]])
    with pytest.raises(ValueError, match="inside the 4x4 input"):
        match_upsampled(np.ones((1, 1), np.float32), fmap, np.array([1.0, -20.0, 1.0, 0.0]), (10, 4), 4)


def test_keypoint_features_are_grid_samples_of_the_map():
    rng = np.random.default_rng(2)
    fmap = rng.standard_normal((4, 6, 8)).astype(np.float32)
    w, h, size = 50, 30, 32
    points = np.column_stack([rng.uniform(0, w, 20), rng.uniform(0, h, 20)])
    geometry = squash(w, h, size)
    grid = torch.from_numpy(np.column_stack([points[:, 0] / w * 2 - 1, points[:, 1] / h * 2 - 1])).float()
    expected = F.grid_sample(torch.from_numpy(fmap)[None], grid[None, None], mode="bilinear",
                             padding_mode="border", align_corners=False)[0, :, 0].T.numpy()
    np.testing.assert_allclose(sample_features(fmap, points, geometry, size), expected, rtol=1e-5, atol=1e-5)
    # at a pixel centre it is DIFT's value: the upsampled map at that pixel
    up = F.interpolate(torch.from_numpy(fmap)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(sample_features(fmap, np.array([[7.5, 12.5]]), geometry, size)[0],
                               up[:, 12, 7].numpy(), rtol=1e-5, atol=1e-6)


def test_geometry_round_trip():
    geometry = np.array([0.5, -3.0, 0.25, 2.0])
    points = np.array([[10.0, 8.0], [0.5, 0.5]])
    np.testing.assert_allclose(to_input(points, geometry), [[2.0, 4.0], [-2.75, 2.125]])
    np.testing.assert_allclose(to_original(to_input(points, geometry), geometry), points)


def test_soft_argmax():
    """A 4x4 map whose best cell (1, 2) has one equally similar neighbour (1, 3): with radius 1 and a
    tiny temperature the two share the weight, so x is the mean of their centres."""
    fmap = np.zeros((2, 4, 4), np.float32)
    fmap[1] = 1.0  # cosine 0 with the query (1, 0) everywhere ...
    fmap[:, 1, 2] = [1, 0]  # ... but 1 here
    fmap[:, 1, 3] = [1, 0]  # and here
    size, geometry = 8, np.array([2.0, 0.0, 2.0, 0.0])  # a 4x4 image scaled 2x onto an 8x8 input
    query = np.array([[1.0, 0.0]], np.float32)
    # radius 0: the first best cell (1, 2), centre (2.5, 1.5) cells -> input (5, 3) -> original (2.5, 1.5)
    np.testing.assert_allclose(match_soft_argmax(query, fmap, geometry, size, radius=0), [[2.5, 1.5]])
    np.testing.assert_allclose(match_soft_argmax(query, fmap, geometry, size, radius=1, temperature=1e-3),
                               [[3.0, 1.5]], atol=1e-9)
    with pytest.raises(ValueError, match="soft-temperature"):
        match_soft_argmax(query, fmap, geometry, size, temperature=0)


def two_pairs() -> Matches:
    """Pair 0 (cat): 2 points, errors 5 and 15; bbox 100x40 (side 100), image 200x150 (side 200).
    Pair 1 (dog): 3 points, errors 3, 4 (a 3-4-5 triangle: 5), 30; bbox 20x60 (side 60), image 80x90 (side 90)."""
    true = np.array([[10, 10], [50, 50], [0, 0], [20, 20], [40, 40]], float)
    offset = np.array([[5, 0], [0, 15], [3, 0], [3, 4], [0, 30]], float)
    return Matches(
        pair=np.array([0, 0, 1, 1, 1]), category=np.array(["cat", "cat", "dog", "dog", "dog"]),
        kp=np.array([0, 1, 0, 1, 2]), source=np.zeros((5, 2)), true=true, pred=true + offset,
        bbox_wh=np.array([[100, 40]] * 2 + [[20, 60]] * 3, float),
        image_wh=np.array([[200, 150]] * 2 + [[80, 90]] * 3, float),
    )


def test_pck_hand_worked_two_pairs():
    """Thresholds: bbox 0.05 -> 5 (cat) / 3 (dog); 0.1 -> 10 / 6; 0.15 -> 15 / 9.
    image 0.05 -> 10 / 4.5; 0.1 -> 20 / 9; 0.15 -> 30 / 13.5.
    bbox: 0.05: cat 1/2 (5 <= 5), dog 1/3 (3 <= 3)   -> per image (1/2 + 1/3)/2, per point 2/5
          0.1:  cat 1/2, dog 2/3                      -> (1/2 + 2/3)/2, 3/5
          0.15: cat 2/2, dog 2/3                      -> (1 + 2/3)/2, 4/5
    image: 0.05: cat 1/2, dog 1/3 (3; 5 > 4.5)        -> (1/2 + 1/3)/2, 2/5
           0.1:  cat 2/2, dog 2/3                     -> (1 + 2/3)/2, 4/5
           0.15: cat 2/2, dog 2/3 (30 > 13.5)         -> (1 + 2/3)/2, 4/5"""
    result = pck(two_pairs())
    expected = {
        "bbox": {"per_image": [(1 / 2 + 1 / 3) / 2, (1 / 2 + 2 / 3) / 2, (1 + 2 / 3) / 2], "per_point": [.4, .6, .8]},
        "image": {"per_image": [(1 / 2 + 1 / 3) / 2, (1 + 2 / 3) / 2, (1 + 2 / 3) / 2], "per_point": [.4, .8, .8]},
    }
    for threshold, averages in expected.items():
        for average, values in averages.items():
            got = [result["overall"][threshold][average][a] for a in ("0.05", "0.1", "0.15")]
            np.testing.assert_allclose(got, values, err_msg=f"{threshold} {average}")
    assert result["overall"]["pairs"] == 2 and result["overall"]["points"] == 5
    dog = result["per_category"]["dog"]
    np.testing.assert_allclose([dog["bbox"]["per_point"][a] for a in ("0.05", "0.1", "0.15")], [1 / 3, 2 / 3, 2 / 3])
    assert dog["bbox"]["per_image"] == dog["bbox"]["per_point"] and dog["pairs"] == 1


def test_pck_without_a_bbox_leaves_that_threshold_undefined():
    matches = two_pairs()
    matches.bbox_wh[0] = np.nan
    result = pck(matches)
    assert result["overall"]["bbox"] is None and result["per_category"]["cat"]["bbox"] is None
    assert result["per_category"]["dog"]["bbox"] is not None and result["overall"]["image"] is not None
    with pytest.raises(ValueError, match="no keypoint pairs"):
        pck(Matches(*(np.zeros((0,) + a.shape[1:]) for a in (matches.pair, matches.category, matches.kp,
                                                              matches.source, matches.true, matches.pred,
                                                              matches.bbox_wh, matches.image_wh))))
