"""Stage-2 analyses that read only the feature store: kNN, CKA and (t, block) sweeps.

The helpers here are shared by every stage-2 command: pooling, reading rows of a run in
chunk-aligned slabs (a zarr read decodes whole chunks, so a slab of whole chunks is decoded exactly
once, and every read goes through `Run.read_chunk`, which refuses pending, damaged and non-finite
chunks), the image counts every result records, and where and how a result is saved.

Results. The default results folder belongs to one store: `<store path>.results/`. A results file
is named `<command>-<label>-<digest>.<suffix>`: the label is for people (run ids, t, block), the
digest covers every setting that changes the numbers, so runs with other settings never overwrite
each other and the same settings replace their own file. Results JSON never holds NaN or inf: an
undefined value is written as null, deliberately, by the analysis that found it.

Noise draws (`--draws`, on runs extracted with `--noise-draws K`; `draws_meaning` says it in every
output). `mean`: every image is the float32 mean of its K draws, for fitting and scoring alike.
`k`: draw k only, for both. `all`: every draw of a training image is a sample of its own (the kNN
bank, the logistic probe's and the retrieval projection's fit; trained heads take one draw per
image per epoch, see pipelines/heads/data.py), while scored images (queries, test images, the
retrieval gallery) are the mean of their draws, so each image is scored once; CKA has no scored
side: there every (image, draw) is a sample, draw d of one view paired with draw d of the other.
On a run of one draw the three choices give the same features.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.pooling import pooled
from featurestore.store import Run, parse_draws, run_id_of

SLAB_ROWS = 4096
RESULTS_SUFFIX = ".results"


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


def read_rows(run: Run, timestep: int | None, block: str, rows: np.ndarray, draws: str | int = "mean") -> np.ndarray:
    """float32 features (len(rows), C, H, W) of run rows given in any order ((len(rows), K, C, H, W)
    for draws="all"; `featurestore.store.select_draws`), read by `Run.read_rows` (each chunk once,
    through `Run.read_chunk`), so its refusals apply: StoreError subclasses for a pending chunk, a
    damaged one, non-finite values of an image that did not fail, or a draw the run lacks."""
    return run.read_rows(timestep, block, rows, lambda x: x.astype(np.float32, copy=False), draws=draws)


def read_pooled(run: Run, timestep: int | None, block: str, rows: np.ndarray, pool: int | None,
                advance: Callable[[int], None] | None = None, draws: str | int = "mean") -> np.ndarray:
    """Pooled, flattened float32 features (len(rows), D) of run rows given in any order ((len(rows),
    K, D) for draws="all"), read as `read_rows` reads them (one raw chunk held at a time; a mean over
    draws is taken before pooling). `advance(n)` (a progress bar's) is called with the number of
    rows of each chunk read."""
    return run.read_rows(timestep, block, rows, lambda x: pooled(x, pool), advance, draws=draws)


# -- noise draws ----------------------------------------------------------------------------------
def scored_draws(draws: str | int) -> str | int:
    """What images that are scored (queries, test images, a gallery) read for `--draws`: the mean
    of their draws for "all", else the choice itself (module docstring)."""
    return "mean" if parse_draws(draws) == "all" else parse_draws(draws)


def training_samples(x: np.ndarray, draws: str | int) -> tuple[np.ndarray, np.ndarray]:
    """Training samples from `read_pooled(..., draws)` output: with "all", (n, K, D) becomes
    (n*K, D), the K draws of an image in consecutive rows; else x as it is. Returns (samples,
    int64 position in the n images of each sample), to take labels with."""
    if parse_draws(draws) != "all":
        return x, np.arange(len(x))
    return x.reshape(-1, x.shape[-1]), np.repeat(np.arange(len(x)), x.shape[1])


def draws_meaning(draws: str | int, runs: Sequence[Run], all_means: str) -> str | None:
    """One line naming what `--draws` did to these runs' features; `all_means` says what "all"
    does in the command at hand (module docstring). None when every run holds one noise draw per
    image (the choice changes nothing there)."""
    draws = parse_draws(draws)
    counts = sorted({run.noise_draws for run in runs})
    if counts == [1]:
        return None
    k = "/".join(map(str, counts))
    if draws == "mean":
        return f"noise draws: mean (float32 mean over the {k} draws of each image)"
    if draws == "all":
        return f"noise draws: all of {k} ({all_means})"
    return f"noise draws: draw {draws} only (of {k})"


def single_draw_dropped(settings: Mapping[str, Any], runs: Sequence[Run]) -> dict[str, Any]:
    """`settings` without "draws" and "draws_meaning" when every run holds one noise draw per image:
    there every --draws choice gives the same numbers, and results keep the file names (digests)
    they had before runs could hold several draws."""
    if any(run.noise_draws > 1 for run in runs):
        return dict(settings)
    return {k: v for k, v in settings.items() if k not in ("draws", "draws_meaning")}


# -- images of a result ------------------------------------------------------------------------
def run_images(runs: Sequence[Run]) -> dict[str, dict[str, int]]:
    """Per run id: images `used` (extracted, not failed: the rows a command draws from), `failed`
    (excluded) and `pending` (not extracted yet; non-zero only with --allow-incomplete)."""
    out = {}
    for run in runs:
        status = run.status()
        out[run.run_id] = {"used": status.done, "failed": status.failed, "pending": status.pending}
    return out


def images_note(runs: Mapping[str, Mapping[str, int]]) -> list[str]:
    """One line per run with failed or pending images (`run_images` counts), for text outputs."""
    lines = []
    for run_id, n in runs.items():
        if n["failed"] or n["pending"]:
            parts = [f"{n['used']} of {n['used'] + n['failed'] + n['pending']} images used"]
            if n["failed"]:
                parts.append(f"{n['failed']} failed (excluded)")
            if n["pending"]:
                parts.append(f"{n['pending']} pending (run incomplete: --allow-incomplete)")
            lines.append(f"run {run_id}: {', '.join(parts)}")
    return lines


# -- saving ---------------------------------------------------------------------------------------
def results_dir(store_url: str, out: str | Path | None) -> Path:
    """Where results go: `out`, or the store's own folder `<store path>.results/` (local stores only).
    ValueError in one line, before anything is computed, when that path or a folder above it is a
    file (`output_path`)."""
    if out is not None:
        return output_path(out, "--out", "folder")
    local = str(store_url).removeprefix("file://")
    if "://" in local:
        raise ValueError(f"{store_url} is not a local path: give --out for the results")
    store = Path(local).resolve()
    return output_path(store.with_name(store.name + RESULTS_SUFFIX), "the results folder", "folder")


def output_path(path: str | Path, option: str, kind: str) -> Path:
    """`path` as a `kind` ("folder" or "file") that can be created or written: raises ValueError,
    naming `option`, when `path` (for a folder) or a folder above it exists as something else than
    a folder, so commands refuse it before computing (mkdir would fail with a bare OSError)."""
    path = Path(path)
    for above in (path, *path.parents) if kind == "folder" else path.parents:
        if above.exists():
            if not above.is_dir():
                where = "is a file" if above == path else f"lies under {above}, which is a file"
                raise ValueError(f"{option} {path} {where}: give a {kind} path whose parents are folders")
            break
    return path


def results_path(folder: Path, command: str, settings: Mapping[str, Any], label: str, suffix: str = ".json") -> Path:
    """`folder/<command>-<label>-<digest><suffix>`: the digest (8 hex digits of the sha256 of the
    canonical JSON of the command and `settings`) must cover everything that changes the numbers
    (run ids, t, blocks, pool, k, splits, seeds, variants, allow_incomplete, ...); `label` is the
    readable part. suffix "" gives a folder name."""
    digest = run_id_of({"command": command, "settings": dict(settings)})[:8]
    return folder / f"{command}-{label}-{digest}{suffix}"


def to_json(doc: Any) -> str:
    """Indented JSON; raises ValueError on NaN or inf (undefined values must be mapped to None)."""
    return json.dumps(doc, indent=2, allow_nan=False)


def write_json(doc: Any, path: Path) -> Path:
    """Write `to_json(doc)` to `path` (parents created); raises ValueError on NaN or inf, before
    writing anything."""
    text = to_json(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def finite_or_none(value: float) -> float | None:
    """`value`, or None when it is NaN or inf (an undefined number, written as null)."""
    return float(value) if math.isfinite(value) else None
