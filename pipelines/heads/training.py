"""Training a grid of heads in one pass over the cache, and their accuracy metrics.

Each minibatch is read once and every head of the grid still training takes one AdamW step on it
(an SGD step with the diffssl recipe; dinov2's `setup_linear_classifiers`): a grid of blocks x timesteps x learning rates costs one read
of the cache per epoch. Every head is seeded on its own at construction and trains without
randomness (no dropout), so a head trained in a grid is bit-identical to the head trained alone.

Validation rides along in the same pass: validation rows are spread over every chunk, so a
separate pass after each epoch would decode the whole cache a second time. So that a score always
belongs to weights that can be restored, the validation batches of epoch e+1 are scored by a frozen
copy of each head as it was when that epoch began (the weights after epoch e); one last pass over
the validation rows alone scores the weights of the final epoch. The initial weights are not
scored: a head is kept after at least one epoch of training.

Each head keeps a record per epoch (`Trainee.epoch_log`): its mean train loss, the validation top-1
of the weights after that epoch, the learning rate of its last step and the epoch's seconds. As the
score of epoch e's weights is known only at the end of epoch e+1's pass (or of the last,
validation-only pass), the one line per epoch on stderr (`pipelines.progress.log`) is printed then,
so its val top-1 is always that epoch's own.

On a run of several noise draws read with draws="all" (`StoreBatches`), each epoch's train rows
take one draw per image, drawn anew every epoch (`StoreBatches.epoch_picks` with the config's seed),
as diffssl draws fresh noise at every forward; validation and test read the mean of the draws.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.analysis import finite_or_none
from pipelines.heads.data import Batch, StoreBatches
from pipelines.heads.logistic import class_metrics
from pipelines.heads.modules import Head
from pipelines.progress import bar, log


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
    window_chunks: int | None = None  # chunks read (and shuffled together) at once; None: what fits in WINDOW_BYTES
    # ours: AdamW (weight_decay), linear warmup then cosine per step. diffssl: the official diffssl
    # finetune.py, SGD without momentum or weight decay, lr x 0.1 every 7 epochs (StepLR(7, 0.1)).
    # vermouth: Vermouth's Classification/train_few-shot.py, AdamW (weight_decay) at a constant lr, the
    # gradient norm of the FuseClassifier (the vermouth-uhead's `fuse`) clipped to 1 before each step.
    recipe: str = "ours"

    def __post_init__(self) -> None:
        if self.recipe not in ("ours", "diffssl", "vermouth"):
            raise ValueError(f"unknown recipe {self.recipe!r}; choose ours, diffssl or vermouth")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 0:
            raise ValueError("epochs and batch size must be positive, patience not negative")
        check_number("--weight-decay", self.weight_decay)
        check_number("--warmup-epochs", self.warmup_epochs)
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"the validation fraction must be between 0 and 1, got {self.val_fraction}")


def check_number(flag: str, value: float, positive: bool = False) -> None:
    """Refuse, in one ValueError naming `flag`, a `value` that is not finite, or not > 0 when
    `positive`, or < 0 otherwise (a learning rate, weight decay or warmup length)."""
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{flag} must be a finite {'positive' if positive else 'non-negative'} number, got {value}")


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


def divergence(name: str, epoch: int, module: torch.nn.Module, loss: float, stepped: bool) -> str | None:
    """Why head `name` diverged in `epoch`, or None: its mean train loss `loss` over the epoch is not
    finite although it took a step (`stepped`), or its weights are not finite."""
    finite_weights = all(bool(p.isfinite().all()) for p in module.parameters())
    if finite_weights and (math.isfinite(loss) or not stepped):
        return None
    return (f"head {name} diverged at epoch {epoch} (train loss {loss:.4g}"
            f"{'' if finite_weights else ', weights not finite'})")


def refuse_divergence(reasons: Sequence[str | None], heads: int) -> None:
    """Refuse the command in one ValueError when a head diverged (`divergence` of each head): its
    scores would be a diverged head's, so no head of the grid is scored or saved."""
    diverged = [r for r in reasons if r]
    if diverged:
        grid = f" (any diverged head refuses the grid of {heads} heads)" if heads > 1 else ""
        raise ValueError(f"{'; '.join(diverged)}: lower --lr; nothing saved{grid}")


class Trainee:
    """One head of a grid: its optimizer, schedule, early-stopping state, the frozen copy of its
    weights that validation scores during an epoch, and its per-epoch records."""

    def __init__(self, name: str, head: Head, lr: float, cfg: TrainConfig, steps_per_epoch: int, device: torch.device,
                 context: str = ""):
        self.name = name
        self.context = context  # after the name in its epoch lines (a few-shot head's seed and shots)
        self.lr = lr
        self.head = head.to(device)
        self.validated = copy.deepcopy(self.head).eval()
        self.device = device
        self.schedule_per_epoch = cfg.recipe == "diffssl"
        self.clipped: list[torch.nn.Parameter] = []  # the vermouth recipe's: gradient norm clipped to 1
        if self.schedule_per_epoch:
            self.optimizer = torch.optim.SGD(head.parameters(), lr=lr)
            self.schedule = torch.optim.lr_scheduler.StepLR(self.optimizer, 7, 0.1)
        elif cfg.recipe == "vermouth":
            if head.spec.kind != "vermouth-uhead":
                raise ValueError(f"the vermouth recipe trains the vermouth-uhead, not {head.spec.kind} (it clips the "
                                 "official FuseClassifier's gradients)")
            self.clipped = list(head.fuse.parameters())
            self.optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
            self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        else:
            self.optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
            warmup, total = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
            self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_cosine(s, warmup, total))
        self.patience = cfg.patience
        self.max_epochs = cfg.epochs
        self.val_top1: list[float] = []  # [i]: the weights after i + 1 epochs
        # [i]: epoch i + 1: {"epoch", "train_loss" (mean over its images), "val_top1" (of the weights
        # after it; None until scored, or without validation), "lr" (of its last step), "seconds"}
        self.epoch_log: list[dict] = []
        self._loss_sum = torch.zeros((), device=device)  # summed over this epoch's train images so far
        self._loss_images = 0
        self._last_lr = lr
        self.best_state: dict[str, torch.Tensor] = {}
        self.stopped = False
        self.divergence: str | None = None  # set by `trained` when the head diverged (`divergence`)

    @property
    def best_epoch(self) -> int:
        """Epochs trained by the weights of the best validation top-1 (the earliest on ties)."""
        return int(np.argmax(self.val_top1)) + 1

    @property
    def epochs(self) -> int:
        return len(self.val_top1)

    @property
    def best_val_top1(self) -> float:
        return self.val_top1[self.best_epoch - 1]

    def step(self, batch: Batch) -> None:
        self.head.train()
        loss = F.cross_entropy(logits_of(self.head, batch, self.device), batch.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clipped:
            torch.nn.utils.clip_grad_norm_(self.clipped, 1.0)
        self._last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        if not self.schedule_per_epoch:
            self.schedule.step()
        self._loss_sum += loss.detach() * len(batch.labels)  # a tensor: no device sync per step
        self._loss_images += len(batch.labels)

    def trained(self, seconds: float) -> None:
        """An epoch's pass ended after `seconds` (shared by the grid: reading, training, and
        validating the previous epoch's weights): record its mean train loss and last learning rate,
        and whether the head diverged (`divergence`)."""
        if self.schedule_per_epoch:
            self.schedule.step()
        loss = float(self._loss_sum) / self._loss_images if self._loss_images else float("nan")
        self.divergence = divergence(self.name, len(self.epoch_log) + 1, self.head, loss, self._loss_images > 0)
        self.epoch_log.append({"epoch": len(self.epoch_log) + 1, "train_loss": finite_or_none(loss), "val_top1": None,
                               "lr": self._last_lr, "seconds": seconds})
        self._loss_sum.zero_()
        self._loss_images = 0

    def epoch_line(self, record: dict) -> str:
        """One line of an epoch's record, as `log` prints it."""
        loss, val = record["train_loss"], record["val_top1"]
        return (f"{' '.join(filter(None, (self.name, self.context)))}  epoch {record['epoch']}/{self.max_epochs}  "
                f"train loss {'n/a' if loss is None else f'{loss:.4f}'}  "
                f"val top-1 {'n/a' if val is None else f'{val:.4f}'}  lr {record['lr']:.3g}  {record['seconds']:.2f} s")

    def freeze_for_validation(self) -> None:
        """The weights the coming validation batches score: the head's weights now."""
        self.validated.load_state_dict(self.head.state_dict())

    def validation_logits(self, batch: Batch) -> torch.Tensor:
        return logits_of(self.validated, batch, self.device)

    def scored(self, val_top1: float) -> None:
        """The frozen weights scored `val_top1`: keep them if best; stop after `patience` scores
        without a better one. Completes the frozen weights' epoch record and logs its line."""
        self.val_top1.append(val_top1)
        record = self.epoch_log[self.epochs - 1]
        record["val_top1"] = finite_or_none(val_top1)
        log(self.epoch_line(record))
        if self.best_epoch == self.epochs:
            self.best_state = {k: v.detach().clone() for k, v in self.validated.state_dict().items()}
        elif self.patience and self.epochs - self.best_epoch >= self.patience:
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
    the weights of its best validation score. A bar counts the epochs, another the images of a pass.
    ValueError as soon as a head diverges (`refuse_divergence`), before anything is scored or saved."""
    times = GridLog([], [])
    with bar("train", f"{len(trainees)} heads", cfg.epochs) as advance:
        for epoch in range(cfg.epochs):
            active = [t for t in trainees if not t.stopped]
            if not active:
                advance(0, description=f"{len(trainees)} heads stopped early after {epoch} epochs")
                break
            advance(0, description=f"epoch {epoch + 1}: {len(active)} of {len(trainees)} heads")
            tic, read_before = time.perf_counter(), data.read_seconds
            rng = np.random.default_rng((cfg.seed, epoch))
            groups = {"val": val_rows, "train": train_rows} if epoch else {"train": train_rows}
            _shared_pass(data, active, groups, rng, data.epoch_picks(train_rows, cfg.seed, epoch))
            times.epoch_seconds.append(time.perf_counter() - tic)
            times.read_seconds.append(data.read_seconds - read_before)
            for t in active:
                t.trained(times.epoch_seconds[-1])
            refuse_divergence([t.divergence for t in active], len(trainees))
            advance()
        _shared_pass(data, trainees, {"val": val_rows}, None)  # the weights of each head's last epoch
    for t in trainees:
        t.restore_best()
    return times


def _shared_pass(data: StoreBatches, trainees: Sequence[Trainee], groups: Mapping[str, np.ndarray],
                 rng: np.random.Generator | None, picks: np.ndarray | None = None) -> None:
    """One read of `groups`: every trainee steps on each train batch, and its frozen weights of the
    pass's start score the val batches, if the pass has any. `picks`: as `StoreBatches.passes`."""
    for t in trainees:
        t.freeze_for_validation()
    correct, seen = np.zeros(len(trainees)), 0
    with bar("images", " + ".join(groups), sum(len(rows) for rows in groups.values())) as advance:
        for group, batch in data.passes(groups, rng, picks):
            advance(len(batch.labels))
            batch = batch.to(trainees[0].device)
            if group == "train":
                for t in trainees:
                    t.step(batch)
                continue
            with torch.no_grad():
                for i, t in enumerate(trainees):
                    correct[i] += int((t.validation_logits(batch).argmax(1) == batch.labels).sum())
            seen += len(batch.labels)
    if "val" in groups:
        for i, t in enumerate(trainees):
            t.scored(correct[i] / seen if seen else float("nan"))


@torch.no_grad()
def predict(data: StoreBatches, heads: Mapping[str, Head], rows: np.ndarray, device: torch.device) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits of every head on `rows`, in one pass in store order: (rows in that order, {name: logits})."""
    order, logits = [], {name: [] for name in heads}
    with bar("images", "predict", len(rows)) as advance:
        for _, batch in data.passes({"eval": rows}, None):
            advance(len(batch.labels))
            batch = batch.to(device)
            order.append(batch.rows)
            for name, head in heads.items():
                head.eval()
                logits[name].append(logits_of(head, batch, device).cpu().numpy())
    return np.concatenate(order), {name: np.concatenate(v) for name, v in logits.items()}


def accuracy_metrics(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """top1, top5 (top-k with k = min(5, classes)), per-class top-1 {class name: accuracy} and the
    confusion matrix of the top-1 predictions (`class_metrics`)."""
    ranked = np.argsort(-logits, axis=1, kind="stable")[:, :min(5, logits.shape[1])]
    return {
        "top1": float((ranked[:, 0] == labels).mean()),
        "top5": float((ranked == labels[:, None]).any(axis=1).mean()),
        **class_metrics(labels, ranked[:, 0], list(class_names)),
    }
