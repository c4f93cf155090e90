"""Linear CKA between (run, t, block) features, streamed over the store.

Three ways to get HSIC for every pair of m views (each view an (N, d_v) feature matrix, rows aligned):

* feature space (`FeatureSpaceHsic`, exact, biased and unbiased): the views are concatenated into
  Z = [X_1 .. X_m] (N x D) and one pass over the rows accumulates in float64 Z^T Z, the column sums,
  and, for the unbiased estimator, the Gram diagonals a_v = |x_v,i|^2 through sum a_u a_v and
  sum a_u z. N never has to fit, only a D x D matrix does. With K = X X^T, L = Y Y^T, s = X^T 1,
  r = Y^T 1, a = diag K, b = diag L and K~, L~ the Grams with zeroed diagonals:
      tr(K H L H)   = |X^T Y - s r^T / N|_F^2                       (biased, / (N-1)^2)
      tr(K~ L~)     = |X^T Y|_F^2 - sum a b
      1^T K~ 1      = |s|^2 - sum a
      1^T K~ L~ 1   = s^T (X^T Y) r - (sum a y) . r - (sum b x) . s + sum a b
  which gives the unbiased U-statistic of Song et al. (2012) exactly, without any N x N Gram.
  The rows are shifted by the first slab's mean first: both estimators are invariant to a constant
  shift, and it keeps float64 sums from cancelling on features with large means.
* Gram space (`GramHsic`, exact, biased and unbiased): each view's N x N Gram is computed once,
  centred once, and the HSIC of all pairs is one matrix product of the flattened centred Grams;
  memory grows with m N^2, not with D, for grids of wide views over a few thousand images.
* minibatch (`MinibatchHsic`, Nguyen et al. 2021): the unbiased HSIC from the b x b Grams of
  minibatches, averaged; memory grows with neither D nor N.

CKA = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)) from any of them. It is undefined (None, null in JSON,
n/a in text) for a view whose HSIC with itself is not positive: a view with constant features (every
row equal, zero variance), or, for the unbiased estimator, a degenerate sample. The result names
such views in one line (`CkaResult.undefined`); when no pair of different views is defined the
analysis is refused with that line.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from featurestore.pooling import pooled
from featurestore.store import FeatureStore, Run, parse_draws, timestep_key
from pipelines.analysis import (SLAB_ROWS, draws_meaning, read_pooled, results_path, row_slabs, run_images,
                                single_draw_dropped, training_samples, write_json)
from pipelines.heads.logistic import resolve_run
from pipelines.progress import bar

Grid = Literal["blocks", "timesteps", "runs"]
Method = Literal["auto", "feature", "gram", "minibatch"]
MAX_FEATURES = 8192  # auto: feature space while the views' total width D keeps Z^T Z (8 D^2 bytes) small
GRAM_MEMORY = 4.0  # auto: else Gram space while its memory (`gram_bytes`) stays within this many GiB
GRAM_COLUMNS = 2048  # feature columns of a view converted to float64 at a time for its Gram
BATCH_SIZE = 256
T = TypeVar("T")


class FeatureSpaceHsic:
    """Exact biased and unbiased HSIC of every pair of views, accumulated over row slabs."""

    def __init__(self) -> None:
        self.n = 0
        self.slices: list[slice] = []
        self.shift = self.sum = self.zz = self.aa = self.az = np.zeros(0)

    def add(self, views: Sequence[np.ndarray]) -> None:
        z = np.concatenate([np.asarray(v, dtype=np.float64) for v in views], axis=1)
        if self.n == 0:
            bounds = np.cumsum([0] + [v.shape[1] for v in views])
            self.slices = [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]
            self.shift = z.mean(axis=0)
            self.sum = np.zeros(z.shape[1])
            self.zz = np.zeros((z.shape[1], z.shape[1]))
            self.aa = np.zeros((len(views), len(views)))
            self.az = np.zeros((len(views), z.shape[1]))
        z -= self.shift
        a = np.stack([np.einsum("ij,ij->i", z[:, sl], z[:, sl]) for sl in self.slices], axis=1)  # Gram diagonals
        self.n += len(z)
        self.sum += z.sum(axis=0)
        self.zz += z.T @ z
        self.aa += a.T @ a
        self.az += a.T @ z

    def hsic(self) -> tuple[np.ndarray, np.ndarray]:
        """(biased, unbiased) m x m HSIC matrices."""
        n = self.n
        if n < 4:
            raise ValueError(f"CKA needs at least 4 images, got {n}")
        centred = self.zz - np.outer(self.sum, self.sum) / n
        sum_a = [np.trace(self.zz[sl, sl]) for sl in self.slices]
        m = len(self.slices)
        biased, unbiased = np.zeros((m, m)), np.zeros((m, m))
        for u, su in enumerate(self.slices):
            for v, sv in enumerate(self.slices):
                xy, s, r = self.zz[su, sv], self.sum[su], self.sum[sv]
                biased[u, v] = np.sum(centred[su, sv] ** 2) / (n - 1) ** 2
                trace = np.sum(xy**2) - self.aa[u, v]
                ones_k, ones_l = s @ s - sum_a[u], r @ r - sum_a[v]
                ones_kl = s @ xy @ r - self.az[u, sv] @ r - self.az[v, su] @ s + self.aa[u, v]
                unbiased[u, v] = (trace + ones_k * ones_l / ((n - 1) * (n - 2)) - 2 * ones_kl / (n - 2)) / (n * (n - 3))
        return biased, unbiased


class GramHsic:
    """Exact biased and unbiased HSIC of every pair of `views` views of the same n rows, from their
    n x n linear Grams. Each view is given whole (`add`, an (n, d) array) and its Gram computed
    once, in float64, in blocks of `GRAM_COLUMNS` feature columns (after shifting by the column
    means, which changes neither estimator), then centred once:

      K_c = H K H, H = I - 11^T/n (biased), and
      U   = the U-centred K (Szekely & Rizzo 2014, Partial distance correlation, eq. 2.2):
            U_ij = K_ij - r_i/(n-2) - r_j/(n-2) + S/((n-1)(n-2)) for i != j, U_ii = 0,
            r the row sums of K without its diagonal, S = sum r.

    With U_K, U_L those of two views, <A, B> = sum_ij A_ij B_ij:
      unbiased HSIC = <U_K, U_L> / (n (n-3)), equal to the U-statistic of Song et al. (2012,
                      Feature selection via dependence maximization, eq. 5) that `FeatureSpaceHsic`
                      accumulates;
      biased HSIC   = <K_c, L_c> / (n-1)^2 = (<U_K, U_L> + delta_K . e_L) / (n-1)^2,
    with e = diag K_c and delta = the diagonal of K_c - U - A, A_ij = a_i + a_j + c for every i, j,
    a = r/(n-2), c = -S/((n-1)(n-2)) (U is the same for K and K_c, so r, S are taken from K_c):
    K_c = U_K + A_K + diag(delta_K), and <A, B> = 0 for any B whose rows and columns sum to zero,
    as K_c's and U's do; U's diagonal is zero. So <K_c, L_c> = <U_K, L_c> + delta_K . e_L and
    <U_K, L_c> = <U_K, U_L + A_L + diag(delta_L)> = <U_K, U_L>.

    So per view only U's upper triangle (n(n-1)/2 float64, U is symmetric), e and delta are kept,
    and `hsic` takes every pair's <U_K, U_L> as one (views x n(n-1)/2) @ (n(n-1)/2 x views)
    product. `constant[v]`: whether view v's rows are all equal. Memory: `gram_bytes`."""

    def __init__(self, views: int) -> None:
        self.views = views
        self.n = 0
        self.count = 0
        self.upper = self.u = self.diag = self.delta = np.zeros(0)
        self.constant = np.zeros(views, dtype=bool)

    def add(self, x: np.ndarray) -> None:
        """The next view, whole: (n, d) float32 or float64, the same n rows as the others."""
        n = len(x)
        if self.count == 0:
            if n < 4:
                raise ValueError(f"CKA needs at least 4 images, got {n}")
            self.n = n
            self.upper = np.triu(np.ones((n, n), dtype=bool), 1)
            self.u = np.empty((self.views, n * (n - 1) // 2))
            self.diag, self.delta = np.empty((self.views, n)), np.empty((self.views, n))
        if n != self.n or self.count == self.views:
            raise ValueError(f"view {self.count + 1} has {n} rows; expected {self.views} views of {self.n} rows")
        shift = x.mean(axis=0, dtype=np.float64)
        k = np.zeros((n, n))
        varies = False
        for lo in range(0, x.shape[1], GRAM_COLUMNS):
            columns = x[:, lo:lo + GRAM_COLUMNS]
            varies = varies or bool((columns != columns[0]).any())
            k += shifted_gram(columns, shift[lo:lo + GRAM_COLUMNS])
        means = k.mean(axis=0)
        k -= means[:, None]
        k -= means[None, :]
        k += means.mean()  # K_c = H K H
        e = np.diag(k).copy()
        half_r = (k.sum(axis=1) - e) / (n - 2)
        s = (k.sum() - e.sum()) / ((n - 1) * (n - 2))
        k -= half_r[:, None]
        k -= half_r[None, :]
        k += s  # U off the diagonal
        self.u[self.count] = k[self.upper]
        self.diag[self.count] = e
        self.delta[self.count] = e - 2 * half_r + s
        self.constant[self.count] = not varies
        self.count += 1

    def hsic(self) -> tuple[np.ndarray, np.ndarray]:
        """(biased, unbiased) views x views HSIC matrices."""
        if self.count < self.views:
            raise ValueError(f"{self.count} of {self.views} views given")
        n = self.n
        products = 2 * (self.u @ self.u.T)  # sum over i != j: both triangles
        return (products + self.delta @ self.diag.T) / (n - 1) ** 2, products / (n * (n - 3))


def shifted_gram(columns: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """(X - shift)(X - shift)^T in float64 for X (n, c); its float64 copy is freed on return."""
    block = columns - shift.astype(np.float64)
    return block @ block.T


def gram_bytes(views: int, n: int, widest: int) -> int:
    """Bytes `gram_cka_matrices` holds at most for `views` views of n rows, the widest with `widest`
    features read as float32: 8 views n(n-1)/2 (the kept triangles) + 16 views n (e, delta)
    + 17 n^2 (the Gram, one block's product before it is added, the triangle mask) + 4 n widest
    (the view) + 9 n GRAM_COLUMNS (one float64 block, its comparison with the first row).
    ADM-256's 37 blocks at pool 4 (4096 to 16384 features) over 2,500 images: 1.2 GiB."""
    return 8 * views * n * (n - 1) // 2 + 16 * views * n + 17 * n * n + 4 * n * widest + 9 * n * GRAM_COLUMNS


class MinibatchHsic:
    """Unbiased HSIC of every pair of views averaged over minibatches (Nguyen et al. 2021). Each
    slab's rows are shuffled (seeded) and cut into minibatches of at most `batch_size` rows; a
    minibatch is a fair sample when the store's row order within a slab carries no structure."""

    def __init__(self, batch_size: int = BATCH_SIZE, seed: int = 0) -> None:
        if batch_size < 4:
            raise ValueError("the unbiased HSIC needs minibatches of at least 4 images")
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.n = 0
        self.batches = 0
        self.total: np.ndarray | None = None

    def add(self, views: Sequence[np.ndarray]) -> None:
        rows = len(views[0])
        order = self.rng.permutation(rows)
        for batch in np.array_split(order, -(-rows // self.batch_size)):
            if len(batch) < 4:
                continue
            gram = GramHsic(len(views))
            for v in views:
                gram.add(v[batch])
            h = gram.hsic()[1]
            self.total = h if self.total is None else self.total + h
            self.n += len(batch)
            self.batches += 1

    def hsic(self) -> tuple[None, np.ndarray]:
        if self.total is None:
            raise ValueError("CKA needs at least 4 images")
        return None, self.total / self.batches


def cka_from_hsic(h: np.ndarray) -> np.ndarray:
    """m x m CKA from m x m HSIC; NaN in the rows and columns of views whose HSIC with themselves
    is not positive (CKA undefined)."""
    diag = np.diag(h)
    defined = diag > 0
    d = np.sqrt(np.where(defined, diag, 1.0))
    return np.where(defined[:, None] & defined[None, :], h / np.outer(d, d), np.nan)


def cka_matrices(slabs: Iterable[Sequence[np.ndarray]], method: Literal["feature", "minibatch"],
                 batch_size: int = BATCH_SIZE, seed: int = 0) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """CKA of every pair of views from aligned row slabs: ({estimator: m x m float64, NaN where
    undefined}, images used, (m,) bool whether each view's rows are all equal (constant features))."""
    acc = FeatureSpaceHsic() if method == "feature" else MinibatchHsic(batch_size, seed)
    first: list[np.ndarray] = []
    varies = np.zeros(0, dtype=bool)
    for views in slabs:
        if not first:
            first, varies = [v[0] for v in views], np.zeros(len(views), dtype=bool)
        varies |= [bool((v != f).any()) for v, f in zip(views, first)]
        acc.add(views)
    return estimator_matrices(*acc.hsic()), acc.n, ~varies


def gram_cka_matrices(views: Iterable[np.ndarray], count: int) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """`cka_matrices` of the Gram-space method (`GramHsic`) from `count` whole views, one at a time:
    each an (n, d_v) array of the same n rows, dropped before the next is taken (so a generator
    that reads them holds one view at a time)."""
    acc = GramHsic(count)
    for x in views:
        acc.add(x)
        del x  # before the next view is made
    return estimator_matrices(*acc.hsic()), acc.n, acc.constant


def estimator_matrices(biased: np.ndarray | None, unbiased: np.ndarray) -> dict[str, np.ndarray]:
    """{"unbiased": CKA, "biased": CKA (when given)} from the HSIC matrices."""
    out = {"unbiased": cka_from_hsic(unbiased)}
    if biased is not None:
        out["biased"] = cka_from_hsic(biased)
    return out


def linear_cka(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Biased and unbiased linear CKA of two in-memory feature matrices (NaN where undefined)."""
    matrices, _, _ = cka_matrices([[x, y]], "feature")
    return {name: float(m[0, 1]) for name, m in matrices.items()}


# -- the store --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    run: Run
    timestep: int | None
    block: str
    label: str

    @property
    def key(self) -> tuple[str, int | None, str]:
        return self.run.run_id, self.timestep, self.block


@dataclass
class CkaResult:
    name: str  # file stem of the saved result, e.g. cka-blocks-feature-<run>-t100-<digest>
    grid: str
    method: str
    images: int  # rows used: the images usable in every run of the views (times K with --draws all)
    pool: int | None
    rows: list[str]
    cols: list[str]
    matrices: dict[str, list[list[float | None]]]  # estimator -> len(rows) x len(cols); None: undefined
    views: dict[str, list]  # label -> [run_id, timestep, block]
    runs: dict[str, dict[str, int]]  # `run_images`: used, failed, pending per run
    settings: dict  # everything that changes the numbers (the results file's digest)
    undefined: str | None = None  # one line naming the views whose CKA is undefined, and why
    draws: str | None = None  # what --draws did (`draws_meaning`; None: runs of one draw)

    def to_dict(self) -> dict:
        return asdict(self)


def grid_views(
    store: FeatureStore, grid: Grid, run_id: str | None = None, timestep: int | None = None,
    block: str | None = None, blocks: Sequence[str] | None = None, timesteps: Sequence[int | None] | None = None,
    other_run_id: str | None = None, other_timestep: int | None = None, other_blocks: Sequence[str] | None = None,
) -> tuple[list[View], list[View]]:
    """Row and column views of a grid: `blocks` (block x block at `timestep`), `timesteps` (t x t at
    `block`), or `runs` (blocks of one run vs blocks of another over the same images)."""
    run = resolve_run(store, run_id)
    if grid in ("blocks", "runs") and timestep is None and None not in run.timesteps:
        raise ValueError(f"--grid {grid} needs --timestep (run {run.run_id} has {run.timesteps})")
    if grid == "blocks":
        views = [View(run, timestep, b, b) for b in blocks or run.blocks]
        cols = views
    elif grid == "timesteps":
        if block is None:
            raise ValueError("--grid timesteps needs --block")
        views = [View(run, t, block, f"t={t}") for t in (run.timesteps if timesteps is None else timesteps)]
        cols = views
    elif grid == "runs":
        if other_run_id is None:
            raise ValueError("--grid runs needs --other-run")
        other = store.run(other_run_id)
        # an expert run (stored under timestep None) needs no --other-timestep
        t_other = other_timestep if other_timestep is not None else None if other.timesteps == [None] else timestep
        views = [View(run, timestep, b, f"{run.run_id[:8]}:{b}") for b in blocks or run.blocks]
        cols = [View(other, t_other, b, f"{other.run_id[:8]}:{b}") for b in other_blocks or other.blocks]
    else:
        raise ValueError(f"--grid must be blocks, timesteps or runs, got {grid!r}")
    for v in {v.key: v for v in views + cols}.values():
        v.run.array(v.timestep, v.block)  # a missing block or timestep fails here, before any reading
    return views, cols


def aligned_rows(runs: Sequence[Run], allow_incomplete: bool = False) -> list[np.ndarray]:
    """Per run, the run rows of the images usable in every run (extracted, not failed), in the
    first run's row order. Runs must cover the same images (rows of the store's images table). An
    incomplete run raises IncompleteRunError unless `allow_incomplete`."""
    first = runs[0]
    common = first.rows[first.usable_rows(allow_incomplete)]
    for other in runs[1:]:
        if not np.array_equal(np.sort(first.rows), np.sort(other.rows)):
            raise ValueError(f"runs {first.run_id} and {other.run_id} cover different images "
                             f"({np.setdiff1d(first.rows, other.rows).size} only in the first, "
                             f"{np.setdiff1d(other.rows, first.rows).size} only in the second)")
        common = np.intersect1d(common, other.rows[other.usable_rows(allow_incomplete)])
    table_rows = first.rows[np.isin(first.rows, common)]
    out = []
    for run in runs:
        run_row_of = np.empty(run.rows.max() + 1, dtype=np.int64)
        run_row_of[run.rows] = np.arange(len(run))
        out.append(run_row_of[table_rows])
    return out


def view_width(view: View, pool: int | None) -> int:
    return pooled(np.zeros((1, *view.run.blocks[view.block]), np.float32), pool).shape[1]


def advancing(items: Iterable[T], advance: Callable[[], None]) -> Iterator[T]:
    """`items`, calling `advance()` after the consumer is done with each (and dropping it before
    the next is made)."""
    for item in items:
        yield item
        del item
        advance()


def choose_method(method: str, widths: Sequence[int], images: int, max_features: int = MAX_FEATURES,
                  gram_memory: float = GRAM_MEMORY) -> str:
    """The method for views of these feature `widths` over `images` rows. auto: feature while the
    total width is at most `max_features`, else gram while `gram_bytes` is at most `gram_memory`
    GiB, else minibatch. An explicit gram over `gram_memory` is refused (it could exhaust memory)."""
    need = gram_bytes(len(widths), images, max(widths, default=0))
    budget = gram_memory * 2**30
    if method == "auto":
        return "feature" if sum(widths) <= max_features else "gram" if need <= budget else "minibatch"
    if method not in ("feature", "gram", "minibatch"):
        raise ValueError(f"--method must be auto, feature, gram or minibatch, got {method!r}")
    if method == "gram" and need > budget:
        raise ValueError(f"--method gram needs {need / 2**30:.1f} GiB for {len(widths)} views of {images} images, "
                         f"over --gram-memory {gram_memory:g}: raise it, or use --method feature or minibatch")
    return method


def cka_run(
    rows: Sequence[View], cols: Sequence[View], grid: str, pool: int | None = 4, method: Method = "auto",
    max_features: int = MAX_FEATURES, batch_size: int = BATCH_SIZE, seed: int = 0, slab_rows: int = SLAB_ROWS,
    allow_incomplete: bool = False, gram_memory: float = GRAM_MEMORY, draws: str | int = "mean",
) -> CkaResult:
    """CKA of every row view against every column view (method as `choose_method` picks it). feature
    and minibatch make one pass over the store in slabs of the first run's chunks; gram reads one
    view (run, t, block) whole at a time, each chunk once. A run stored in another row order is
    read by image, so each slab touches many of its chunks: slower, same numbers. Progress: a bar
    per slab or per view on stderr. `draws` (pipelines.analysis): "all" makes every (image, noise
    draw) a row, draw d of one view paired with draw d of every other, so all runs must hold the
    same number of draws. Raises ValueError when no pair of different views has a defined CKA
    (constant features) or for "all" over runs of different draw counts, besides the errors of
    `choose_method`, `aligned_rows` and `read_pooled`."""
    unique = list({v.key: v for v in [*rows, *cols]}.values())
    position = {v.key: i for i, v in enumerate(unique)}
    runs = list({v.run.run_id: v.run for v in unique}.values())
    run_rows = dict(zip((r.run_id for r in runs), aligned_rows(runs, allow_incomplete)))
    first = runs[0]
    draws = parse_draws(draws)
    counts = {r.run_id: r.noise_draws for r in runs}
    if draws == "all" and len(set(counts.values())) > 1:
        raise ValueError(f"--draws all pairs draw d of one view with draw d of the other, but the runs hold "
                         f"{', '.join(f'{k} draws ({run_id})' for run_id, k in counts.items())}: use --draws mean or k")
    per_image = first.noise_draws if draws == "all" else 1
    method = choose_method(method, [view_width(v, pool) for v in unique], len(run_rows[first.run_id]) * per_image,
                           max_features, gram_memory)

    def read(v: View, at: slice = slice(None)) -> np.ndarray:
        x = read_pooled(v.run, v.timestep, v.block, run_rows[v.run.run_id][at], pool, draws=draws)
        return training_samples(x, draws)[0]  # "all": (n*K, D), the draws of an image in consecutive rows

    if method == "gram":
        with bar("cka", f"{grid} grid, gram, views", len(unique)) as advance:
            matrices, images, constant = gram_cka_matrices(advancing((read(v) for v in unique), advance), len(unique))
    else:
        slabs = list(row_slabs(first, run_rows[first.run_id], slab_rows))
        with bar("cka", f"{grid} grid, {method}, slabs", len(slabs)) as advance:
            matrices, images, constant = cka_matrices(
                advancing(([read(v, s) for v in unique] for s in slabs), advance), method, batch_size, seed)
    r = [position[v.key] for v in rows]
    c = [position[v.key] for v in cols]
    undefined = undefined_note(unique, matrices, constant, images)
    distinct = np.array([[rv.key != cv.key for cv in cols] for rv in rows])
    if undefined and not any(np.isfinite(m[np.ix_(r, c)])[distinct].any() for m in matrices.values()):
        raise ValueError(undefined)
    settings = single_draw_dropped({"grid": grid, "method": method, "pool": pool, "rows": [list(v.key) for v in rows],
                                    "cols": [list(v.key) for v in cols], "allow_incomplete": allow_incomplete,
                                    "draws": draws,
                                    **({"batch_size": batch_size, "seed": seed} if method == "minibatch" else {})},
                                   runs)
    return CkaResult(
        results_path(Path(), "cka", settings, result_label(grid, method, unique), suffix="").name, grid, method, images,
        pool, [v.label for v in rows], [v.label for v in cols],
        {name: [[float(x) if np.isfinite(x) else None for x in line] for line in m[np.ix_(r, c)]]
         for name, m in matrices.items()},
        {v.label: [v.run.run_id, v.timestep, v.block] for v in [*rows, *cols]},
        run_images(runs), settings, undefined, draws_meaning(
            draws, runs, "every (image, draw) is a row, draw d of one view paired with draw d of the other"),
    )


def undefined_note(views: Sequence[View], matrices: dict[str, np.ndarray], constant: np.ndarray,
                   images: int) -> str | None:
    """One line naming every view whose CKA is undefined (NaN on its diagonal) and why; None if none."""
    named = []
    for i, v in enumerate(views):
        bad = [name for name, m in matrices.items() if not np.isfinite(m[i, i])]
        if bad:
            why = (f"constant features (every one of the {images} images has the same values)" if constant[i]
                   else f"its {' and '.join(bad)} HSIC with itself is not positive")
            named.append(f"run {v.run.run_id} {timestep_key(v.timestep)} block {v.block}: {why}")
    return "linear CKA undefined (null) for " + "; ".join(named) if named else None


def result_label(grid: str, method: str, views: Sequence[View]) -> str:
    """<grid>-<method>-<run ids>[-t<T> when one timestep][-<block> when one block]."""
    parts = [grid, method, *dict.fromkeys(v.run.run_id[:8] for v in views)]
    timesteps = {v.timestep for v in views}
    blocks = {v.block for v in views}
    parts += [timestep_key(t) for t in timesteps if len(timesteps) == 1]
    parts += [b for b in blocks if len(blocks) == 1]
    return "-".join(parts)


def plot_cka(result: CkaResult, path: Path) -> Path:
    """A heatmap per estimator, values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(result.matrices)
    size = max(3.0, 0.6 * len(result.cols) + 2)
    fig, axes = plt.subplots(1, len(names), figsize=(size * len(names), size), squeeze=False)
    for ax, name in zip(axes[0], names):
        m = np.array(result.matrices[name], dtype=float)  # None (undefined) -> NaN: an empty cell marked n/a
        image = ax.imshow(m, vmin=0, vmax=1, cmap="magma")
        ax.set_xticks(range(len(result.cols)), result.cols, rotation=45, ha="right")
        ax.set_yticks(range(len(result.rows)), result.rows)
        for (i, j), value in np.ndenumerate(m):
            ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if np.isnan(value) or value < 0.6 else "black")
        ax.set_title(f"linear CKA ({name}, {result.method}, N={result.images})")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_cka(result: CkaResult, out: Path) -> list[Path]:
    """The result as JSON and its heatmap as PNG in `out`, named `result.name` (undefined values null)."""
    return [write_json(result.to_dict(), out / f"{result.name}.json"), plot_cka(result, out / f"{result.name}.png")]
