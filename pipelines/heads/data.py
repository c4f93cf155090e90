"""Minibatches for the heads, read straight from the store a window of whole chunks at a time.

Reading one row decodes its whole zarr chunk, so an epoch shuffles the order of chunks, reads a
window of several chunks of every array at once (each chunk exactly once per pass), shuffles the
rows of the window and cuts them into batches; rows left over carry into the next window, so every
batch but the last of a pass is full. How well batches mix classes depends on how many chunks a
window holds: stores are in manifest order, often sorted by class, so that a chunk holds one or two
classes. By default a window holds as many chunks as fit in WINDOW_BYTES of float32, so a small
store is shuffled whole; in a large class-sorted store a batch mixes about as many classes as a
window has chunks (extract with a smaller --chunk-rows for more). The next window is read on a
background thread while the heads work on the current one. Several groups of rows (train and
validation) are batched from the same pass, so validating costs no extra reads.

An expert run (another run of the same store, e.g. a ResNet under timestep None) is aligned by
image: each batch carries the expert's maps of the same images, read by whole chunks too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from featurestore.store import Run
from pipelines.heads.modules import Key

WINDOW_BYTES = 512 * 2**20  # float32 bytes of one window; the next one is read meanwhile, so twice that


@dataclass
class Batch:
    features: dict[Key, torch.Tensor]  # float32 (B, C, H, W) per (t, block) of the probed run
    expert: dict[Key, torch.Tensor]  # the same images in the expert run (empty without one)
    labels: torch.Tensor  # int64 (B,)
    rows: np.ndarray  # run rows of the batch

    def to(self, device: torch.device | str) -> Batch:
        return Batch({k: v.to(device, non_blocking=True) for k, v in self.features.items()},
                     {k: v.to(device, non_blocking=True) for k, v in self.expert.items()},
                     self.labels.to(device, non_blocking=True), self.rows)


def read_rows(array: zarr.Array, chunk_rows: int, rows: np.ndarray) -> np.ndarray:
    """array[rows] as float32 for rows in any order, decoding each chunk that holds one of them
    exactly once and whole (one slice per chunk, never row by row)."""
    chunks, inverse = np.unique(rows // chunk_rows, return_inverse=True)
    slabs = [array[c * chunk_rows:(c + 1) * chunk_rows] for c in chunks]
    starts = np.cumsum([0] + [len(s) for s in slabs[:-1]])
    return np.concatenate(slabs)[starts[inverse] + rows % chunk_rows].astype(np.float32, copy=False)


def expert_rows(run: Run, expert: Run) -> np.ndarray:
    """For each row of `run`, the row of the same image in `expert`; -1 where the expert lacks
    the image, has not written it yet, or failed on it."""
    run_images, expert_images = run.rows, expert.rows  # rows of the images table
    position = np.full(max(run_images.max(initial=-1), expert_images.max(initial=-1)) + 1, -1, dtype=np.int64)
    usable = expert.rows_done() & ~expert.failed
    position[expert_images[usable]] = np.flatnonzero(usable)
    return position[run_images]


class StoreBatches:
    """Passes over rows of a run (and an aligned expert run) as minibatches of float32 tensors."""

    def __init__(self, run: Run, keys: Sequence[Key], labels: np.ndarray, *, expert: Run | None = None,
                 expert_keys: Sequence[Key] = (), batch_size: int = 64, window_chunks: int | None = None):
        if batch_size < 1 or (window_chunks is not None and window_chunks < 1):
            raise ValueError("batch size and window chunks must be positive")
        self.run = run
        self.arrays: dict[Key, zarr.Array] = {k: run.array(*k) for k in keys}  # unknown (t, block) fails here
        self.labels = labels
        self.expert = expert
        self.expert_arrays: dict[Key, zarr.Array] = {k: expert.array(*k) for k in expert_keys} if expert else {}
        self.expert_rows = expert_rows(run, expert) if expert else None
        self.batch_size = batch_size
        row_values = sum(math.prod(a.shape[1:]) for a in [*self.arrays.values(), *self.expert_arrays.values()])
        self.window_chunks = window_chunks or max(1, WINDOW_BYTES // (4 * row_values * run.chunk_rows))
        self.read_seconds = 0.0  # time spent waiting for windows, over the life of this object

    def _check_rows(self, rows: np.ndarray) -> None:
        """Refuse rows the expert run cannot supply (loud, rather than silently dropping images)."""
        if self.expert_rows is not None and (missing := int((self.expert_rows[rows] < 0).sum())):
            raise ValueError(f"expert run {self.expert.run_id} lacks {missing} of the probed images "
                             "(not in that run, not extracted yet, or failed)")

    def _read_window(self, rows: np.ndarray) -> dict:
        """One window of rows: {("features", key): array, ("expert", key): array, "rows": rows}."""
        part: dict = {("features", k): read_rows(a, self.run.chunk_rows, rows) for k, a in self.arrays.items()}
        if self.expert_arrays:
            erows = self.expert_rows[rows]
            part.update({("expert", k): read_rows(a, self.expert.chunk_rows, erows) for k, a in self.expert_arrays.items()})
        part["rows"] = rows
        return part

    def passes(self, groups: Mapping[str, np.ndarray], rng: np.random.Generator | None) -> Iterator[tuple[str, Batch]]:
        """One pass over the union of `groups` (name -> disjoint run rows): yields (group name, batch).
        With `rng`, chunk order and rows within each window are shuffled; without, in store order.
        Within a window, groups come in the order given."""
        group_of = np.full(len(self.run), -1)
        for g, rows in enumerate(groups.values()):
            self._check_rows(rows)
            group_of[rows] = g
        all_rows = np.flatnonzero(group_of >= 0)  # ascending, hence grouped by chunk
        _, starts = np.unique(all_rows // self.run.chunk_rows, return_index=True)
        ends = np.append(starts[1:], len(all_rows))
        order = rng.permutation(len(starts)) if rng is not None else np.arange(len(starts))
        windows = [np.concatenate([all_rows[starts[c]:ends[c]] for c in order[i:i + self.window_chunks]])
                   for i in range(0, len(order), self.window_chunks)]
        pending: dict[str, dict | None] = dict.fromkeys(groups)
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(self._read_window, windows[0]) if windows else None
            for i in range(len(windows)):
                tic = time.perf_counter()
                window = future.result()
                self.read_seconds += time.perf_counter() - tic
                if i + 1 < len(windows):
                    future = pool.submit(self._read_window, windows[i + 1])
                for g, name in enumerate(groups):
                    index = np.flatnonzero(group_of[window["rows"]] == g)
                    if rng is not None:
                        index = rng.permutation(index)
                    part = {k: v[index] for k, v in window.items()}
                    if pending[name] is not None:
                        part = {k: np.concatenate([pending[name][k], v]) for k, v in part.items()}
                    while len(part["rows"]) >= self.batch_size:
                        yield name, self._batch({k: v[:self.batch_size] for k, v in part.items()})
                        part = {k: v[self.batch_size:] for k, v in part.items()}
                    pending[name] = part
        for name, rest in pending.items():
            if rest is not None and len(rest["rows"]):
                yield name, self._batch(rest)

    def _batch(self, part: dict) -> Batch:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in part.items() if k != "rows"}
        return Batch(
            features={k: v for (source, k), v in tensors.items() if source == "features"},
            expert={k: v for (source, k), v in tensors.items() if source == "expert"},
            labels=torch.from_numpy(self.labels[part["rows"]]),
            rows=part["rows"],
        )
