"""Peak memory of the dense linear probe as the number of images grows (not a timed test).

One store holds N_max images of (320, 64, 64) float16 maps (the shape of SD v1.5's finest decoder
block) and their 64 x 64 masks of 11 classes, written through the store and targets APIs. For each
N the linear dense head (pipelines/dense: LayerNorm + 1x1 conv, cross-entropy with ignore index)
trains one epoch on the first N images in a FRESH process, streamed by `StoreBatches` exactly as
`featurestore segment` streams them, and that process reports its peak resident set size
(VmHWM). Flat peaks across N show that memory is bounded by the read window, not by the data.

The maps are random: four chunks of standard normals (float16) are drawn once and written in turn
into every chunk (drawing 13 billion normals would dominate the run; what the reader holds per
window is the same). Disk: N_max x 2.6 MB (26 GB at 10,000), under --folder; delete it afterwards.

Usage:
    python bench/dense_memory.py                              # N = 2500, 5000, 10000
    python bench/dense_memory.py --sizes 500,1000 --folder /tmp/dm   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = (320, 64, 64)
CLASSES = [f"c{k}" for k in range(11)]
CHUNK_ROWS = 16


def build(folder: Path, n: int) -> str:
    """The store with n images (reused when it is there and complete)."""
    from featurestore.store import FeatureStore
    from featurestore.targets import RowTargets, write_targets

    path = folder / f"dense-{n}.zarr"
    done = folder / f"dense-{n}.done"
    if done.exists():
        return str(path)
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(0)
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"img{i}" for i in range(n)]
    rows = store.add_images("bench", {"id": ids, "label": [0] * n, "class_name": ["x"] * n,
                                      "split": ["train"] * (n - 16) + ["test"] * 16, "domain": ["x"] * n,
                                      "source": ids})
    run = store.create_run({"dataset": "bench"}, arrays={"up3": SHAPE}, timesteps=[0], rows=rows,
                           chunk_rows=CHUNK_ROWS, dtype="float16", provenance={"backbone": {"input": {"size": 64}}})
    pool = [rng.standard_normal((CHUNK_ROWS, *SHAPE), dtype=np.float32).astype(np.float16) for _ in range(4)]
    tic = time.perf_counter()
    for c in range(run.n_chunks):
        k = run.chunk_len(c)
        run.write_chunk(c, {(0, "up3"): pool[c % 4][:k]}, np.zeros(k, bool), [""] * k)
    masks = rng.integers(0, len(CLASSES), (64, 64, 64)).astype(np.uint8)
    write_targets(store, "bench", rows, resize="crop", size=64, info={"mask": {"classes": CLASSES}},
                  load=lambda i: RowTargets((64, 64), np.array([1.0, 0, 1, 0]), mask=masks[i % 64]))
    print(f"wrote {n} images in {time.perf_counter() - tic:.0f} s to {path}", file=sys.stderr)
    done.touch()
    return str(path)


def train_once(store_path: str, n: int, batch_size: int) -> dict:
    """One epoch of the linear dense head on the first n images; peak RSS of this process."""
    import torch

    from featurestore.store import FeatureStore
    from featurestore.targets import run_targets
    from pipelines.dense.heads import DenseSpec, build_dense_head
    from pipelines.dense.train import DenseTrainConfig, DenseTrainee, TargetReader, segmentation_loss, train_dense
    from pipelines.heads.data import StoreBatches

    run = FeatureStore.open(store_path).runs()[0]
    tg = run_targets(run)
    cfg = DenseTrainConfig(epochs=1, batch_size=batch_size)
    data = StoreBatches(run, [(0, "up3")], TargetReader(tg.masks), batch_size=batch_size)
    head = build_dense_head(DenseSpec("linear", {(0, "up3"): SHAPE}, len(CLASSES), 64))
    trainee = DenseTrainee("linear", head, lambda m, b: m(b.features), segmentation_loss, cfg,
                           -(-n // batch_size), torch.device("cpu"))
    tic = time.perf_counter()
    train_dense(data, [trainee], np.arange(n), cfg)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux (VmHWM)
    return {"images": n, "peak_rss_gb": peak_kb / 2**20, "epoch_seconds": time.perf_counter() - tic,
            "window_rows": data.window_chunks * run.chunk_rows, "loss": trainee.epoch_log[-1]["train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2500,5000,10000")
    parser.add_argument("--folder", default="/tmp/dense-memory")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train", nargs=2, metavar=("STORE", "N"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.train:
        print(json.dumps(train_once(args.train[0], int(args.train[1]), args.batch_size)))
        return
    sizes = [int(v) for v in args.sizes.split(",")]
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    store = build(folder, max(sizes))
    rows = []
    for n in sizes:
        command = [sys.executable, __file__, "--train", store, str(n), "--batch-size", str(args.batch_size)]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        child = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"N = {n:6d}: peak RSS {rows[-1]['peak_rss_gb']:.2f} GB, epoch {rows[-1]['epoch_seconds']:.0f} s",
              file=sys.stderr)
    print(json.dumps({"shape": SHAPE, "dtype": "float16", "classes": len(CLASSES), "batch_size": args.batch_size,
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
