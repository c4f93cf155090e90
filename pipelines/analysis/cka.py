"""Linear CKA between (run, t, block) features, streamed over the store.

Two ways to get HSIC for every pair of m views (each view an (N, d_v) feature matrix, rows aligned):

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
* minibatch (`MinibatchHsic`, Nguyen et al. 2021): the unbiased HSIC from the b x b Grams of
  minibatches, averaged; memory does not grow with D, for views too wide for Z^T Z.

CKA = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)) from either. It is undefined (None, null in JSON,
n/a in text) for a view whose HSIC with itself is not positive: a view with constant features (every
row equal, zero variance), or, for the unbiased estimator, a degenerate sample. The result names
such views in one line (`CkaResult.undefined`); when no pair of different views is defined the
analysis is refused with that line.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from featurestore.store import FeatureStore, Run, timestep_key
from pipelines.analysis import SLAB_ROWS, pooled, read_pooled, results_path, row_slabs, run_images, write_json
from pipelines.heads.logistic import resolve_run

Grid = Literal["blocks", "timesteps", "runs"]
Method = Literal["auto", "feature", "minibatch"]
MAX_FEATURES = 8192  # auto: feature space while the views' total width D keeps Z^T Z (8 D^2 bytes) small
BATCH_SIZE = 256


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
            h = unbiased_hsic_gram([np.asarray(v[batch], dtype=np.float64) for v in views])
            self.total = h if self.total is None else self.total + h
            self.n += len(batch)
            self.batches += 1

    def hsic(self) -> tuple[None, np.ndarray]:
        if self.total is None:
            raise ValueError("CKA needs at least 4 images")
        return None, self.total / self.batches


def unbiased_hsic_gram(views: Sequence[np.ndarray]) -> np.ndarray:
    """m x m unbiased HSIC (Song et al. 2012) of views of the same n rows, from their n x n Grams."""
    n = len(views[0])
    grams = np.stack([(x - x.mean(axis=0)) @ (x - x.mean(axis=0)).T for x in views])  # shifted: exact, stabler
    for g in grams:
        np.fill_diagonal(g, 0.0)
    flat = grams.reshape(len(views), -1)
    row_sums = grams.sum(axis=2)
    totals = row_sums.sum(axis=1)
    return (flat @ flat.T + np.outer(totals, totals) / ((n - 1) * (n - 2)) - 2 * row_sums @ row_sums.T / (n - 2)) / (n * (n - 3))


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
    biased, unbiased = acc.hsic()
    out = {"unbiased": cka_from_hsic(unbiased)}
    if biased is not None:
        out["biased"] = cka_from_hsic(biased)
    return out, acc.n, ~varies


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
    images: int  # rows used: the images usable in every run of the views
    pool: int | None
    rows: list[str]
    cols: list[str]
    matrices: dict[str, list[list[float | None]]]  # estimator -> len(rows) x len(cols); None: undefined
    views: dict[str, list]  # label -> [run_id, timestep, block]
    runs: dict[str, dict[str, int]]  # `run_images`: used, failed, pending per run
    settings: dict  # everything that changes the numbers (the results file's digest)
    undefined: str | None = None  # one line naming the views whose CKA is undefined, and why

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


def cka_run(
    rows: Sequence[View], cols: Sequence[View], grid: str, pool: int | None = 4, method: Method = "auto",
    max_features: int = MAX_FEATURES, batch_size: int = BATCH_SIZE, seed: int = 0, slab_rows: int = SLAB_ROWS,
    allow_incomplete: bool = False,
) -> CkaResult:
    """CKA of every row view against every column view, in one pass over the store in slabs of the
    first run's chunks. A run stored in another row order is read by image, so each slab touches
    many of its chunks: slower, same numbers. Raises ValueError when no pair of different views has
    a defined CKA (constant features), besides the errors of `aligned_rows` and `read_pooled`."""
    unique = list({v.key: v for v in [*rows, *cols]}.values())
    position = {v.key: i for i, v in enumerate(unique)}
    runs = list({v.run.run_id: v.run for v in unique}.values())
    run_rows = dict(zip((r.run_id for r in runs), aligned_rows(runs, allow_incomplete)))
    if method == "auto":
        method = "feature" if sum(view_width(v, pool) for v in unique) <= max_features else "minibatch"
    if method not in ("feature", "minibatch"):
        raise ValueError(f"--method must be auto, feature or minibatch, got {method!r}")
    first = runs[0]
    slabs = (
        [read_pooled(v.run, v.timestep, v.block, run_rows[v.run.run_id][s], pool) for v in unique]
        for s in row_slabs(first, run_rows[first.run_id], slab_rows)
    )
    matrices, images, constant = cka_matrices(slabs, method, batch_size, seed)
    r = [position[v.key] for v in rows]
    c = [position[v.key] for v in cols]
    undefined = undefined_note(unique, matrices, constant, images)
    distinct = np.array([[rv.key != cv.key for cv in cols] for rv in rows])
    if undefined and not any(np.isfinite(m[np.ix_(r, c)])[distinct].any() for m in matrices.values()):
        raise ValueError(undefined)
    settings = {"grid": grid, "method": method, "pool": pool, "rows": [list(v.key) for v in rows],
                "cols": [list(v.key) for v in cols], "allow_incomplete": allow_incomplete,
                **({"batch_size": batch_size, "seed": seed} if method == "minibatch" else {})}
    return CkaResult(
        results_path(Path(), "cka", settings, result_label(grid, method, unique), suffix="").name, grid, method, images,
        pool, [v.label for v in rows], [v.label for v in cols],
        {name: [[float(x) if np.isfinite(x) else None for x in line] for line in m[np.ix_(r, c)]]
         for name, m in matrices.items()},
        {v.label: [v.run.run_id, v.timestep, v.block] for v in [*rows, *cols]},
        run_images(runs), settings, undefined,
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
