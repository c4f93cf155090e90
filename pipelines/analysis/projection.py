"""A projection for zero-shot SBIR trained on SEEN classes only, then applied to unseen-class
queries and gallery: a linear map of both domains into one space, trained with either loss.

- cross-entropy: a cosine classifier over the seen classes (temperature 0.1) whose class vectors
  are the class-name text embeddings when given (the map then lands in the text space, as in the
  papers), else learned prototypes;
- triplet: a query-domain anchor (sketch) is pulled towards a gallery-domain item (photo) of its
  class and pushed from one of another class, by a cosine margin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipelines.progress import bar

LOSSES = ("cross-entropy", "triplet")


@dataclass(frozen=True)
class ProjectionConfig:
    dim: int | None = 128  # None: the width of the text embeddings
    loss: str = "cross-entropy"
    text_embeddings: str | None = None  # class-name embeddings (`featurestore text-embed`) as fixed class vectors
    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 256
    temperature: float = 0.1
    margin: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"projection loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.text_embeddings is not None and self.loss != "cross-entropy":
            raise ValueError("text embeddings are the class vectors of the cross-entropy loss; the triplet loss has none")
        if self.dim is None and self.text_embeddings is None:
            raise ValueError("a projection needs a width (--project-dim) unless it maps into text embeddings")
        if (self.dim is not None and self.dim < 1) or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("projection dim, epochs and batch size must be positive")
        if self.lr <= 0 or self.temperature <= 0 or self.margin < 0:
            raise ValueError("projection lr and temperature must be positive and the margin not negative")


def train_projection(
    x: np.ndarray, labels: np.ndarray, is_query: np.ndarray, config: ProjectionConfig,
    class_vectors: np.ndarray | None = None,
) -> np.ndarray:
    """(D, dim) weights from features `x` (N, D) of seen-class images of both domains, their
    seen-class labels 0..K-1 and which rows are queries. `class_vectors` (K, dim): fixed class
    vectors of the cross-entropy loss (text embeddings). The caller guarantees no unseen class is
    among the rows. A bar counts the epochs."""
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    dim = class_vectors.shape[1] if class_vectors is not None else config.dim
    weights = (torch.randn(features.shape[1], dim, generator=generator) / features.shape[1] ** 0.5).requires_grad_()
    with bar("projection", config.loss, config.epochs) as advance:
        if config.loss == "triplet":
            _fit_triplet(features, weights, np.asarray(labels), np.asarray(is_query, bool), config, generator, advance)
        else:
            _fit_cross_entropy(features, weights, torch.from_numpy(np.asarray(labels, dtype=np.int64)), config,
                               generator, class_vectors, advance)
    return weights.detach().numpy()


def _fit_cross_entropy(features, weights, targets, config: ProjectionConfig, generator, class_vectors,
                       advance: Callable[[], None]) -> None:
    import torch
    from torch.nn.functional import cross_entropy, normalize

    n_classes = int(targets.max()) + 1
    if class_vectors is None:
        prototypes = torch.randn(n_classes, weights.shape[1], generator=generator).requires_grad_()
        parameters = [weights, prototypes]
    else:
        prototypes = torch.from_numpy(np.ascontiguousarray(class_vectors, dtype=np.float32))
        parameters = [weights]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr)
    for _ in range(config.epochs):
        for batch in torch.randperm(len(features), generator=generator).split(config.batch_size):
            z = normalize(features[batch] @ weights, dim=1)
            loss = cross_entropy(z @ normalize(prototypes, dim=1).T / config.temperature, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        advance()


def _fit_triplet(features, weights, labels: np.ndarray, is_query: np.ndarray, config: ProjectionConfig,
                 generator, advance: Callable[[], None]) -> None:
    import torch
    from torch.nn.functional import normalize

    rng = np.random.default_rng(config.seed)
    gallery = np.flatnonzero(~is_query)
    by_class = {c: gallery[labels[gallery] == c] for c in np.unique(labels[gallery])}
    anchors = np.flatnonzero(is_query & np.isin(labels, list(by_class)))
    if len(by_class) < 2 or not len(anchors):
        raise ValueError("the triplet loss needs query-domain images and gallery-domain images of at least "
                         "two seen classes")
    optimizer = torch.optim.AdamW([weights], lr=config.lr)
    for _ in range(config.epochs):
        positives = np.array([rng.choice(by_class[c]) for c in labels[anchors]])
        negatives = rng.choice(gallery, len(anchors))
        while (clash := labels[negatives] == labels[anchors]).any():
            negatives[clash] = rng.choice(gallery, int(clash.sum()))
        for batch in torch.randperm(len(anchors), generator=generator).split(config.batch_size):
            a, p, n = (normalize(features[torch.from_numpy(rows)[batch]] @ weights, dim=1)
                       for rows in (anchors, positives, negatives))
            loss = torch.relu((a * n).sum(1) - (a * p).sum(1) + config.margin).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        advance()
