"""DenseTrainee: the learning-rate schedule follows the batches, including those with nothing to learn."""

import math
import warnings

import numpy as np
import pytest
import torch

from pipelines.dense.metrics import IGNORE_INDEX
from pipelines.dense.train import DenseTrainConfig, DenseTrainee, segmentation_loss
from pipelines.heads.data import Batch


def expected_lr(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps ((s + 1) / warmup), then cosine decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def test_a_batch_without_a_valid_pixel_takes_no_step_but_advances_the_schedule():
    torch.manual_seed(0)
    cfg = DenseTrainConfig(epochs=2, batch_size=2, lr=0.1, warmup_epochs=0.5)
    steps_per_epoch = 4  # warmup = 2 steps, total = 8
    module = torch.nn.Conv2d(3, 2, 1)
    trainee = DenseTrainee("h", module, lambda m, b: m(b.features[(0, "x")]), segmentation_loss, cfg,
                           steps_per_epoch, torch.device("cpu"))
    features = {(0, "x"): torch.randn(2, 3, 4, 4)}
    valid = Batch(features, {}, torch.randint(0, 2, (2, 4, 4)), np.arange(2))
    ignored = Batch(features, {}, torch.full((2, 4, 4), IGNORE_INDEX), np.arange(2))
    order = [ignored, valid, ignored, ignored, valid]  # the first batch has nothing to learn from
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning reaches the user
        for k, batch in enumerate(order):
            before = [p.detach().clone() for p in module.parameters()]
            trainee.step(batch, torch.device("cpu"))
            moved = any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
            assert moved == (batch is valid), k
            assert trainee.optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr(k + 1, 0.1, 2, 8)), k
    assert trainee._images == 4  # the training loss averages over the batches that were learned from
