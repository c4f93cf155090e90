"""`featurestore probe --head linear|mlp|attention|difformer|uhead|diffssl-*|vermouth-uhead`: trained heads from the cache.

The runner layer: resolve the run (and expert run), split train/validation/test, build the grid
of heads (one head per (timestep, block) for single-map heads, one fusing all of them for
difformer and uhead; each times every learning rate), train it in one pass per epoch, test, and
write one safetensors file per head plus `results.json` into the grid's folder in the results folder,
`probe-<head>-<run>-<digest>/` (`results_path`: the digest covers the whole config, never the
per-epoch records, whose seconds differ from run to run).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from featurestore.store import FeatureStore, Run, timestep_key
from pipelines.analysis import draws_meaning, results_path, run_images, scored_draws, single_draw_dropped, write_json
from pipelines.device import resolve_device
from pipelines.heads.data import StoreBatches
from pipelines.heads.logistic import class_names, resolve_run, split_rows
from pipelines.heads.modules import (
    EXPERT_KINDS,
    SINGLE_INPUT_KINDS,
    HeadSpec,
    Key,
    build_head,
    load_head,
    save_head,
)
from pipelines.heads.text_embeddings import read_text_embeddings
from pipelines.heads.training import (
    TrainConfig,
    Trainee,
    accuracy_metrics,
    carve_validation,
    predict,
    train_grid,
)


@dataclass
class ProbeConfig:
    head: str
    blocks: list[str]
    timesteps: list[int | None]
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    run_id: str | None = None
    classifier: str = "linear"
    text_embeddings: str | None = None  # safetensors: "embeddings" (K, D), metadata {"classes": [...]}
    expert_run: str | None = None  # uhead: run id of the expert in the same store
    expert_blocks: list[str] | None = None  # default: all blocks of the expert run
    head_options: dict[str, Any] = field(default_factory=dict)  # HeadSpec fields: pool, width, depth, ...
    train_split: str = "train"
    test_split: str = "test"
    holdout: float | None = None
    allow_incomplete: bool = False  # an incomplete run: train and test on its extracted images instead of refusing it
    train: TrainConfig = field(default_factory=TrainConfig)
    # noise draws of the run (StoreBatches): all = one draw per train image per epoch, validation and test on the mean
    draws: str | int = "all"


def head_name(kind: str, keys: list[Key], lr: float) -> str:
    timesteps = "+".join(dict.fromkeys(timestep_key(t) for t, _ in keys))
    blocks = "+".join(dict.fromkeys(b for _, b in keys))
    return f"{kind}_{timesteps}_{blocks}_lr{lr:g}"


def grid(cfg: ProbeConfig, run: Run, expert: Run | None, expert_keys: list[Key], num_classes: int,
         text: torch.Tensor | None) -> list[tuple[str, HeadSpec, float]]:
    """(name, spec, lr) of every head to train."""
    keys = [(t, b) for t in cfg.timesteps for b in cfg.blocks]
    groups = [[k] for k in keys] if cfg.head in SINGLE_INPUT_KINDS else [keys]
    specs = [HeadSpec(
        kind=cfg.head, inputs={k: tuple(run.blocks[k[1]]) for k in group}, num_classes=num_classes,
        expert_inputs={k: tuple(expert.blocks[k[1]]) for k in expert_keys}, classifier=cfg.classifier,
        text_dim=None if text is None else text.shape[1], **cfg.head_options,
    ) for group in groups]
    return [(head_name(cfg.head, list(spec.inputs), lr), spec, lr) for spec in specs for lr in cfg.lrs]


def probe_heads(store: FeatureStore, cfg: ProbeConfig, results: Path) -> dict:
    """Train and test the grid of `cfg`; returns the results document, also written as results.json
    with the heads' weights into the folder `<results>/probe-<head>-<run>-<digest>/` (its path in "out")."""
    device = resolve_device(cfg.train.device)
    run = resolve_run(store, cfg.run_id)
    if cfg.expert_run is not None and cfg.head not in EXPERT_KINDS:
        raise ValueError(f"--expert-run feeds the {' and '.join(EXPERT_KINDS)} only, not the {cfg.head} head")
    if cfg.expert_blocks and cfg.expert_run is None:
        raise ValueError("--expert-blocks needs --expert-run")
    expert = store.run(cfg.expert_run) if cfg.expert_run is not None else None
    if expert is not None:  # a prefix of the id: the full id in the settings and files
        cfg = replace(cfg, expert_run=expert.run_id)
    expert_keys = [(t, b) for t in expert.timesteps for b in (cfg.expert_blocks or expert.blocks)] if expert else []
    table = run.images
    labels = table.label.astype(np.int64)
    classes = class_names(labels, table.class_name)
    text = read_text_embeddings(cfg.text_embeddings, classes) if cfg.text_embeddings else None

    keys = [(t, b) for t in cfg.timesteps for b in cfg.blocks]
    data = StoreBatches(run, keys, labels, expert=expert, expert_keys=expert_keys, batch_size=cfg.train.batch_size,
                        window_chunks=cfg.train.window_chunks, allow_incomplete=cfg.allow_incomplete, draws=cfg.draws)
    train_rows, test_rows = split_rows(run, cfg.train_split, cfg.test_split, cfg.holdout, cfg.train.seed,
                                       cfg.allow_incomplete)
    train_rows, val_rows = carve_validation(train_rows, cfg.train.val_fraction, cfg.train.seed)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.train.batch_size)
    trainees = []
    for name, spec, lr in grid(cfg, run, expert, expert_keys, len(classes), text):
        torch.manual_seed(cfg.train.seed)  # the same initial weights whatever else is in the grid
        trainees.append(Trainee(name, build_head(spec, text), lr, cfg.train, steps_per_epoch, device))

    log = train_grid(data, trainees, train_rows, val_rows, cfg.train)
    order, logits = predict(data, {t.name: t.head for t in trainees}, test_rows, device)

    settings = single_draw_dropped({**asdict(cfg), "run_id": run.run_id}, [run])
    out = results_path(results, "probe", settings, f"{cfg.head}-{run.run_id}", suffix="")
    out.mkdir(parents=True, exist_ok=True)
    heads = []
    for t in trainees:
        weights = out / f"{t.name}.safetensors"
        save_head(t.head, weights, extra={"lr": t.lr, "run_id": run.run_id, "expert_run_id": cfg.expert_run,
                                          "split": split_options(cfg.train_split, cfg.test_split, cfg.holdout,
                                                                 cfg.train.seed)})
        heads.append({
            "name": t.name, "kind": cfg.head, "lr": t.lr,
            "keys": [list(k) for k in t.head.keys], "expert_keys": [list(k) for k in t.head.expert_keys],
            **accuracy_metrics(logits[t.name], labels[order], classes),
            "val_top1": t.best_val_top1, "best_epoch": t.best_epoch, "epochs": t.epochs, "epoch_log": t.epoch_log,
            "weights": weights.name, "spec": t.head.spec.to_json(),
        })
    best = max(heads, key=lambda h: h["val_top1"])  # chosen on validation, never on test
    doc = {
        "task": "probe", "store": store.url, "run_id": run.run_id, "expert_run_id": cfg.expert_run,
        "config": settings, "classes": classes,
        "runs": run_images([run, *([expert] if expert else [])]),
        "draws": draws_meaning(cfg.draws, [run], "each epoch, one draw per train image, drawn anew from (seed, epoch, "
                                                 "image); validation and test images: the float32 mean of their draws"),
        "images": {"train": len(train_rows), "val": len(val_rows), "test": len(test_rows)},
        "best_head": best["name"], "top1": best["top1"], "top5": best["top5"],
        "epochs_run": len(log.epoch_seconds),
        "seconds_per_epoch": float(np.mean(log.epoch_seconds)),
        "read_seconds_per_epoch": float(np.mean(log.read_seconds)),
        "out": str(out), "heads": heads,
    }
    write_json(doc, out / "results.json")
    return doc


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_options(train_split: str, test_split: str, holdout: float | None, seed: int) -> dict:
    """What decides a run's train/test rows (`split_rows`); the seed only with a holdout."""
    return {"train_split": train_split, "test_split": test_split, "holdout": holdout,
            "seed": seed if holdout is not None else None}


def evaluate_head_file(store: FeatureStore, head_file: Path, results: Path, *, run_id: str | None = None,
                       keys: list[Key] | None = None, train_split: str = "train", test_split: str = "test",
                       holdout: float | None = None, seed: int = 0, allow_incomplete: bool = False,
                       batch_size: int = 64, device: str = "cpu", draws: str | int = "mean") -> dict:
    """Test a saved head (`save_head`'s safetensors: our probe's heads or `featurestore heads import`)
    on the run's test split, without training; returns the results document, also written as
    `<results>/probe-head-<run>-<digest>.json` (its path in "out"; the digest covers the head file's
    sha256). The test rows are those `probe` tests on with the same split options (`split_rows`).
    `keys`: the (timestep, block) inputs asked for, which must be the head's (None: the head's).
    ValueError when the run lacks one of the head's inputs, its shape differs from the head's, or
    the store's class count is not the head's. `draws`: the noise draws tested on, in a run of
    several (mean or k; "all" scores the mean, as trained heads' tests do)."""
    head = load_head(head_file)
    spec = head.spec
    if spec.expert_inputs:
        raise ValueError(f"{head_file} is a uhead with an expert run: --head-file evaluates heads of one run only")
    run = resolve_run(store, run_id)
    if keys is not None and sorted(keys, key=str) != sorted(spec.inputs, key=str):
        raise ValueError(f"{head_file} reads {[list(k) for k in spec.inputs]} (timestep, block), not the "
                         f"{[list(k) for k in keys]} asked for: omit --block/--timestep or give the head's")
    for (t, block), shape in spec.inputs.items():
        if block not in run.blocks or t not in run.timesteps:
            raise ValueError(f"run {run.run_id} has no block {block} at t={t}, which the head {head_file} reads")
        if tuple(run.blocks[block]) != tuple(shape):
            raise ValueError(f"block {block} of run {run.run_id} is {tuple(run.blocks[block])} (C, H, W), "
                             f"the head {head_file} reads {tuple(shape)}")
    table = run.images
    labels = table.label.astype(np.int64)
    classes = class_names(labels, table.class_name)
    if len(classes) != spec.num_classes:
        raise ValueError(f"the store has {len(classes)} classes, the head {head_file} predicts {spec.num_classes}")
    with safe_open(str(head_file), "pt") as f:
        extra = json.loads((f.metadata() or {}).get("extra", "{}"))
    trained = extra.get("split")
    if extra.get("run_id") == run.run_id and trained is not None:
        asked = split_options(train_split, test_split, holdout, seed)
        if asked != trained:
            raise ValueError(f"{head_file} was trained on this run with split options {trained}; testing with "
                             f"{asked} could score it on its own training images: give the options it was trained with")
    _, test_rows = split_rows(run, train_split, test_split, holdout, seed, allow_incomplete)
    data = StoreBatches(run, list(spec.inputs), labels, batch_size=batch_size, allow_incomplete=allow_incomplete,
                        draws=scored_draws(draws))
    order, logits = predict(data, {"head": head.to(resolve_device(device))}, test_rows, resolve_device(device))
    settings = {"head_file_sha256": file_sha256(head_file), "run_id": run.run_id, "train_split": train_split,
                "test_split": test_split, "holdout": holdout, "seed": seed, "allow_incomplete": allow_incomplete,
                "draws": scored_draws(draws)}
    settings = single_draw_dropped(settings, [run])
    out = results_path(results, "probe", settings, f"head-{run.run_id}")
    doc = {
        "task": "probe-head-file", "store": store.url, "run_id": run.run_id, "head_file": str(head_file),
        "config": settings, "spec": spec.to_json(), "head_extra": extra, "classes": classes,
        "runs": run_images([run]), "images": {"test": len(test_rows)},
        "draws": draws_meaning(scored_draws(draws), [run], ""),
        "tested_on": f"split {test_split!r}" if holdout is None else f"holdout {holdout} (seed {seed})",
        **accuracy_metrics(logits["head"], labels[order], classes), "out": str(out),
    }
    write_json(doc, out)
    return doc
