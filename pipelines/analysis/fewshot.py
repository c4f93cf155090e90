"""Few-shot classification from the cache (the CoOp protocol): for each seed, k training images
per class (k in 1, 2, 4, 8, 16), a classifier fitted on them, top-1 on the FULL test split; per k
the mean and standard deviation over seeds.

Layers: `sample_shots` and `knn_top1` work on arrays; `fewshot_run` reads the store, splits its
rows with `split_rows` (the manifest's split column, such as CoOp's fixed splits, or a seeded
holdout for single-split data), samples every (seed, k) and scores each classifier; the command is
`cli/fewshot.py`.

Classifiers (`head`):
- `logistic`: `fit_logistic_probe` on pooled features (standardised with the shots' statistics).
- `knn`: the DINO weighted kNN with the shots as the searched set (neighbours capped at the shots).
- a trained head of pipelines/heads (`linear`, `mlp`, `attention`, `difformer`, `uhead`): the heads'
  grid trainer on the shot rows, WITHOUT validation or early stopping: a k-shot set is too small to
  hold images out (1-shot would leave classes with nothing to train on), so every head trains for
  the configured epochs and is tested with its final weights (TrainConfig's patience and
  val_fraction are not used). Each epoch prints one line on stderr (head, seed, shots, train loss,
  lr, seconds) and its record goes into the result (`ShotScore.epoch_log`, val_top1 null).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from featurestore.store import FeatureStore, Run, timestep_key
from pipelines.analysis import read_pooled, results_path, run_images, write_json
from pipelines.analysis.knn import TEMPERATURE, knn_accuracy, l2_normalized, search_topk
from pipelines.device import resolve_device
from pipelines.heads.data import StoreBatches
from pipelines.heads.logistic import fit_logistic_probe, resolve_run, split_rows
from pipelines.heads.modules import KINDS, OFFICIAL_KINDS, Key, build_head
from pipelines.heads.probe import ProbeConfig, class_names, grid
from pipelines.heads.training import (
    TrainConfig,
    Trainee,
    accuracy_metrics,
    predict,
    train_grid,
)
from pipelines.progress import bar, log

FIXED = ("logistic", "knn")  # fitted in closed form on pooled features, no training loop
HEADS = (*FIXED, *(k for k in KINDS if k not in OFFICIAL_KINDS))  # the papers' own heads and options: `probe`
SHOTS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
STD_DDOF = 0  # numpy's default, as CoOp's parse_test_res.py reports its "std"

ShotSets = Mapping[tuple[int, int], np.ndarray]  # (seed, k) -> sorted run rows of the shots


@dataclass
class FewshotConfig:
    head: str = "logistic"
    shots: list[int] = field(default_factory=lambda: list(SHOTS))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    timesteps: list[int | None] | None = None  # None: every timestep of the run
    blocks: list[str] | None = None  # None: every block of the run
    run_id: str | None = None
    pool: int | None = 4  # logistic, knn: average-pool each map to pool x pool (linear, mlp: head_options)
    train_split: str = "train"
    test_split: str = "test"
    holdout: float | None = None  # single-split data: test on this fraction, draw shots from the rest
    split_seed: int = 0  # seed of the holdout: the test set is the same for every shot seed
    allow_incomplete: bool = False  # an incomplete run: use its extracted images instead of refusing it
    c: float = 1.0  # logistic: inverse L2 strength
    knn_k: int = 20  # knn: neighbours, capped at the number of shots
    temperature: float = TEMPERATURE  # knn: vote weight exp(cosine / T)
    lrs: list[float] = field(default_factory=lambda: [1e-2])  # trained heads: one head per lr (few steps: a high lr)
    head_options: dict = field(default_factory=dict)  # trained heads: HeadSpec fields (pool, width, ...)
    expert_run: str | None = None  # uhead: an expert run of the same store
    expert_blocks: list[str] | None = None
    # trained heads (a 1-shot epoch is one or two steps, hence many epochs); its device also runs the kNN search
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, batch_size=32))

    def __post_init__(self) -> None:
        if self.head in OFFICIAL_KINDS:
            raise ValueError(f"fewshot does not train the papers' own heads ({', '.join(OFFICIAL_KINDS)}): their "
                             f"official options are `probe`'s; "
                             f"heads: {', '.join(HEADS)}")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; heads: {', '.join(HEADS)}")
        if not self.shots or min(self.shots) < 1 or len(set(self.shots)) != len(self.shots):
            raise ValueError(f"--shots must be distinct positive integers, got {self.shots}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct integers, got {self.seeds}")
        if self.knn_k < 1:
            raise ValueError(f"--k must be positive, got {self.knn_k}")


@dataclass
class ShotScore:
    shots: int
    train_images: int  # shots x classes, the same for every seed
    top1: list[float]  # per seed, in the order of FewshotResult.seeds
    mean: float
    std: float  # over seeds, ddof = STD_DDOF
    epoch_log: list[list[dict]] | None = None  # trained heads, per seed: `Trainee.epoch_log` (no validation)


@dataclass
class ClassifierScores:
    name: str
    keys: list[Key]  # the (timestep, block) maps it reads
    scores: list[ShotScore]


@dataclass
class FewshotResult:
    run_id: str
    head: str
    seeds: list[int]
    classes: int
    train_pool: int  # usable train images the shots are drawn from
    test: int
    std_ddof: int
    seconds: float
    config: dict  # the FewshotConfig with the resolved run id: the results file's digest
    classifiers: list[ClassifierScores]
    runs: dict[str, dict[str, int]]  # `run_images`: used, failed, pending per run (with an expert run)

    def to_dict(self) -> dict:
        return asdict(self)


def save_fewshot(result: FewshotResult, folder: Path) -> Path:
    """The result as `fewshot-<run>-<head>-<digest>.json` in `folder`: a rerun with the same
    options replaces its own file."""
    return write_json(result.to_dict(), results_path(folder, "fewshot", result.config, f"{result.run_id}-{result.head}"))


# -- pure compute ---------------------------------------------------------------------------------
def sample_shots(pool: np.ndarray, labels: np.ndarray, k: int, seed: int, classes: Sequence[int],
                 names: Sequence[str] | None = None) -> np.ndarray:
    """k rows of every class in `classes`, drawn from the run rows `pool` (`labels` is indexed by
    run row); sorted. Each class's rows are shuffled once by `seed` and the first k taken, so the
    sets of one seed are nested (the 1-shot images are among the 2-shot ones, ...) and the curve
    over k compares like with like. A class with fewer than k rows in the pool is an error."""
    rng = np.random.default_rng(seed)
    pool = np.sort(pool)
    chosen, short = [], []
    for c in classes:
        rows = pool[labels[pool] == c]
        if len(rows) < k:
            short.append(f"{names[c] if names else c} ({len(rows)})")
        chosen.append(rng.permutation(rows)[:k])
    if short:
        raise ValueError(f"{k}-shot needs {k} train images of every class; too few in {len(short)} class(es): "
                         f"{', '.join(short[:8])}{', ...' if len(short) > 8 else ''}; choose smaller --shots")
    return np.sort(np.concatenate(chosen))


def knn_top1(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int,
             temperature: float = TEMPERATURE, device: str = "cpu") -> float:
    """Weighted-kNN top-1 with the shots as the searched set; k is capped at the number of shots."""
    k = min(k, len(train_x))
    sims, indices = search_topk(l2_normalized(train_x), l2_normalized(test_x), k, device)
    return knn_accuracy(sims, indices, train_y, test_y, [k], temperature)[k][0]


def shot_scores(top1: Mapping[tuple[int, int], float], seeds: Sequence[int], shots: Sequence[int],
                classes: int, epoch_logs: Mapping[tuple[int, int], list[dict]] | None = None) -> list[ShotScore]:
    """Per k: the top-1 of each seed, their mean and standard deviation (ddof STD_DDOF), and the
    per-epoch records of each seed when the classifier was trained (`epoch_logs`)."""
    out = []
    for k in shots:
        values = [top1[(seed, k)] for seed in seeds]
        out.append(ShotScore(k, k * classes, values, float(np.mean(values)), float(np.std(values, ddof=STD_DDOF)),
                             [epoch_logs[(seed, k)] for seed in seeds] if epoch_logs else None))
    return out


# -- runner ---------------------------------------------------------------------------------------
def fewshot_run(store: FeatureStore, cfg: FewshotConfig) -> FewshotResult:
    """Sample every (seed, k) shot set first (so a class without enough images fails before any
    work), then score each classifier on every set against the full test split."""
    tic = time.perf_counter()
    run = resolve_run(store, cfg.run_id)
    if cfg.expert_run is not None:  # a prefix of the id: the full id in the settings and files
        cfg = dataclasses.replace(cfg, expert_run=store.run(cfg.expert_run).run_id)
    train, test = split_rows(run, cfg.train_split, cfg.test_split, cfg.holdout, cfg.split_seed, cfg.allow_incomplete)
    labels = run.labels
    names = class_names(labels, run.images.class_name)
    classes = np.unique(labels[np.concatenate([train, test])])
    shot_sets = {(seed, k): sample_shots(train, labels, k, seed, classes, names) for seed in cfg.seeds for k in cfg.shots}
    timesteps = cfg.timesteps if cfg.timesteps is not None else run.timesteps
    blocks = cfg.blocks or list(run.blocks)
    keys = [(t, b) for t in timesteps for b in blocks]
    if cfg.head in FIXED:
        scored = fixed_classifiers(run, keys, shot_sets, test, labels, cfg)
    else:
        scored = trained_heads(store, run, timesteps, blocks, shot_sets, test, labels, names, cfg)
    runs = [run, *([store.run(cfg.expert_run)] if cfg.expert_run is not None else [])]
    return FewshotResult(
        run.run_id, cfg.head, list(cfg.seeds), len(classes), len(train), len(test), STD_DDOF,
        time.perf_counter() - tic, {**asdict(cfg), "run_id": run.run_id},
        [ClassifierScores(name, maps, shot_scores(top1, cfg.seeds, cfg.shots, len(classes), epoch_logs))
         for name, (maps, top1, epoch_logs) in scored.items()],
        run_images(runs),
    )


# name -> (keys, {(seed, k): top-1}, {(seed, k): per-epoch records of a trained head}; empty when fitted)
Scored = dict[str, tuple[list[Key], dict[tuple[int, int], float], dict[tuple[int, int], list[dict]]]]


def fixed_classifiers(run: Run, keys: Sequence[Key], shot_sets: ShotSets, test: np.ndarray, labels: np.ndarray,
                      cfg: FewshotConfig) -> Scored:
    """logistic or knn on each (t, block): its pooled features of the test rows and of every shot are
    read once, then every (seed, k) is fitted in memory (a bar counts the fits)."""
    needed = np.unique(np.concatenate([test, *shot_sets.values()]))
    out: Scored = {}
    with bar("fewshot", cfg.head, len(keys) * len(shot_sets)) as advance:
        for t, block in keys:
            advance(0, description=f"{cfg.head} t={t} {block}: reading")
            x = read_pooled(run, t, block, needed, cfg.pool)
            test_x = x[np.searchsorted(needed, test)]
            top1 = {}
            for (seed, k), shots in shot_sets.items():
                advance(0, description=f"{cfg.head} t={t} {block}: seed {seed}, {k}-shot")
                shot_x = x[np.searchsorted(needed, shots)]
                if cfg.head == "logistic":
                    top1[(seed, k)] = fit_logistic_probe(shot_x, labels[shots], test_x, labels[test], c=cfg.c)[0]
                else:
                    top1[(seed, k)] = knn_top1(shot_x, labels[shots], test_x, labels[test], cfg.knn_k,
                                               cfg.temperature, cfg.train.device)
                advance()
            out[f"{cfg.head}_{timestep_key(t)}_{block}"] = ([(t, block)], top1, {})
    return out


class FinalWeights(Trainee):
    """A trainee without validation: it never stops early and keeps the weights of its last epoch;
    its epoch line is printed as soon as the epoch ends."""

    def trained(self, seconds: float) -> None:
        super().trained(seconds)
        log(self.epoch_line(self.epoch_log[-1]))

    def scored(self, val_top1: float) -> None:
        pass

    def restore_best(self) -> None:
        self.head.eval()


def trained_heads(store: FeatureStore, run: Run, timesteps: list[int | None], blocks: list[str], shot_sets: ShotSets,
                  test: np.ndarray, labels: np.ndarray, names: list[str], cfg: FewshotConfig) -> Scored:
    """The probe's grid of heads (one per map and lr for single-map heads, one fusing all maps for
    difformer and uhead), trained afresh on each (seed, k) with `seed` as the training seed."""
    device = resolve_device(cfg.train.device)
    expert = store.run(cfg.expert_run) if cfg.expert_run is not None else None
    expert_keys = [(t, b) for t in expert.timesteps for b in (cfg.expert_blocks or expert.blocks)] if expert else []
    probe_cfg = ProbeConfig(head=cfg.head, blocks=blocks, timesteps=timesteps, lrs=cfg.lrs,
                            head_options=cfg.head_options)
    specs = grid(probe_cfg, run, expert, expert_keys, len(names), None)
    data = StoreBatches(run, [(t, b) for t in timesteps for b in blocks], labels, expert=expert,
                        expert_keys=expert_keys, batch_size=cfg.train.batch_size, window_chunks=cfg.train.window_chunks,
                        allow_incomplete=cfg.allow_incomplete)
    out: Scored = {name: (list(spec.inputs), {}, {}) for name, spec, _ in specs}
    with bar("fewshot", cfg.head, len(shot_sets)) as advance:
        for (seed, k), shots in shot_sets.items():
            advance(0, description=f"{cfg.head}: seed {seed}, {k}-shot")
            train_cfg = dataclasses.replace(cfg.train, seed=seed)
            steps_per_epoch = math.ceil(len(shots) / train_cfg.batch_size)
            trainees = []
            for name, spec, lr in specs:
                torch.manual_seed(seed)  # the same initial weights whatever else is in the grid
                trainees.append(FinalWeights(name, build_head(spec), lr, train_cfg, steps_per_epoch, device,
                                             context=f"seed {seed} {k}-shot"))
            train_grid(data, trainees, shots, np.empty(0, np.int64), train_cfg)
            order, logits = predict(data, {t.name: t.head for t in trainees}, test, device)
            for t in trainees:
                out[t.name][1][(seed, k)] = accuracy_metrics(logits[t.name], labels[order], names)["top1"]
                out[t.name][2][(seed, k)] = t.epoch_log
            advance()
    return out
