"""Zero-shot sketch-based image retrieval (ZS-SBIR) from the cache: exact cosine search, streamed
over the gallery, and retrieval metrics with every variant named (ZS-SBIR codebases disagree on them).

Layers: metrics on ranked relevance (`HitRanks`, `average_precision`, `precision_at`, `averaged`);
exact search on arrays (`stream_topk`, `stream_ranks`); `retrieve_run` reads queries and gallery
from the store and `save_grid` draws a few ranked lists.

Ranking. Gallery items are ranked by descending cosine similarity as FAISS `IndexFlatIP` computes
it (float32, on L2-normalised rows); equal similarities are ordered by ascending gallery position,
the order of a stable argsort of -similarity. Both are packed into one uint64 key per (query, item)
(`ranking_keys`), so "ranked before" is "smaller key" and merging lists is sorting keys.

Same-domain retrieval (queries and gallery the same images, e.g. digit against digit): each query's
own image is left out of its gallery, the standard protocol (otherwise it is its own first hit),
so R and the gallery size are one less for every query; the count is reported (`self_left_out`).
A query set only partly inside the gallery is refused (its galleries would differ in size).

Metrics (R: relevant items of a query in the whole gallery, K: the cutoff, P(r): precision at rank r):
- AP `noninterp`: the sum of P(r) over relevant ranks r <= K, divided by min(R, K) (normalisation
  `min`; R for @all, so a perfect ranking scores 1) or by the relevant items retrieved within K
  (`retrieved`; 0 when none is). `voc11`: PASCAL VOC 11-point interpolated, the mean over recall
  levels 0, 0.1, ..., 1 of the best precision at any rank <= K whose recall (hits / R) reaches the
  level (0 when none does). `voc-allpoint`: PASCAL VOC all-point interpolated (VOC 2010 on), the
  area under the whole precision envelope: with recall = hits / N (N the normalisation), sentinels
  (recall 0, precision 0) before the first rank and (recall 1, precision 0) after rank K, and the
  precision made non-increasing from the right (P~(r) = max of P at ranks >= r, within K), the sum
  of (recall step) x P~ over the ranks where recall changes. Recall steps by 1 / N at each relevant
  rank, so this is `noninterp` with P~ in place of P: sum of P~(r) over relevant ranks r <= K, / N.
  It is the mAP of SAKE (qliu24/SAKE, src/test_cse_resnet_tuberlin_zeroshot.py, `eval_AP_inner` +
  `VOCap`), ZSE-SBIR (buptLinfy/ZSE-SBIR, utils/ap.py, `voc_eval` + `voc_ap`) and Vermouth
  (develop-productivity/Vermouth, SBIR/utils_sbir/evaluate.py, `eval_AP_inner` + `VOCap`): all three
  truncate the ranking at K and divide recall by min(K, R) (normalisation `min`), and give a query
  with R = 0 NaN, which their nanmean skips; here such queries are refused (`HitRanks`). They order
  equal scores by an unstable argsort, here by gallery position.
- P@K: relevant items in the top K divided by K (denominator `k`) or by min(K, R) (`min`);
  `min-cutoff`: relevant items in the top min(K, R) divided by min(K, R), so R-precision when R < K
  (ZSE-SBIR, utils/ap.py, `precision_eval`). SAKE (`eval_precision`, same file as its AP) and
  Vermouth (`eval_precision`) divide by K (`k`); they cap K at the gallery size G, which changes
  nothing unless K > G.
- averaging: over `queries`, or over `classes` (the mean over classes of the mean over each class's
  queries).

mAP@all without storing the full ranking. AP@all needs the rank of every relevant item. With the
gallery streamed in slabs, `stream_ranks` makes two passes: the first keeps, per query, the keys of
its relevant items (R per query, never the Q x G ranking); the second counts, per relevant item,
the non-relevant items ranked before it. The j-th relevant item then has rank j + that count:
exact, including ties, in O(sum of R) memory. Each pass searches every slab piece with k = its
length, so FAISS computes the same similarities as the top-K search (checked in the tests). The
price is FAISS sorting whole pieces: 1,000 queries x 20,000 items took 9 s for @all against 1.4 s
for a top-200 pass (2 shared CPU cores), so mAP@all is computed only when --map-at asks for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featurestore.store import FeatureStore, Run, timestep_key
from pipelines.analysis import (SLAB_ROWS, draws_meaning, read_pooled, results_path, row_slabs, run_images,
                                scored_draws, single_draw_dropped, training_samples, write_json)
from pipelines.analysis.knn import flat_ip_index, l2_normalized
from pipelines.analysis.projection import ProjectionConfig, train_projection
from pipelines.analysis.splits import load_split
from pipelines.heads.logistic import resolve_run
from pipelines.progress import bar

AP_KINDS = ("noninterp", "voc11", "voc-allpoint")
NORMALISATIONS = ("min", "retrieved")
DENOMINATORS = ("k", "min", "min-cutoff")
AVERAGES = ("queries", "classes")
VARIANTS = {
    "ap": {
        "noninterp": "non-interpolated: sum of precision at each relevant rank within the cutoff / normalisation",
        "voc11": "VOC 11-point interpolated: mean over recall 0, 0.1, ..., 1 of the best precision at that "
                 "recall or above within the cutoff (recall = hits / R); no normalisation",
        "voc-allpoint": "VOC all-point interpolated: area under the precision envelope (precision made "
                        "non-increasing from the right) within the cutoff, recall = hits / normalisation",
    },
    "normalisation": {"min": "min(R, K); R for @all", "retrieved": "relevant items retrieved within K (none: AP 0)"},
    "denominator": {"k": "K", "min": "min(K, R)",
                    "min-cutoff": "min(K, R), counting relevant items in the top min(K, R) only"},
    "average": {"queries": "mean over queries", "classes": "mean over classes of the mean over their queries"},
}
# GPU FAISS selects at most 2048 neighbours per search, and a piece searched in full (k = its rows)
# must stay under that. The cap on queries x piece rows bounds the per-piece arrays (similarities,
# ids, keys and their sorted copies: ~35 bytes an entry, ~140 MiB at the cap, measured).
GPU_MAX_K = 2048
PIECE_ENTRIES = 1 << 22
_SIGN = np.uint32(0x80000000)
_LOW32 = np.uint64(0xFFFFFFFF)


# -- metrics on ranked relevance ----------------------------------------------------------------
@dataclass(frozen=True)
class HitRanks:
    """Where each query's relevant gallery items are ranked.

    ranks: (Q, H) float64, the 1-based ranks of relevant items, ascending, padded with inf;
    n_relevant: (Q,) R, the relevant items in the whole gallery; depth: ranked positions known
    (K for top-K lists); gallery_size: G (a ranking of depth G is complete).
    """

    ranks: np.ndarray
    n_relevant: np.ndarray
    depth: int
    gallery_size: int

    def __post_init__(self) -> None:
        found = np.isfinite(self.ranks).sum(axis=1)
        if (self.n_relevant < 1).any():
            raise ValueError(f"queries {_first(np.flatnonzero(self.n_relevant < 1))} have no relevant gallery item; "
                             "their AP is undefined: leave them out (e.g. with a split)")
        if (found > self.n_relevant).any():
            raise ValueError("more relevant items ranked than the query has (n_relevant too small)")

    @classmethod
    def from_relevance(cls, relevance: np.ndarray, n_relevant: np.ndarray, gallery_size: int | None = None) -> HitRanks:
        """From ranked lists: relevance[q, i] says whether the item at rank i + 1 of query q is
        relevant. gallery_size defaults to the list length (the lists rank the whole gallery)."""
        relevance = np.asarray(relevance, dtype=bool)
        depth = relevance.shape[1]
        ranks = np.sort(np.where(relevance, np.arange(1, depth + 1, dtype=np.float64), np.inf), axis=1)
        width = int(relevance.sum(axis=1).max(initial=0))
        return cls(ranks[:, :width], np.asarray(n_relevant, dtype=np.int64), depth,
                   depth if gallery_size is None else gallery_size)

    def within(self, cutoff: int | None) -> np.ndarray:
        """(Q, H) whether each relevant item is ranked within the cutoff (None: the whole gallery),
        refusing cutoffs the ranked lists do not reach."""
        if cutoff is None:
            incomplete = np.flatnonzero(np.isfinite(self.ranks).sum(axis=1) < self.n_relevant)
            if len(incomplete):
                raise ValueError(f"@all needs the rank of every relevant item, but the ranked lists (depth "
                                 f"{self.depth} of {self.gallery_size}) miss some for queries {_first(incomplete)}")
            return np.isfinite(self.ranks)
        if cutoff < 1:
            raise ValueError(f"a cutoff is a positive integer, got {cutoff}")
        if cutoff > self.depth and self.depth < self.gallery_size:
            raise ValueError(f"cutoff {cutoff} is deeper than the ranked lists ({self.depth} of {self.gallery_size})")
        return self.ranks <= cutoff


def average_precision(hits: HitRanks, cutoff: int | None = None, ap: str = "noninterp",
                      normalisation: str = "min") -> np.ndarray:
    """Per-query AP within the cutoff (None: AP@all); see the module docstring for the variants."""
    _check(ap, AP_KINDS, "ap")
    _check(normalisation, NORMALISATIONS, "normalisation")
    inside = hits.within(cutoff)
    j = np.arange(1, hits.ranks.shape[1] + 1)
    precision = np.where(inside, j / np.where(inside, hits.ranks, 1.0), 0.0)  # P at the j-th relevant rank
    r = hits.n_relevant
    if precision.shape[1] == 0:
        return np.zeros(len(r))
    # Max of P over hits j' >= j within the cutoff: the envelope at the j-th relevant rank (P at a
    # non-relevant rank is below P at the relevant rank before it, so only relevant ranks matter).
    best_after = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    if ap == "voc11":
        levels = np.arange(11)
        first = np.maximum((levels[None, :] * r[:, None] + 9) // 10, 1)  # least j with j / R >= level / 10
        reached = first <= precision.shape[1]
        interpolated = np.take_along_axis(best_after, np.minimum(first, precision.shape[1]) - 1, axis=1)
        return np.where(reached, interpolated, 0.0).mean(axis=1)
    if normalisation == "min":
        norm = r if cutoff is None else np.minimum(r, cutoff)
    else:
        norm = inside.sum(axis=1)
    summed = (best_after if ap == "voc-allpoint" else precision).sum(axis=1)
    return np.divide(summed, norm, out=np.zeros(len(r)), where=norm > 0)


def precision_at(hits: HitRanks, k: int, denominator: str = "k") -> np.ndarray:
    """Per-query precision: relevant items in the top k / k (`k`) or / min(k, R) (`min`), or
    relevant items in the top min(k, R) / min(k, R) (`min-cutoff`); see the module docstring."""
    _check(denominator, DENOMINATORS, "denominator")
    inside = hits.within(k)
    if denominator == "k":
        return inside.sum(axis=1) / k
    depth = np.minimum(k, hits.n_relevant)
    if denominator == "min-cutoff":
        inside = hits.ranks <= depth[:, None]
    return inside.sum(axis=1) / depth


def averaged(values: np.ndarray, classes: np.ndarray, average: str = "queries") -> float:
    """The mean over queries, or over classes of the mean over each class's queries."""
    _check(average, AVERAGES, "average")
    if average == "queries":
        return float(np.mean(values))
    _, inverse = np.unique(classes, return_inverse=True)
    return float(np.mean(np.bincount(inverse, weights=values) / np.bincount(inverse)))


# -- exact search on arrays -----------------------------------------------------------------------
def ranking_keys(sims: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is the ranking: the float32 similarity, flipped to sort
    descending, in the high 32 bits; the gallery position (ties: lower first) in the low 32."""
    bits = (np.asarray(sims, dtype=np.float32) + np.float32(0)).view(np.uint32)  # + 0 turns -0.0 into 0.0
    ascending = np.where(bits & _SIGN, ~bits, bits | _SIGN)  # unsigned order = float order
    return ((~ascending).astype(np.uint64) << np.uint64(32)) | np.asarray(indices).astype(np.uint64)


def key_indices(keys: np.ndarray) -> np.ndarray:
    return (keys & _LOW32).astype(np.int64)


def key_similarities(keys: np.ndarray) -> np.ndarray:
    ascending = ~(keys >> np.uint64(32)).astype(np.uint32)
    return np.where(ascending & _SIGN, ascending & ~_SIGN, ~ascending).astype(np.uint32).view(np.float32)


def piece_rows(n_queries: int) -> int:
    """Gallery rows per FAISS search: at most GPU_MAX_K, and queries x rows at most PIECE_ENTRIES."""
    return int(np.clip(PIECE_ENTRIES // max(n_queries, 1), 1, GPU_MAX_K))


def _pieces(slabs: Iterable[np.ndarray], rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset of the first row in the whole gallery, piece) for consecutive pieces of the slabs."""
    offset = 0
    for slab in slabs:
        if offset + len(slab) > 1 << 32:
            raise ValueError("a gallery beyond 2^32 items does not fit the positions of a ranking key")
        for start in range(0, len(slab), rows):
            yield offset + start, slab[start:start + rows]
        offset += len(slab)


def _piece_keys(queries: np.ndarray, piece: np.ndarray, offset: int, k: int, device: str) -> np.ndarray:
    """Keys of the k best rows of one piece for every query, best first (k = rows: all of them).

    One more neighbour than asked is searched: when it ties with the k-th, which of the tied rows
    FAISS kept is arbitrary, so the piece is ranked in full (same batch, same arithmetic) instead.
    """
    if piece.shape[1] != queries.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features, the gallery {piece.shape[1]}: "
                         "choose (timestep, block, pool) of equal width on both sides")
    index = flat_ip_index(piece.shape[1], device)
    index.add(_finite_rows(piece, "gallery"))
    wide = min(k + 1, len(piece))
    sims, ids = index.search(queries, wide)
    if wide > k and (sims[:, k - 1] == sims[:, k]).any():
        sims, ids = index.search(queries, len(piece))
    return np.sort(ranking_keys(sims, ids + offset), axis=1, kind="stable")[:, :k]  # FAISS orders ties arbitrarily


def _finite_rows(x: np.ndarray, what: str) -> np.ndarray:
    """Contiguous float32 rows, refusing NaN and inf (FAISS would silently leave such rows out)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"the {what} features hold NaN or inf")
    return x


def _merge(best: np.ndarray, new: np.ndarray, k: int) -> np.ndarray:
    """The k smallest keys of two sorted key lists per query (a stable sort merges the two runs)."""
    return np.sort(np.concatenate([best, new], axis=1), axis=1, kind="stable")[:, :k]


def stream_topk(slabs: Iterable[np.ndarray], queries: np.ndarray, k: int, device: str = "cpu",
                itself: np.ndarray | None = None) -> np.ndarray:
    """Ranking keys of the k best gallery rows per query, best first, over consecutive slabs of
    L2-normalised rows (positions count across slabs); memory O(queries x (k + piece)).
    `itself` (Q,) int64: the gallery position of each query's own image, left out of its ranking
    (-1: none; `self_positions`)."""
    queries = _finite_rows(queries, "query")
    wide = k if itself is None else k + 1  # one more, for the query itself
    best = np.empty((len(queries), 0), np.uint64)
    for offset, piece in _pieces(slabs, piece_rows(len(queries))):
        best = _merge(best, _piece_keys(queries, piece, offset, min(wide, len(piece)), device), wide)
    return _without_self(best, itself, k)


def _without_self(keys: np.ndarray, itself: np.ndarray | None, k: int) -> np.ndarray:
    """The first k of each row of sorted keys once the key of the query's own image (`itself`) is
    moved past every other (the largest uint64; finite similarities and positions < 2^32 never give it)."""
    if itself is None:
        return keys[:, :k]
    own = key_indices(keys) == itself[:, None]
    return np.sort(np.where(own, np.uint64(np.iinfo(np.uint64).max), keys), axis=1, kind="stable")[:, :k]


def self_positions(query_images: np.ndarray, gallery_images: np.ndarray) -> np.ndarray:
    """(Q,) int64: the gallery position of each query's own image (the same store row), -1 when
    it is not in the gallery. Rows of a store are distinct images, so a row is in a gallery once."""
    order = np.argsort(gallery_images, kind="stable")
    at = np.minimum(np.searchsorted(gallery_images[order], query_images), len(order) - 1)
    return np.where(gallery_images[order][at] == query_images, order[at], -1).astype(np.int64)


def count_below(sorted_keys: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """(Q, P): how many of each row's sorted keys are smaller than each of its sorted probes."""
    merged = np.concatenate([probes, sorted_keys], axis=1)
    order = np.argsort(merged, axis=1, kind="stable")  # two sorted runs: a linear merge; probes first on ties
    position = np.nonzero(order < probes.shape[1])[1].reshape(probes.shape)
    return position - np.arange(probes.shape[1])


def stream_ranks(
    make_slabs: Callable[[], Iterable[np.ndarray]], queries: np.ndarray, query_classes: np.ndarray,
    gallery_classes: np.ndarray, k: int, device: str = "cpu", itself: np.ndarray | None = None,
) -> tuple[np.ndarray, HitRanks]:
    """Top-k keys and the complete `HitRanks` (relevant: same class) in two passes over the gallery
    (`make_slabs()` gives the slabs anew each time); memory O(sum of R + queries x (k + piece)).
    `itself` (Q,) int64, every entry >= 0: each query's own gallery position, left out of its
    ranking (the items after it move up one rank; R and the gallery size are one less)."""
    queries = _finite_rows(queries, "query")
    rows = piece_rows(len(queries))
    groups = {c: np.flatnonzero(query_classes == c) for c in np.unique(query_classes)}

    def scan() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for offset, piece in _pieces(make_slabs(), rows):
            keys = _piece_keys(queries, piece, offset, len(piece), device)
            yield keys, gallery_classes[key_indices(keys)]

    wide = k if itself is None else k + 1
    best = np.empty((len(queries), 0), np.uint64)
    parts: dict = {c: [] for c in groups}
    for keys, owner in scan():  # pass 1: the keys of every query's relevant items
        best = _merge(best, keys[:, :wide], wide)
        for c, members in groups.items():
            mine = owner[members] == c  # the same count on every row of a class
            parts[c].append(keys[members][mine].reshape(len(members), -1))
    relevant = {c: np.sort(np.concatenate(p, axis=1), axis=1) for c, p in parts.items()}
    before = {c: np.zeros(r.shape, np.int64) for c, r in relevant.items()}
    for keys, owner in scan():  # pass 2: non-relevant items ranked before each relevant one
        for c, members in groups.items():
            others = keys[members][owner[members] != c].reshape(len(members), -1)  # still sorted
            before[c] += count_below(others, relevant[c])

    ranked = {c: np.arange(1, b.shape[1] + 1) + b for c, b in before.items()}
    if itself is not None:  # each query's own image is one of its relevant items: drop it, close the gap
        for c, members in groups.items():
            own = key_indices(relevant[c]) == itself[members][:, None]
            kept = ranked[c] - np.cumsum(own, axis=1)
            ranked[c] = kept[~own].reshape(len(members), -1)
    width = max((r.shape[1] for r in ranked.values()), default=0)
    ranks = np.full((len(queries), width), np.inf)
    for c, members in groups.items():
        ranks[members, :ranked[c].shape[1]] = ranked[c]
    n_relevant = np.array([ranked[c].shape[1] for c in query_classes], dtype=np.int64)
    size = len(gallery_classes) - (itself is not None)
    return _without_self(best, itself, k), HitRanks(ranks, n_relevant, size, size)


def _check(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def _first(items: np.ndarray, n: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# -- the runner: queries and gallery from the store ----------------------------------------------
@dataclass(frozen=True)
class Side:
    """Queries or gallery: images of one domain in a run (None: the store's only run), at (t, block)."""

    run: str | None
    timestep: int | None
    block: str
    domain: str


@dataclass(frozen=True)
class RetrievalConfig:
    query: Side
    gallery: Side
    split: str | None = None  # a split file, or the name of a shipped one: unseen classes only
    pool: int | None = 4
    map_at: tuple[int | None, ...] = (None, 200)  # None: mAP@all
    precision_at: tuple[int, ...] = (100, 200)
    ap: str = "noninterp"
    normalisation: str = "min"
    precision_denominator: str = "k"
    average: str = "queries"
    device: str = "cpu"
    slab_rows: int = SLAB_ROWS
    examples: int = 5  # queries shown with their top EXAMPLE_DEPTH in the results and the grid
    projection: ProjectionConfig | None = None  # trained on the split's seen classes, applied to both sides
    allow_incomplete: bool = False  # incomplete runs: use their extracted images instead of refusing them
    # noise draws (pipelines.analysis): "all" trains the projection on every draw, queries and gallery are the mean
    draws: str | int = "mean"

    def __post_init__(self) -> None:
        _check(self.ap, AP_KINDS, "--ap")
        _check(self.normalisation, NORMALISATIONS, "--map-normalisation")
        _check(self.precision_denominator, DENOMINATORS, "--precision-denominator")
        _check(self.average, AVERAGES, "--average")
        if self.ap == "voc11" and self.normalisation != "min":
            raise ValueError(f"--ap voc11 has no normalisation (recall is hits / R); drop --map-normalisation "
                             f"{self.normalisation}")
        if not self.map_at and not self.precision_at:
            raise ValueError("nothing to compute: give --map-at and/or --precision-at")
        if any(k is not None and k < 1 for k in (*self.map_at, *self.precision_at)):
            raise ValueError("cutoffs are positive integers (or 'all' for mAP)")
        if self.projection is not None and self.split is None:
            raise ValueError("a trained projection needs --split: it is trained on the seen classes only")


EXAMPLE_DEPTH = 10
SELF_LEFT_OUT = ("the query itself is left out of its gallery (same image of the store): R and the gallery size "
                 "are one less, the items ranked after it move up one rank")


@dataclass
class RetrievalResult:
    query: dict  # run_id, timestep, block, domain, images
    gallery: dict
    pool: int | None
    split: str | None
    classes: list[str]
    features: int
    device: str
    metrics: dict[str, dict]  # name -> {"value", its variant names, "average"}
    per_class: dict[str, dict[str, float]]  # class -> name -> mean over the class's queries
    examples: list[dict]
    projection: dict | None = None  # its config and the seen classes it was trained on
    runs: dict[str, dict[str, int]] = field(default_factory=dict)  # `run_images`: used, failed, pending per run
    settings: dict = field(default_factory=dict)  # the config with resolved run ids: the results file's digest
    variants: dict = field(default_factory=lambda: VARIANTS)
    self_left_out: int = 0  # queries whose own image was left out of their gallery (same-domain retrieval)
    grid: str | None = None
    grid_note: str | None = None
    draws: str | None = None  # what --draws did (`draws_meaning`; None: runs of one draw)

    def to_dict(self) -> dict:
        return asdict(self)

    def path(self, folder: Path, suffix: str) -> Path:
        """`folder/retrieve-<runs, (t, block) of both sides, split>-<digest><suffix>`: the digest
        covers every setting (metric variants, pooling, projection, ...)."""
        q, g = self.query, self.gallery
        label = f"{q['run_id']}-{timestep_key(q['timestep'])}-{q['block']}"
        if (g["run_id"], g["timestep"], g["block"]) != (q["run_id"], q["timestep"], q["block"]):
            label += f"-vs-{g['run_id']}-{timestep_key(g['timestep'])}-{g['block']}"
        label += f"-{self.split}" if self.split else ""
        return results_path(folder, "retrieve", self.settings, label, suffix)


def retrieve_run(store: FeatureStore, config: RetrievalConfig) -> RetrievalResult:
    """Sketch queries against a photo gallery (any two domains) from one or two runs of a store.

    The queries are read at once; the gallery is streamed in chunk-aligned slabs of about
    `slab_rows` rows, once for top-K metrics, twice when mAP@all is asked for. A bar counts
    the images read.
    """
    query_run, gallery_run = resolve_run(store, config.query.run), resolve_run(store, config.gallery.run)
    query_rows, query_names = _usable(query_run, config.query.domain, config.allow_incomplete)
    gallery_rows, gallery_names = _usable(gallery_run, config.gallery.domain, config.allow_incomplete)
    split = None
    q, g = config.query, config.gallery
    project = None
    if config.split is not None:
        split = load_split(config.split)
        split.check(set(query_names), set(gallery_names))
        if config.projection is not None:
            project = seen_class_projection(query_run, gallery_run, config, query_rows, query_names, gallery_rows,
                                            gallery_names, split.seen)
        query_keep, gallery_keep = np.isin(query_names, split.unseen), np.isin(gallery_names, split.unseen)
        query_rows, query_names = query_rows[query_keep], query_names[query_keep]
        gallery_rows, gallery_names = gallery_rows[gallery_keep], gallery_names[gallery_keep]
    lacking = sorted(set(query_names) - set(gallery_names))
    if lacking:
        raise ValueError(f"no gallery image of query class(es) {', '.join(lacking)} in domain "
                         f"{config.gallery.domain!r}: their AP is undefined; leave them out with --split")
    itself = self_positions(query_run.images.store_row[query_rows], gallery_run.images.store_row[gallery_rows])
    left_out = int((itself >= 0).sum())
    if 0 < left_out < len(itself):
        raise ValueError(f"{left_out:,} of {len(itself):,} queries are also gallery images and the others are not: "
                         "leaving out only some queries' own images gives galleries of unequal sizes; "
                         "query and gallery the same images, or disjoint ones")
    itself = itself if left_out else None
    size = len(gallery_rows) - (left_out > 0)  # each query's gallery, without the query itself
    classes = np.array(sorted(set(query_names) | set(gallery_names)))
    query_classes, gallery_classes = np.searchsorted(classes, query_names), np.searchsorted(classes, gallery_names)

    def features(run: Run, side: Side, rows: np.ndarray) -> np.ndarray:
        x = read_pooled(run, side.timestep, side.block, rows, config.pool, advance, scored_draws(config.draws))
        return l2_normalized(x if project is None else x @ project)

    passes = 2 if None in config.map_at else 1  # mAP@all ranks every relevant item: two scans
    scans = 0

    def slabs() -> Iterator[np.ndarray]:
        nonlocal scans
        scans += 1
        advance(0, description=f"t={g.timestep} {g.block}: gallery, pass {scans} of {passes}")
        for part in row_slabs(gallery_run, gallery_rows, config.slab_rows):
            yield features(gallery_run, g, gallery_rows[part])

    cutoffs = [k for k in (*config.map_at, *config.precision_at) if k is not None]
    k = min(max([*cutoffs, EXAMPLE_DEPTH]), size)
    n_relevant = np.bincount(gallery_classes, minlength=len(classes))[query_classes] - (left_out > 0)
    with bar("retrieve", f"t={q.timestep} {q.block}: queries", len(query_rows) + passes * len(gallery_rows)) as advance:
        queries = features(query_run, q, query_rows)
        if passes == 2:
            top, hits = stream_ranks(slabs, queries, query_classes, gallery_classes, k, config.device, itself)
        else:
            top = stream_topk(slabs(), queries, k, config.device, itself)
            relevance = gallery_classes[key_indices(top)] == query_classes[:, None]
            hits = HitRanks.from_relevance(relevance, n_relevant, size)
    metrics, per_class = _metrics(hits, query_names, config)

    query_images, gallery_images = query_run.images.take(query_rows), gallery_run.images.take(gallery_rows)
    shown = [int(np.flatnonzero(query_names == c)[0]) for c in sorted(set(query_names))][: config.examples]
    examples = [
        {
            "id": str(query_images.id[i]), "class": str(query_names[i]), "source": str(query_images.source[i]),
            "top": [
                {"id": str(gallery_images.id[j]), "class": str(gallery_names[j]), "source": str(gallery_images.source[j]),
                 "similarity": float(s), "relevant": bool(gallery_names[j] == query_names[i])}
                for j, s in zip(key_indices(top[i, :EXAMPLE_DEPTH]), key_similarities(top[i, :EXAMPLE_DEPTH]))
            ],
        }
        for i in shown
    ]
    return RetrievalResult(
        query={"run_id": query_run.run_id, "timestep": q.timestep, "block": q.block, "domain": q.domain,
               "images": len(query_rows)},
        gallery={"run_id": gallery_run.run_id, "timestep": g.timestep, "block": g.block, "domain": g.domain,
                 "images": len(gallery_rows)},
        pool=config.pool, split=split.name if split else None, classes=sorted(set(query_names)),
        projection=None if project is None else {**asdict(config.projection), "trained_on_classes": sorted(split.seen)},
        features=queries.shape[1], device=config.device, metrics=metrics, per_class=per_class, examples=examples,
        runs=run_images(list({r.run_id: r for r in (query_run, gallery_run)}.values())),
        self_left_out=left_out,
        variants={**VARIANTS, "gallery": SELF_LEFT_OUT} if left_out else VARIANTS,
        draws=draws_meaning(config.draws, [query_run, gallery_run], (
            "the projection is fitted on every draw as a sample of its own; " if project is not None else "")
            + "queries and gallery: the float32 mean of their draws"),
        settings=single_draw_dropped({**{k: v for k, v in asdict(config).items() if k != "slab_rows"},
                                      "query": asdict(dataclasses.replace(q, run=query_run.run_id)),
                                      "gallery": asdict(dataclasses.replace(g, run=gallery_run.run_id)),
                                      **({"gallery_protocol": SELF_LEFT_OUT} if left_out else {})},
                                     [query_run, gallery_run]),
    )


def seen_class_projection(
    query_run: Run, gallery_run: Run, config: RetrievalConfig, query_rows: np.ndarray, query_names: np.ndarray,
    gallery_rows: np.ndarray, gallery_names: np.ndarray, seen: Sequence[str],
) -> np.ndarray:
    """Train the projection on the seen-class images of both sides (every noise draw its own sample
    with --draws all); unseen rows are never read."""
    q, g, projection = config.query, config.gallery, config.projection
    q_seen, g_seen = np.isin(query_names, seen), np.isin(gallery_names, seen)
    with bar("retrieve", "projection: seen classes", int(q_seen.sum() + g_seen.sum())) as advance:
        qx, q_at = training_samples(read_pooled(query_run, q.timestep, q.block, query_rows[q_seen], config.pool,
                                                advance, config.draws), config.draws)
        gx, g_at = training_samples(read_pooled(gallery_run, g.timestep, g.block, gallery_rows[g_seen], config.pool,
                                                advance, config.draws), config.draws)
    x = np.concatenate([qx, gx])
    names = np.concatenate([query_names[q_seen][q_at], gallery_names[g_seen][g_at]])
    is_query = np.arange(len(names)) < len(qx)
    classes = sorted(set(names))
    class_vectors = None
    if projection.text_embeddings is not None:
        from pipelines.heads.text_embeddings import select_text_embeddings

        class_vectors = select_text_embeddings(projection.text_embeddings, classes).numpy()
        if projection.dim is not None and projection.dim != class_vectors.shape[1]:
            raise ValueError(f"--project-dim {projection.dim} differs from the width {class_vectors.shape[1]} of the "
                             f"text embeddings the projection maps into; leave --project-dim out")
    return train_projection(x, np.searchsorted(classes, names), is_query, projection, class_vectors)


def _usable(run: Run, domain: str, allow_incomplete: bool) -> tuple[np.ndarray, np.ndarray]:
    """Extracted, non-failed rows of a run in one domain, and their class names; an incomplete run
    raises IncompleteRunError unless `allow_incomplete`."""
    images = run.images
    ok = np.zeros(len(run), dtype=bool)
    ok[run.usable_rows(allow_incomplete)] = True
    rows = np.flatnonzero(ok & (images.domain == domain))
    if not len(rows):
        found = sorted(set(images.domain[ok].tolist()))
        raise ValueError(f"run {run.run_id} has no finished images in domain {domain!r} "
                         f"(its domains: {', '.join(found) or 'none'}); choose --query-domain/--gallery-domain")
    return rows, images.class_name[rows]


def _metrics(hits: HitRanks, query_names: np.ndarray, config: RetrievalConfig) -> tuple[dict, dict]:
    """Every asked metric averaged as configured, with its variant names, and per class."""
    per_query: dict[str, tuple[np.ndarray, dict]] = {}
    for cutoff in config.map_at:
        name = f"mAP@{'all' if cutoff is None else cutoff}"
        variant = {"ap": config.ap, "normalisation": None if config.ap == "voc11" else config.normalisation}
        per_query[name] = (average_precision(hits, cutoff, config.ap, config.normalisation), variant)
    for k in config.precision_at:
        per_query[f"P@{k}"] = (precision_at(hits, k, config.precision_denominator),
                               {"denominator": config.precision_denominator})
    per_query["chance"] = (hits.n_relevant / hits.gallery_size, {"definition": "R / gallery size"})
    metrics = {name: {"value": averaged(values, query_names, config.average), **variant, "average": config.average}
               for name, (values, variant) in per_query.items()}
    per_class = {str(c): {name: float(values[query_names == c].mean()) for name, (values, _) in per_query.items()}
                 for c in sorted(set(query_names))}
    return metrics, per_class


def save_results(result: RetrievalResult, folder: Path, data_root: str | Path | None,
                 query_data_root: str | Path | None = None) -> Path:
    """Write the grid PNG (or the reason it was skipped, kept in the result) and the results JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    png = result.path(folder, ".png")
    result.grid_note = save_grid(result.examples, png, data_root, query_data_root)
    result.grid = None if result.grid_note else str(png)
    return write_json(result.to_dict(), result.path(folder, ".json"))


def save_grid(examples: list[dict], path: Path, data_root: str | Path | None,
              query_data_root: str | Path | None = None) -> str | None:
    """A PNG with one row per example query: the query, then its top gallery images framed green
    (relevant) or red. The images are the store's `source` paths under the data roots (the query
    root defaults to the gallery's). Returns None when drawn, else why it was skipped."""
    from data_manifests.sources import load_image

    if data_root is None:
        return "grid skipped: no --data-root (the folder the gallery's sources are relative to)"
    if not examples:
        return "grid skipped: no example queries"
    roots = {"query": Path(query_data_root or data_root), "gallery": Path(data_root)}

    def image(side: str, source: str):
        file, _, fragment = source.partition("#")
        return np.asarray(load_image(roots[side] / file, fragment or None).convert("RGB"))

    try:
        rows = [[image("query", e["source"])] + [image("gallery", t["source"]) for t in e["top"]] for e in examples]
    except (OSError, ValueError) as exc:
        return f"grid skipped: cannot read an image under {roots['gallery']} / {roots['query']}: {exc}"

    from matplotlib.figure import Figure

    columns = 1 + max(len(e["top"]) for e in examples)
    fig = Figure(figsize=(1.4 * columns, 1.6 * len(examples)))
    axes = fig.subplots(len(examples), columns, squeeze=False)
    for example, images, row in zip(examples, rows, axes):
        for col, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(images):
                ax.set_axis_off()
                continue
            ax.imshow(images[col])
            if col == 0:
                ax.set_title(f"query: {example['class']}", fontsize=7)
                continue
            hit = example["top"][col - 1]
            ax.set_title(f"{hit['class']} {hit['similarity']:.2f}", fontsize=6)
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if hit["relevant"] else "red")
                spine.set_linewidth(2.5)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return None
