"""`featurestore demo`: the whole flow on the embedded default.

Extract MNIST DDPM features of the 2,000 embedded digits at seven timesteps and four blocks
(one forward per batch and t), then from the cache alone a linear probe and a weighted kNN for
every (t, block) (`sweep`), linear CKA between every pair of blocks at t=100 (`cka --grid
blocks`), and one self-contained HTML report page. Written into `out`: the store `store.zarr`,
its results folder `store.zarr.results/` (the sweep as JSON and CSV and its two plots, the CKA
grid as JSON and PNG) and `report.html`.

Dense section: the first 600 of the same digits as MNIST-seg (`mnist-seg-demo`: 11 classes,
background and 1 + the digit on pixels > 127) extracted at one timestep, and a per-pixel linear head
per block trained on the stored masks of half of them in one pass (`featurestore segment --grid
--holdout 0.5`); its mIoU table is printed and the report shows it with predictions beside the
ground truth. Small on purpose: it adds seconds, not minutes, to the demo.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from featurestore.store import FeatureStore
from pipelines.analysis import results_dir
from pipelines.analysis.cka import CkaResult, cka_run, grid_views, save_cka
from pipelines.analysis.sweep import pivot_table, save_sweep, sweep_run
from pipelines.extract.runner import ExtractConfig, extract
from pipelines.report.html import write_report

DEMO_TIMESTEPS = [0, 10, 50, 100, 200, 300, 500]
DEMO_POOL = 4
DEMO_CKA_TIMESTEP = 100
DEMO_SEG_TIMESTEP = 100
DEMO_SEG_EPOCHS = 8
DEMO_SEG_IMAGES = 600  # the manifest's first rows (all in its "train" split): tested on a seeded half


def run_demo(out: Path, batch_size: int = 64, progress: bool = True, echo: Callable[[str], None] = print) -> Path:
    """Run the demo into `out`; returns the report page."""
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
    segment_demo(store_path, results, batch_size, progress, echo)
    return Path(write_report(store_path, out / "report.html").out)


def segment_demo(store_path: str, results: Path, batch_size: int, progress: bool, echo: Callable[[str], None]) -> None:
    """MNIST-seg: extract the demo digits with their masks at one timestep, train a per-pixel
    linear head per block (one pass per epoch) and print the test mIoU of each."""
    from pipelines.dense.runner import DenseConfig, dense_run
    from pipelines.dense.train import DenseTrainConfig

    tic = time.perf_counter()
    result = extract(ExtractConfig(store=store_path, backbone="ddpm-mnist", dataset="mnist-seg-demo",
                                   timesteps=[DEMO_SEG_TIMESTEP], limit=DEMO_SEG_IMAGES, batch_size=batch_size,
                                   progress=progress))
    store = FeatureStore.open(store_path)
    blocks = list(store.run(result.run_id).blocks)
    cfg = DenseConfig("segment", "linear", blocks, [DEMO_SEG_TIMESTEP], grid=True, run_id=result.run_id, holdout=0.5,
                      train=DenseTrainConfig(epochs=DEMO_SEG_EPOCHS, batch_size=16, lr=1e-2))
    doc = dense_run(store, cfg, results)
    echo(f"MNIST-seg (11 classes: background, digit 0..9; {doc['images']['train']} train / {doc['images']['test']} "
         f"test digits), per-pixel linear head per block at t={DEMO_SEG_TIMESTEP}, {DEMO_SEG_EPOCHS} epochs; "
         "test mIoU (over the classes whose IoU is defined) and pixel accuracy:")
    echo("| block | mIoU | pixel accuracy |\n|---|---|---|")
    for h in doc["heads"]:
        echo(f"| {h['keys'][0][1]} | {h['miou']:.3f} | {h['pixel_accuracy']:.3f} |")
    echo(f"in {time.perf_counter() - tic:.1f} s (extraction included); saved {doc['out']}")


def cka_table(result: CkaResult, estimator: str) -> str:
    """One CKA matrix as a Markdown table (n/a: undefined)."""
    lines = ["| | " + " | ".join(result.cols) + " |", "|---|" + "---|" * len(result.cols)]
    for label, row in zip(result.rows, result.matrices[estimator]):
        lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)
