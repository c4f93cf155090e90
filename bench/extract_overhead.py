"""Extraction overhead and stop-early, as ratios measured in one run, on full-size SD v1.5 graphs
with random weights (the real FLOPs; nothing downloaded).

1. `featurestore extract` (the real path: reader, VAE + text encode once per image, noise, hooks,
   one UNet forward per (batch, t), copies, background writer) against a bare loop of
   `unet(x_t, t, encoder_hidden_states)` over the same latents, timesteps and batches (after one
   warm-up forward; timed before and after the extraction and averaged, as the load drifts).
   overhead = (extract wall time - its once-per-image prepare time) / bare loop time; the prepare
   time (VAE encode, more FLOPs than a UNet forward at 512 px) is reported beside it.
2. stop-early = time of a forward that stops after `mid` (down0..3 + mid) / a forward through up3.

    python bench/extract_overhead.py [--images 4] [--batch-size 2] [--timesteps 100,500] [--device cpu]

The random-weight model folder (~4 GB) is written once under --cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "pipelines"))  # the random SD folder writer

from tiny_models import write_tiny_sd  # noqa: E402

from pipelines.extract.noise import q_sample  # noqa: E402
from pipelines.extract.runner import ExtractConfig, extract, prepare_job  # noqa: E402
from pipelines.extract.reader import read_chunk  # noqa: E402


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--timesteps", default="100,500")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "featurestore-bench" / "sd15-random")
    args = parser.parse_args()
    timesteps = [int(t) for t in args.timesteps.split(",")]

    if not (args.cache / "scheduler").is_dir():
        tic = time.perf_counter()
        write_tiny_sd(args.cache, full_size=True)
        print(f"wrote the random full-size SD folder to {args.cache} in {time.perf_counter() - tic:.0f} s")

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(store=f"{tmp}/s.zarr", backbone="sd15", weights=str(args.cache), dataset="demo",
                            limit=args.images, timesteps=timesteps, batch_size=args.batch_size,
                            device=args.device, progress=False)
        job = prepare_job(cfg)
        backbone = job.backbone
        unet = backbone.module
        with ThreadPoolExecutor(2) as pool:
            pixels = torch.from_numpy(read_chunk(job.manifest, range(args.images), backbone.input, pool).pixels)
        ids = list(job.manifest.ids)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        with torch.inference_mode():
            batches = []
            for start in range(0, args.images, args.batch_size):
                prepared = backbone.prepare(pixels[start:start + args.batch_size].to(args.device))
                for t in timesteps:
                    x_t = q_sample(prepared.x0, ids[start:start + args.batch_size], t, 0, backbone.alphas_cumprod())
                    batches.append((x_t, torch.full((len(x_t),), t, device=x_t.device), prepared.cond))

            def bare() -> None:
                for x_t, t, cond in batches:
                    unet(x_t, t, encoder_hidden_states=cond)
                sync()

            unet(*batches[0][:2], encoder_hidden_states=batches[0][2])  # warm-up: kernels chosen, memory allocated
            bare_before = timed(bare)
            seconds = extract(cfg).seconds  # the bare loop runs before and after it: load drifts
            bare_s = (bare_before + timed(bare)) / 2
            x_t, t, cond = batches[0]
            down_mid = ["down0", "down1", "down2", "down3", "mid"]
            stop_s = min(timed(lambda: (backbone.forward_blocks(x_t, t, down_mid, cond), sync())) for _ in range(2))
            full_s = min(timed(lambda: (backbone.forward_blocks(x_t, t, list(backbone.blocks), cond), sync()))
                         for _ in range(2))

    work = args.images * len(timesteps)
    report = {
        "device": args.device, "images": args.images, "timesteps": timesteps, "batch_size": args.batch_size,
        "extract_s": round(seconds["total"], 2), "prepare_s": round(seconds["prepare"], 2),
        "bare_unet_loop_s": round(bare_s, 2),
        "overhead_ratio": round((seconds["total"] - seconds["prepare"]) / bare_s, 3),
        "overhead_ratio_with_prepare": round(seconds["total"] / bare_s, 3),
        "stop_early_ratio": round(stop_s / full_s, 3),
        "images_t_per_s": round(work / seconds["total"], 3),
        "unet_images_t_per_s": round(work / bare_s, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
