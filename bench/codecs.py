"""Bytes per stored value and write/read speed of candidate codecs on real activations.

Reads every (t, block) array of one run of a store (e.g. the demo's), rewrites it under each
codec into a temporary store, and prints one table. Usage:
    python bench/codecs.py demo-output/store.zarr [--limit-rows 1024]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import zarr
import zarr.codecs

from featurestore.store import FeatureStore

CANDIDATES = {
    "none": None,
    "zarr default (zstd level 0)": "default",
    "blosc zstd5 + shuffle": zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
    "blosc zstd1 + shuffle": zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    "blosc lz4 + shuffle": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc zstd1 + bitshuffle": zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
    "blosc zstd5 + bitshuffle": zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--limit-rows", type=int, default=1024)
    args = parser.parse_args()
    run = FeatureStore.open(args.store).runs()[0]
    arrays = [run.array(t, b) for t in run.timesteps for b in run.blocks]
    data = [(a.chunks, a[: args.limit_rows]) for a in arrays]
    values = sum(d.size for _, d in data)
    print(f"run {run.run_id}: {len(data)} arrays, {values:,} {data[0][1].dtype} values")
    print(f"{'codec':32s} {'bytes/value':>12s} {'ratio':>7s} {'write MB/s':>11s} {'read MB/s':>10s}")
    for name, codec in CANDIDATES.items():
        with tempfile.TemporaryDirectory() as tmp:
            g = zarr.open_group(tmp, mode="w")
            kwargs = {} if codec == "default" else {"compressors": codec}
            tic = time.perf_counter()
            for k, (chunks, d) in enumerate(data):
                g.create_array(str(k), shape=d.shape, dtype=d.dtype, chunks=chunks, **kwargs)[:] = d
            write_s = time.perf_counter() - tic
            tic = time.perf_counter()
            for k in range(len(data)):
                g[str(k)][:]
            read_s = time.perf_counter() - tic
            stored = sum(g[str(k)].nbytes_stored() for k in range(len(data)))
        raw = sum(d.nbytes for _, d in data)
        print(f"{name:32s} {stored / values:12.3f} {raw / stored:7.3f} {raw / write_s / 1e6:11.0f} {raw / read_s / 1e6:10.0f}")


if __name__ == "__main__":
    main()
