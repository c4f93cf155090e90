"""Stage 2 compared with the usual ways, side by side, as ratios measured in one run.

1. kNN: our FAISS IndexFlatIP search vs scikit-learn NearestNeighbors(metric="cosine",
   algorithm="brute") on the same features, both scored with the same weighted vote; the top-1
   accuracy must be the same (asserted).
2. CKA: our feature-space CKA (biased and unbiased) and our minibatch CKA vs the `ckatorch`
   package (`cka_base` with unbiased=False/True, `cka_batch` on the same minibatches); the same
   numbers to 1e-5 are asserted. ckatorch is never installed into the project's venv (its
   dependencies would pull another torch): the bench prints the exact command that puts it, alone,
   into --pkgs, and looks there.
   CKA grid (part cka-grid): a 37 x 37 block grid shaped like ADM-256's blocks at pool 4 (4,096 to
   16,384 features each, 348,160 in all) over 2,500 images, random features with shared structure.
   Ours: the Gram-space path `featurestore cka` takes for it (`gram_cka_matrices`, each block's
   Gram computed and centred once, all pairs in one product) vs ckatorch `cka_base` pair by pair
   (biased and unbiased, each call computing both Grams). ckatorch on all 666 pairs of different
   blocks would take hours on 2 cores, so a seeded random sample of pairs is timed and its mean
   time per pair extrapolated to 666 (said so in the output); every sampled pair is checked
   equal to ours to 1e-6 (asserted).
3. Cache epoch vs online epoch: one epoch of the `linear` head from pipelines/heads trained from
   the store (read + head step) against the same epoch with the backbone run online, the way
   diffssl/Vermouth train (every minibatch: decode, VAE + text encode, q_sample, UNet forward up
   to the block, then the head step), on the full-size SD v1.5 graph with random weights. Same
   head init, same batches in the same order, same number of optimizer steps. The one-time
   extraction is the real `extract`; payoff = extract_s / (online_epoch_s - cache_epoch_s).

Usage:
    python bench/stage2.py                                   # all three, random kNN/CKA features
    python bench/stage2.py --parts knn,cka                   # skip the SD part (~1 min)
    python bench/stage2.py --parts cka-grid --grid-pairs 10  # the 37 x 37 grid (~10 min on 2 cores)
    python bench/stage2.py demo-output/store.zarr --timestep 100 --block block2   # kNN/CKA on a store
    python bench/stage2.py --images 8 --batch-size 4 --epoch-block mid --epoch-timestep 200 --image-size 512

The random-weight SD folder (~4 GB) is written once under --sd-folder (reused when present).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(tempfile.gettempdir()) / "featurestore-bench"
CKATORCH = "ckatorch==1.0.3"
KS = (20, 200)
CKA_TOL = 1e-5
GRID_TOL = 1e-6
GRID_BACKBONE = "adm256-uncond"


def timed(fn: Callable, repeats: int = 1):
    """(result of the last call, best wall time over `repeats` calls)."""
    best, out = math.inf, None
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - tic)
    return out, best


# -- 1. kNN -------------------------------------------------------------------------------------------
def random_data(n_train: int, n_test: int, dim: int, seed: int = 0):
    """Ten Gaussian classes in `dim` dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dim)).astype(np.float32)
    train_y, test_y = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)
    train_x = centres[train_y] + 10 * rng.normal(size=(n_train, dim)).astype(np.float32)
    test_x = centres[test_y] + 10 * rng.normal(size=(n_test, dim)).astype(np.float32)
    return train_x, train_y, test_x, test_y


def store_data(path: str, run_id: str | None, timestep: int, block: str, other_block: str | None, pool: int | None):
    """A store's (t, block) split by its split column, and CKA's second view (another block at t)."""
    from featurestore.store import FeatureStore
    from pipelines.analysis import read_pooled
    from pipelines.heads.logistic import resolve_run, split_rows

    run = resolve_run(FeatureStore.open(path), run_id)
    train, test = split_rows(run, "train", "test", None, 0)
    other_block = other_block or next(b for b in run.blocks if b != block)
    labels = run.labels
    return (read_pooled(run, timestep, block, train, pool), labels[train], read_pooled(run, timestep, block, test, pool),
            labels[test], read_pooled(run, timestep, other_block, train, pool))


def bench_knn(train_x, train_y, test_x, test_y) -> dict:
    from sklearn.neighbors import NearestNeighbors

    from pipelines.analysis.knn import knn_accuracy, l2_normalized, search_topk

    k = min(max(KS), len(train_x))
    ks = [v for v in KS if v <= k]
    (sims, indices), faiss_s = timed(lambda: search_topk(l2_normalized(train_x), l2_normalized(test_x), k))
    model = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute")
    (dist, sk_indices), sklearn_s = timed(lambda: model.fit(train_x).kneighbors(test_x))
    ours = knn_accuracy(sims, indices, train_y, test_y, ks)
    theirs = knn_accuracy(1 - dist.astype(np.float32), sk_indices, train_y, test_y, ks)
    same_sets = float((np.sort(indices, axis=1) == np.sort(sk_indices, axis=1)).all(axis=1).mean())
    for v in ks:
        assert ours[v][0] == theirs[v][0], f"kNN top-1 differs at k={v}: faiss {ours[v][0]} vs sklearn {theirs[v][0]}"
    return {
        "train": len(train_x), "queries": len(test_x), "dim": int(train_x.shape[1]), "k": k,
        "faiss_s": faiss_s, "sklearn_s": sklearn_s, "sklearn_over_faiss": sklearn_s / faiss_s,
        "top1_faiss": {v: ours[v][0] for v in ks}, "top1_sklearn": {v: theirs[v][0] for v in ks},
        "same_neighbour_sets": same_sets, "top1_equal": True,
    }


# -- 2. CKA -------------------------------------------------------------------------------------------
def install_hint(pkgs: Path) -> str:
    return f"{sys.executable} -m pip install --no-deps --target {pkgs} {CKATORCH}"


def import_ckatorch(pkgs: Path):
    """ckatorch.core from --pkgs (appended to sys.path, so nothing of the venv is shadowed), or None.

    ckatorch/__init__.py imports its plotting module, which needs seaborn and pandas; installed
    --no-deps they are absent, so on that ImportError the package is loaded without its __init__
    (core, hsic and utils need torch alone)."""
    if str(pkgs) not in sys.path:
        sys.path.append(str(pkgs))
    try:
        return importlib.import_module("ckatorch.core")
    except ImportError:
        for name in [m for m in sys.modules if m == "ckatorch" or m.startswith("ckatorch.")]:
            del sys.modules[name]
    for entry in sys.path:
        folder = Path(entry) / "ckatorch"
        if (folder / "core.py").is_file():
            package = types.ModuleType("ckatorch")
            package.__path__ = [str(folder)]
            sys.modules["ckatorch"] = package
            return importlib.import_module("ckatorch.core")
    return None


def random_cka_views(rows: int, dx: int, dy: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """X (rows, dx) and Y (rows, dy) = a noisy linear map of X, so CKA is neither ~0 nor ~1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, dx)).astype(np.float32) + 0.5  # a mean offset: centring must matter
    y = x @ rng.normal(size=(dx, dy)).astype(np.float32) / np.sqrt(dx) + 1.5 * rng.normal(size=(rows, dy)).astype(np.float32)
    return x, y


def bench_cka(x: np.ndarray, y: np.ndarray, batch_size: int, pkgs: Path, repeats: int) -> dict:
    from pipelines.analysis.cka import cka_matrices, gram_cka_matrices, linear_cka

    n = len(x)
    ours, ours_s = timed(lambda: linear_cka(x, y), repeats)
    (gram, _, _), gram_s = timed(lambda: gram_cka_matrices(iter([x, y]), 2), repeats)
    for name in ("biased", "unbiased"):
        assert abs(ours[name] - gram[name][0, 1]) < 1e-8, f"feature-space and Gram-space {name} CKA differ"
    (mini, _, _), mini_s = timed(lambda: cka_matrices([[x, y]], "minibatch", batch_size=batch_size, seed=0), repeats)
    out = {
        "rows": n, "dx": int(x.shape[1]), "dy": int(y.shape[1]), "minibatch": batch_size,
        "ours_feature_s": ours_s, "ours_gram_s": gram_s, "ours_minibatch_s": mini_s,
        "ours_biased": ours["biased"], "ours_unbiased": ours["unbiased"], "ours_minibatch": float(mini["unbiased"][0, 1]),
    }
    core = import_ckatorch(pkgs)
    if core is None:
        print(f"  ckatorch not found: install it (alone, no dependencies) for this bench with\n    {install_hint(pkgs)}")
        out["ckatorch"] = None
        return out
    import torch

    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    biased, biased_s = timed(lambda: float(core.cka_base(tx, ty, unbiased=False)), repeats)
    unbiased, unbiased_s = timed(lambda: float(core.cka_base(tx, ty, unbiased=True)), repeats)
    # the same minibatches as ours: MinibatchHsic permutes the rows with default_rng(seed) and cuts
    # them with array_split; equal batches (n divisible by the batch size) stack for cka_batch
    order = np.random.default_rng(0).permutation(n)
    parts = np.array_split(order, -(-n // batch_size))
    if len({len(p) for p in parts}) == 1:
        index = torch.from_numpy(np.stack(parts))
        theirs_mini, theirs_mini_s = timed(lambda: float(core.cka_batch(tx[index], ty[index])), repeats)
    else:
        theirs_mini, theirs_mini_s = None, None
    out.update({
        "ckatorch": CKATORCH, "ckatorch_biased_s": biased_s, "ckatorch_unbiased_s": unbiased_s,
        "ckatorch_biased": biased, "ckatorch_unbiased": unbiased,
        "ckatorch_batch": theirs_mini, "ckatorch_batch_s": theirs_mini_s,
        "ckatorch_biased_over_ours": biased_s / ours_s, "ckatorch_unbiased_over_ours": unbiased_s / ours_s,
        "diff_biased": abs(biased - ours["biased"]), "diff_unbiased": abs(unbiased - ours["unbiased"]),
        "diff_minibatch": None if theirs_mini is None else abs(theirs_mini - out["ours_minibatch"]),
    })
    assert out["diff_biased"] < CKA_TOL, f"biased CKA: ckatorch {biased} vs ours {ours['biased']}"
    assert out["diff_unbiased"] < CKA_TOL, f"unbiased CKA: ckatorch {unbiased} vs ours {ours['unbiased']}"
    if theirs_mini is not None:
        assert out["diff_minibatch"] < CKA_TOL, f"minibatch CKA: ckatorch {theirs_mini} vs ours {out['ours_minibatch']}"
        out["ckatorch_batch_over_ours"] = theirs_mini_s / mini_s
    return out


def grid_widths(pool: int) -> dict[str, int]:
    """Features per block of GRID_BACKBONE pooled to pool x pool (its block table; no weights)."""
    from pipelines.extract.backbone import create_backbone
    from pipelines.extract.weights import META

    blocks = create_backbone(GRID_BACKBONE, META).describe()["blocks"]
    return {b: c * min(h, pool) * min(w, pool) for b, (c, h, w) in blocks.items()}


def grid_view(v: int, blocks: int, rows: int, width: int, seed: int) -> np.ndarray:
    """Block v's random features (rows, width) float32, the same on every call: a 32-d latent mixed
    from two (cos, sin of an angle going from 0 to pi with depth: near blocks alike, blocks a
    quarter turn apart unrelated, the first and last alike again, as a U-Net pairs them), mapped
    to `width` features, plus as much noise and a per-feature offset."""
    shared = np.random.default_rng(seed).standard_normal((rows, 64), dtype=np.float32)
    angle = np.pi * v / (blocks - 1)
    latent = np.cos(angle) * shared[:, :32] + np.sin(angle) * shared[:, 32:]
    rng = np.random.default_rng([seed, v])
    x = latent @ rng.standard_normal((32, width), dtype=np.float32) / np.float32(np.sqrt(32))
    x += rng.standard_normal((rows, width), dtype=np.float32)
    x += rng.standard_normal(width, dtype=np.float32) + 2
    return x


def bench_cka_grid(rows: int, pool: int, pairs: int, seed: int, pkgs: Path) -> dict:
    from pipelines.analysis.cka import choose_method, gram_cka_matrices

    widths = list(grid_widths(pool).values())
    m = len(widths)
    method = choose_method("auto", widths, rows)
    assert method == "gram", f"featurestore cka would use {method} for this grid, not gram"
    made = [0.0]

    def views():
        for v, width in enumerate(widths):
            tic = time.perf_counter()
            x = grid_view(v, m, rows, width, seed)
            made[0] += time.perf_counter() - tic
            yield x
            del x

    (ours, _, constant), total_s = timed(lambda: gram_cka_matrices(views(), m))
    ours_s = total_s - made[0]  # making the random features is not CKA's work
    assert not constant.any()
    offdiag = ours["unbiased"][~np.eye(m, dtype=bool)]
    out = {
        "backbone": GRID_BACKBONE, "blocks": m, "rows": rows, "pool": pool, "features": sum(widths),
        "widths": sorted(set(widths)), "method": method, "ours_s": ours_s, "features_made_s": made[0],
        "ours_unbiased_range": [float(offdiag.min()), float(offdiag.max())],
    }
    core = import_ckatorch(pkgs)
    if core is None:
        print(f"  ckatorch not found: install it (alone, no dependencies) for this bench with\n    {install_hint(pkgs)}")
        out["ckatorch"] = None
        return out
    import torch

    distinct = list(itertools.combinations(range(m), 2))
    sample = [distinct[i] for i in np.random.default_rng(seed).choice(len(distinct), min(pairs, len(distinct)), replace=False)]
    times, diffs = [], {"biased": 0.0, "unbiased": 0.0}
    for i, j in sample:
        x, y = (torch.from_numpy(grid_view(v, m, rows, widths[v], seed)) for v in (i, j))
        pair_s = 0.0
        for name in diffs:
            value, seconds = timed(lambda: float(core.cka_base(x, y, unbiased=name == "unbiased")))
            pair_s += seconds
            diffs[name] = max(diffs[name], abs(value - ours[name][i, j]))
            assert diffs[name] <= GRID_TOL, f"{name} CKA of blocks {i}, {j}: ckatorch {value} vs ours {ours[name][i, j]}"
        times.append(pair_s)
        print(f"  ckatorch pair {len(times)}/{len(sample)} (blocks {i + 1}, {j + 1}): {pair_s:.1f} s")
    per_pair = statistics.mean(times)
    out.update({
        "ckatorch": CKATORCH, "pairs_total": len(distinct), "pairs_timed": len(sample),
        "ckatorch_pair_s": per_pair, "ckatorch_extrapolated_s": per_pair * len(distinct),
        "ckatorch_over_ours": per_pair * len(distinct) / ours_s,
        "max_diff_biased": diffs["biased"], "max_diff_unbiased": diffs["unbiased"],
    })
    return out


# -- 3. cache epoch vs online epoch ------------------------------------------------------------------
def bench_epoch(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "pipelines"))  # the random SD folder writer
    from tiny_models import write_tiny_sd

    from featurestore.store import FeatureStore
    from pipelines.extract.noise import q_sample
    from pipelines.extract.prompts import prompts_for
    from pipelines.extract.reader import read_chunk
    from pipelines.extract.runner import ExtractConfig, extract, prepare_job
    from pipelines.heads.data import Batch, StoreBatches
    from pipelines.heads.modules import HeadSpec, build_head
    from pipelines.heads.training import TrainConfig, Trainee

    folder = args.sd_folder
    if not (folder / "scheduler").is_dir():
        tic = time.perf_counter()
        write_tiny_sd(folder, full_size=True)
        print(f"  wrote the random full-size SD folder to {folder} in {time.perf_counter() - tic:.0f} s")
    t, block, bs, n_images = args.epoch_timestep, args.epoch_block, args.batch_size, args.images
    key = (t, block)
    device = torch.device("cpu")

    with tempfile.TemporaryDirectory() as tmp:
        config = None
        if args.image_size != 512:
            config = Path(tmp) / "sd15.json"
            config.write_text(json.dumps({"image_size": args.image_size}))
        cfg = ExtractConfig(store=f"{tmp}/s.zarr", backbone="sd15", weights=str(folder), backbone_config=config,
                            dataset="demo", limit=n_images, timesteps=[t], blocks=[block], batch_size=bs,
                            device="cpu", progress=False)
        # the one-time extraction (the real path); its model load is timed apart from its loop
        result, extract_wall_s = timed(lambda: extract(cfg))
        extract_s, extract_prepare_s = result.seconds["total"], result.seconds["prepare"]
        print(f"  extract: {n_images} images, t={t}, {block}: {extract_s:.1f} s loop ({extract_wall_s:.1f} s with model load)")

        run = FeatureStore.open(cfg.store).run(result.run_id)
        labels = run.labels
        rows = np.arange(len(run))
        spec = HeadSpec(kind="linear", inputs={key: tuple(run.blocks[block])}, num_classes=int(labels.max()) + 1)
        train_cfg = TrainConfig(epochs=1, batch_size=bs, warmup_epochs=0, seed=0)
        steps = math.ceil(len(rows) / bs)

        def fresh() -> Trainee:
            torch.manual_seed(0)  # the same initial head for every epoch measured
            return Trainee(spec.kind, build_head(spec), args.lr, train_cfg, steps, device)

        data = StoreBatches(run, [key], labels, batch_size=bs, window_chunks=train_cfg.window_chunks)

        def cache_epoch() -> tuple[float, float, float, list[np.ndarray], Trainee]:
            trainee, order, step_s = fresh(), [], 0.0
            read_before = data.read_seconds
            tic = time.perf_counter()
            for _, batch in data.passes({"train": rows}, np.random.default_rng((0, 0))):
                s = time.perf_counter()
                trainee.step(batch.to(device))
                step_s += time.perf_counter() - s
                order.append(batch.rows)
            return time.perf_counter() - tic, data.read_seconds - read_before, step_s, order, trainee

        cache_runs = [cache_epoch() for _ in range(args.cache_repeats)]
        cache_s = statistics.median(r[0] for r in cache_runs)
        _, cache_read_s, cache_step_s, order, cache_head = min(cache_runs, key=lambda r: abs(r[0] - cache_s))
        print(f"  cache epoch: {cache_s:.3f} s (median of {len(cache_runs)}; {len(order)} steps)")

        # the online path: the backbone loaded once (as in diffssl), then every batch runs it
        job, load_s = timed(lambda: prepare_job(cfg))
        backbone, manifest = job.backbone, job.manifest
        assert list(run.images.id) == list(manifest.ids), "store rows are not the manifest's rows"
        prompts = prompts_for(job.prompt, manifest.ids, manifest.class_names)
        alphas = backbone.alphas_cumprod()
        cached = torch.from_numpy(run.array(t, block)[:].astype(np.float32))  # small: for the check below
        trainee = fresh()
        parts = {"decode": 0.0, "prepare": 0.0, "unet": 0.0, "step": 0.0}
        max_rel_diff = 0.0
        clock = [0.0]

        def lap(part: str) -> None:
            """Add the time since the last lap to `part`."""
            now = time.perf_counter()
            parts[part] += now - clock[0]
            clock[0] = now

        with ThreadPoolExecutor(4) as decoders:
            tic = clock[0] = time.perf_counter()
            for batch_rows in order:
                pixels = torch.from_numpy(read_chunk(manifest, batch_rows.tolist(), backbone.input, decoders).pixels)
                lap("decode")
                with torch.no_grad():
                    prepared = backbone.prepare(pixels, [prompts[i] for i in batch_rows])
                    x_t = q_sample(prepared.x0, [manifest.ids[i] for i in batch_rows], t, cfg.seed, alphas)
                    lap("prepare")
                    t_batch = torch.full((len(batch_rows),), t, dtype=torch.long)
                    h = backbone.forward_blocks(x_t, t_batch, [block], prepared.cond)[block]
                    lap("unet")
                trainee.step(Batch({key: h}, {}, torch.from_numpy(labels[batch_rows]), batch_rows))
                lap("step")
                # not timed: the online features are the cached ones (up to the store's float16)
                ref = cached[torch.from_numpy(batch_rows)]
                max_rel_diff = max(max_rel_diff, float((h - ref).abs().max() / ref.abs().max()))
                untimed = time.perf_counter() - clock[0]
                tic += untimed
                clock[0] += untimed
            online_s = time.perf_counter() - tic
        print(f"  online epoch: {online_s:.1f} s (backbone load {load_s:.1f} s, not counted)")
        assert max_rel_diff < 1e-2, f"online features differ from the cached ones by {max_rel_diff:.2e} (relative)"
        weight_diff = max(float((a - b).abs().max()) for a, b in
                          zip(cache_head.head.state_dict().values(), trainee.head.state_dict().values()))

    saved = online_s - cache_s
    return {
        "images": n_images, "batch_size": bs, "timestep": t, "block": block, "image_size": args.image_size,
        "head": spec.kind, "steps_per_epoch": len(order), "shape": list(run.blocks[block]),
        "extract_s": extract_s, "extract_prepare_s": extract_prepare_s, "extract_wall_s": extract_wall_s,
        "backbone_load_s": load_s,
        "cache_epoch_s": cache_s, "cache_epoch_all_s": [r[0] for r in cache_runs],
        "cache_read_s": cache_read_s, "cache_step_s": cache_step_s,
        "online_epoch_s": online_s, "online_parts_s": parts,
        "online_over_cache": online_s / cache_s,
        "online_over_extract": online_s / extract_s,
        "payoff_epochs": extract_s / saved if saved > 0 else math.inf,
        "features_max_rel_diff": max_rel_diff, "head_weights_max_diff": weight_diff,
    }


# -- report -------------------------------------------------------------------------------------------
def summary(report: dict) -> str:
    lines = [f"{'comparison':58} {'ours':>10} {'theirs':>10} {'ratio':>9}  check"]
    lines.append("-" * len(lines[0]) + "-" * 30)
    if (k := report.get("knn")) is not None:
        top = ", ".join(f"k={v}: {a:.4f}" for v, a in k["top1_faiss"].items())
        lines.append(f"{'kNN faiss vs sklearn brute cosine':58} {k['faiss_s']:9.2f}s {k['sklearn_s']:9.2f}s "
                     f"{k['sklearn_over_faiss']:8.1f}x  top-1 equal ({top})")
        lines.append(f"{'':4}{k['train']:,} x {k['dim']} train, {k['queries']:,} queries, k={k['k']}; "
                     f"same neighbour sets: {k['same_neighbour_sets']:.2%}")
    if (c := report.get("cka")) is not None:
        head = f"{c['rows']:,} rows, {c['dx']} vs {c['dy']}"
        if c.get("ckatorch"):
            lines.append(f"{'CKA biased: ours feature space vs ckatorch cka_base':58} {c['ours_feature_s']:9.3f}s "
                         f"{c['ckatorch_biased_s']:9.3f}s {c['ckatorch_biased_over_ours']:8.1f}x  "
                         f"{c['ours_biased']:.8f} vs {c['ckatorch_biased']:.8f} (diff {c['diff_biased']:.1e})")
            lines.append(f"{'CKA unbiased: ours feature space vs ckatorch cka_base':58} {c['ours_feature_s']:9.3f}s "
                         f"{c['ckatorch_unbiased_s']:9.3f}s {c['ckatorch_unbiased_over_ours']:8.1f}x  "
                         f"{c['ours_unbiased']:.8f} vs {c['ckatorch_unbiased']:.8f} (diff {c['diff_unbiased']:.1e})")
            if c.get("ckatorch_batch") is not None:
                lines.append(f"{'CKA minibatch ' + str(c['minibatch']) + ': ours vs ckatorch cka_batch':58} "
                             f"{c['ours_minibatch_s']:9.3f}s {c['ckatorch_batch_s']:9.3f}s "
                             f"{c['ckatorch_batch_over_ours']:8.1f}x  {c['ours_minibatch']:.8f} vs "
                             f"{c['ckatorch_batch']:.8f} (diff {c['diff_minibatch']:.1e})")
        else:
            lines.append(f"{'CKA: ckatorch missing, ours only':58} {c['ours_feature_s']:9.3f}s {'-':>10} {'-':>9}")
        lines.append(f"{'':4}{head}; ours Gram space {c['ours_gram_s']:.3f} s "
                     f"({c['ours_gram_s'] / c['ours_feature_s']:.1f}x the feature-space time), same values")
    if (g := report.get("cka_grid")) is not None:
        title = f"CKA {g['blocks']}x{g['blocks']} grid: ours {g['method']} vs ckatorch pair by pair"
        if g.get("ckatorch"):
            lines.append(f"{title:58} {g['ours_s']:9.1f}s {g['ckatorch_extrapolated_s']:9.0f}s "
                         f"{g['ckatorch_over_ours']:8.1f}x  max |diff| biased {g['max_diff_biased']:.1e}, "
                         f"unbiased {g['max_diff_unbiased']:.1e}")
            lines.append(f"{'':4}ckatorch: cka_base biased + unbiased timed on {g['pairs_timed']} seeded random pairs "
                         f"(mean {g['ckatorch_pair_s']:.1f} s a pair), EXTRAPOLATED to all {g['pairs_total']} pairs")
        else:
            lines.append(f"{title + ' (ckatorch missing)':58} {g['ours_s']:9.1f}s {'-':>10} {'-':>9}")
        lines.append(f"{'':4}{g['backbone']} blocks at pool {g['pool']} ({g['widths'][0]:,} to {g['widths'][-1]:,} "
                     f"features, {g['features']:,} in all), {g['rows']:,} images; off-diagonal unbiased CKA "
                     f"{g['ours_unbiased_range'][0]:.2f} to {g['ours_unbiased_range'][1]:.2f}; making the random "
                     f"features ({g['features_made_s']:.0f} s) not counted")
    if (e := report.get("epoch")) is not None:
        lines.append(f"{'epoch: cache (read + head step) vs online (backbone + step)':58} {e['cache_epoch_s']:9.3f}s "
                     f"{e['online_epoch_s']:9.2f}s {e['online_over_cache']:8.0f}x  same {e['steps_per_epoch']} "
                     f"batches; features rel diff {e['features_max_rel_diff']:.1e}")
        p = e["online_parts_s"]
        lines.append(f"{'':4}SD v1.5 random, {e['images']} images, batch {e['batch_size']}, t={e['timestep']}, "
                     f"{e['block']} {tuple(e['shape'])}, {e['image_size']} px, linear head")
        lines.append(f"{'':4}online parts: decode {p['decode']:.2f} s, VAE+text {p['prepare']:.1f} s, "
                     f"UNet to {e['block']} {p['unet']:.1f} s, head steps {p['step']:.3f} s; "
                     f"cache: read {e['cache_read_s']:.3f} s, head steps {e['cache_step_s']:.3f} s")
        lines.append(f"{'':4}extract once: {e['extract_s']:.1f} s (VAE+text {e['extract_prepare_s']:.1f} s; "
                     f"{e['extract_wall_s']:.1f} s with model load); online epoch / extract = "
                     f"{e['online_over_extract']:.2f}; pays off after {e['payoff_epochs']:.2f} epochs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", nargs="?", help="kNN/CKA on a feature store (default: random features).")
    parser.add_argument("--parts", default="knn,cka,cka-grid,epoch",
                        help="Comma-separated subset of knn,cka,cka-grid,epoch.")
    parser.add_argument("--run")
    parser.add_argument("--timestep", type=int, default=100, help="Store mode: the timestep of the kNN/CKA features.")
    parser.add_argument("--block", default="block2", help="Store mode: the block of the kNN/CKA features.")
    parser.add_argument("--other-block", help="Store mode: CKA's second view [default: the run's first other block].")
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--knn-train", type=int, default=20000)
    parser.add_argument("--knn-queries", type=int, default=5000)
    parser.add_argument("--knn-dim", type=int, default=1024)
    parser.add_argument("--cka-rows", type=int, default=2000)
    parser.add_argument("--cka-dims", default="512,256", help="Widths of the two random CKA views.")
    parser.add_argument("--cka-batch", type=int, default=250, help="Minibatch CKA batch size (divides --cka-rows "
                                                                   "for the ckatorch cka_batch comparison).")
    parser.add_argument("--cka-repeats", type=int, default=3, help="CKA times are the best of this many calls.")
    parser.add_argument("--grid-rows", type=int, default=2500, help="Images of the CKA grid.")
    parser.add_argument("--grid-pool", type=int, default=4, help="Pool size of the CKA grid's blocks.")
    parser.add_argument("--grid-pairs", type=int, default=10, help="Pairs of blocks ckatorch is timed on.")
    parser.add_argument("--grid-seed", type=int, default=0)
    parser.add_argument("--pkgs", type=Path, default=BENCH_DIR / "pkgs", help="Where ckatorch is installed for the bench.")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epoch-timestep", type=int, default=200)
    parser.add_argument("--epoch-block", default="mid")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cache-repeats", type=int, default=5, help="Cache epochs measured (median reported).")
    parser.add_argument("--sd-folder", type=Path, default=BENCH_DIR / "sd15-random")
    parser.add_argument("--json", type=Path, help="Also write the report here.")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if unknown := parts - {"knn", "cka", "cka-grid", "epoch"}:
        parser.error(f"unknown --parts {sorted(unknown)}")

    report: dict = {"knn": None, "cka": None, "cka_grid": None, "epoch": None}
    if parts & {"knn", "cka"}:
        if args.store:
            (train_x, train_y, test_x, test_y, other), load_s = timed(lambda: store_data(
                args.store, args.run, args.timestep, args.block, args.other_block, args.pool))
            print(f"read and pooled {args.store} t={args.timestep} in {load_s:.1f} s")
            cka_x, cka_y = train_x[:args.cka_rows], other[:args.cka_rows]
        else:
            train_x, train_y, test_x, test_y = random_data(args.knn_train, args.knn_queries, args.knn_dim)
            dx, dy = (int(d) for d in args.cka_dims.split(","))
            cka_x, cka_y = random_cka_views(args.cka_rows, dx, dy)
        if "knn" in parts:
            print("1. kNN ...")
            report["knn"] = bench_knn(train_x, train_y, test_x, test_y)
        if "cka" in parts:
            print("2. CKA ...")
            report["cka"] = bench_cka(cka_x, cka_y, args.cka_batch, args.pkgs, args.cka_repeats)
    if "cka-grid" in parts:
        print("2b. CKA grid ...")
        report["cka_grid"] = bench_cka_grid(args.grid_rows, args.grid_pool, args.grid_pairs, args.grid_seed, args.pkgs)
    if "epoch" in parts:
        print("3. cache epoch vs online epoch ...")
        report["epoch"] = bench_epoch(args)

    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    print()
    print(summary(report))


if __name__ == "__main__":
    main()
