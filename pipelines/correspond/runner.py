"""`featurestore correspond` on a store: the run's image pairs, keypoints, boxes and geometry from its
targets (featurestore/targets.py), every (t, block) of a grid matched in one pass over the pairs,
PCK per map (pipelines/correspond/compute.py for the protocol).

A pair is scored on its keypoints visible in both images whose source point and target point lie
inside the backbone input: a source point cropped off by `resize=crop` has no feature, and a target
point cropped off cannot be reached by any candidate pixel (scoring it would bias PCK low). Both
kinds are counted, never scored. Pairs with an image whose features or targets are missing or
failed are left out and counted; so are pairs without a common visible keypoint inside both inputs.
A run of several noise draws is read as the mean of each image's draws or as one draw (`draws`;
pipelines/analysis: each image is scored once, so "all" has no meaning here).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store import FeatureStore, Run, StoreError, parse_draws, timestep_key, timestep_text
from featurestore.targets import RunTargets, run_targets
from pipelines.analysis import draws_meaning, results_path, run_images, single_draw_dropped, write_json
from pipelines.correspond.compute import (
    ALPHAS, AVERAGES, BBOX_OF, CORRECT, THRESHOLDS, Matches, inside_input, match_soft_argmax, match_upsampled,
    pck, sample_features
)
from pipelines.heads.logistic import resolve_run
from pipelines.progress import bar

UPSAMPLES = {
    "input": "DIFT: the target map bilinearly upsampled (align_corners=False) onto the target's original pixel "
             "grid through the reader's geometry (nn.Upsample to the image size for --resize squash), cosine "
             "with every pixel inside the input, the best pixel's centre",
    "feature": "cosine with every cell of the target map at feature resolution, soft-argmax (softmax(cos / T) "
               "over the cells within R of the best cell) of the cell centres, mapped back to original pixels",
}
MATCHES_COLUMNS = ("pair", "category", "kp", "src_x", "src_y", "true_x", "true_y", "pred_x", "pred_y",
                   "bbox_w", "bbox_h", "img_w", "img_h")  # bbox_w, bbox_h: the box of the threshold (bbox_of)
MIN_SIDE = 2  # a map needs at least 2 x 2 positions: on one cell every keypoint ties onto the same pixel
PAIRS_PER_READ = 64  # pairs whose features are read at a time (one map each; 1.5 GB of SD 2.1 up1 maps)


@dataclass
class MapPck:
    timestep: int | None
    block: str
    pck: dict  # compute.pck: overall and per category, per threshold and average, per alpha


@dataclass
class CorrespondResult:
    run_id: str
    dataset: str
    geometry: str  # the targets' geometry key, e.g. "squash-768"
    upsample: str
    method: str  # UPSAMPLES[upsample], with R and T for "feature"
    alphas: list[float]
    bbox_of: str  # whose box sets the bbox threshold: "target" or "source" (compute.BBOX_OF)
    pairs: dict[str, int]  # listed, scored, and why the others were left out
    points: dict[str, int]  # scored, outside the source input, outside the target input
    maps: list[MapPck]
    runs: dict[str, dict[str, int]]
    settings: dict[str, Any]
    variants: dict[str, Any] = field(default_factory=dict)  # thresholds (bbox as bbox_of), averages, correct
    blocks_left_out: list[str] = field(default_factory=list)  # "<block> [C, H, W]": maps too small to match on
    out: str | None = None  # the results file, once `save_correspond` has written it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Pairs:
    """The scored pairs: run positions, categories, and per pair its scored keypoint indices."""

    index: list[int]  # position in the run's pair list
    source: np.ndarray
    target: np.ndarray
    category: list[str]
    kps: list[np.ndarray]


def correspond_run(
    store: FeatureStore, run_id: str | None, timesteps: Sequence[int | None] | None, blocks: Sequence[str] | None,
    upsample: str = "input", soft_radius: int | None = None, soft_temperature: float | None = None,
    alphas: Sequence[float] = ALPHAS, split: str | None = None, allow_incomplete: bool = False,
    draws: str | int = "mean", bbox_of: str = "target",
) -> tuple[CorrespondResult, dict[tuple[int | None, str], Matches]]:
    """PCK of every (t, block) of `timesteps` x `blocks` (None: every timestep and every feature
    block of the run, `Run.feature_blocks`, so no `.attn` map) over the run's pairs (of `split` when
    given), and the matches of each map. `soft_radius` (cells, default 1) and `soft_temperature`
    (default 0.05) are for upsample="feature" only. `draws`: "mean" (float32 mean of an image's
    noise draws) or a draw index k. `bbox_of`: whose box sets the bbox threshold (compute.BBOX_OF).

    Raises ValueError (StoreError included) in one line, before any feature is read, for an unknown
    upsample or bbox_of, soft options with upsample="input", an alpha that is not a finite positive
    number, draws "all" or a draw the run lacks, a run without keypoint targets or pairs, an
    unknown t or block, a named block whose map has fewer than MIN_SIDE x MIN_SIDE positions (e.g.
    logits or pooled features stored as [C, 1, 1]: every match ties onto one pixel; without named
    blocks such maps are left out and listed in `blocks_left_out`), or no pair left."""
    if upsample not in UPSAMPLES:
        raise ValueError(f"--upsample must be one of {', '.join(UPSAMPLES)}, got {upsample!r}")
    if upsample == "input" and (soft_radius is not None or soft_temperature is not None):
        raise ValueError("--soft-radius and --soft-temperature refine --upsample feature only; "
                         "--upsample input takes the best pixel")
    radius = 1 if soft_radius is None else soft_radius
    temperature = 0.05 if soft_temperature is None else soft_temperature
    if radius < 0 or not temperature > 0:
        raise ValueError(f"--soft-radius must be >= 0 cells and --soft-temperature positive, got {radius} and "
                         f"{temperature}")
    if not alphas or not all(math.isfinite(a) and a > 0 for a in alphas):
        raise ValueError(f"--alpha takes finite positive numbers, got {list(alphas)}")
    if bbox_of not in BBOX_OF:
        raise ValueError(f"--bbox-of must be one of {', '.join(BBOX_OF)}, got {bbox_of!r}")
    draws = parse_draws(draws)
    if draws == "all":
        raise ValueError("--draws all has no meaning for correspondence (each image is matched once): "
                         "give mean or a draw index k")
    run = resolve_run(store, run_id)
    if isinstance(draws, int) and draws >= run.noise_draws:
        raise StoreError(f"--draws {draws}: run {run.run_id} holds {run.noise_draws} noise draw"
                         f"{'s' if run.noise_draws != 1 else ''} per image (draws 0..{run.noise_draws - 1})")
    named = blocks is not None
    timesteps = list(run.timesteps) if timesteps is None else list(timesteps)
    blocks = run.feature_blocks if blocks is None else list(blocks)
    for t in timesteps:
        if t not in run.timesteps:
            raise StoreError(f"run {run.run_id} has no timestep {timestep_text(t)}; timesteps: "
                             + ", ".join(map(timestep_text, run.timesteps)))
    for b in blocks:
        if b not in run.blocks:
            raise StoreError(f"run {run.run_id} has no block {b!r}; blocks: {', '.join(run.blocks)}")
    shapes = {b: _map_shape(run, b) for b in blocks}
    small = {b: shape for b, shape in shapes.items() if min(shape[1:]) < MIN_SIDE}
    if small and named:
        b, shape = next(iter(small.items()))
        raise ValueError(f"block {b!r} of run {run.run_id} holds maps of shape {list(shape)} (C, H, W): "
                         f"correspondence needs at least {MIN_SIDE} x {MIN_SIDE} positions to match on")
    blocks = [b for b in blocks if b not in small]
    if not blocks:
        raise ValueError(f"run {run.run_id} has no block with at least {MIN_SIDE} x {MIN_SIDE} positions to match "
                         f"on (" + ", ".join(f"{b} {list(s)}" for b, s in small.items()) + ")")
    targets = run_targets(run)
    every = targets.pairs()
    listed = [p for p in every if split is None or p[3] == split]
    if not listed and every:
        raise ValueError(f"run {run.run_id} ({run.spec.get('dataset')!r}) has no image pairs of split {split!r}; "
                         f"its pairs are of split {', '.join(sorted({p[3] for p in every}))}")
    if not listed:
        raise ValueError(f"run {run.run_id} ({run.spec.get('dataset')!r}) has no image pairs: its manifest declares "
                         "none (correspondence needs a pair dataset, e.g. warps-cifar10)")

    usable = np.zeros(len(run), dtype=bool)
    usable[np.intersect1d(run.usable_rows(allow_incomplete), targets.usable_rows())] = True
    kept = [(k, p) for k, p in enumerate(listed) if usable[p[0]] and usable[p[1]]]
    rows = np.unique([r for _, p in kept for r in p[:2]]).astype(np.int64)
    at = {int(r): i for i, r in enumerate(rows)}
    keypoints = targets.keypoints(rows) if len(rows) else np.zeros((0, 0, 3), np.float32)
    geometry, image_size = targets.geometry(rows), targets.image_size(rows)
    boxes = _boxes(targets, rows)

    chosen = _Pairs([], np.zeros(0, np.int64), np.zeros(0, np.int64), [], [])
    outside_source = outside_target = without_points = 0
    sources, targets_ = [], []
    for k, (s, t, category, _) in kept:
        ks, kt = keypoints[at[s]], keypoints[at[t]]
        common = np.flatnonzero((ks[:, 2] == 1) & (kt[:, 2] == 1))
        seen = inside_input(ks[common, :2], geometry[at[s]], targets.size)
        reachable = inside_input(kt[common, :2], geometry[at[t]], targets.size)
        outside_source += int((~seen).sum())
        outside_target += int((seen & ~reachable).sum())  # counted once: a point without a source feature is a source's
        if not (seen & reachable).any():
            without_points += 1
            continue
        chosen.index.append(k)
        sources.append(s)
        targets_.append(t)
        chosen.category.append(category)
        chosen.kps.append(common[seen & reachable])
    chosen.source, chosen.target = np.asarray(sources, np.int64), np.asarray(targets_, np.int64)
    if not chosen.index:
        raise ValueError(f"none of the {len(listed)} pairs can be scored: {len(listed) - len(kept)} have an image "
                         f"without usable features or targets, {without_points} no common visible keypoint "
                         "inside both inputs")

    matches = {}
    total = len(chosen.index) * len(timesteps) * len(blocks)
    with bar("correspond", "pairs", total) as advance:
        for t in timesteps:
            for b in blocks:
                advance(0, description=f"t={t} {b}")
                matches[(t, b)] = _match_map(run, t, b, chosen, keypoints, geometry, image_size, boxes, at,
                                             targets.size, upsample, radius, temperature, advance, draws, bbox_of)
    maps = [MapPck(t, b, pck(matches[(t, b)], alphas)) for t in timesteps for b in blocks]
    method = UPSAMPLES[upsample] + (f" (R = {radius} cells, T = {temperature})" if upsample == "feature" else "")
    settings = single_draw_dropped({
        "run_id": run.run_id, "timesteps": timesteps, "blocks": blocks, "upsample": upsample,
        "soft_radius": radius if upsample == "feature" else None,
        "soft_temperature": temperature if upsample == "feature" else None,
        "alphas": list(alphas), "split": split, "allow_incomplete": allow_incomplete, "bbox_of": bbox_of,
        "draws": draws, "draws_meaning": draws_meaning(draws, [run], "not offered here")}, [run])
    result = CorrespondResult(
        run.run_id, str(run.spec.get("dataset")), targets.key, upsample, method, list(alphas), bbox_of,
        pairs={"listed": len(listed), "scored": len(chosen.index), "image_unusable": len(listed) - len(kept),
               "no_common_point": without_points},
        points={"scored": int(sum(len(k) for k in chosen.kps)), "outside_source_input": outside_source,
                "outside_target_input": outside_target},
        maps=maps, runs=run_images([run]), settings=settings,
        variants={"thresholds": {**THRESHOLDS, "bbox": BBOX_OF[bbox_of]}, "averages": AVERAGES, "correct": CORRECT},
        blocks_left_out=[f"{b} {list(shape)}" for b, shape in small.items()],
    )
    return result, matches


def _map_shape(run: Run, block: str) -> tuple[int, int, int]:
    """(C, H, W) of `block`'s stored maps (the same at every timestep of a run)."""
    return tuple(int(n) for n in run.array(run.timesteps[0], block).shape[-3:])


def _boxes(targets: RunTargets, rows: np.ndarray) -> np.ndarray:
    """(len(rows), 4) float64 boxes (x0, y0, x1, y1) of run rows, NaN for a row without one (its
    pairs' bbox PCK is undefined, the other rows' is not): one read when every row has a box, else
    one read per row."""
    try:
        return targets.bbox(rows).astype(np.float64)
    except StoreError:  # no boxes at all, or not for every row
        pass
    boxes = np.full((len(rows), 4), np.nan)
    for i, r in enumerate(rows):
        try:
            boxes[i] = targets.bbox(np.asarray([r]))[0]
        except StoreError:
            continue
    return boxes


def _match_map(run: Run, t: int | None, block: str, chosen: _Pairs, keypoints: np.ndarray, geometry: np.ndarray,
               image_size: np.ndarray, boxes: np.ndarray, at: dict[int, int], size: int, upsample: str, radius: int,
               temperature: float, advance: Callable[[int], None], draws: str | int, bbox_of: str) -> Matches:
    """The Matches of one (t, block) over the chosen pairs, features (float32, `draws` of each image:
    "mean" or a draw index) read PAIRS_PER_READ pairs at a time.

    `keypoints` (n, K, 3) float32 (x, y, visible), `geometry` (n, 4) float64 [sx, ox, sy, oy],
    `image_size` (n, 2) int64 (w, h) and `boxes` (n, 4) float64 (x0, y0, x1, y1, NaN without a box)
    are per distinct image of the chosen pairs, in original pixels; `at` maps a run position to its
    index in them. `size`: the S x S input's side. `bbox_of` picks the source's or the target's box
    for Matches.bbox_wh. `advance(1)` is called after each pair."""
    out: dict[str, list] = {name: [] for name in ("pair", "category", "kp", "source", "true", "pred", "bbox_wh",
                                                  "image_wh")}
    for start in range(0, len(chosen.index), PAIRS_PER_READ):
        batch = range(start, min(start + PAIRS_PER_READ, len(chosen.index)))
        rows = np.unique(np.concatenate([chosen.source[batch], chosen.target[batch]]))
        features = run.read_rows(t, block, rows, lambda x: x.astype(np.float32, copy=False), draws=draws)
        local = {int(r): i for i, r in enumerate(rows)}
        for j in batch:
            s, g = at[int(chosen.source[j])], at[int(chosen.target[j])]
            kps = chosen.kps[j]
            src_points = keypoints[s][kps, :2].astype(np.float64)
            queries = sample_features(features[local[int(chosen.source[j])]], src_points, geometry[s], size)
            trg_map = features[local[int(chosen.target[j])]]
            if upsample == "input":
                pred = match_upsampled(queries, trg_map, geometry[g], image_size[g], size)
            else:
                pred = match_soft_argmax(queries, trg_map, geometry[g], size, radius, temperature)
            n = len(kps)
            out["pair"].append(np.full(n, chosen.index[j]))
            out["category"].append(np.full(n, chosen.category[j], dtype=object))
            out["kp"].append(kps)
            out["source"].append(src_points)
            out["true"].append(keypoints[g][kps, :2].astype(np.float64))
            out["pred"].append(pred)
            box = boxes[s if bbox_of == "source" else g]
            out["bbox_wh"].append(np.tile(box[2:] - box[:2], (n, 1)))
            out["image_wh"].append(np.tile(image_size[g].astype(np.float64), (n, 1)))
            advance(1)
    return Matches(**{name: np.concatenate(values) for name, values in out.items()})


def left_out_notes(pairs: dict[str, int], points: dict[str, int], blocks: Sequence[str] = ()) -> list[str]:
    """What a result did not score, in words (`CorrespondResult.pairs`, `.points` and
    `.blocks_left_out`, or the same keys of its JSON); empty when everything was scored."""
    what = {"image_unusable": "pairs with an image without usable features or targets",
            "no_common_point": "pairs without a common visible keypoint inside both inputs"}
    notes = [f"{pairs[key]} {text}" for key, text in what.items() if pairs[key]]
    if points["outside_source_input"]:
        notes.append(f"{points['outside_source_input']} source points outside the input (no feature)")
    if points.get("outside_target_input"):  # results written before it was counted lack the key
        notes.append(f"{points['outside_target_input']} target points outside the input (no candidate pixel "
                     "reaches them)")
    if blocks:
        notes.append(f"blocks with fewer than {MIN_SIDE} x {MIN_SIDE} positions (C, H, W): {', '.join(blocks)}")
    return notes


def save_matches(matches: Matches, path: str | Path) -> Path:
    """One CSV row per scored source keypoint, columns MATCHES_COLUMNS (target keypoint, prediction
    and target image size in original target pixels; bbox_w/bbox_h: the threshold's box, the
    target's or, with bbox_of="source", the source's, in that image's pixels, empty without a box). Refuses (ValueError) to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists; --save-matches never overwrites a file (remove it or name another)")
    path.parent.mkdir(parents=True, exist_ok=True)

    def number(v: float) -> str:
        return "" if math.isnan(v) else repr(float(v))

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(MATCHES_COLUMNS)
        for i in range(len(matches)):
            writer.writerow([int(matches.pair[i]), matches.category[i], int(matches.kp[i]),
                             *(number(v) for v in (*matches.source[i], *matches.true[i], *matches.pred[i],
                                                   *matches.bbox_wh[i], *matches.image_wh[i]))])
    return path


def save_correspond(result: CorrespondResult, folder: Path) -> Path:
    """The result as `correspond-<run>-<maps>-<digest>.json` in `folder` (the digest covers every
    setting); its path is set as `result.out` and written in the file ("out")."""
    maps = result.maps
    label = (f"{timestep_key(maps[0].timestep)}-{maps[0].block}" if len(maps) == 1 else f"{len(maps)}maps")
    path = results_path(folder, "correspond", result.settings, f"{result.run_id}-{label}")
    result.out = str(path)
    return write_json(result.to_dict(), path)
