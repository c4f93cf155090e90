"""Weighted kNN classification from the cache (the DINO protocol), with exact FAISS search.

Features are L2-normalised, neighbours are ranked by cosine similarity s, and each of the k nearest
train images votes exp(s / T) for its class. The train set is searched slab by slab and the
running top-k merged, so it never has to fit in memory; the queries (the test set) do.

Top-n (VOTE_RULE): a query is a hit when its class got a positive vote weight (at least one of the
k neighbours is of its class) and fewer than n classes rank before it; classes of equal weight
rank by ascending class index. A class without a vote is never a hit, so top-5 at k=1 is top-1
(DINO's fix: ranking every class would credit zero-vote classes through ties at 0).

Layers: `search_topk` / `merge_topk` / `knn_accuracy` on arrays, `knn_run` reads one (t, block) of
a run from the store.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore.store import FeatureStore, timestep_key
from pipelines.analysis import (SLAB_ROWS, draws_meaning, read_pooled, results_path, row_slabs, run_images,
                                scored_draws, single_draw_dropped, training_samples, write_json)
from pipelines.heads.logistic import ClassifiedMap, resolve_run, split_rows
from pipelines.progress import bar

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07
VOTE_RULE = ("each of the k nearest train images votes exp(cosine / T) for its class; top-n: the true class has a "
             "positive vote and fewer than n classes rank before it (equal votes: lower class index first)")


@dataclass
class KnnResult(ClassifiedMap):
    temperature: float
    top1: dict[int, float]  # k -> test accuracy
    top5: dict[int, float]
    vote: str = VOTE_RULE  # the variant of top1/top5


def l2_normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@functools.cache
def _gpu_resources():
    import faiss

    return faiss.StandardGpuResources()


def check_faiss_device(device: str) -> None:
    """cpu, or cuda when faiss has GPU support: asking for cuda without it is an error, never a
    silent CPU run."""
    import faiss

    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and (not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0):
        raise ValueError("--device cuda needs faiss with GPU support (pip install faiss-gpu) and a visible GPU; "
                         "this faiss has none: use --device cpu")


def flat_ip_index(dim: int, device: str):
    """An exact inner-product index on the CPU or on the first GPU."""
    import faiss

    check_faiss_device(device)
    return faiss.IndexFlatIP(dim) if device == "cpu" else faiss.GpuIndexFlatIP(_gpu_resources(), dim)


def search_topk(database: np.ndarray, queries: np.ndarray, k: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The min(k, len(database)) most similar database rows of each query, best first: (sims, indices)."""
    index = flat_ip_index(database.shape[1], device)
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(database)))


def merge_topk(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of two (sims, indices) lists per query, best first."""
    sims = np.concatenate([a[0], b[0]], axis=1)
    indices = np.concatenate([a[1], b[1]], axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(indices, order, axis=1)


def streamed_topk(slabs: Iterable[np.ndarray], queries: np.ndarray, k: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Top-k over consecutive database slabs (normalised rows); indices count rows across all slabs,
    so the result equals one search over their concatenation."""
    best = (np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64))
    offset = 0
    for slab in slabs:
        sims, indices = search_topk(slab, queries, k, device)
        best = merge_topk(best, (sims, indices + offset), k)
        offset += len(slab)
    return best


def class_scores(sims: np.ndarray, neighbour_classes: np.ndarray, n_classes: int, temperature: float) -> np.ndarray:
    """(queries, classes): the sum of exp(s / T) over the neighbours of each class."""
    scores = np.zeros((len(sims), n_classes))
    rows = np.broadcast_to(np.arange(len(sims))[:, None], sims.shape)
    np.add.at(scores, (rows, neighbour_classes), np.exp(sims.astype(np.float64) / temperature))
    return scores


def in_top(scores: np.ndarray, classes: np.ndarray, n: int) -> np.ndarray:
    """(queries,) bool: whether each query's class (int index into the columns of the (queries,
    classes) vote weights `scores`) has a positive weight and ranks among the n best (VOTE_RULE:
    ties go to the lower class index). A class without a vote is never in the top n."""
    own = np.take_along_axis(scores, classes[:, None], axis=1)
    lower_index = np.arange(scores.shape[1])[None, :] < classes[:, None]
    rank = (scores > own).sum(axis=1) + ((scores == own) & lower_index).sum(axis=1)
    return (rank < n) & (own[:, 0] > 0)


def check_temperature(temperature: float) -> None:
    """The vote weight exp(s / T) needs T > 0: T = 0 makes every vote inf (ties decide), T < 0
    inverts the ranking. Raises ValueError otherwise."""
    if not temperature > 0:
        raise ValueError(f"--temperature must be positive (votes weigh exp(cosine / T)), got {temperature}")


def knn_accuracy(
    sims: np.ndarray, indices: np.ndarray, train_labels: np.ndarray, test_labels: np.ndarray,
    ks: Sequence[int], temperature: float = TEMPERATURE,
) -> dict[int, tuple[float, float]]:
    """Top-1 and top-5 accuracy (VOTE_RULE) for each k from the neighbour lists of the largest k
    (best first): {k: (top1, top5)}. A test label absent from the train set is never right."""
    check_temperature(temperature)
    classes, train_classes = np.unique(train_labels, return_inverse=True)
    known = np.isin(test_labels, classes)
    test_classes = np.where(known, np.searchsorted(classes, test_labels).clip(max=len(classes) - 1), 0)
    out = {}
    for k in ks:
        scores = class_scores(sims[:, :k], train_classes[indices[:, :k]], len(classes), temperature)
        out[k] = tuple(float((in_top(scores, test_classes, n) & known).mean()) for n in (1, 5))
    return out


def knn_run(
    store: FeatureStore, run_id: str | None, timestep: int | None, block: str, ks: Sequence[int] = KS,
    pool: int | None = 4, train_split: str = "train", test_split: str = "test", holdout: float | None = None,
    seed: int = 0, temperature: float = TEMPERATURE, device: str = "cpu", slab_rows: int = SLAB_ROWS,
    allow_incomplete: bool = False, draws: str | int = "mean",
) -> KnnResult:
    """Weighted kNN of one (t, block) of a run: the test features are read at once, the train
    features streamed in chunk-aligned slabs of about `slab_rows` rows (a bar counts the images
    read). `draws` (pipelines.analysis): "all" puts every noise draw of a train image in the bank
    as its own neighbour (K x the train images) and queries with the mean of each test image's
    draws. Errors (ValueError) as `split_rows` and `read_pooled`, and for k outside 1..bank size."""
    check_faiss_device(device)
    check_temperature(temperature)
    run = resolve_run(store, run_id)
    train, test = split_rows(run, train_split, test_split, holdout, seed, allow_incomplete)
    per_image = run.noise_draws if draws == "all" else 1  # bank entries per train image
    if not ks or min(ks) < 1 or max(ks) > len(train) * per_image:
        raise ValueError(f"k must be between 1 and the {len(train) * per_image} train "
                         f"{'samples' if per_image > 1 else 'images'}, got {list(ks)}")
    labels = run.labels
    with bar("knn", f"t={timestep} {block}: queries", len(test) + len(train)) as advance:
        queries = l2_normalized(read_pooled(run, timestep, block, test, pool, advance, scored_draws(draws)))
        advance(0, description=f"t={timestep} {block}: train slabs")
        slabs = (l2_normalized(training_samples(read_pooled(run, timestep, block, train[s], pool, advance, draws),
                                                draws)[0])
                 for s in row_slabs(run, train, slab_rows))
        sims, indices = streamed_topk(slabs, queries, max(ks), device)
    accuracy = knn_accuracy(sims, indices, np.repeat(labels[train], per_image), labels[test], ks, temperature)
    meaning = draws_meaning(draws, [run], "every draw of a train image is a neighbour of its own; "
                                          "queries: the float32 mean of their draws")
    settings = single_draw_dropped({
        "run_id": run.run_id, "timestep": timestep, "block": block, "k": list(ks), "pool": pool,
        "temperature": temperature, "train_split": train_split, "test_split": test_split, "holdout": holdout,
        "seed": seed, "device": device, "allow_incomplete": allow_incomplete, "draws": draws, "draws_meaning": meaning,
    }, [run])
    return KnnResult(
        run.run_id, timestep, block, pool, queries.shape[1], len(train), len(test), run_images([run]), settings,
        temperature, top1={k: acc[0] for k, acc in accuracy.items()}, top5={k: acc[1] for k, acc in accuracy.items()},
    )


def save_knn(result: KnnResult, folder: Path) -> Path:
    """The result as `knn-<run>-<t>-<block>-<digest>.json` in `folder`."""
    label = f"{result.run_id}-{timestep_key(result.timestep)}-{result.block}"
    return write_json(result.to_dict(), results_path(folder, "knn", result.settings, label))
