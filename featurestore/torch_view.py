"""A torch Dataset over one or more (t, block) arrays of a run, and a chunk-aware shuffle.

Reading one row decodes its whole zarr chunk, so random access row by row is slow. The sampler
shuffles the order of chunks, groups them into windows of `window_chunks` and shuffles the rows
inside each window; the dataset keeps the last `cache_chunks` decoded chunks of every array, so a
shuffled epoch decodes each chunk once when the cache holds a window. Stores are in manifest order,
often sorted by class: a window of one chunk gives batches of one or two classes, a window of many
chunks mixes them (at the memory of that many decoded chunks).
This is the only module of `featurestore` that imports torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from featurestore.store import Run, timestep_key


class FeatureDataset(Dataset):
    """Items are (features, label): one float32 tensor (C, H, W) for one key, a dict
    {"t<T>/<block>": tensor} (`tnone/<block>` for experts) for several keys; the label an int.
    `split` (e.g. "train") keeps only the images of that split (`Run.split_rows`), so training
    never sees test images; None keeps every split. `rows` (default: all of the split) are run
    rows; only images of the split that were extracted and did not fail are allowed (ValueError
    otherwise). An unknown split raises StoreError naming the run's splits. An incomplete run
    raises IncompleteRunError (how many images are pending; re-running `extract` resumes) unless
    `allow_incomplete`, which keeps only the extracted images.
    `cache_chunks`: decoded chunks kept per array (a sampler's window needs that many). Every chunk
    is read through `Run.read_chunk`, so non-finite features raise NonFiniteError when read."""

    def __init__(self, run: Run, keys: Sequence[tuple[int | None, str]], rows: np.ndarray | None = None,
                 allow_incomplete: bool = False, cache_chunks: int = 1, split: str | None = None):
        if not keys:
            raise ValueError("FeatureDataset needs at least one (timestep, block)")
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks must be at least 1, got {cache_chunks}")
        self.run = run
        self.keys = list(keys)
        for t, block in self.keys:
            run.array(t, block)  # an unknown (t, block) fails here
        usable = run.usable_rows(allow_incomplete) if split is None else run.split_rows(split, allow_incomplete)
        self.rows = usable if rows is None else np.asarray(rows, dtype=np.int64)
        if rows is not None and not np.isin(self.rows, usable).all():
            outside = "" if split is None else f", or are not of split {split!r}"
            raise ValueError(f"some requested rows are not extracted yet or failed{outside}")
        self.labels = run.labels
        self.cache_chunks = cache_chunks
        self._cache: list[OrderedDict[int, np.ndarray]] = [OrderedDict() for _ in self.keys]

    def __len__(self) -> int:
        return len(self.rows)

    def _row(self, k: int, row: int) -> np.ndarray:
        chunk, cache = row // self.run.chunk_rows, self._cache[k]
        if chunk in cache:
            cache.move_to_end(chunk)
        else:
            cache[chunk] = self.run.read_chunk(*self.keys[k], chunk)
            if len(cache) > self.cache_chunks:
                cache.popitem(last=False)  # the least recently used
        return cache[chunk][row - chunk * self.run.chunk_rows]

    def __getitem__(self, index: int):
        row = int(self.rows[index])
        values = [torch.from_numpy(self._row(k, row).astype(np.float32)) for k in range(len(self.keys))]
        label = int(self.labels[row])
        if len(values) == 1:
            return values[0], label
        return {f"{timestep_key(t)}/{block}": v for (t, block), v in zip(self.keys, values)}, label


class ChunkShuffleSampler(Sampler[int]):
    """Indices of a FeatureDataset: chunks in shuffled order, `window_chunks` at a time, the rows of
    each window shuffled together; a new order every epoch (seed + epoch), the same order for the
    same seed. The dataset must cache at least `window_chunks` chunks."""

    def __init__(self, dataset: FeatureDataset, seed: int = 0, window_chunks: int = 1):
        if window_chunks < 1:
            raise ValueError(f"window_chunks must be at least 1, got {window_chunks}")
        if dataset.cache_chunks < window_chunks:
            raise ValueError(f"a window of {window_chunks} chunks needs FeatureDataset(cache_chunks >= {window_chunks}) "
                             f"(it has {dataset.cache_chunks}); otherwise chunks are decoded again and again")
        self.dataset = dataset
        self.seed = seed
        self.window_chunks = window_chunks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        chunk_of = self.dataset.rows // self.dataset.run.chunk_rows
        chunks = rng.permutation(np.unique(chunk_of))
        for start in range(0, len(chunks), self.window_chunks):
            window = np.flatnonzero(np.isin(chunk_of, chunks[start:start + self.window_chunks]))
            yield from rng.permutation(window).tolist()
