"""`featurestore demo`: the whole flow on the embedded default.

Extract MNIST DDPM features of the 2,000 embedded digits at seven timesteps and four blocks
(one forward per batch and t), then from the cache alone a linear probe and a weighted kNN for
every (t, block) (`sweep`), linear CKA between every pair of blocks at t=100 (`cka --grid
blocks`), and one self-contained HTML report page. Written into `out`: the store `store.zarr`,
its results folder `store.zarr.results/` (the sweep as JSON and CSV and its two plots, the CKA
grid as JSON and PNG) and `report.html`.

Segmentation (its own store, so that `store.zarr` keeps one run and every command without --run
works on it): 600 of the same digits as MNIST-seg (`mnist-seg-demo`: 11 classes, background and 1 +
the digit on pixels > 127), the first 300 of its train split and the first 300 of its test split
(written as the manifest `mnist-seg-demo-600.csv`), extracted at t=0 into `mnist-seg.zarr`; one
hypercolumn head over the four blocks trained on the train digits' stored masks (`featurestore
segment --head hypercolumn --blocks all`), scored on the test digits beside the majority-class
baseline; results in `mnist-seg.zarr.results/`, its own page `mnist-seg.html`. Small on purpose:
it adds about half a minute to the demo.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from data_manifests.manifest import Manifest, load_dataset

from featurestore.store import FeatureStore
from pipelines.analysis import results_dir
from pipelines.analysis.cka import CkaResult, cka_run, grid_views, save_cka
from pipelines.analysis.sweep import pivot_table, save_sweep, sweep_run
from pipelines.extract.runner import ExtractConfig, extract
from pipelines.report.html import write_report

DEMO_TIMESTEPS = [0, 10, 50, 100, 200, 300, 500]
DEMO_POOL = 4
DEMO_CKA_TIMESTEP = 100
DEMO_SEG_TIMESTEP = 0
DEMO_SEG_EPOCHS = 20
DEMO_SEG_BATCH = 32
DEMO_SEG_LR = 2e-2
DEMO_SEG_PER_SPLIT = 300  # the first rows of mnist-seg-demo's train split (0..999) and of its test split (1000..1999)


def run_demo(out: Path, batch_size: int = 64, progress: bool = True,
             echo: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Run the demo into `out`; returns the report pages (the digits' and the segmentation's)."""
    out.mkdir(parents=True, exist_ok=True)
    store_path = str(out / "store.zarr")
    results = results_dir(store_path, None)
    tic = time.perf_counter()
    result = extract(ExtractConfig(
        store=store_path, backbone="ddpm-mnist", dataset="demo", timesteps=DEMO_TIMESTEPS,
        batch_size=batch_size, progress=progress,
    ))
    echo(f"extracted run {result.run_id}: {result.done} images x {len(DEMO_TIMESTEPS)} timesteps x 4 blocks "
         f"in {time.perf_counter() - tic:.1f} s")
    store = FeatureStore.open(store_path)
    sweep = sweep_run(store, result.run_id, pool=DEMO_POOL)
    saved = save_sweep(sweep, results, store)
    echo(f"linear probe, test top-1 (features pooled to {DEMO_POOL}x{DEMO_POOL}; 1,000 train / 1,000 test digits):")
    echo(pivot_table(sweep, "linear_top1"))
    echo(f"weighted kNN (k={sweep.knn_k}), test top-1:")
    echo(pivot_table(sweep, "knn_top1"))
    echo(f"{len(sweep.rows)} (t, block) pairs probed from the cache in {sweep.seconds:.1f} s; saved "
         + ", ".join(str(p) for p in saved))
    tic = time.perf_counter()
    cka = cka_run(*grid_views(store, "blocks", result.run_id, timestep=DEMO_CKA_TIMESTEP), "blocks", pool=DEMO_POOL)
    saved = save_cka(cka, results)
    echo(f"linear CKA (unbiased, {cka.method} method) between blocks at t={DEMO_CKA_TIMESTEP}, {cka.images} digits:")
    echo(cka_table(cka, "unbiased"))
    echo(f"in {time.perf_counter() - tic:.1f} s; saved " + ", ".join(str(p) for p in saved))
    report = Path(write_report(store_path, out / "report.html").out)
    return report, segment_demo(out, batch_size, progress, echo)


def segment_demo(out: Path, batch_size: int, progress: bool, echo: Callable[[str], None]) -> Path:
    """MNIST-seg into its own store `out/mnist-seg.zarr`: extract DEMO_SEG_PER_SPLIT train and as
    many test digits with their masks at one timestep, train one hypercolumn head over every block,
    print its test mIoU and pixel accuracy beside the majority-class baseline, and write the page
    `out/mnist-seg.html`; returns that page."""
    from data_manifests.builders import DEMO_DIR
    from pipelines.dense.runner import DenseConfig, dense_run
    from pipelines.dense.train import DenseTrainConfig

    tic = time.perf_counter()
    manifest = out / "mnist-seg-demo-600.csv"
    split_spread(load_dataset("mnist-seg-demo"), DEMO_SEG_PER_SPLIT).to_csv(manifest)
    store_path = str(out / "mnist-seg.zarr")
    result = extract(ExtractConfig(store=store_path, backbone="ddpm-mnist", manifest=manifest, data_root=DEMO_DIR,
                                   timesteps=[DEMO_SEG_TIMESTEP], batch_size=batch_size, progress=progress))
    store = FeatureStore.open(store_path)
    cfg = DenseConfig("segment", "hypercolumn", None, [DEMO_SEG_TIMESTEP], run_id=result.run_id,
                      train=DenseTrainConfig(epochs=DEMO_SEG_EPOCHS, batch_size=DEMO_SEG_BATCH, lr=DEMO_SEG_LR))
    doc = dense_run(store, cfg, results_dir(store_path, None))
    head, base = doc["heads"][0], doc["baseline"]
    echo(f"MNIST-seg (11 classes: background, digit 0..9; {doc['images']['train']} train / {doc['images']['test']} "
         f"test digits of the manifest's splits), one hypercolumn head over {'+'.join(b for _, b in head['keys'])} "
         f"at t={DEMO_SEG_TIMESTEP}, {DEMO_SEG_EPOCHS} epochs; test mIoU (over the classes whose IoU is defined) "
         "and pixel accuracy:")
    echo("| | mIoU | pixel accuracy |\n|---|---|---|")
    echo(f"| hypercolumn head | {head['miou']:.3f} | {head['pixel_accuracy']:.3f} |")
    echo(f"| {base['name']} ({base['class']}) | {base['miou']:.3f} | {base['pixel_accuracy']:.3f} |")
    page = Path(write_report(store_path, out / "mnist-seg.html").out)
    echo(f"in {time.perf_counter() - tic:.1f} s (extraction included); saved {doc['out']} and {page}")
    return page


def split_spread(manifest: Manifest, per_split: int) -> Manifest:
    """The first `per_split` rows of each of the manifest's splits, in manifest order, with their
    targets (a manifest without pairs). ValueError when a split has fewer rows."""
    if manifest.pairs:
        raise ValueError(f"{manifest.name}: split_spread keeps no pairs")
    splits, names = np.array(manifest.splits), list(dict.fromkeys(manifest.splits))
    short = [s for s in names if (splits == s).sum() < per_split]
    if short:
        raise ValueError(f"{manifest.name}: split(s) {', '.join(short)} have fewer than {per_split} rows")
    rows = np.sort(np.concatenate([np.flatnonzero(splits == s)[:per_split] for s in names]))
    pick = lambda values: tuple(values[i] for i in rows)  # noqa: E731
    return replace(manifest, ids=pick(manifest.ids), sources=pick(manifest.sources), labels=pick(manifest.labels),
                   splits=pick(manifest.splits), domains=pick(manifest.domains),
                   targets={c: pick(v) for c, v in manifest.targets.items()})


def cka_table(result: CkaResult, estimator: str) -> str:
    """One CKA matrix as a Markdown table (n/a: undefined)."""
    lines = ["| | " + " | ".join(result.cols) + " |", "|---|" + "---|" * len(result.cols)]
    for label, row in zip(result.rows, result.matrices[estimator]):
        lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)
