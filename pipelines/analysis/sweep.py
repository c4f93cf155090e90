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


def save_sweep(result: SweepResult, out: Path) -> list[Path]:
    """The table as JSON and CSV and both plots in `out`: `sweep-<run>-<digest>.json`, `.csv`,
    `-vs-t.png` and `-vs-block.png`."""
    def path(suffix: str) -> Path:
        return results_path(out, "sweep", result.settings, result.run_id, suffix)

    return [
        write_json(result.to_dict(), path(".json")),
        write_csv(result, path(".csv")),
        plot_sweep(result, path("-vs-t.png"), by="timestep"),
        plot_sweep(result, path("-vs-block.png"), by="block"),
    ]


def write_csv(result: SweepResult, path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SweepRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in result.rows)
    return path


def plot_sweep(result: SweepResult, path: Path, by: str) -> Path:
    """Linear and kNN top-1 side by side, against t (`by="timestep"`, a line per block; experts
    stored without a timestep are left out) or against the block (`by="block"`, a line per t)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line_of = "block" if by == "timestep" else "timestep"
    blocks = list(dict.fromkeys(r.block for r in result.rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, metric, title in zip(axes, ("linear_top1", "knn_top1"), ("linear probe", f"weighted kNN (k={result.knn_k})")):
        for line in dict.fromkeys(getattr(r, line_of) for r in result.rows):
            points = [r for r in result.rows if getattr(r, line_of) == line]
            if by == "timestep":
                xy = sorted((r.timestep, getattr(r, metric)) for r in points if r.timestep is not None)
            else:
                xy = [(blocks.index(r.block), getattr(r, metric)) for r in points]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=f"t={line}" if line_of == "timestep" else line)
        if by == "block":
            ax.set_xticks(range(len(blocks)), blocks)
        ax.set_xlabel("timestep t" if by == "timestep" else "block")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (test)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"run {result.run_id}, pool {result.pool}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
