"""Reading minibatches from the store: whole chunks, once per pass, seeded shuffles, expert alignment."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from pipelines.heads.data import StoreBatches

N, CHUNK = 100, 8  # 13 chunks, the last one holds 4 rows


@pytest.fixture
def stored(make_run, noise, rng):
    labels = rng.integers(0, 3, N)
    features = {(10, "a"): noise(rng, N, (3, 2, 2)), (10, "b"): noise(rng, N, (2, 4, 4))}
    return make_run(features, labels, chunk_rows=CHUNK), features, labels


def test_a_pass_reads_each_chunk_once_and_yields_every_row_once_in_full_batches(stored, rng, chunk_reads):
    run, features, labels = stored
    data = StoreBatches(run, list(features), labels, batch_size=10, window_chunks=3)
    rows = rng.permutation(N)
    groups = {"val": np.sort(rows[:23]), "train": np.sort(rows[23:95])}  # rows 95.. are in no group
    seen = {"val": [], "train": []}
    sizes = {"val": [], "train": []}
    for group, batch in data.passes(groups, np.random.default_rng(1)):
        seen[group].extend(batch.rows.tolist())
        sizes[group].append(len(batch.rows))
        for key, x in batch.features.items():
            np.testing.assert_array_equal(x.numpy(), features[key][batch.rows])
        np.testing.assert_array_equal(batch.labels.numpy(), labels[batch.rows])
    for group, expected in groups.items():
        assert sorted(seen[group]) == expected.tolist()
        assert sizes[group] == [10] * (len(expected) // 10) + [len(expected) % 10]
    needed = set((np.concatenate(list(groups.values())) // CHUNK).tolist())
    assert chunk_reads == Counter({(run.run_id, *key, c): 1 for key in features for c in needed})


def test_shuffles_are_seeded_chunk_aware_and_differ_between_epochs(stored):
    run, _, labels = stored
    data = StoreBatches(run, [(10, "a")], labels, batch_size=7, window_chunks=1)

    def order(rng):
        return np.concatenate([b.rows for _, b in data.passes({"train": np.arange(N)}, rng)])

    epoch0 = order(np.random.default_rng((0, 0)))
    assert np.array_equal(epoch0, order(np.random.default_rng((0, 0))))
    assert not np.array_equal(epoch0, order(np.random.default_rng((0, 1))))
    assert not np.array_equal(epoch0, np.arange(N))
    assert np.array_equal(order(None), np.arange(N))  # no rng: store order
    # one chunk per window: each chunk's rows come together, in shuffled chunk order
    chunk_runs = [chunk for chunk, _ in itertools.groupby((epoch0 // CHUNK).tolist())]
    assert sorted(chunk_runs) == list(range(run.n_chunks)) and chunk_runs != sorted(chunk_runs)


def test_expert_maps_belong_to_the_same_image_whatever_the_expert_row_order(make_run, noise, rng):
    labels = rng.integers(0, 3, N)
    features = {(10, "a"): noise(rng, N, (2, 2, 2))}
    expert_features = {(None, "layer"): noise(rng, N, (3, 1, 1))}
    run = make_run(features, labels, chunk_rows=CHUNK)
    expert = make_run(expert_features, labels, chunk_rows=6, name="expert", order=rng.permutation(N))
    data = StoreBatches(run, [(10, "a")], labels, expert=expert, expert_keys=[(None, "layer")], batch_size=16)
    batches = [b for _, b in data.passes({"train": np.arange(N)}, np.random.default_rng(0))]
    assert sum(len(b.rows) for b in batches) == N
    for b in batches:  # run row r is image r (write_run's default order)
        np.testing.assert_array_equal(b.expert[(None, "layer")].numpy(), expert_features[(None, "layer")][b.rows])


def test_images_the_expert_lacks_are_refused(make_run, noise, rng):
    labels = rng.integers(0, 3, N)
    run = make_run({(10, "a"): noise(rng, N, (2, 2, 2))}, labels, chunk_rows=CHUNK)
    expert = make_run({(None, "layer"): noise(rng, N, (3, 1, 1))}, labels, name="expert", order=np.arange(N - 5))
    data = StoreBatches(run, [(10, "a")], labels, expert=expert, expert_keys=[(None, "layer")])
    with pytest.raises(ValueError, match="lacks 5 of the probed images"):
        next(data.passes({"train": np.arange(N)}, None))
    assert len(list(data.passes({"train": np.arange(N - 5)}, None))) == 2


def test_unknown_blocks_and_timesteps_are_named(stored):
    run, _, labels = stored
    with pytest.raises(ValueError, match="no block 'nope'"):
        StoreBatches(run, [(10, "nope")], labels)
    with pytest.raises(ValueError, match="no timestep 11"):
        StoreBatches(run, [(11, "a")], labels)


def test_by_default_a_small_class_sorted_store_is_shuffled_whole(make_run, noise, rng):
    """Rows sorted by class, one class per chunk: one chunk per window gives one-class batches; the
    default window (what fits in WINDOW_BYTES: here the whole store) mixes every class into each."""
    labels = np.repeat(np.arange(6), CHUNK)
    run = make_run({(10, "a"): noise(rng, len(labels), (3, 2, 2))}, labels, chunk_rows=CHUNK)

    def classes_per_batch(data: StoreBatches) -> list[int]:
        return [len(set(b.labels.tolist())) for _, b in data.passes({"train": np.arange(len(labels))},
                                                                      np.random.default_rng(0))]

    assert set(classes_per_batch(StoreBatches(run, [(10, "a")], labels, batch_size=CHUNK, window_chunks=1))) == {1}
    default = StoreBatches(run, [(10, "a")], labels, batch_size=CHUNK)
    assert default.window_chunks >= 6 and min(classes_per_batch(default)) >= 4
