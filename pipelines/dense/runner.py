"""`featurestore segment` and `featurestore depth`: train dense heads on a run's cached maps against
the targets stored for its images (`featurestore.targets.run_targets`), and score them.

The grid: without --grid, one head reads every given (timestep, block) (the linear head takes one);
with --grid, one head per (timestep, block) for the linear head, and one per timestep over the given
blocks for the fusing heads (hypercolumn, uhead). All heads train in one shared pass per epoch.
Splits are the probe's (`split_rows`: the manifest's train/test splits, or a seeded --holdout).
Results: `<results>/<task>-<head>-<run>-<digest>/` with results.json, each head's weights and
examples.npz (the ground truth and every head's prediction of the first few test images, for the
report); the digest covers every setting, so other settings never overwrite it.

Saved predictions (`--save-predictions DIR`, segmentation, one head): DIR/<file> per test image, an
8-bit PNG of class indices at the stored mask size (S x S), 255 where the ground truth is ignored,
and DIR/index.csv (columns id, file). The file is the image id itself plus ".png" when the id is
made only of letters, digits, '.', '_' and '-' (not starting with '.'); any other id (with '/' or '#',
say) becomes those characters kept, every other one replaced by '_', then '-' and the first 8 hex
digits of the sha256 of the id, so that two ids never share a file. The folder is checked (new or
empty) before training.

Scores are computed on the S x S input grid of the run's targets (`metrics.grid_variant`, named in
every head's variant), not at the original images' resolution: the store keeps the masks and depth
maps only as nearest-resampled to the input grid, so an original-resolution evaluation cannot be
run from it. Depth metrics average per image (BTS) or over pixels (`depth_average`).

Noise draws (`draws`, runs of `extract --noise-draws K`; pipelines/analysis/__init__.py): "mean" or
k for training and test images alike; "all": every epoch each train image feeds one of its draws,
drawn anew (`StoreBatches.epoch_picks`), while test images are the mean of their draws.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.store import FeatureStore, timestep_key
from pipelines.analysis import draws_meaning, output_path, results_path, run_images, single_draw_dropped, write_json
from pipelines.dense.heads import CosineLogits, DenseSpec, build_dense_head, save_dense_head
from pipelines.dense.openvocab import OpenVocab
from pipelines.dense.metrics import (
    DEPTH_AVERAGES, DepthSums, class_pixel_counts, confusion_matrix, eigen_crop_mask, grid_variant, majority_baseline,
    segmentation_scores,
)
from pipelines.dense.train import (
    TRAINING, DenseTrainConfig, DenseTrainee, TargetReader, depth_loss, predict_batches, segmentation_loss, train_dense,
)
from pipelines.device import resolve_device
from pipelines.heads.data import StoreBatches
from pipelines.heads.logistic import resolve_run, split_rows
from pipelines.heads.modules import Key

TASKS = ("segment", "depth")
EXAMPLES = 4  # test images whose ground truth and predictions go to examples.npz
_SAFE = re.compile(r"[A-Za-z0-9._-]+")
ALL_DRAWS = "every epoch each train image feeds one of its draws, drawn anew; test images: the mean of their draws"


@dataclass
class DenseConfig:
    task: str  # segment | depth
    head: str  # linear | hypercolumn | uhead
    blocks: list[str] | None  # None: `Run.feature_blocks` (every block but the cross-attention maps)
    timesteps: list[int | None] | None  # None: every timestep of the run
    grid: bool = False
    run_id: str | None = None
    width: int = 128  # uhead pyramid width
    train_split: str = "train"
    test_split: str = "test"
    holdout: float | None = None
    allow_incomplete: bool = False
    draws: str | int = "mean"  # noise draws read (module docstring)
    depth_average: str = "image"  # depth: "image" (BTS) or "pixel" (metrics.DEPTH_AVERAGES); unused for segment
    train: DenseTrainConfig = field(default_factory=DenseTrainConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown dense task {self.task!r}; tasks: {', '.join(TASKS)}")
        if self.blocks == [] or self.timesteps == []:
            raise ValueError("give --block and --timestep (or all)")
        if self.depth_average not in DEPTH_AVERAGES:
            raise ValueError(f"--depth-average must be one of {', '.join(DEPTH_AVERAGES)}, not {self.depth_average!r}")


def head_groups(cfg: DenseConfig) -> list[list[Key]]:
    """The (timestep, block) inputs of each head of the grid (see the module)."""
    keys = [(t, b) for t in cfg.timesteps for b in cfg.blocks]
    if not cfg.grid:
        return [keys]
    if cfg.head == "linear":
        return [[k] for k in keys]
    return [[(t, b) for b in cfg.blocks] for t in cfg.timesteps]


def head_name(kind: str, keys: Sequence[Key]) -> str:
    """A head's name: `<kind>_<timesteps>_<blocks>`, each list of `keys` ((timestep, block) pairs)
    deduplicated in order and joined by '+', timesteps as `timestep_key` writes them ("t0", "none"):
    head_name("linear", [(0, "fine"), (0, "coarse")]) == "linear_t0_fine+coarse"."""
    timesteps = "+".join(dict.fromkeys(timestep_key(t) for t, _ in keys))
    return f"{kind}_{timesteps}_{'+'.join(dict.fromkeys(b for _, b in keys))}"


def prediction_file(image_id: str) -> str:
    """The file name of an image's saved prediction (the scheme in the module docstring)."""
    if _SAFE.fullmatch(image_id) and not image_id.startswith("."):
        return f"{image_id}.png"
    kept = re.sub(r"[^A-Za-z0-9._-]", "_", image_id).lstrip(".")
    return f"{kept}-{hashlib.sha256(image_id.encode()).hexdigest()[:8]}.png"


class PredictionWriter:
    """Writes `--save-predictions` PNGs and index.csv (refuses a folder that already holds files)."""

    def __init__(self, folder: Path):
        output_path(folder, "--save-predictions", "folder")
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"--save-predictions {folder} is not empty: give a new or empty folder")
        self.folder = folder  # made by the first prediction, so a run refused before it leaves no folder
        self.index: dict[str, str] = {}
        self.files: set[str] = set()

    def add(self, image_id: str, pred: np.ndarray) -> None:
        """Write `pred`, (S, S) integer class indices in 0..255 (stored as uint8, 255 = ignored), as
        the 8-bit PNG `prediction_file(image_id)`. ValueError when another id already took that file."""
        from PIL import Image

        name = prediction_file(image_id)
        if name in self.files:
            raise ValueError(f"two test images map to the prediction file {name} (id {image_id!r})")
        self.files.add(name)
        self.index[image_id] = name
        self.folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred.astype(np.uint8), mode="L").save(self.folder / name)

    def close(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "index.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "file"])
            writer.writerows(self.index.items())
        return path


def predicted_classes(logits: np.ndarray, truth: np.ndarray, ignore_index: int) -> np.ndarray:
    """(B, S, S) uint8: the argmax class of (B, K, S, S) logits, `ignore_index` where the truth is."""
    pred = logits.argmax(axis=1).astype(np.uint8)
    pred[truth == ignore_index] = ignore_index
    return pred


def dense_run(store: FeatureStore, cfg: DenseConfig, results: Path, save_predictions: Path | None = None,
              openvocab: OpenVocab | None = None) -> dict:
    """Train and score the grid of `cfg`; returns the results document (also results.json in its
    folder, whose path is "out"). With `openvocab` (segmentation), the heads output pixel
    embeddings scored by cosine against class-name embeddings, trained on the seen classes only
    (pipelines/dense/openvocab.py). Errors: ValueError/StoreError for a run without the targets of
    the task, unknown blocks or timesteps, empty splits, or --save-predictions with several heads
    or for depth."""
    from featurestore.targets import run_targets

    device = resolve_device(cfg.train.device)
    run = resolve_run(store, cfg.run_id)
    cfg = replace(cfg, run_id=run.run_id, blocks=cfg.blocks or run.feature_blocks,
                  timesteps=cfg.timesteps or list(run.timesteps))
    tg = run_targets(run)
    grid = grid_variant(tg.resize, tg.size, tg.key)
    groups = head_groups(cfg)
    if save_predictions is not None and (cfg.task != "segment" or len(groups) != 1):
        raise ValueError("--save-predictions saves the class maps of one segmentation head: "
                         f"this grid has {len(groups)} heads" if cfg.task == "segment" else
                         "--save-predictions is for segmentation")
    for t, b in {k for g in groups for k in g}:
        run.array(t, b)  # an unknown block or timestep fails here, in one line
    segment = cfg.task == "segment"
    if openvocab is not None and not segment:
        raise ValueError("open-vocabulary heads segment: they are not for depth")
    forward = lambda m, batch: m(batch.features)  # noqa: E731
    if segment:
        classes, ignore = list(tg.classes), tg.ignore_index
        read, out_channels = tg.masks, len(classes)
        loss = segmentation_loss
        if openvocab is not None:
            forward = openvocab.train_logits
            loss = lambda logits, masks: segmentation_loss(logits, openvocab.training_masks(masks))  # noqa: E731
    else:
        info = dict(tg.depth_info)
        read, out_channels = tg.depth, 1
        loss = lambda pred, depth: depth_loss(pred, depth, info.get("max_depth"))  # noqa: E731
    read(np.zeros(0, dtype=np.int64))  # a run without this kind of target fails here, before training
    train_rows, test_rows = split_rows(run, cfg.train_split, cfg.test_split, cfg.holdout, cfg.train.seed,
                                       cfg.allow_incomplete)
    with_targets = tg.usable_rows()  # images whose targets could not be read are left out, and counted
    missing = {name: int((~np.isin(rows, with_targets)).sum())
               for name, rows in (("train", train_rows), ("test", test_rows))}
    train_rows, test_rows = np.intersect1d(train_rows, with_targets), np.intersect1d(test_rows, with_targets)
    if not len(train_rows) or not len(test_rows):
        raise ValueError(f"no {'train' if not len(train_rows) else 'test'} image of run {run.run_id} has readable "
                         f"targets ({len(with_targets)} of its {len(run)} images have)")
    keys = list(dict.fromkeys(k for g in groups for k in g))
    data = StoreBatches(run, keys, TargetReader(read), batch_size=cfg.train.batch_size,
                        allow_incomplete=cfg.allow_incomplete, draws=cfg.draws)
    steps = -(-len(train_rows) // cfg.train.batch_size)
    trainees = []
    for group in groups:
        outputs = out_channels if openvocab is None else openvocab.text.shape[1]
        spec = DenseSpec(cfg.head, {k: tuple(run.blocks[k[1]]) for k in group}, outputs, tg.size, width=cfg.width)
        torch.manual_seed(cfg.train.seed)  # the same initial weights whatever else is in the grid
        module = build_dense_head(spec)
        if openvocab is not None:
            module = CosineLogits(module, openvocab.temperature)
        trainees.append(DenseTrainee(head_name(cfg.head, group), module, forward, loss, cfg.train, steps, device))
    writer = PredictionWriter(save_predictions) if save_predictions is not None else None  # refused before training
    seconds = train_dense(data, trainees, train_rows, cfg.train)
    if openvocab is not None:
        for t in trainees:
            t.forward = openvocab.test_logits  # every class at test, the unseen included

    settings = {**asdict(cfg), "run_id": run.run_id, "draws_meaning": draws_meaning(cfg.draws, [run], ALL_DRAWS),
                **({"openvocab": openvocab.settings()} if openvocab else {})}
    settings = single_draw_dropped(settings, [run])
    if segment:
        del settings["depth_average"]
    task = "openvocab" if openvocab is not None else cfg.task
    out = results_path(results, task, settings, f"{cfg.head}-{run.run_id}", suffix="")
    out.mkdir(parents=True, exist_ok=True)
    ids = run.images.id
    confusions = {t.name: np.zeros((out_channels, out_channels), np.int64) for t in trainees} if segment else {}
    depth_sums = {t.name: DepthSums(info.get("max_depth"), cfg.depth_average) for t in trainees} if not segment else {}
    examples: dict[str, list[np.ndarray]] = {"truth": [], "rows": [], **{t.name: [] for t in trainees}}
    for batch, outputs in predict_batches(data, trainees, test_rows, device):
        truth = batch.labels.numpy()
        take = max(0, EXAMPLES - sum(len(r) for r in examples["rows"]))
        examples["truth"].append(truth[:take])
        examples["rows"].append(batch.rows[:take])
        crop = None
        if not segment and info.get("eval_crop") == "eigen":
            crop = eigen_crop_mask(tg.geometry(batch.rows), tg.image_size(batch.rows), tg.size)
        for name, output in outputs.items():
            if segment:
                pred = predicted_classes(output, truth, ignore)
                confusions[name] += confusion_matrix(truth, pred, out_channels, ignore)
                if writer is not None:
                    for row, p in zip(batch.rows, pred):
                        writer.add(str(ids[row]), p)
            else:
                pred = output[:, 0]
                depth_sums[name].add(pred, truth, crop)
            examples[name].append(pred[:take])
    index = writer.close() if writer is not None else None
    np.savez_compressed(out / "examples.npz", ids=np.array([str(ids[r]) for r in np.concatenate(examples["rows"])]),
                        **{k: np.concatenate(v) for k, v in examples.items() if k != "rows"})

    heads = []
    for t in trainees:
        weights = out / f"{t.name}.safetensors"
        head = t.module if openvocab is None else t.module.head
        save_dense_head(head, weights, extra={"run_id": run.run_id, "task": task, "lr": cfg.train.lr,
                                              **({"openvocab": openvocab.settings()} if openvocab else {})})
        scores = segmentation_scores(confusions[t.name], classes) if segment else depth_sums[t.name].scores()
        scores["variant"]["grid"] = grid
        if openvocab is not None:
            scores.update(openvocab.scores(scores["per_class_iou"]))
        heads.append({"name": t.name, "kind": cfg.head, "keys": [list(k) for k in head.keys], **scores,
                      **({"confusion": confusions[t.name].tolist()} if segment else {}),
                      "epoch_log": t.epoch_log, "weights": weights.name, "spec": head.spec.to_json()})
    doc: dict[str, Any] = {
        "task": task, "store": store.url, "run_id": run.run_id, "config": settings,
        "training": TRAINING, "target_size": tg.size, "runs": run_images([run]),
        "images": {"train": len(train_rows), "test": len(test_rows), "without_targets": missing},
        "seconds_per_epoch": float(np.mean(seconds)), "out": str(out), "heads": heads,
    }
    if segment:
        doc.update(classes=classes, ignore_index=ignore)
        if openvocab is None:  # on the same test pixels as the heads (every head's confusion has the same rows)
            doc["baseline"] = majority_baseline(class_pixel_counts(read, train_rows, out_channels, ignore),
                                                confusions[trainees[0].name].sum(1), classes)
            doc["baseline"]["variant"]["grid"] = grid
    else:
        doc.update(depth_info=info)
    if index is not None:
        doc["predictions"] = {"folder": str(save_predictions), "index": str(index), "head": trainees[0].name}
    write_json(doc, out / "results.json")
    return doc

