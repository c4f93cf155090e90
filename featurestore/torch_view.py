"""A torch Dataset over one or more (t, block) arrays of a run, and a chunk-aware shuffle.

Reading one row decodes its whole zarr chunk, so random access row by row is slow. The sampler
shuffles the order of chunks and then the rows inside each chunk; the dataset keeps the decoded
chunk of every array it last touched, so a shuffled epoch decodes each chunk once.
This is the only module of `featurestore` that imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from featurestore.store import Run, timestep_key


class FeatureDataset(Dataset):
    """Items are (features, label): one float32 tensor for one key, a dict {"t<T>/<block>": tensor}
    (`tnone/<block>` for experts)
    for several keys. Only rows whose chunk is done and whose image did not fail are included."""

    def __init__(self, run: Run, keys: Sequence[tuple[int | None, str]], rows: np.ndarray | None = None):
        if not keys:
            raise ValueError("FeatureDataset needs at least one (timestep, block)")
        self.run = run
        self.keys = list(keys)
        self.arrays = [run.array(t, block) for t, block in self.keys]
        usable = run.rows_done() & ~run.failed
        self.rows = np.flatnonzero(usable) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows is not None and not usable[self.rows].all():
            raise ValueError("some requested rows are not extracted yet or failed")
        self.labels = run.labels
        self._cache: dict[int, tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def _row(self, k: int, row: int) -> np.ndarray:
        chunk = row // self.run.chunk_rows
        cached = self._cache.get(k)
        if cached is None or cached[0] != chunk:
            cached = (chunk, self.arrays[k][self.run.chunk_slice(chunk)])
            self._cache[k] = cached
        return cached[1][row - chunk * self.run.chunk_rows]

    def __getitem__(self, index: int):
        row = int(self.rows[index])
        values = [torch.from_numpy(self._row(k, row).astype(np.float32)) for k in range(len(self.keys))]
        label = int(self.labels[row])
        if len(values) == 1:
            return values[0], label
        return {f"{timestep_key(t)}/{block}": v for (t, block), v in zip(self.keys, values)}, label


class ChunkShuffleSampler(Sampler[int]):
    """Indices of a FeatureDataset in shuffled chunk order, shuffled within each chunk; a new
    order every epoch (seed + epoch), the same order for the same seed."""

    def __init__(self, dataset: FeatureDataset, seed: int = 0):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        chunk_of = self.dataset.rows // self.dataset.run.chunk_rows
        chunks = np.unique(chunk_of)
        for chunk in rng.permutation(chunks):
            yield from rng.permutation(np.flatnonzero(chunk_of == chunk)).tolist()
