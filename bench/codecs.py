"""What each codec of `featurestore extract --codec` costs: bytes per stored value, write and read
speed, and the change of the linear-probe and kNN top-1 of every (t, block) against lossless zstd.

Reads every done chunk of one run of a store (never writes to it), writes it again under each codec
into a fresh store of its own under --work (the same spec with the codec, so the same values an
extraction with that `--codec` stores), runs `featurestore sweep`'s analysis (`sweep_run`: logistic
probe and weighted kNN on features pooled to --pool) on each, and prints one Markdown table: a row
per (t, block) with the lossless top-1 and each codec's change in points (100 x top-1), then the
bytes per value, speeds, worst and mean change, and whether the codec meets the target: at most
--target-bytes bytes per value with at most --target-drop points of probe top-1 lost, on average
over the (t, block) and at every one.
Usage:
    python bench/codecs.py demo-output/store.zarr [--codecs zstd,bitround:3,int8] [--work /tmp/codecs]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from featurestore.store import FeatureStore, Run, timestep_key
from pipelines.analysis.sweep import KNN_K, SweepResult, sweep_run

# bitround:9 drops one mantissa bit of float16 (relative error <= 2^-10): its changes show how much
# top-1 moves under any tiny change of the features, the noise floor of the other columns
CODECS = "zstd,bitround:9,bitround:4,bitround:3,bitround:2,int8"


def reencode(source: Run, codec: str, path: Path) -> tuple[Run, float]:
    """A copy of `source` at `path` whose features are stored with `codec`; returns it and the
    seconds spent in `write_chunk`."""
    shutil.rmtree(path, ignore_errors=True)
    store = FeatureStore.open(path, "a")
    images = source.images
    rows = store.add_images(str(images.dataset[0]), {c: getattr(images, c) for c in
                                                     ("id", "label", "class_name", "split", "domain", "source")})
    spec = {k: v for k, v in source.spec.items() if k != "codec"} | ({} if codec == "zstd" else {"codec": codec})
    run = store.create_run(spec, arrays=source.blocks, timesteps=source.timesteps, rows=rows,
                           chunk_rows=source.chunk_rows, dtype=source.attrs["dtype"], provenance=source.provenance)
    failed, errors = source.failed, source.errors
    seconds = 0.0
    for c in np.flatnonzero(source.done_chunks()):
        s = source.chunk_slice(int(c))
        features = {(t, b): source.read_chunk(t, b, int(c)) for t in source.timesteps for b in source.blocks}
        tic = time.perf_counter()
        run.write_chunk(int(c), features, failed[s], errors[s])
        seconds += time.perf_counter() - tic
    run.mark_finished()
    return run, seconds


def read_seconds(run: Run) -> float:
    tic = time.perf_counter()
    for c in np.flatnonzero(run.done_chunks()):
        for t in run.timesteps:
            for b in run.blocks:
                run.read_chunk(t, b, int(c))
    return time.perf_counter() - tic


def stored_bytes(run: Run) -> int:
    return sum(run.array(t, b).nbytes_stored() for t in run.timesteps for b in run.blocks)


def points(result: SweepResult, metric: str) -> dict[tuple, float]:
    return {(r.timestep, r.block): 100 * getattr(r, metric) for r in result.rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--run", default=None, help="run id or prefix (default: the store's only run)")
    parser.add_argument("--codecs", default=CODECS, help=f"comma-separated, zstd first (default {CODECS})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/featurestore-codecs"),
                        help="folder for the re-encoded stores (each replaced on every run)")
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--holdout", type=float, default=None, help="for a store with one split, as in sweep")
    parser.add_argument("--target-bytes", type=float, default=1.0)
    parser.add_argument("--target-drop", type=float, default=0.2, help="points of probe top-1")
    args = parser.parse_args()
    codecs = args.codecs.split(",")
    if codecs[0] != "zstd":
        parser.error("--codecs must start with zstd, the lossless reference")
    source_store = FeatureStore.open(args.store)
    source = source_store.run(args.run) if args.run else source_store.runs()[0]
    values = sum(len(source) * int(np.prod(chw)) for chw in source.blocks.values()) * len(source.timesteps)
    work = args.work / source.run_id
    if work.resolve() == Path(args.store).resolve() or Path(args.store).resolve() in work.resolve().parents:
        parser.error("--work must lie outside the store")

    measured = {}
    for codec in codecs:
        print(f"{codec}: re-encoding run {source.run_id} into {work}", file=sys.stderr, flush=True)
        run, write_s = reencode(source, codec, work / f"{codec.replace(':', '-')}.zarr")
        read_s = read_seconds(run)
        print(f"{codec}: sweep (probe and kNN per (t, block))", file=sys.stderr, flush=True)
        result = sweep_run(run.store, run.run_id, pool=args.pool, holdout=args.holdout)
        measured[codec] = (stored_bytes(run) / values, write_s, read_s, points(result, "linear_top1"),
                           points(result, "knn_top1"))
    raw_mb = values * np.dtype(source.attrs["dtype"]).itemsize / 1e6
    base_probe, base_knn = measured["zstd"][3], measured["zstd"][4]
    keys = list(base_probe)
    lossy = codecs[1:]

    print(f"store {args.store}, run {source.run_id}: {len(source):,} images, {len(keys)} (t, block), {values:,} "
          f"{source.attrs['dtype']} values. Top-1 of the logistic probe / weighted kNN (k={KNN_K}) on features "
          f"pooled to {args.pool}x{args.pool} (featurestore sweep); each codec's change in points vs zstd.")
    print("| t | block | zstd (lossless) | " + " | ".join(lossy) + " |")
    print("|---|---|---|" + "---|" * len(lossy))
    for key in keys:
        cells = [f"{measured[c][3][key] - base_probe[key]:+.1f} / {measured[c][4][key] - base_knn[key]:+.1f}"
                 for c in lossy]
        print(f"| {timestep_key(key[0])} | {key[1]} | {base_probe[key]:.1f} / {base_knn[key]:.1f} | "
              + " | ".join(cells) + " |")

    def row(name: str, cell) -> None:
        print(f"| {name} | | " + " | ".join(cell(c) for c in codecs) + " |")

    def worst(c: str, which: int) -> float:
        return min(measured[c][which][k] - measured["zstd"][which][k] for k in keys)

    def mean(c: str, which: int) -> float:
        return float(np.mean([measured[c][which][k] - measured["zstd"][which][k] for k in keys]))

    row("bytes per value", lambda c: f"{measured[c][0]:.3f}")
    row("write / read MB/s", lambda c: f"{raw_mb / measured[c][1]:.0f} / {raw_mb / measured[c][2]:.0f}")
    row("worst change", lambda c: "" if c == "zstd" else f"{worst(c, 3):+.1f} / {worst(c, 4):+.1f}")
    row("mean change", lambda c: "" if c == "zstd" else f"{mean(c, 3):+.2f} / {mean(c, 4):+.2f}")
    small = {c: measured[c][0] <= args.target_bytes for c in codecs}
    row(f"<= {args.target_bytes} B/value, mean probe loss <= {args.target_drop}",
        lambda c: "yes" if small[c] and mean(c, 3) >= -args.target_drop else "no")
    row(f"<= {args.target_bytes} B/value, probe loss <= {args.target_drop} at every (t, block)",
        lambda c: "yes" if small[c] and worst(c, 3) >= -args.target_drop else "no")


if __name__ == "__main__":
    main()
