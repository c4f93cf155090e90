"""The first probe from the cache: standardised features, multinomial logistic regression.

Pure compute (`fit_logistic_probe`) on arrays; `probe_run` reads one (t, block) of a run, splits
train/test by the manifest's split column, and calls it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from featurestore.store import FeatureStore, Run


@dataclass
class ClassifiedMap:
    """What every classifier of one (run, timestep, block) map reports first: the map, its pooling,
    feature width and how many images trained and tested it."""

    run_id: str
    timestep: int | None
    block: str
    pool: int | None
    features: int
    train: int
    test: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProbeResult(ClassifiedMap):
    top1: float
    train_top1: float


def pooled(features: np.ndarray, size: int | None) -> np.ndarray:
    """Adaptive average pooling of (N, C, H, W) to (N, C, size, size), as torch's
    adaptive_avg_pool2d bins it (window i covers floor(i*H/size) .. ceil((i+1)*H/size)), then flatten.
    A map already at most size x size is left as it is."""
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


def fit_logistic_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
    c: float = 1.0, max_iter: int = 1000,
) -> tuple[float, float]:
    """Standardise with train statistics, fit multinomial logistic regression; (test, train) top-1."""
    from sklearn.linear_model import LogisticRegression

    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0) + 1e-6
    model = LogisticRegression(C=c, max_iter=max_iter)
    model.fit((train_x - mean) / std, train_y)
    test_acc = float((model.predict((test_x - mean) / std) == test_y).mean())
    train_acc = float((model.predict((train_x - mean) / std) == train_y).mean())
    return test_acc, train_acc


def split_rows(run: Run, train_split: str, test_split: str, holdout: float | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test rows of a run's finished, non-failed images: from the split column, or a
    seeded holdout fraction when the data has a single split."""
    status_ok = run.rows_done() & ~run.failed
    splits = run.images.split
    if holdout is not None:
        if not 0 < holdout < 1:
            raise ValueError("--holdout must be a fraction between 0 and 1")
        rng = np.random.default_rng(seed)
        is_test = rng.random(len(run)) < holdout
        train, test = np.flatnonzero(status_ok & ~is_test), np.flatnonzero(status_ok & is_test)
    else:
        train = np.flatnonzero(status_ok & (splits == train_split))
        test = np.flatnonzero(status_ok & (splits == test_split))
    if len(train) == 0 or len(test) == 0:
        found = ", ".join(sorted(set(splits.tolist())))
        raise ValueError(
            f"need images in both splits {train_split!r} and {test_split!r} (found: {found}); "
            "choose --train-split/--test-split or use --holdout FRACTION"
        )
    return train, test


def probe_run(
    store: FeatureStore, run_id: str | None, timestep: int | None, block: str, pool: int | None = 4,
    train_split: str = "train", test_split: str = "test", holdout: float | None = None,
    c: float = 1.0, seed: int = 0,
) -> ProbeResult:
    """Linear probe of one (t, block) of a run (the only run when run_id is None)."""
    run = resolve_run(store, run_id)
    train, test = split_rows(run, train_split, test_split, holdout, seed)
    x = pooled(run.numpy(timestep, block), pool)
    y = run.labels
    top1, train_top1 = fit_logistic_probe(x[train], y[train], x[test], y[test], c=c)
    return ProbeResult(run.run_id, timestep, block, pool, x.shape[1], len(train), len(test), top1, train_top1)


def resolve_run(store: FeatureStore, run_id: str | None) -> Run:
    if run_id is not None:
        return store.run(run_id)
    ids = store.run_ids()
    if len(ids) != 1:
        raise ValueError(f"{store.url} holds {len(ids)} runs; pick one with --run ({', '.join(ids) or 'none'})")
    return store.run(ids[0])
