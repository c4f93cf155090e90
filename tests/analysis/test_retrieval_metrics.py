"""Retrieval metrics on a ranking worked out by hand, every variant, compared as exact fractions."""

from fractions import Fraction as F

import numpy as np
import pytest

from pipelines.analysis.retrieval import (
    HitRanks,
    average_precision,
    averaged,
    precision_at,
)

# A gallery of 8 items, fully ranked for 3 queries (1 = relevant, rank 1 first).
#   q1, class A, R = 3:  1 0 1 0 0 1 0 0   relevant at ranks 1, 3, 6
#   q2, class A, R = 3:  0 1 0 0 1 0 0 1   relevant at ranks 2, 5, 8
#   q3, class B, R = 2:  0 0 0 1 0 0 0 1   relevant at ranks 4, 8
RELEVANCE = np.array([
    [1, 0, 1, 0, 0, 1, 0, 0],
    [0, 1, 0, 0, 1, 0, 0, 1],
    [0, 0, 0, 1, 0, 0, 0, 1],
], dtype=bool)
R = np.array([3, 3, 2])
CLASSES = np.array(["A", "A", "B"])


def exact(value: float) -> F:
    """The fraction a float stands for: every hand result below has a denominator under 10,000,
    and distinct such fractions differ by far more than float64 rounding."""
    return F(value).limit_denominator(10_000)


def hits() -> HitRanks:
    return HitRanks.from_relevance(RELEVANCE, R)


def test_hit_ranks():
    h = hits()
    assert h.ranks.tolist() == [[1, 3, 6], [2, 5, 8], [4, 8, np.inf]]
    assert (h.depth, h.gallery_size) == (8, 8)


def test_non_interpolated_ap_at_all():
    # q1: (1/1 + 2/3 + 3/6) / 3 = (6/6 + 4/6 + 3/6) / 3 = 13/18
    # q2: (1/2 + 2/5 + 3/8) / 3 = (20/40 + 16/40 + 15/40) / 3 = 51/120 = 17/40
    # q3: (1/4 + 2/8) / 2 = 1/4
    ap = average_precision(hits(), None, "noninterp")
    assert [exact(v) for v in ap] == [F(13, 18), F(17, 40), F(1, 4)]
    # mAP@all over queries: (260 + 153 + 90) / 360 / 3 = 503/1080
    assert exact(averaged(ap, CLASSES, "queries")) == F(503, 1080)
    # over classes: A = (13/18 + 17/40) / 2 = 413/720, B = 1/4 = 180/720; (413 + 180) / 720 / 2 = 593/1440
    assert exact(averaged(ap, CLASSES, "classes")) == F(593, 1440)


def test_voc_11_point_ap_at_all():
    # Interpolated precision at recall level r: the best precision j / rank_j with j / R >= r.
    # q1, P = 1, 2/3, 1/2 at recall 1/3, 2/3, 1: levels 0-0.3 -> 1 (4 levels), 0.4-0.6 -> 2/3 (3),
    #     0.7-1 -> 1/2 (4): (4 + 2 + 2) / 11 = 8/11
    # q2, P = 1/2, 2/5, 3/8: (4 * 1/2 + 3 * 2/5 + 4 * 3/8) / 11 = (2 + 6/5 + 3/2) / 11 = 47/110
    # q3, P = 1/4, 2/8 at recall 1/2, 1: every level -> 1/4
    ap = average_precision(hits(), None, "voc11")
    assert [exact(v) for v in ap] == [F(8, 11), F(47, 110), F(1, 4)]
    # (160 + 94 + 55) / 220 / 3 = 103/220
    assert exact(averaged(ap, CLASSES)) == F(103, 220)


def test_map_at_k_normalisations():
    # K = 2. Divided by min(R, K) = 2, 2, 2:
    #   q1: 1/1 / 2 = 1/2;  q2: 1/2 / 2 = 1/4;  q3: nothing in the top 2 -> 0;  mean (1/2 + 1/4) / 3 = 1/4
    # Divided by the relevant items retrieved (1, 1, 0): 1, 1/2, 0 (none retrieved -> 0); mean 1/2
    h = hits()
    assert [exact(v) for v in average_precision(h, 2, normalisation="min")] == [F(1, 2), F(1, 4), 0]
    assert exact(averaged(average_precision(h, 2, normalisation="min"), CLASSES)) == F(1, 4)
    assert [exact(v) for v in average_precision(h, 2, normalisation="retrieved")] == [1, F(1, 2), 0]
    assert exact(averaged(average_precision(h, 2, normalisation="retrieved"), CLASSES)) == F(1, 2)
    # K = 4, min(R, K) = 3, 3, 2:  q1 (1 + 2/3) / 3 = 5/9;  q2 (1/2) / 3 = 1/6;  q3 (1/4) / 2 = 1/8
    #   mean (40 + 12 + 9) / 72 / 3 = 61/216.  Retrieved (2, 1, 1): 5/6, 1/2, 1/4; mean 19/36
    assert [exact(v) for v in average_precision(h, 4)] == [F(5, 9), F(1, 6), F(1, 8)]
    assert exact(averaged(average_precision(h, 4), CLASSES)) == F(61, 216)
    assert exact(averaged(average_precision(h, 4, normalisation="retrieved"), CLASSES)) == F(19, 36)
    # K beyond every relevant rank: mAP@K = mAP@all under min(R, K)
    assert np.array_equal(average_precision(h, 8), average_precision(h, None))


def test_precision_at_k_denominators():
    # P@4, hits in the top 4: 2, 1, 1.  Denominator K: 1/2, 1/4, 1/4, mean 1/3;
    #   classes: A = (1/2 + 1/4) / 2 = 3/8, B = 1/4: (3/8 + 2/8) / 2 = 5/16
    # Denominator min(K, R) = 3, 3, 2: 2/3, 1/3, 1/2, mean (2/3 + 1/3 + 1/2) / 3 = 1/2
    h = hits()
    assert [exact(v) for v in precision_at(h, 4, "k")] == [F(1, 2), F(1, 4), F(1, 4)]
    assert exact(averaged(precision_at(h, 4, "k"), CLASSES)) == F(1, 3)
    assert exact(averaged(precision_at(h, 4, "k"), CLASSES, "classes")) == F(5, 16)
    assert [exact(v) for v in precision_at(h, 4, "min")] == [F(2, 3), F(1, 3), F(1, 2)]
    assert exact(averaged(precision_at(h, 4, "min"), CLASSES)) == F(1, 2)


def test_truncated_lists_give_the_same_top_metrics_and_refuse_all():
    top4 = HitRanks.from_relevance(RELEVANCE[:, :4], R, gallery_size=8)
    for k in (1, 2, 3, 4):
        assert np.array_equal(average_precision(top4, k), average_precision(hits(), k))
        assert np.array_equal(precision_at(top4, k), precision_at(hits(), k))
    with pytest.raises(ValueError, match="@all needs the rank of every relevant item"):
        average_precision(top4, None)
    with pytest.raises(ValueError, match="deeper than the ranked lists"):
        precision_at(top4, 5)
    # A complete ranking of a small gallery answers any cutoff: P@200 of 8 items.
    assert exact(precision_at(hits(), 200)[0]) == F(3, 200)


def test_bad_variants_and_queries_without_relevant_items():
    with pytest.raises(ValueError, match="ap must be one of noninterp, voc11"):
        average_precision(hits(), None, "voc12")
    with pytest.raises(ValueError, match="denominator must be one of"):
        precision_at(hits(), 2, "R")
    with pytest.raises(ValueError, match="queries 1 have no relevant gallery item"):
        HitRanks.from_relevance(RELEVANCE, np.array([3, 0, 2]))


# VOC all-point AP on a ranking of 10 items whose precision rises again after a dip, R = 5:
#   rank       1    2    3    4    5    6    7    8    9    10
#   relevant   0    1    0    0    1    1    1    0    0    1
#   recall     0   1/5  1/5  1/5  2/5  3/5  4/5  4/5  4/5   1
#   precision  0   1/2  1/3  1/4  2/5  1/2  4/7  1/2  4/9  1/2
# With the sentinels (recall 0, precision 0) in front and (recall 1, precision 0) at the end, the
# envelope (the max of the precision at this point and every later one) is
#   sentinel 0, then 4/7 at ranks 1-7, 1/2 at ranks 8-10, then the end sentinel 0.
# Recall changes at ranks 2, 5, 6, 7 (envelope 4/7) and 10 (envelope 1/2), each a step of 1/5:
#   AP@all = (4 * 4/7 + 1/2) / 5 = (32/14 + 7/14) / 5 = 39/70
#   (non-interpolated: (1/2 + 2/5 + 1/2 + 4/7 + 1/2) / 5 = (70 + 56 + 70 + 80 + 70) / 700 = 173/350).
# AP@6: the ranking is cut after rank 6 and recall divides by min(R, 6) = 5; the curve is
#   recall 1/5, 2/5, 3/5 at ranks 2, 5, 6 with precision 1/2, 2/5, 1/2, envelope 1/2, 1/2, 1/2, and
#   the end sentinel (recall 1, precision 0) adds nothing: (3 * 1/2) / 5 = 3/10.
#   Dividing recall by the 3 retrieved instead: (3 * 1/2) / 3 = 1/2.
# AP@3: one hit (rank 2, precision 1/2), recall step 1 / min(5, 3) = 1/3: 1/6.
DIP = np.array([[0, 1, 0, 0, 1, 1, 1, 0, 0, 1]], dtype=bool)


def test_voc_all_point_ap_by_hand():
    h = HitRanks.from_relevance(DIP, [5])
    assert exact(average_precision(h, None, "voc-allpoint")[0]) == F(39, 70)
    assert exact(average_precision(h, None, "noninterp")[0]) == F(173, 350)
    assert exact(average_precision(h, 6, "voc-allpoint")[0]) == F(3, 10)
    assert exact(average_precision(h, 6, "voc-allpoint", "retrieved")[0]) == F(1, 2)
    assert exact(average_precision(h, 3, "voc-allpoint")[0]) == F(1, 6)
    # The rankings above have non-increasing precision at their hits: the envelope changes nothing.
    for cutoff in (None, 2, 4):
        assert np.array_equal(average_precision(hits(), cutoff, "voc-allpoint"), average_precision(hits(), cutoff))


def voc_all_point(relevant: np.ndarray, cutoff: int | None) -> float:
    """VOC all-point AP of one ranked list, step by step over every rank: recall and precision after
    each rank (recall over min(R, cutoff)), sentinels, the envelope from the right, and the area over
    the recall changes."""
    n_relevant = int(relevant.sum())
    if cutoff is not None:
        relevant, n_relevant = relevant[:cutoff], min(n_relevant, cutoff)
    found = np.cumsum(relevant)
    recall = np.concatenate([[0.0], found / n_relevant, [1.0]])
    precision = np.concatenate([[0.0], found / np.arange(1, len(relevant) + 1), [0.0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    area = 0.0
    for i in range(len(recall) - 1):
        if recall[i + 1] != recall[i]:
            area += (recall[i + 1] - recall[i]) * precision[i + 1]
    return area


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voc_all_point_ap_against_a_direct_implementation(seed):
    rng = np.random.default_rng(seed)
    relevance = rng.random((40, 60)) < rng.uniform(0.05, 0.5, size=(40, 1))
    relevance[relevance.sum(axis=1) == 0, rng.integers(60)] = True  # every query has a relevant item
    h = HitRanks.from_relevance(relevance, relevance.sum(axis=1))
    for cutoff in (None, 1, 5, 17, 60, 100):
        expected = [voc_all_point(row, cutoff) for row in relevance]
        np.testing.assert_allclose(average_precision(h, cutoff, "voc-allpoint"), expected, rtol=1e-12, atol=0)


def test_precision_at_min_cutoff_against_the_formula():
    # By hand on RELEVANCE, K = 4: min(K, R) = 3, 3, 2; hits in the top 3, 3, 2: 2, 1, 0.
    assert [exact(v) for v in precision_at(hits(), 4, "min-cutoff")] == [F(2, 3), F(1, 3), 0]
    rng = np.random.default_rng(3)
    relevance = rng.random((30, 50)) < rng.uniform(0.05, 0.6, size=(30, 1))
    relevance[relevance.sum(axis=1) == 0, 0] = True
    r = relevance.sum(axis=1)
    h = HitRanks.from_relevance(relevance, r)
    for k in (1, 3, 10, 50):
        expected = [relevance[q, :min(k, r[q])].mean() for q in range(len(r))]
        np.testing.assert_allclose(precision_at(h, k, "min-cutoff"), expected, rtol=1e-12, atol=0)
    # Top-k lists suffice: the top min(k, R) lies inside the top k.
    top = HitRanks.from_relevance(relevance[:, :10], r, gallery_size=50)
    assert np.array_equal(precision_at(top, 10, "min-cutoff"), precision_at(h, 10, "min-cutoff"))
