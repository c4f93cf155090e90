"""The `featurestore` command: each command parses its options into a typed config, calls one
pipeline function, and prints or writes its result. No logic of its own."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Extract diffusion features once into a zarr store; probe, compare and retrieve from the cache.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
backbones_app = typer.Typer(help="The registered backbones and their block tables.", no_args_is_help=True)
app.add_typer(backbones_app, name="backbones")

EXIT_ERROR = 1
EXIT_SOME_FAILED = 3  # extraction finished, but some images could not be read


def user_errors(command: Callable) -> Callable:
    """Bad input (a manifest, a store, weights, an option) ends with one clear line and exit 1."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper


def parse_timesteps(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise typer.BadParameter(f"timesteps must be integers separated by commas, got {text!r}") from None


def parse_blocks(text: str) -> list[str] | None:
    return None if text.strip() == "all" else [b.strip() for b in text.split(",") if b.strip()]


def parse_pool(text: str | None) -> dict[str, int]:
    """`4` pools every block to 4x4; `block1=2,block3=1` names blocks."""
    if not text:
        return {}
    try:
        if "=" not in text:
            return {"*": int(text)}
        return {name.strip(): int(size) for name, size in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise typer.BadParameter(f"--pool takes SIZE or BLOCK=SIZE,..., got {text!r}") from None


@app.command()
@user_errors
def extract(
    store: Annotated[str, typer.Option(help="Store path or fsspec URL (created if missing).")],
    backbone: Annotated[str, typer.Option(help="A registered backbone (featurestore backbones list).")] = "ddpm-mnist",
    dataset: Annotated[Optional[str], typer.Option(help="A dataset of data_manifests/ (demo, mnist-test, ...).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="A manifest YAML or CSV instead of --dataset.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Overrides the manifest's root folder.")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="Checkpoint file (.safetensors/.pt/.pth/.th) or model folder.")] = None,
    backbone_config: Annotated[Optional[Path], typer.Option(help="JSON config of a configurable backbone.")] = None,
    timesteps: Annotated[str, typer.Option(help="Comma-separated integer timesteps.")] = "100",
    blocks: Annotated[str, typer.Option(help="'all' or comma-separated block names.")] = "all",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N images of the manifest.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward (does not change the values).")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the per-(image, t) noise.")] = 0,
    prompt: Annotated[str, typer.Option(help="null|blip|classnames|fixed:TEXT|file:PATH (conditional backbones).")] = "null",
    noise: Annotated[str, typer.Option(help="ddpm (q_sample) or none (the clean input at timestep t).")] = "ddpm",
    device: Annotated[str, typer.Option(help="Torch device; never falls back silently.")] = "cpu",
    pool: Annotated[Optional[str], typer.Option(help="Adaptive average pool: SIZE for all, or BLOCK=SIZE,...")] = None,
    dtype: Annotated[str, typer.Option(help="Stored precision: float16 or float32.")] = "float16",
    chunk_rows: Annotated[Optional[int], typer.Option(help="Rows per chunk of a new run (default from block sizes).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run the frozen backbone once per (image, timestep) and store every requested block."""
    from pipelines.extract.runner import ExtractConfig, extract as run_extract

    cfg = ExtractConfig(
        store=store, backbone=backbone, dataset=dataset, manifest=manifest, data_root=data_root,
        weights=weights, backbone_config=backbone_config, timesteps=parse_timesteps(timesteps),
        blocks=parse_blocks(blocks), limit=limit, batch_size=batch_size, seed=seed, noise=noise,
        prompt=prompt, pool=parse_pool(pool), dtype=dtype, device=device, chunk_rows=chunk_rows,
        progress=not json_out and sys.stderr.isatty(),
    )
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
        raise typer.Exit(EXIT_SOME_FAILED)


@app.command()
@user_errors
def inspect(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the full JSON document.")] = False,
) -> None:
    """Runs, specs, arrays and image counts of a store."""
    from featurestore.inspect import inspect_store

    doc = inspect_store(store)
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(f"{doc['store']}: {doc['images']} images, {len(doc['runs'])} runs")
    for run in doc["runs"]:
        spec = run["spec"]
        typer.echo(
            f"  {run['run_id']}  {spec['backbone']} on {spec['dataset']}  t={spec['timesteps']}  "
            f"blocks={','.join(spec['blocks'])}  done {run['done']}/{run['images']}, failed {run['failed']}, "
            f"pending {run['pending']}"
        )


@backbones_app.command("list")
def backbones_list() -> None:
    """Names and one-line descriptions."""
    from pipelines.extract.backbone import list_backbones

    for entry in list_backbones():
        typer.echo(f"{entry.name:20s} {entry.description}")


@backbones_app.command("show")
@user_errors
def backbones_show(
    name: Annotated[str, typer.Argument(help="Backbone name.")],
    weights: Annotated[Optional[Path], typer.Option(help="Load and check this checkpoint strictly.")] = None,
    backbone_config: Annotated[Optional[Path], typer.Option(help="JSON config of a configurable backbone.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Parameter count, input and block table (C, H, W) of a backbone; nothing is downloaded."""
    from pipelines.extract.backbone import create_backbone
    from pipelines.extract.runner import read_backbone_config

    doc = create_backbone(name, weights, read_backbone_config(backbone_config)).describe()
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(f"{doc['name']}: {doc['parameters']:,} parameters, input {doc['input']}")
    for block, chw in doc["blocks"].items():
        typer.echo(f"  {block:10s} {chw}")


@app.command()
@user_errors
def probe(
    store: Annotated[str, typer.Argument(help="Store path or URL.")],
    block: Annotated[str, typer.Option(help="Block to probe.")],
    timestep: Annotated[int, typer.Option(help="Timestep to probe.")],
    run: Annotated[Optional[str], typer.Option(help="Run id (needed when the store holds several).")] = None,
    pool: Annotated[Optional[int], typer.Option(help="Average-pool the map to SIZE x SIZE before the probe.")] = 4,
    train_split: Annotated[str, typer.Option(help="Manifest split to train on.")] = "train",
    test_split: Annotated[str, typer.Option(help="Manifest split to test on.")] = "test",
    holdout: Annotated[Optional[float], typer.Option(help="Instead of splits: test on this seeded fraction.")] = None,
    c: Annotated[float, typer.Option("--c", help="Inverse L2 strength of the logistic regression.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of --holdout.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Linear probe from the cache: standardised features, multinomial logistic regression."""
    from featurestore.store import FeatureStore
    from pipelines.heads.logistic import probe_run

    result = probe_run(FeatureStore.open(store), run, timestep, block, pool, train_split, test_split, holdout, c, seed)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(f"{result.block} t={result.timestep}: top-1 {result.top1:.4f} "
                   f"(train {result.train_top1:.4f}; {result.train} train / {result.test} test images)")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the store, plot and report.")] = Path("demo-output"),
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 64,
) -> None:
    """The whole flow on the embedded default: MNIST DDPM features of 2,000 digits, a linear probe
    for every (t, block), a table, a plot and a report."""
    from pipelines.report.demo import run_demo

    report = run_demo(out, batch_size=batch_size, progress=sys.stderr.isatty(), echo=typer.echo)
    typer.echo(f"report: {report}")


if __name__ == "__main__":
    app()
