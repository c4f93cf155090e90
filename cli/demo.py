"""`featurestore demo`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.app import app, user_errors


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the store (store.zarr), its results (store.zarr.results/) "
                                           "and the report.")] = Path("demo-output"),
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 64,
) -> None:
    """The whole flow on the embedded default: MNIST DDPM features of 2,000 digits, then a linear
    probe and a kNN for every (t, block) from the cache (saved in store.zarr.results/), and an HTML
    report."""
    from pipelines.report.demo import run_demo

    report = run_demo(out, batch_size=batch_size, progress=sys.stderr.isatty(), echo=typer.echo)
    typer.echo(f"report: {report}")
