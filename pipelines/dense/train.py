"""Training dense heads on minibatches streamed from the store, and predicting test batches.

Batches come from `pipelines.heads.data.StoreBatches` (windows of whole chunks, shuffled, the next
window read on a background thread), so memory is bounded by the window and the heads, never by
the number of images. Targets are read per batch from the store (`TargetReader`), not held in memory.
A grid of heads (one per (timestep, block), or per timestep) shares each pass: every head takes an
AdamW step (linear warmup, then cosine decay per step) on every batch; a batch without a pixel to
learn from takes no step, but the schedule still advances, so the learning rate follows the batches
and reaches its end at the last one. There is no validation split and no early stopping: each head
keeps its weights after the last epoch, and the output says so.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.analysis import finite_or_none
from pipelines.dense.metrics import IGNORE_INDEX, MIN_DEPTH
from pipelines.heads.data import Batch, StoreBatches
from pipelines.heads.training import autocast, check_number, divergence, refuse_divergence, warmup_cosine
from pipelines.progress import bar, log

TRAINING = ("AdamW, linear warmup then cosine decay per step; every head keeps its weights after the last epoch "
            "(no validation split, no early stopping)")


@dataclass
class DenseTrainConfig:
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--epochs and --batch-size must be positive")
        check_number("--lr", self.lr, positive=True)
        check_number("--weight-decay", self.weight_decay)
        check_number("--warmup-epochs", self.warmup_epochs)


class TargetReader:
    """Per-row targets read from the store when a batch is cut: `targets[rows]` calls `read(rows)`
    (e.g. `tg.masks`), so StoreBatches carries them without holding all of them."""

    def __init__(self, read: Callable[[np.ndarray], np.ndarray]):
        self.read = read

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.read(np.asarray(rows, dtype=np.int64)))


def segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor | None:
    """Mean cross-entropy over the pixels whose mask is not IGNORE_INDEX; logits (B, K, S, S),
    masks (B, S, S) uint8 or int. None when the batch has no such pixel (no step is taken)."""
    masks = masks.long()
    counted = int((masks != IGNORE_INDEX).sum())
    if counted == 0:
        return None
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum") / counted


def depth_loss(pred: Tensor, depth: Tensor, max_depth: float | None) -> Tensor | None:
    """Mean L1 (metres) over valid pixels (MIN_DEPTH < depth, < max_depth when capped); pred
    (B, 1, S, S), depth (B, S, S) float. None when no pixel is valid."""
    valid = depth > MIN_DEPTH
    if max_depth is not None:
        valid &= depth < max_depth
    if not bool(valid.any()):
        return None
    return (pred[:, 0][valid] - depth[valid]).abs().mean()


class DenseTrainee:
    """One head of a grid: its module, how it is called and scored, its optimizer and records."""

    def __init__(self, name: str, module: nn.Module, forward: Callable[[nn.Module, Batch], Tensor],
                 loss: Callable[[Tensor, Tensor], Tensor | None], cfg: DenseTrainConfig, steps_per_epoch: int,
                 device: torch.device):
        self.name = name
        self.module = module.to(device)
        self.forward = forward
        self.loss = loss
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup, total = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_cosine(s, warmup, total))
        self.epoch_log: list[dict] = []
        self._loss_sum, self._images = 0.0, 0
        self.divergence: str | None = None  # set by `end_epoch` when the head diverged (`divergence`)

    def step(self, batch: Batch, device: torch.device) -> None:
        self.module.train()
        with autocast(device):
            out = self.forward(self.module, batch).float()
        loss = self.loss(out, batch.labels)
        if loss is None:  # nothing to learn from this batch: no step, but the schedule follows the batches
            with warnings.catch_warnings():  # torch warns when the schedule steps before the optimizer has
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step\\(\\)` before")
                self.schedule.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self._loss_sum += float(loss.detach()) * len(batch.rows)
        self._images += len(batch.rows)

    def end_epoch(self, epochs: int, seconds: float) -> None:
        loss = self._loss_sum / self._images if self._images else float("nan")
        self.divergence = divergence(self.name, len(self.epoch_log) + 1, self.module, loss, self._images > 0)
        record = {"epoch": len(self.epoch_log) + 1, "train_loss": finite_or_none(loss),
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds}
        self.epoch_log.append(record)
        log(f"{self.name}  epoch {record['epoch']}/{epochs}  train loss "
            f"{'n/a' if record['train_loss'] is None else f'{loss:.4f}'}  {seconds:.2f} s")
        self._loss_sum, self._images = 0.0, 0


def train_dense(data: StoreBatches, trainees: Sequence[DenseTrainee], rows: np.ndarray,
                cfg: DenseTrainConfig) -> list[float]:
    """`cfg.epochs` shared passes over `rows` (shuffled with (seed, epoch); with draws="all", each
    row's noise draw picked anew per epoch by `data.epoch_picks`); returns each epoch's seconds.
    ValueError as soon as a head diverges (`refuse_divergence`), before anything is scored or saved."""
    device = torch.device(cfg.device)
    seconds = []
    with bar("train", f"{len(trainees)} dense heads", cfg.epochs) as advance:
        for epoch in range(cfg.epochs):
            tic = time.perf_counter()
            with bar("images", "train", len(rows)) as images:
                picks = data.epoch_picks(rows, cfg.seed, epoch)
                for _, batch in data.passes({"train": rows}, np.random.default_rng((cfg.seed, epoch)), picks):
                    images(len(batch.rows))
                    batch = batch.to(device)
                    for t in trainees:
                        t.step(batch, device)
            seconds.append(time.perf_counter() - tic)
            for t in trainees:
                t.end_epoch(cfg.epochs, seconds[-1])
            refuse_divergence([t.divergence for t in trainees], len(trainees))
            advance()
    for t in trainees:
        t.module.eval()
    return seconds


@torch.no_grad()
def predict_batches(data: StoreBatches, trainees: Sequence[DenseTrainee], rows: np.ndarray,
                    device: torch.device) -> Iterator[tuple[Batch, Mapping[str, np.ndarray]]]:
    """Test batches in store order with every head's float32 outputs (B, out, S, S), one batch at
    a time (the caller accumulates its metrics, so predictions are never all held)."""
    with bar("images", "predict", len(rows)) as advance:
        for _, batch in data.passes({"test": rows}, None):
            advance(len(batch.rows))
            on_device = batch.to(device)
            outputs = {}
            for t in trainees:
                t.module.eval()
                with autocast(device):
                    outputs[t.name] = t.forward(t.module, on_device).float().cpu().numpy()
            yield batch, outputs
