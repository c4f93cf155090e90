"""Adaptive average pooling of stored feature maps (numpy only): the one pooling function that
`Run.split` and every stage-2 analysis use."""

from __future__ import annotations

import numpy as np


def pooled(features: np.ndarray, size: int | None) -> np.ndarray:
    """Adaptive average pooling of (N, C, H, W) to (N, C, size, size), as torch's
    adaptive_avg_pool2d bins it (window i covers floor(i*H/size) .. ceil((i+1)*H/size)), then
    flatten to (N, C*size*size) float32. A map already at most size x size is left as it is;
    `size=None` only flattens. Raises ValueError for a size below 1."""
    if size is not None and size < 1:
        raise ValueError(f"--pool takes a positive size, got {size}")
    x = features.astype(np.float32)
    if size is not None and x.ndim == 4 and (x.shape[2] > size or x.shape[3] > size):
        x = _adaptive_mean(_adaptive_mean(x, size, axis=2), size, axis=3)
    return x.reshape(len(x), -1)


def _adaptive_mean(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = x.shape[axis]
    if n % size == 0:  # equal windows: one reshape
        shape = (*x.shape[:axis], size, n // size, *x.shape[axis + 1:])
        return x.reshape(shape).mean(axis=axis + 1)
    bins = [np.take(x, range(i * n // size, -(-(i + 1) * n // size)), axis=axis).mean(axis=axis) for i in range(size)]
    return np.stack(bins, axis=axis)
