"""Stage-2 search and CKA against the usual libraries, side by side in one run (times and ratios).

kNN: our FAISS IndexFlatIP search vs scikit-learn NearestNeighbors(metric="cosine",
algorithm="brute") on the same features, both scored with the same weighted vote; the top-1 must
agree. CKA: our streamed feature-space CKA vs the N x N Gram formula (our minibatch method with a
single batch) and vs `ckatorch` when it is importable (this bench installs nothing).

Usage:
    python bench/stage2_knn_cka.py                      # random: 20,000 x 1024 train, 5,000 queries
    python bench/stage2_knn_cka.py demo-output/store.zarr --timestep 100 --block block2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from featurestore.store import FeatureStore
from pipelines.analysis import read_pooled
from pipelines.analysis.cka import cka_matrices, linear_cka
from pipelines.analysis.knn import knn_accuracy, l2_normalized, search_topk
from pipelines.heads.logistic import resolve_run, split_rows

KS = (20, 200)


def timed(fn: Callable):
    tic = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - tic


def random_data(n_train: int, n_test: int, dim: int, seed: int = 0):
    """Ten Gaussian classes in `dim` dimensions; Y for CKA is a noisy linear map of X."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dim)).astype(np.float32)
    train_y, test_y = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)
    train_x = centres[train_y] + 10 * rng.normal(size=(n_train, dim)).astype(np.float32)
    test_x = centres[test_y] + 10 * rng.normal(size=(n_test, dim)).astype(np.float32)
    other = train_x @ rng.normal(size=(dim, dim // 2)).astype(np.float32) + 20 * rng.normal(size=(n_train, dim // 2)).astype(np.float32)
    return train_x, train_y, test_x, test_y, other


def store_data(path: str, run_id: str | None, timestep: int, block: str, other_block: str | None, pool: int | None):
    """A store's (t, block) split by its split column; CKA's second view is another block at t."""
    run = resolve_run(FeatureStore.open(path), run_id)
    train, test = split_rows(run, "train", "test", None, 0)
    other_block = other_block or next(b for b in run.blocks if b != block)
    labels = run.labels
    return (read_pooled(run, timestep, block, train, pool), labels[train], read_pooled(run, timestep, block, test, pool),
            labels[test], read_pooled(run, timestep, other_block, train, pool))


def bench_knn(train_x, train_y, test_x, test_y) -> None:
    from sklearn.neighbors import NearestNeighbors

    k = min(max(KS), len(train_x))
    ks = [v for v in KS if v <= k]
    (sims, indices), faiss_s = timed(lambda: search_topk(l2_normalized(train_x), l2_normalized(test_x), k))
    model = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute")
    (dist, sk_indices), sklearn_s = timed(lambda: model.fit(train_x).kneighbors(test_x))
    ours = knn_accuracy(sims, indices, train_y, test_y, ks)
    theirs = knn_accuracy(1 - dist.astype(np.float32), sk_indices, train_y, test_y, ks)
    same = (np.sort(indices, axis=1) == np.sort(sk_indices, axis=1)).all(axis=1).mean()
    print(f"kNN: {len(train_x):,} train x {train_x.shape[1]} features, {len(test_x):,} queries, k={k}")
    print(f"  faiss IndexFlatIP     {faiss_s:7.2f} s   top-1 " + ", ".join(f"k={v}: {ours[v][0]:.4f}" for v in ks))
    print(f"  sklearn brute cosine  {sklearn_s:7.2f} s   top-1 " + ", ".join(f"k={v}: {theirs[v][0]:.4f}" for v in ks))
    print(f"  sklearn / faiss: {sklearn_s / faiss_s:.1f}x; queries with the same neighbour set: {same:.2%}")
    for v in ks:
        assert ours[v][0] == theirs[v][0], f"top-1 differs at k={v}: faiss {ours[v][0]} vs sklearn {theirs[v][0]}"


def bench_cka(x: np.ndarray, y: np.ndarray, gram_rows: int) -> None:
    print(f"CKA: {len(x):,} rows, {x.shape[1]} vs {y.shape[1]} features")
    full, feature_s = timed(lambda: linear_cka(x, y))
    print(f"  ours, feature space (streamed, fp64)  {feature_s:7.2f} s   biased {full['biased']:.6f}  unbiased {full['unbiased']:.6f}")
    xs, ys = x[:gram_rows], y[:gram_rows]
    sub, sub_s = timed(lambda: linear_cka(xs, ys))
    (gram, _), gram_s = timed(lambda: cka_matrices([[xs, ys]], "minibatch", batch_size=len(xs)))
    print(f"  on the first {len(xs):,} rows: ours, feature space {sub_s:.2f} s; ours, N x N Gram formula "
          f"{gram_s:.2f} s ({gram_s / sub_s:.1f}x); unbiased {sub['unbiased']:.8f} vs {gram['unbiased'][0, 1]:.8f}")
    assert abs(sub["unbiased"] - gram["unbiased"][0, 1]) < 1e-8
    try:
        import torch
        from ckatorch.core import cka_base
    except ImportError:
        print("  ckatorch not installed: pip install ckatorch==1.0.3 into a throwaway venv")
        return
    theirs, ckatorch_s = timed(lambda: float(cka_base(torch.from_numpy(xs), torch.from_numpy(ys), unbiased=True)))
    print(f"  ckatorch cka_base (fp64, N x N)   {ckatorch_s:7.2f} s   unbiased {theirs:.8f}; "
          f"ckatorch / ours: {ckatorch_s / sub_s:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", help="A feature store (default: random features).")
    parser.add_argument("--run")
    parser.add_argument("--timestep", type=int, default=100)
    parser.add_argument("--block", default="block2")
    parser.add_argument("--other-block", help="CKA's second view [default: the run's first other block].")
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--gram-rows", type=int, default=5000, help="Rows for the N x N Gram comparisons.")
    args = parser.parse_args()
    if args.store:
        data, load_s = timed(lambda: store_data(args.store, args.run, args.timestep, args.block, args.other_block, args.pool))
        print(f"read and pooled {args.store} t={args.timestep} in {load_s:.1f} s")
    else:
        data = random_data(20000, 5000, 1024)
    train_x, train_y, test_x, test_y, other = data
    bench_knn(train_x, train_y, test_x, test_y)
    bench_cka(train_x, other, args.gram_rows)


if __name__ == "__main__":
    main()
