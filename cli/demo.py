"""`featurestore demo`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.app import QuietFlag, app, user_errors


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the store (store.zarr), its results (store.zarr.results/), "
                                           "the report (report.html) and the segmentation's store, results and page "
                                           "(mnist-seg.zarr, mnist-seg.zarr.results/, mnist-seg.html).")] = Path("demo-output"),
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 64,
    quiet: QuietFlag = False,
) -> None:
    """The whole flow on the embedded default: MNIST DDPM features of 2,000 digits, then a linear
    probe and a kNN for every (t, block) and linear CKA between the blocks at t=100, from the cache
    (saved in store.zarr.results/) and an HTML report; then per-pixel segmentation of 600 of the same
    digits (MNIST-seg masks) in its own store mnist-seg.zarr, with its own page."""
    from pipelines.progress import set_quiet
    from pipelines.report.demo import run_demo

    set_quiet(quiet)
    report, segmentation = run_demo(out, batch_size=batch_size, progress=sys.stderr.isatty() and not quiet,
                                    echo=typer.echo)
    typer.echo(f"report: {report}")
    typer.echo(f"segmentation report: {segmentation}")
