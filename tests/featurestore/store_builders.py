"""Helpers for tests/featurestore: stores built through the store API with random numpy data.

The `make_run(...)` fixture (conftest.py) builds a store in tmp_path, writes some chunks of random
features (with failed rows), and returns a `Written` record holding, independently of the store, what
every array should contain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurestore.store import WritableRun, WritableStore

BLOCKS = {"down0": (3, 2, 2), "mid": (4, 1, 1)}
TIMESTEPS = (10, None)
SPEC = {"dataset": "toy", "backbone": "tiny", "timesteps": [10, None], "blocks": ["down0", "mid"], "seed": 0}


def manifest(ids, labels, *, split="train", domain="photo") -> dict[str, list]:
    """The columns add_images expects (everything but `dataset`); `split` is one split for every
    image or a sequence of one per image."""
    ids = [str(i) for i in ids]
    labels = [int(label) for label in labels]
    return {
        "id": ids,
        "label": labels,
        "class_name": [f"class{label}" for label in labels],
        "split": [split] * len(ids) if isinstance(split, str) else [str(s) for s in split],
        "domain": [domain] * len(ids),
        "source": [f"img/{i}.png" for i in ids],
    }


@dataclass
class Written:
    """A run and what it holds, tracked independently of the store."""

    path: Path
    store: WritableStore
    run: WritableRun
    chunk_rows: int
    data: dict[tuple[int | None, str], np.ndarray]  # (t, block) -> (N, C, H, W) expected values
    ids: np.ndarray  # image id of each run row
    labels: np.ndarray  # label of each run row
    splits: np.ndarray  # split of each run row
    done_chunks: list[int]
    failed: dict[int, str] = field(default_factory=dict)  # run row -> error, in done chunks only
    undone_failed: dict[int, str] = field(default_factory=dict)  # flags written in chunks not done

    @property
    def n(self) -> int:
        return len(self.ids)

    def chunk_of(self, row: int) -> int:
        return row // self.chunk_rows

    def usable_rows(self) -> np.ndarray:
        return np.array(
            [r for r in range(self.n) if self.chunk_of(r) in self.done_chunks and r not in self.failed],
            dtype=np.int64,
        )


def write_random_chunk(w: Written, chunk: int, rng: np.random.Generator, failed: dict[int, str]) -> None:
    """Write random features for every array of one chunk, with `failed` rows (run row -> message)."""
    rows = range(chunk * w.chunk_rows, min((chunk + 1) * w.chunk_rows, w.n))
    features = {}
    for key, expected in w.data.items():
        values = rng.standard_normal((len(rows), *expected.shape[1:])).astype(np.float32)
        for r in failed:
            values[r - rows.start] = 0.0  # the pipeline leaves failed rows zero
        expected[rows.start : rows.stop] = values  # cast to the stored dtype by the assignment
        features[key] = values
    flags = np.array([r in failed for r in rows])
    errors = [failed.get(r, "") for r in rows]
    w.run.write_chunk(chunk, features, flags, errors)
    w.done_chunks.append(chunk)
    w.failed.update(failed)


def age_files(root: Path) -> dict[str, tuple[int, int]]:
    """Set every file's mtime far into the past; returns {path: (mtime_ns, size)} after that."""
    old = 1_000_000_000 * 10**9
    for dirpath, _, files in os.walk(root):
        for f in files:
            os.utime(os.path.join(dirpath, f), ns=(old, old))
    return file_stamps(root)


def file_stamps(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_mtime_ns, st.st_size)
    return out
