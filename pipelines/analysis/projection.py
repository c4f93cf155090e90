"""A projection for zero-shot SBIR trained on SEEN classes only, then applied to unseen-class
queries and gallery: a linear map of both domains into one space where a cosine classifier over
the seen classes (learned prototypes) separates them (cross-entropy, temperature 0.1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProjectionConfig:
    dim: int = 128
    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 256
    temperature: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0:
            raise ValueError("projection dim, epochs and batch size must be positive, as must lr and temperature")


def train_projection(x: np.ndarray, labels: np.ndarray, config: ProjectionConfig) -> np.ndarray:
    """(D, dim) weights from features `x` (N, D) of seen-class images of both domains and their
    seen-class labels 0..K-1. The caller guarantees no unseen class is among them."""
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    n_classes = int(targets.max()) + 1
    weights = (torch.randn(features.shape[1], config.dim, generator=generator) / features.shape[1] ** 0.5).requires_grad_()
    prototypes = torch.randn(n_classes, config.dim, generator=generator).requires_grad_()
    optimizer = torch.optim.AdamW([weights, prototypes], lr=config.lr)
    for _ in range(config.epochs):
        for batch in torch.randperm(len(features), generator=generator).split(config.batch_size):
            z = torch.nn.functional.normalize(features[batch] @ weights, dim=1)
            logits = z @ torch.nn.functional.normalize(prototypes, dim=1).T / config.temperature
            loss = torch.nn.functional.cross_entropy(logits, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return weights.detach().numpy()
