"""The first probe from the cache: standardised features, multinomial logistic regression.

Pure compute (`fit_logistic_probe`) on arrays; `probe_run` reads one (t, block) of a run, splits
train/test by the manifest's split column, and calls it; `save_probe` writes its result.
`split_rows`, `resolve_run`, `class_names` and `class_metrics` (per-class top-1, confusion matrix)
are shared by every stage-2 command.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store import FeatureStore, Run, timestep_key
from pipelines.analysis import (draws_meaning, read_pooled, results_path, run_images, scored_draws,
                                single_draw_dropped, training_samples, write_json)
from pipelines.progress import bar


@dataclass
class ClassifiedMap:
    """What every classifier of one (run, timestep, block) map reports first: the map, its pooling,
    feature width, how many images trained and tested it, the run's image counts (`run_images`:
    used, failed, pending) and every setting that changes the numbers (the results file's digest)."""

    run_id: str
    timestep: int | None
    block: str
    pool: int | None
    features: int
    train: int
    test: int
    runs: dict[str, dict[str, int]]
    settings: dict[str, Any]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProbeResult(ClassifiedMap):
    top1: float
    train_top1: float
    classes: list[str]  # class name of each label 0..K-1 (`class_names`)
    per_class: dict[str, float]  # `class_metrics`: test top-1 of each class with test images
    confusion: list[list[int]]  # `class_metrics`: K x K test counts, row = true label, column = predicted


def fit_logistic_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
    c: float = 1.0, max_iter: int = 1000,
) -> tuple[float, float]:
    """Standardise with train statistics, fit multinomial logistic regression; (test, train) top-1."""
    test_pred, train_pred = logistic_predictions(train_x, train_y, test_x, c, max_iter)
    return float((test_pred == test_y).mean()), float((train_pred == train_y).mean())


def logistic_predictions(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float = 1.0, max_iter: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """Standardise with train statistics, fit multinomial logistic regression (sklearn); the
    predicted labels of the (test, train) rows."""
    from sklearn.linear_model import LogisticRegression

    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0) + 1e-6
    model = LogisticRegression(C=c, max_iter=max_iter)
    model.fit((train_x - mean) / std, train_y)
    return model.predict((test_x - mean) / std), model.predict((train_x - mean) / std)


def class_names(labels: np.ndarray, names: np.ndarray) -> list[str]:
    """The class name of each label 0..max, from the images table ("" for a label no image has)."""
    classes = [""] * (int(labels.max()) + 1)
    values, first = np.unique(labels, return_index=True)
    for label, row in zip(values.tolist(), first.tolist()):
        classes[label] = str(names[row])
    return classes


def class_metrics(labels: np.ndarray, predicted: np.ndarray, classes: list[str] | tuple[str, ...]) -> dict:
    """Per-class top-1 and the confusion matrix of predicted labels against true ones (int arrays
    of equal length, values in 0..K-1 with K = len(classes)): {"per_class": {class name: fraction of
    that class's images predicted right, for every class with images}, "confusion": K x K int
    counts, row = true label, column = predicted label (sklearn.metrics.confusion_matrix's layout)}."""
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    k = len(classes)
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    return {
        "per_class": {classes[c]: float((predicted[labels == c] == c).mean()) for c in np.unique(labels)},
        "confusion": confusion.tolist(),
    }


def split_rows(run: Run, train_split: str, test_split: str, holdout: float | None, seed: int,
               allow_incomplete: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 train/test rows of a run's extracted, non-failed images: from the split column,
    or a seeded holdout fraction when the data has a single split. An incomplete run raises
    IncompleteRunError (how many images are pending, and that `extract` resumes) unless
    `allow_incomplete`; then only the extracted images are split. Train and test sets that share
    an image (e.g. --train-split train --test-split train) raise ValueError: the test score would
    be a training score. Every command that turns --train-split/--test-split into rows calls this."""
    status_ok = np.zeros(len(run), dtype=bool)
    status_ok[run.usable_rows(allow_incomplete)] = True
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
        found = ", ".join(sorted(set(splits[status_ok].tolist()))) or "none"
        raise ValueError(
            f"need usable (extracted, not failed) images in both splits {train_split!r} and {test_split!r} "
            f"(they are in: {found}); choose --train-split/--test-split or use --holdout FRACTION"
        )
    shared = np.intersect1d(train, test)  # a run's rows are distinct images of the store
    if len(shared):
        raise ValueError(f"the train split {train_split!r} and the test split {test_split!r} share {len(shared):,} "
                         "images: scores on them would be training scores; choose disjoint --train-split/--test-split")
    return train, test


def probe_run(
    store: FeatureStore, run_id: str | None, timestep: int | None, block: str, pool: int | None = 4,
    train_split: str = "train", test_split: str = "test", holdout: float | None = None,
    c: float = 1.0, seed: int = 0, allow_incomplete: bool = False, draws: str | int = "mean",
) -> ProbeResult:
    """Linear probe of one (t, block) of a run (the only run when run_id is None). `draws`
    (pipelines.analysis): "all" fits on every noise draw of each train image as its own sample and
    tests on the mean of each test image's draws; train top-1 is over the fitted samples. Errors
    as `split_rows` and `read_pooled`."""
    run = resolve_run(store, run_id)
    train, test = split_rows(run, train_split, test_split, holdout, seed, allow_incomplete)
    what = f"logistic t={timestep} {block}"
    with bar("probe", f"{what}: reading", len(train) + len(test)) as advance:
        if scored_draws(draws) == draws:  # one read of both splits, each chunk once
            x = read_pooled(run, timestep, block, np.concatenate([train, test]), pool, advance, draws)
            (train_x, at), test_x = (x[:len(train)], np.arange(len(train))), x[len(train):]
        else:  # "all": every draw of the train images, the mean of the test images'
            train_x, at = training_samples(read_pooled(run, timestep, block, train, pool, advance, draws), draws)
            test_x = read_pooled(run, timestep, block, test, pool, advance, scored_draws(draws))
        y = run.labels
        advance(0, description=f"{what}: fitting")
        test_pred, train_pred = logistic_predictions(train_x, y[train][at], test_x, c=c)
    classes = class_names(y, run.images.class_name)
    meaning = draws_meaning(draws, [run], "fitted on every draw of a train image as a sample of its own; "
                                          "test images: the float32 mean of their draws")
    settings = single_draw_dropped({
        "run_id": run.run_id, "timestep": timestep, "block": block, "pool": pool, "train_split": train_split,
        "test_split": test_split, "holdout": holdout, "seed": seed, "c": c, "allow_incomplete": allow_incomplete,
        "draws": draws, "draws_meaning": meaning,
    }, [run])
    return ProbeResult(run.run_id, timestep, block, pool, test_x.shape[1], len(train), len(test), run_images([run]),
                       settings, float((test_pred == y[test]).mean()), float((train_pred == y[train][at]).mean()),
                       classes, **class_metrics(y[test], test_pred, classes))


def save_probe(result: ProbeResult, folder: Path) -> Path:
    """The result as `probe-logistic-<run>-<t>-<block>-<digest>.json` in `folder`."""
    label = f"logistic-{result.run_id}-{timestep_key(result.timestep)}-{result.block}"
    return write_json(result.to_dict(), results_path(folder, "probe", result.settings, label))


def resolve_run(store: FeatureStore, run_id: str | None) -> Run:
    if run_id is not None:
        return store.run(run_id)
    ids = store.run_ids()
    if not ids:
        raise ValueError(f"{store.url} holds no run yet: extract features first (featurestore extract)")
    if len(ids) != 1:
        raise ValueError(f"{store.url} holds {len(ids)} runs; pick one with --run ({', '.join(ids)})")
    return store.run(ids[0])
