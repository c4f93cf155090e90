"""`featurestore extract`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import EXIT_NONFINITE, EXIT_SOME_FAILED, app, parse_blocks, parse_pool, parse_timesteps, user_errors


@app.command()
@user_errors
def extract(
    store: Annotated[str, typer.Option(help="Store path or fsspec URL (created if missing).")],
    backbone: Annotated[str, typer.Option(help="A registered backbone (featurestore backbones list).")] = "ddpm-mnist",
    dataset: Annotated[Optional[str], typer.Option(help="A dataset of data_manifests/ (demo, mnist-test, ...).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="A manifest YAML or CSV instead of --dataset.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Overrides the manifest's root folder.")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="Checkpoint (.safetensors, .pt/.pth/.th read weights-only), model folder, or 'random'.")] = None,
    backbone_config: Annotated[Optional[Path], typer.Option(help="JSON config of a configurable backbone.")] = None,
    timesteps: Annotated[Optional[list[str]], typer.Option("--timesteps", "--timestep", help="Integer timesteps, repeated or comma-separated (default: the backbone's).")] = None,
    blocks: Annotated[Optional[list[str]], typer.Option("--blocks", "--block", help="'all' (default) or block names, repeated or comma-separated.")] = None,
    attention_maps: Annotated[bool, typer.Option(help="Also store cross-attention maps <block>.attn.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images of the manifest.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward (does not change the values).")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the per-(image, t) noise.")] = 0,
    prompt: Annotated[str, typer.Option(
        help="null|blip|classnames|fixed:TEXT|file:PATH|tags[:TEMPLATE]|tags:FILE (conditional backbones; tags: the "
             "classes in each image's mask, or predicted tags from a CSV of id,tags).")] = "null",
    noise: Annotated[str, typer.Option(help="ddpm (q_sample), ddim-inversion, or none (the clean input at t).")] = "ddpm",
    ensemble: Annotated[int, typer.Option(
        help="Store the mean of every block over K noise draws (--noise ddpm; K forwards per t; part of the run spec).")] = 1,
    noise_draws: Annotated[int, typer.Option(
        help="Store K noise draws of every block along a 'draw' axis (--noise ddpm; K forwards per t; part of "
             "the run spec; read with --draws mean|all|<k>).")] = 1,
    ddim_steps: Annotated[int, typer.Option(help="DDIM inversion steps up to the largest timestep.")] = 50,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance of the DDIM inversion.")] = 1.0,
    captioner: Annotated[Optional[str], typer.Option(help="BLIP folder or hub id in the local cache (--prompt blip).")] = None,
    caption_max_tokens: Annotated[int, typer.Option(help="Longest BLIP caption, in tokens.")] = 30,
    device: Annotated[str, typer.Option(help="Torch device; never falls back silently.")] = "cpu",
    pool: Annotated[Optional[str], typer.Option(help="Adaptive average pool: SIZE for all, or BLOCK=SIZE,...")] = None,
    resize: Annotated[str, typer.Option(
        help="How images reach the square input: crop (short side, centre crop) or squash (both sides, DIFT's).")] = "crop",
    dtype: Annotated[str, typer.Option(help="Stored precision: float16 or float32.")] = "float16",
    codec: Annotated[str, typer.Option(
        help="How features are stored (part of the run spec): zstd (lossless), bitround:K (K mantissa bits "
             "kept, then zstd) or int8 (8-bit codes per chunk and channel, then zstd).")] = "zstd",
    autocast: Annotated[Optional[str], typer.Option(help="Compute precision on CUDA: bf16 (default there), fp16, none.")] = None,
    chunk_rows: Annotated[Optional[int], typer.Option(help="Rows per chunk of a new run (default from block sizes).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Run on a local dask cluster of N worker processes.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Run on an existing dask cluster at this address.")] = None,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Extract again the chunks holding images that failed (e.g. once their files are fixed).")] = False,
    allow_mismatch: Annotated[bool, typer.Option(
        "--allow-mismatch", help="Extract colour images with a grey-only backbone (refused by default).")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the arrays, the expected store size and time (measured on a warm-up) and the "
                          "free space; write nothing to the store.")] = False,
    warmup_images: Annotated[int, typer.Option(
        help="Images extracted into a temporary store to measure sizes and speed (--dry-run, disk check).")] = 32,
    ignore_free_space: Annotated[bool, typer.Option(
        "--ignore-free-space", help="Start even when the store would not fit in its device's free space.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run the frozen backbone once per (image, timestep) and store every requested block."""
    from pipelines.extract.runner import ExtractConfig, dry_run as plan_extract, extract as run_extract

    cfg = ExtractConfig(
        store=store, backbone=backbone, dataset=dataset, manifest=manifest, data_root=data_root,
        weights=weights, backbone_config=backbone_config, timesteps=parse_timesteps(timesteps),
        blocks=parse_blocks(blocks), attention_maps=attention_maps, limit=limit, batch_size=batch_size,
        seed=seed, noise=noise, ensemble=ensemble, noise_draws=noise_draws, ddim_steps=ddim_steps,
        guidance_scale=guidance_scale, prompt=prompt,
        captioner=captioner, caption_max_tokens=caption_max_tokens, pool=parse_pool(pool), resize=resize, dtype=dtype, codec=codec,
        device=device, autocast=autocast, chunk_rows=chunk_rows, workers=workers, scheduler=scheduler,
        progress=not json_out and sys.stderr.isatty(), retry_failed=retry_failed, allow_mismatch=allow_mismatch,
        ignore_free_space=ignore_free_space, warmup_images=warmup_images,
    )
    if dry_run:
        plan = plan_extract(cfg)
        typer.echo(plan.to_json() if json_out else plan.to_text())
        return
    result = run_extract(cfg)
    if json_out:
        typer.echo(result.to_json())
    else:
        s = result.seconds
        typer.echo(
            f"run {result.run_id}: {result.done}/{result.images} images done, {len(result.failed)} failed; "
            f"wrote {result.chunks_written} chunks, {result.chunks_skipped} already done"
        )
        if result.chunks_written:
            typer.echo(
                f"{s['total']:.1f} s ({result.images_timesteps_per_s:.1f} images*t/s); waiting on read "
                f"{s['read']:.1f} s, compute {s['compute']:.1f} s, waiting on write {s['write']:.1f} s"
            )
        for image_id, error in list(result.failed.items())[:20]:
            typer.echo(f"failed: {image_id}: {error}", err=True)
        if result.failed:
            typer.echo(f"{len(result.failed)} images failed and are left out of every analysis; once their files are "
                       "fixed, the same command with --retry-failed extracts them", err=True)
    if result.nonfinite:
        typer.echo(nonfinite_line(result.nonfinite, dtype), err=True)
        raise typer.Exit(EXIT_NONFINITE)
    if result.failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def nonfinite_line(nonfinite: dict[str, dict[str, int]], dtype: str) -> str:
    """One line naming the arrays ("t<T>/<block>") that hold inf/NaN, with counts, and what to do:
    store float32 when only the cast overflowed; look at the model when it computed them itself."""
    computed = {key: c["computed"] for key, c in nonfinite.items() if c["computed"]}
    if computed:
        where = ", ".join(f"{key} ({n:,} values)" for key, n in computed.items())
        return (f"error: the model itself produced inf/NaN in {where}, before the cast to {dtype}; check the weights "
                "and inputs (--dtype float32 will not help). The run is stored; reading those arrays is refused")
    where = ", ".join(f"{key} ({c['stored']:,} values)" for key, c in nonfinite.items())
    return (f"error: {dtype} overflow: {where} stored as inf (values beyond 65504); extract again with "
            "--dtype float32 (a new run). The run is stored; reading those arrays is refused")
