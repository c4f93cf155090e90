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
image: each batch carries the expert's maps of the same images, read by whole chunks too. Every
read goes through `Run.read_chunk` (`pipelines.analysis.read_rows`), so a pending or damaged chunk
and non-finite features are refused (StoreError) instead of trained on.

Noise draws. On a run of K > 1 noise draws (`extract --noise-draws K`), `draws` chooses what a
batch holds: "mean" (the float32 mean of each image's draws) or k (draw k only) for every row; with
"all", a pass given `picks` (`epoch_picks`: one draw per train image, drawn anew each epoch from
(seed, epoch) and the image's run row, as diffssl draws fresh noise at every forward) feeds those
rows their picked draw and every other row (validation, test) the mean of its draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from featurestore.store import Run, parse_draws, select_draws
from pipelines.analysis import read_rows, scored_draws
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


def expert_rows(run: Run, expert: Run, allow_incomplete: bool = False) -> np.ndarray:
    """For each row of `run`, the (int64) row of the same image in `expert`; -1 where the expert
    lacks the image, has not written it yet, or failed on it. An incomplete expert run raises
    IncompleteRunError unless `allow_incomplete`."""
    run_images, expert_images = run.rows, expert.rows  # rows of the images table
    position = np.full(max(run_images.max(initial=-1), expert_images.max(initial=-1)) + 1, -1, dtype=np.int64)
    usable = expert.usable_rows(allow_incomplete)
    position[expert_images[usable]] = usable
    return position[run_images]


class StoreBatches:
    """Passes over rows of a run (and an aligned expert run) as minibatches of float32 tensors."""

    def __init__(self, run: Run, keys: Sequence[Key], labels: np.ndarray, *, expert: Run | None = None,
                 expert_keys: Sequence[Key] = (), batch_size: int = 64, window_chunks: int | None = None,
                 allow_incomplete: bool = False, draws: str | int = "mean"):
        if batch_size < 1 or (window_chunks is not None and window_chunks < 1):
            raise ValueError("batch size and window chunks must be positive")
        self.run = run
        self.keys = list(keys)
        self.labels = labels
        self.expert = expert
        self.expert_keys = list(expert_keys) if expert else []
        self.expert_rows = expert_rows(run, expert, allow_incomplete) if expert else None
        self.batch_size = batch_size
        self.draws = parse_draws(draws)
        self.sampling = self.draws == "all" and run.noise_draws > 1  # train rows take one draw each per pass
        shapes = [run.array(*k).shape[1:] for k in self.keys]  # an unknown (t, block) fails here; draws included
        shapes += [expert.array(*k).shape[1:] for k in self.expert_keys]
        row_values = sum(math.prod(shape) for shape in shapes)
        self.window_chunks = window_chunks or max(1, WINDOW_BYTES // (4 * row_values * run.chunk_rows))
        self.read_seconds = 0.0  # time spent waiting for windows, over the life of this object

    def _check_rows(self, rows: np.ndarray) -> None:
        """Refuse rows the expert run cannot supply (loud, rather than silently dropping images)."""
        if self.expert_rows is not None and (missing := int((self.expert_rows[rows] < 0).sum())):
            raise ValueError(f"expert run {self.expert.run_id} lacks {missing} of the probed images "
                             "(not in that run, not extracted yet, or failed)")

    def epoch_picks(self, rows: np.ndarray, seed: int, epoch: int) -> np.ndarray | None:
        """Per run row, the noise draw a pass feeds: for `rows`, one of the run's K draws drawn
        uniformly by numpy's default_rng((seed, epoch, 1)) over all run rows (so an image's draw
        depends on (seed, epoch, its run row) only, never on batches or windows); -1 (the mean)
        for every other row. None unless draws="all" on a run of several draws."""
        if not self.sampling:
            return None
        picks = np.full(len(self.run), -1, dtype=np.int64)
        picks[rows] = np.random.default_rng((seed, epoch, 1)).integers(self.run.noise_draws, size=len(self.run))[rows]
        return picks

    def _features(self, key: Key, rows: np.ndarray, picks: np.ndarray | None) -> np.ndarray:
        """float32 (n, C, H, W) of `rows`: as `draws` asks, or per row its picked draw (-1: the mean)."""
        if picks is None:
            return read_rows(self.run, *key, rows, scored_draws(self.draws))
        every = read_rows(self.run, *key, rows, "all")
        out = np.empty((len(rows), *every.shape[2:]), dtype=np.float32)
        pick = picks[rows]
        one = np.flatnonzero(pick >= 0)
        out[one] = every[one, pick[one]]
        mean = np.flatnonzero(pick < 0)
        out[mean] = select_draws(every[mean], self.run.noise_draws, "mean")
        return out

    def _read_window(self, rows: np.ndarray, picks: np.ndarray | None = None) -> dict:
        """One window of rows: {("features", key): array, ("expert", key): array, "rows": rows}."""
        part: dict = {("features", k): self._features(k, rows, picks) for k in self.keys}
        if self.expert_keys:
            erows = self.expert_rows[rows]
            part.update({("expert", k): read_rows(self.expert, *k, erows) for k in self.expert_keys})
        part["rows"] = rows
        return part

    def passes(self, groups: Mapping[str, np.ndarray], rng: np.random.Generator | None,
               picks: np.ndarray | None = None) -> Iterator[tuple[str, Batch]]:
        """One pass over the union of `groups` (name -> disjoint run rows): yields (group name, batch).
        With `rng`, chunk order and rows within each window are shuffled; without, in store order.
        Within a window, groups come in the order given. `picks` (`epoch_picks`): the noise draw
        of each run row (-1: the mean of its draws); None: `draws` for every row."""
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
            future = pool.submit(self._read_window, windows[0], picks) if windows else None
            for i in range(len(windows)):
                tic = time.perf_counter()
                window = future.result()
                self.read_seconds += time.perf_counter() - tic
                if i + 1 < len(windows):
                    future = pool.submit(self._read_window, windows[i + 1], picks)
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
