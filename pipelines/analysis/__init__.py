"""Stage-2 analyses that read only the feature store: kNN, CKA and (t, block) sweeps.

The helpers here are shared by every analysis: reading rows of a run in chunk-aligned slabs (a
zarr read decodes whole chunks, so a slab of whole chunks is decoded exactly once), and where a
result is saved.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store import Run
from pipelines.heads.logistic import pooled

SLAB_ROWS = 4096


def row_slabs(run: Run, rows: np.ndarray, slab_rows: int = SLAB_ROWS) -> Iterator[slice]:
    """Positions into the sorted run rows `rows`, one slice per window of whole store chunks of
    about `slab_rows` rows (at least one chunk); empty windows are skipped."""
    if slab_rows < 1:
        raise ValueError("slab rows must be positive")
    window = max(1, slab_rows // run.chunk_rows) * run.chunk_rows
    bounds = np.searchsorted(rows, np.arange(0, len(run) + window, window))
    for start, stop in itertools.pairwise(bounds):
        if stop > start:
            yield slice(int(start), int(stop))


def read_pooled(run: Run, timestep: int | None, block: str, rows: np.ndarray, pool: int | None) -> np.ndarray:
    """Pooled, flattened float32 features of run rows given in any order. Read chunk by chunk: a
    slice of whole chunks reads ~3x faster than zarr's integer selection, and only one raw chunk
    is held at a time."""
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    parts = []
    for group in np.split(ordered, np.flatnonzero(np.diff(ordered // run.chunk_rows)) + 1):
        chunk = run.chunk_slice(int(group[0]) // run.chunk_rows)
        parts.append(pooled(run.numpy(timestep, block, chunk)[group - chunk.start], pool))
    out = np.empty((len(rows), parts[0].shape[1]), np.float32)
    out[order] = np.concatenate(parts)
    return out


def results_dir(store_url: str, out: str | Path | None) -> Path:
    """Where results go: `out`, or `results/` next to a local store."""
    if out is not None:
        return Path(out)
    local = str(store_url).removeprefix("file://")
    if "://" in local:
        raise ValueError(f"{store_url} is not a local path: give --out for the results")
    return Path(local).resolve().parent / "results"


def write_json(doc: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path
