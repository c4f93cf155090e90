"""Training a grid of heads in one pass over the cache, and their accuracy metrics.

Each minibatch is read once and every head of the grid still training takes one AdamW step on it
(dinov2's `setup_linear_classifiers`): a grid of blocks x timesteps x learning rates costs one read
of the cache per epoch. Every head is seeded on its own at construction and trains without
randomness (no dropout), so a head trained in a grid is bit-identical to the head trained alone.

Validation is progressive: the validation rows of each window are scored by each head as the
window arrives, before the heads step on that window's training rows. Validation rows are spread
over every chunk, so a separate pass after each epoch would decode the whole cache a second time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.heads.data import Batch, StoreBatches
from pipelines.heads.modules import Head


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    val_fraction: float = 0.1  # of the train rows, carved with `seed`
    patience: int = 5  # epochs without a better validation top-1 before a head stops; 0: never
    seed: int = 0
    device: str = "cpu"
    window_chunks: int = 4  # chunks read (and shuffled together) at once

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 0 or self.warmup_epochs < 0:
            raise ValueError("epochs and batch size must be positive, patience and warmup not negative")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"the validation fraction must be between 0 and 1, got {self.val_fraction}")


def autocast(device: torch.device):
    """bf16 mixed precision on CUDA only: on CPU it is slower and would change the numbers."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def logits_of(head: Head, batch: Batch, device: torch.device) -> torch.Tensor:
    """float32 logits of a batch (already on `device`), in mixed precision on CUDA."""
    with autocast(device):
        return head(batch.features, batch.expert).float()


def carve_validation(train_rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) rows: a seeded random `fraction` of the train rows (at least one)."""
    order = np.random.default_rng(seed).permutation(train_rows)
    n_val = max(1, round(fraction * len(train_rows)))
    if len(train_rows) - n_val < 1:
        raise ValueError(f"{len(train_rows)} train images leave none to train on after the validation split")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class Trainee:
    """One head of a grid: its optimizer, schedule and early-stopping state."""

    def __init__(self, name: str, head: Head, lr: float, cfg: TrainConfig, steps_per_epoch: int, device: torch.device):
        self.name = name
        self.lr = lr
        self.head = head.to(device)
        self.device = device
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        warmup, total = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_cosine(s, warmup, total))
        self.patience = cfg.patience
        self.val_top1: list[float] = []
        self.best_state: dict[str, torch.Tensor] = {}
        self.stopped = False

    @property
    def best_epoch(self) -> int:
        """0-based epoch of the best validation top-1 (the earliest on ties)."""
        return int(np.argmax(self.val_top1))

    def step(self, batch: Batch) -> None:
        self.head.train()
        loss = F.cross_entropy(logits_of(self.head, batch, self.device), batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()

    def end_epoch(self, val_top1: float) -> None:
        """Keep the weights of the best validation epoch; stop after `patience` epochs without a
        better one."""
        self.val_top1.append(val_top1)
        if self.best_epoch == len(self.val_top1) - 1:
            self.best_state = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        elif self.patience and len(self.val_top1) - 1 - self.best_epoch >= self.patience:
            self.stopped = True

    def restore_best(self) -> None:
        self.head.load_state_dict(self.best_state)
        self.head.eval()


@dataclass
class GridLog:
    epoch_seconds: list[float]  # wall time of each epoch (read, train and validate)
    read_seconds: list[float]  # of which the heads waited for the store


def train_grid(data: StoreBatches, trainees: Sequence[Trainee], train_rows: np.ndarray, val_rows: np.ndarray,
               cfg: TrainConfig) -> GridLog:
    """Train every head on one shared pass per epoch until all stop or `cfg.epochs`; each ends with
    the weights of its best validation epoch."""
    log = GridLog([], [])
    for epoch in range(cfg.epochs):
        active = [t for t in trainees if not t.stopped]
        if not active:
            break
        tic, read_before = time.perf_counter(), data.read_seconds
        correct, seen = np.zeros(len(active)), 0
        rng = np.random.default_rng((cfg.seed, epoch))
        for group, batch in data.passes({"val": val_rows, "train": train_rows}, rng):
            batch = batch.to(active[0].device)
            if group == "train":
                for t in active:
                    t.step(batch)
                continue
            with torch.no_grad():
                for i, t in enumerate(active):
                    t.head.eval()
                    correct[i] += int((logits_of(t.head, batch, t.device).argmax(1) == batch.labels).sum())
            seen += len(batch.labels)
        for i, t in enumerate(active):
            t.end_epoch(correct[i] / seen)
        log.epoch_seconds.append(time.perf_counter() - tic)
        log.read_seconds.append(data.read_seconds - read_before)
    for t in trainees:
        t.restore_best()
    return log


@torch.no_grad()
def predict(data: StoreBatches, heads: Mapping[str, Head], rows: np.ndarray, device: torch.device) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits of every head on `rows`, in one pass in store order: (rows in that order, {name: logits})."""
    order, logits = [], {name: [] for name in heads}
    for _, batch in data.passes({"eval": rows}, None):
        batch = batch.to(device)
        order.append(batch.rows)
        for name, head in heads.items():
            head.eval()
            logits[name].append(logits_of(head, batch, device).cpu().numpy())
    return np.concatenate(order), {name: np.concatenate(v) for name, v in logits.items()}


def accuracy_metrics(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """top1, top5 (top-k with k = min(5, classes)) and per-class top-1 {class name: accuracy}."""
    ranked = np.argsort(-logits, axis=1, kind="stable")[:, :min(5, logits.shape[1])]
    hit1 = ranked[:, 0] == labels
    return {
        "top1": float(hit1.mean()),
        "top5": float((ranked == labels[:, None]).any(axis=1).mean()),
        "per_class": {class_names[c]: float(hit1[labels == c].mean()) for c in np.unique(labels)},
    }
