"""A linear probe and a weighted kNN for every (t, block) of a run: the accuracy-vs-t and
accuracy-vs-block analyses (Fig. 3 / Fig. 5 / Table 9 style) from one store, with no extraction."""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from featurestore.store import FeatureStore
from pipelines.analysis import results_path, run_images, write_json
from pipelines.analysis.knn import TEMPERATURE, VOTE_RULE, knn_run
from pipelines.heads.logistic import probe_run, resolve_run
from pipelines.progress import bar

KNN_K = 20


@dataclass
class SweepRow:
    timestep: int | None
    block: str
    features: int
    train: int
    test: int
    linear_top1: float
    linear_train_top1: float
    knn_top1: float
    knn_top5: float


@dataclass
class SweepResult:
    run_id: str
    pool: int | None
    knn_k: int
    seconds: float
    rows: list[SweepRow]
    runs: dict[str, dict[str, int]]  # `run_images`: used, failed, pending
    settings: dict  # everything that changes the numbers (the results file's digest)
    knn_vote: str = VOTE_RULE  # the variant of knn_top1 / knn_top5

    def to_dict(self) -> dict:
        return asdict(self)


def sweep_run(
    store: FeatureStore, run_id: str | None, timesteps: Sequence[int | None] | None = None,
    blocks: Sequence[str] | None = None, pool: int | None = 4, knn_k: int = KNN_K, train_split: str = "train",
    test_split: str = "test", holdout: float | None = None, c: float = 1.0, seed: int = 0,
    temperature: float = TEMPERATURE, device: str = "cpu", allow_incomplete: bool = False,
) -> SweepResult:
    """`probe_run` and `knn_run` (one k) for every (t, block), with the same split and pooling (a
    bar counts the (t, block) pairs); errors as theirs."""
    tic = time.perf_counter()
    run = resolve_run(store, run_id)
    timesteps = list(run.timesteps if timesteps is None else timesteps)
    blocks = list(blocks or run.blocks)
    rows = []
    with bar("sweep", "", len(timesteps) * len(blocks)) as advance:
        for t in timesteps:
            for block in blocks:
                advance(0, description=f"t={t} {block}")
                probe = probe_run(store, run.run_id, t, block, pool, train_split, test_split, holdout, c, seed,
                                  allow_incomplete)
                knn = knn_run(store, run.run_id, t, block, [knn_k], pool, train_split, test_split, holdout, seed,
                              temperature, device, allow_incomplete=allow_incomplete)
                rows.append(SweepRow(t, block, probe.features, probe.train, probe.test, probe.top1,
                                     probe.train_top1, knn.top1[knn_k], knn.top5[knn_k]))
                advance()
    settings = {"run_id": run.run_id, "timesteps": timesteps, "blocks": blocks, "pool": pool, "knn_k": knn_k,
                "temperature": temperature, "train_split": train_split, "test_split": test_split, "holdout": holdout,
                "c": c, "seed": seed, "device": device, "allow_incomplete": allow_incomplete}
    return SweepResult(run.run_id, pool, knn_k, time.perf_counter() - tic, rows, run_images([run]), settings)


def pivot_table(result: SweepResult, metric: str = "linear_top1") -> str:
    """One metric as a Markdown table: a row per timestep, a column per block."""
    blocks = list(dict.fromkeys(r.block for r in result.rows))
    value = {(r.timestep, r.block): getattr(r, metric) for r in result.rows}
    lines = ["| t | " + " | ".join(blocks) + " |", "|---|" + "---|" * len(blocks)]
    for t in dict.fromkeys(r.timestep for r in result.rows):
        lines.append(f"| {t} | " + " | ".join(f"{value[(t, b)]:.3f}" if (t, b) in value else "" for b in blocks) + " |")
    return "\n".join(lines)


def save_sweep(result: SweepResult, out: Path, store: FeatureStore) -> list[Path]:
    """The table as JSON and CSV and its plots in `out`: `sweep-<run>-<digest>.json`, `.csv`,
    `-vs-t.png` (not for a run of experts stored without a timestep) and `-vs-block.png` -- the
    report's figures (`pipelines.report.results.sweep_plot`: chance line, best point, symlog t)."""
    from pipelines.report.results import run_info, sweep_plot

    def path(suffix: str) -> Path:
        return results_path(out, "sweep", result.settings, result.run_id, suffix)

    info = run_info(store, result.run_id)
    saved = [write_json(result.to_dict(), path(".json")), write_csv(result, path(".csv"))]
    for by, suffix in (("timestep", "-vs-t.png"), ("block", "-vs-block.png")):
        if by == "block" or any(r.timestep is not None for r in result.rows):
            sweep_plot(result, info, by, "log").savefig(path(suffix))
            saved.append(path(suffix))
    return saved


def write_csv(result: SweepResult, path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SweepRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in result.rows)
    return path
