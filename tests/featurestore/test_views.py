"""torch view: FeatureDataset items and row selection, ChunkShuffleSampler order and chunk reads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from store_builders import manifest

from featurestore.store import FeatureStore, IncompleteRunError, NonFiniteError, StoreError, timestep_key
from featurestore.torch_view import ChunkShuffleSampler, FeatureDataset

# N=30 in chunks of 4: 8 chunks, the last one has 2 rows. Chunk 3 (rows 12-15) is not done but has a
# failure flag on row 14; rows 2, 17 and 29 failed in done chunks.
LAYOUT = dict(n=30, chunk_rows=4, done=(0, 1, 2, 4, 5, 6, 7), failed={2: "bad png", 17: "nan", 29: "oom"},
              undone_failed={14: "killed"})
USABLE = [r for r in range(30) if r // 4 != 3 and r not in (2, 17, 29)]


@pytest.fixture
def written(make_run):
    return make_run(**LAYOUT)


def view(run, keys, **kw) -> FeatureDataset:
    """A FeatureDataset that accepts the incomplete run of LAYOUT (chunk 3 pending)."""
    return FeatureDataset(run, keys, allow_incomplete=True, **kw)


def _count_reads(ds: FeatureDataset) -> list[list[slice]]:
    """Per key of `ds`, the rows (a slice per chunk) of every read; all go through `Run.read_chunk`."""
    reads: dict[tuple, list[slice]] = {key: [] for key in ds.keys}
    read_chunk = ds.run.read_chunk

    def counted(t, block, chunk):
        reads[(t, block)].append(ds.run.chunk_slice(chunk))
        return read_chunk(t, block, chunk)

    ds.run.read_chunk = counted
    return list(reads.values())


def _chunk_runs(chunks: list[int]) -> list[int]:
    """The chunk of each maximal run of equal consecutive values."""
    return [c for c, _ in itertools.groupby(chunks)]


# -- FeatureDataset -------------------------------------------------------------------------------
def test_single_key_items_are_features_and_label(written):
    ds = view(written.run, [(10, "down0")])
    assert len(ds) == len(USABLE)
    for i, row in enumerate(USABLE):
        x, y = ds[i]
        assert isinstance(x, torch.Tensor)
        assert x.dtype == torch.float32
        assert x.shape == (3, 2, 2)
        np.testing.assert_array_equal(x.numpy(), written.data[(10, "down0")][row])
        assert type(y) is int
        assert y == written.labels[row]


def test_float16_store_gives_float32_tensors(make_run):
    w = make_run(dtype="float16")  # N=10, chunks of 4: chunks 0 and 2 done, rows 1 and 9 failed
    ds = FeatureDataset(w.run, [(None, "down0")], allow_incomplete=True)
    assert ds.rows.tolist() == [0, 2, 3, 8]
    for i, row in enumerate([0, 2, 3, 8]):
        x, y = ds[i]
        assert x.dtype == torch.float32
        np.testing.assert_array_equal(x.numpy(), w.data[(None, "down0")][row].astype(np.float32))
        assert y == w.labels[row]


def test_timestep_none_key_reads_its_own_array(written):
    ds = view(written.run, [(None, "mid")])
    for i, row in enumerate(USABLE):
        np.testing.assert_array_equal(ds[i][0].numpy(), written.data[(None, "mid")][row])
    assert not np.array_equal(written.data[(None, "mid")][USABLE], written.data[(10, "mid")][USABLE])


def test_two_keys_give_a_dict(written):
    ds = view(written.run, [(10, "down0"), (10, "mid")])
    for i, row in enumerate(USABLE):
        x, y = ds[i]
        assert set(x) == {"t10/down0", "t10/mid"}
        np.testing.assert_array_equal(x["t10/down0"].numpy(), written.data[(10, "down0")][row])
        np.testing.assert_array_equal(x["t10/mid"].numpy(), written.data[(10, "mid")][row])
        assert x["t10/mid"].dtype == torch.float32
        assert y == written.labels[row]


def test_dict_key_of_timestep_none_follows_store_naming(written):
    ds = view(written.run, [(10, "mid"), (None, "mid")])
    x, _ = ds[0]
    assert set(x) == {"t10/mid", f"{timestep_key(None)}/mid"}


def test_an_incomplete_run_is_refused_unless_allowed(written):
    with pytest.raises(IncompleteRunError, match=r"incomplete: 4 of 30 images pending; re-run the same `featurestore "
                                                 r"extract` to resume, or pass --allow-incomplete"):
        FeatureDataset(written.run, [(10, "down0")])
    with pytest.raises(IncompleteRunError, match="pending"):
        FeatureDataset(written.run, [(10, "down0")], rows=np.array([0, 1]))  # even rows that are done
    assert FeatureDataset(written.run, [(10, "down0")], allow_incomplete=True).rows.tolist() == USABLE


def test_a_complete_run_needs_no_flag_and_leaves_failed_images_out(make_run):
    complete = make_run(n=8, chunk_rows=4, done=(0, 1), failed={3: "bad png"}, undone_failed={})
    assert FeatureDataset(complete.run, [(10, "down0")]).rows.tolist() == [0, 1, 2, 4, 5, 6, 7]  # failed: left out


def test_non_finite_features_are_refused_when_read(make_run):
    w = make_run(n=8, chunk_rows=4, done=(0, 1), failed={}, undone_failed={})
    values = w.data[(10, "down0")][4:8].copy()
    values[2, 0, 0, 0] = np.inf
    w.run.write_chunk(1, {(10, "down0"): values}, np.zeros(4, bool), [""] * 4)
    ds = FeatureDataset(w.run, [(10, "down0")])
    np.testing.assert_array_equal(ds[0][0].numpy(), w.data[(10, "down0")][0])
    with pytest.raises(NonFiniteError, match="array t10/down0 chunk 1 holds non-finite values"):
        ds[5]


def test_failed_and_undone_rows_are_excluded(written):
    ds = view(written.run, [(10, "down0")])
    assert ds.rows.tolist() == USABLE
    assert 14 not in ds.rows and 12 not in ds.rows and 2 not in ds.rows


def test_explicit_rows_keep_their_order(written):
    rows = np.array([21, 0, 8, 9, 28])
    ds = view(written.run, [(None, "down0")], rows=rows)
    assert len(ds) == 5
    for i, row in enumerate(rows):
        x, y = ds[i]
        np.testing.assert_array_equal(x.numpy(), written.data[(None, "down0")][row])
        assert y == written.labels[row]


@pytest.mark.parametrize("bad_row", [2, 29, 12, 14], ids=["failed", "failed-last", "undone", "undone-flagged"])
def test_requesting_unusable_rows_raises(written, bad_row):
    with pytest.raises(ValueError, match="not extracted yet or failed"):
        view(written.run, [(10, "down0")], rows=np.array([0, bad_row, 5]))


def test_dataset_needs_a_known_key(written):
    with pytest.raises(ValueError):
        view(written.run, [])
    with pytest.raises(StoreError):
        view(written.run, [(10, "up0")])
    with pytest.raises(StoreError):
        view(written.run, [(999, "mid")])


# -- ChunkShuffleSampler --------------------------------------------------------------------------
def test_sampler_yields_a_permutation(written):
    ds = view(written.run, [(10, "mid")])
    sampler = ChunkShuffleSampler(ds, seed=3)
    order = list(sampler)
    assert len(sampler) == len(ds)
    assert sorted(order) == list(range(len(ds)))
    assert all(type(i) is int for i in order)


def test_sampler_keeps_each_chunk_contiguous(written):
    ds = view(written.run, [(10, "mid")])
    for seed in (0, 1, 7):
        sampler = ChunkShuffleSampler(ds, seed=seed)
        for epoch in (0, 1, 5):
            sampler.set_epoch(epoch)
            chunks = [int(ds.rows[i]) // 4 for i in sampler]
            runs = _chunk_runs(chunks)
            assert sorted(runs) == [0, 1, 2, 4, 5, 6, 7], (seed, epoch, chunks)  # one run per chunk


def test_sampler_with_explicit_rows_keeps_chunks_contiguous(written):
    rows = np.array([25, 0, 9, 24, 1, 8, 26, 3, 10])
    ds = view(written.run, [(10, "mid")], rows=rows)
    order = list(ChunkShuffleSampler(ds, seed=2))
    assert sorted(order) == list(range(9))
    assert sorted(_chunk_runs([int(rows[i]) // 4 for i in order])) == [0, 2, 6]


def test_sampler_is_deterministic_per_seed_and_epoch(written):
    ds = view(written.run, [(10, "mid")])
    a, b = ChunkShuffleSampler(ds, seed=11), ChunkShuffleSampler(ds, seed=11)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again gives the same epoch
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ChunkShuffleSampler(ds, seed=12)) != list(ChunkShuffleSampler(ds, seed=11))


def test_sampler_really_shuffles(written):
    ds = view(written.run, [(10, "mid")])
    sampler = ChunkShuffleSampler(ds, seed=0)
    chunk_orders, segments = [], []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        order = list(sampler)
        chunk_orders.append(tuple(_chunk_runs([int(ds.rows[i]) // 4 for i in order])))
        segments += [list(seg) for _, seg in itertools.groupby(order, lambda i: int(ds.rows[i]) // 4)]
    assert any(list(c) != sorted(c) for c in chunk_orders)  # chunk order is shuffled
    assert len(set(chunk_orders)) > 1
    assert any(seg != sorted(seg) for seg in segments)  # rows inside a chunk are shuffled too


def test_sampler_order_decodes_each_chunk_once(written):
    ds = view(written.run, [(10, "down0"), (None, "mid")])
    counters = _count_reads(ds)
    sampler = ChunkShuffleSampler(ds, seed=5)
    sampler.set_epoch(2)
    for i in sampler:
        x, y = ds[i]
        row = int(ds.rows[i])
        np.testing.assert_array_equal(x["t10/down0"].numpy(), written.data[(10, "down0")][row])
        assert y == written.labels[row]
    expected = [written.run.chunk_slice(c) for c in (0, 1, 2, 4, 5, 6, 7)]
    for counter in counters:
        assert len(counter) == len(expected)
        assert sorted(counter, key=lambda s: s.start) == expected


def test_read_counter_sees_re_decoding(written):
    """The counter of the test above can fail: alternating chunks re-decodes every time."""
    ds = view(written.run, [(10, "mid")])
    (counter,) = _count_reads(ds)
    order = [0, 3, 1, 4, 2, 5]  # rows 0, 4, 1, 5, 3, 6: chunks 0, 1, 0, 1, 0, 1
    for i in order:
        ds[i]
    assert len(counter) == 6


def test_dataloader_with_sampler(written):
    ds = view(written.run, [(10, "down0")])
    sampler = ChunkShuffleSampler(ds, seed=1)
    order = list(sampler)
    loader = DataLoader(ds, batch_size=5, sampler=sampler)
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    rows = ds.rows[order]
    np.testing.assert_array_equal(x.numpy(), written.data[(10, "down0")][rows])
    np.testing.assert_array_equal(y.numpy(), written.labels[rows])


def test_a_window_of_chunks_is_shuffled_together_and_each_chunk_decoded_once(written):
    ds = view(written.run, [(10, "down0")], cache_chunks=3)
    (counter,) = _count_reads(ds)
    sampler = ChunkShuffleSampler(ds, seed=4, window_chunks=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    chunks = [int(ds.rows[i]) // 4 for i in order]
    usable_rows = {c: chunks.count(c) for c in set(chunks)}
    windows, rest = [], chunks
    while rest:  # a window: the next 3 chunks met, all of whose rows come before any other chunk's
        window = list(dict.fromkeys(rest))[:3]
        size = sum(usable_rows[c] for c in window)
        assert set(rest[:size]) == set(window)
        windows.append(window)
        rest = rest[size:]
    assert [len(w) for w in windows] == [3, 3, 1]
    assert len(_chunk_runs(chunks)) > 7  # rows of the chunks of a window interleave
    for i in order:
        np.testing.assert_array_equal(ds[i][0].numpy(), written.data[(10, "down0")][int(ds.rows[i])])
    assert sorted(counter, key=lambda s: s.start) == [written.run.chunk_slice(c) for c in (0, 1, 2, 4, 5, 6, 7)]


def test_the_chunk_cache_keeps_the_last_chunks_used(written):
    ds = view(written.run, [(10, "mid")], cache_chunks=2)
    (counter,) = _count_reads(ds)
    for i in [0, 3, 1, 4, 2, 5]:  # chunks 0, 1, 0, 1, 0, 1: both stay cached
        ds[i]
    ds[7]  # chunk 2 evicts chunk 0, the least recently used
    ds[4]  # chunk 1 is still there
    ds[0]  # chunk 0 is read again
    assert [s.start for s in counter] == [0, 4, 8, 0]


def test_a_window_needs_a_cache_that_holds_it(written):
    with pytest.raises(ValueError, match=r"needs FeatureDataset\(cache_chunks >= 4\)"):
        ChunkShuffleSampler(view(written.run, [(10, "mid")], cache_chunks=2), window_chunks=4)
    with pytest.raises(ValueError, match="cache_chunks must be at least 1"):
        view(written.run, [(10, "mid")], cache_chunks=0)


def test_a_run_with_nothing_extracted_is_refused_without_suggesting_allow_incomplete(store_path):
    store = FeatureStore.open(store_path, "a")
    rows = store.add_images("toy", manifest(range(4), [0, 1, 0, 1]))
    run = store.create_run({"name": "empty"}, arrays={"mid": (4, 1, 1)}, timesteps=[10], rows=rows, chunk_rows=2,
                           dtype="float32", provenance={})
    with pytest.raises(IncompleteRunError) as err:
        run.usable_rows()
    assert str(err.value).endswith("4 of 4 images pending; re-run the same `featurestore extract` to resume")
    assert len(run.usable_rows(allow_incomplete=True)) == 0


def test_the_float16_bit_check_finds_exactly_the_rows_np_isfinite_finds():
    from featurestore.store import _nonfinite_rows

    specials = np.array([65504, -65504, 6e-8, -0.0, np.inf, -np.inf, np.nan, 1.0], dtype=np.float16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 2, 2)).astype(np.float16)
    x.reshape(64, -1)[np.arange(64), rng.integers(0, 12, 64)] = rng.choice(specials, 64)
    expected = ~np.isfinite(x.astype(np.float32)).reshape(64, -1).all(axis=1)
    assert 0 < expected.sum() < 64
    np.testing.assert_array_equal(_nonfinite_rows(x), expected)
    np.testing.assert_array_equal(_nonfinite_rows(x.astype(np.float32)), expected)
