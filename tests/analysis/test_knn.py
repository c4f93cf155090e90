"""Weighted kNN on arrays: FAISS search + votes against a brute-force numpy implementation."""

import itertools

import numpy as np
import pytest

from pipelines.analysis.knn import knn_accuracy, l2_normalized, search_topk, streamed_topk


def brute_force_knn(train_x, train_y, test_x, test_y, k, temperature=0.07):
    """The DINO weighted vote written out plainly, in float64: (top-1, top-5). A query is a top-n
    hit when its class has a positive vote and fewer than n classes beat it (a higher vote, or an
    equal vote and a lower class index): a class no neighbour voted for is never a hit."""
    train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    test = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    classes = sorted(set(train_y.tolist()))
    hits1 = hits5 = 0
    for query, label in zip(test.astype(np.float64), test_y):
        sims = train.astype(np.float64) @ query
        nearest = np.argsort(-sims)[:k]
        votes = {c: 0.0 for c in classes}
        for i in nearest:
            votes[train_y[i]] += np.exp(sims[i] / temperature)
        beaten_by = sum(votes[c] > votes[label] or (votes[c] == votes[label] and c < label) for c in classes)
        hits1 += votes[label] > 0 and beaten_by < 1
        hits5 += votes[label] > 0 and beaten_by < 5
    return hits1 / len(test_y), hits5 / len(test_y)


@pytest.mark.parametrize("k", [1, 2, 3, 10, 20, 100])
def test_matches_brute_force_vote(k):
    """12 classes, so top-5 at small k would count classes without a vote if they were ranked."""
    rng = np.random.default_rng(k)
    centres = rng.normal(size=(12, 16))
    train_y, test_y = rng.integers(0, 12, 300), rng.integers(0, 12, 80)
    train_x = centres[train_y] + 1.5 * rng.normal(size=(300, 16))
    test_x = centres[test_y] + 1.5 * rng.normal(size=(80, 16))
    sims, indices = search_topk(l2_normalized(train_x), l2_normalized(test_x), k)
    top1, top5 = knn_accuracy(sims, indices, train_y, test_y, [k])[k]
    expected = brute_force_knn(train_x, train_y, test_x, test_y, k)
    assert (top1, top5) == pytest.approx(expected, abs=1e-12)
    assert 0.2 < top1 < 1.0 and top5 >= top1  # a task that is neither trivial nor hopeless
    if k == 1:
        assert top5 == top1  # one neighbour votes for one class: top-5 is top-1
    else:
        assert top5 > top1


def test_streamed_search_equals_one_search():
    rng = np.random.default_rng(0)
    train, queries = l2_normalized(rng.normal(size=(503, 24))), l2_normalized(rng.normal(size=(40, 24)))
    expected = search_topk(train, queries, 50)
    for bounds in ([0, 7, 100, 101, 350, 503], [0, 503], list(range(0, 504, 64)) + [503]):
        slabs = [train[a:b] for a, b in itertools.pairwise(bounds)]
        sims, indices = streamed_topk(slabs, queries, 50)
        np.testing.assert_array_equal(indices, expected[1])
        np.testing.assert_array_equal(sims, expected[0])


def test_toy_two_classes_in_the_plane():
    # Class 0 points right, class 1 points up; each query is nearest to its own class.
    train_x = np.array([[1, 0.1], [1, -0.1], [1, 0], [0.1, 1], [-0.1, 1], [0, 1]], dtype=np.float32)
    train_y = np.array([0, 0, 0, 1, 1, 1])
    test_x = np.array([[5, 1], [1, 5], [3, -1]], dtype=np.float32)
    test_y = np.array([0, 1, 1])  # the last one is labelled wrong on purpose
    sims, indices = search_topk(l2_normalized(train_x), l2_normalized(test_x), 6)
    assert set(indices[0, :3]) == {0, 1, 2} and set(indices[1, :3]) == {3, 4, 5}
    accuracy = knn_accuracy(sims, indices, train_y, test_y, [1, 3, 6])
    # k=1, 3: no neighbour of the mislabelled query is of class 1, so it is not even in the top 5
    assert accuracy[1] == accuracy[3] == pytest.approx((2 / 3, 2 / 3))
    # k=6: every train point votes, the near class still wins by exp(s / 0.07); class 1 is second.
    assert accuracy[6] == pytest.approx((2 / 3, 1.0))


def test_unknown_test_label_is_never_right():
    x = l2_normalized(np.eye(3, dtype=np.float32))
    sims, indices = search_topk(x, x, 1)
    assert knn_accuracy(sims, indices, np.array([0, 1, 2]), np.array([0, 1, 9]), [1])[1] == pytest.approx((2 / 3, 2 / 3))


def test_a_timestep_free_run_is_printed_as_the_cli_spells_it(tmp_path):
    """knn and probe on an expert's run (timestep None) print t=none, the value --timestep takes."""
    from typer.testing import CliRunner

    from cli.main import app
    from featurestore.store import FeatureStore

    store = FeatureStore.open(str(tmp_path / "s.zarr"), mode="a")
    n = 12
    labels = np.arange(n) % 2
    rows = store.add_images("toy", {"id": [f"i{i}" for i in range(n)], "label": labels,
                                    "class_name": [f"c{v}" for v in labels],
                                    "split": ["train" if i < 8 else "test" for i in range(n)],
                                    "domain": ["x"] * n, "source": [f"i{i}" for i in range(n)]})
    run = store.create_run({"name": "expert"}, arrays={"b": (2, 1, 1)}, timesteps=[None], rows=rows, chunk_rows=n,
                           dtype="float32", provenance={})
    values = np.random.default_rng(0).standard_normal((n, 2, 1, 1)).astype(np.float32) + labels[:, None, None, None]
    run.write_chunk(0, {(None, "b"): values}, np.zeros(n, bool), [""] * n)
    for command in (["knn", "--k", "3"], ["probe"]):
        result = CliRunner().invoke(app, [command[0], str(tmp_path / "s.zarr"), "--block", "b", "--timestep", "none",
                                          *command[1:], "--out", str(tmp_path / "r")])
        assert result.exit_code == 0, result.output
        assert "b t=none" in result.output and "None" not in result.output
