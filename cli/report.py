"""`featurestore report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import app, user_errors


@app.command()
@user_errors
def report(
    store: Annotated[str, typer.Argument(help="Store path (local: its results are looked for in <store>.results/).")],
    out: Annotated[Optional[Path], typer.Option(help="HTML file to write (default: report.html in the results folder).")] = None,
    results: Annotated[Optional[Path], typer.Option(help="Results folder (default: the store's own <store>.results/).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON: the page written, its sections, results found, "
                                                          "files skipped and why.")] = False,
) -> None:
    """One self-contained HTML page: the store's runs and images, sweeps, CKA heatmaps and every
    other results JSON of this store; results of other stores' runs are listed as skipped."""
    from pipelines.report.html import write_report

    summary = write_report(store, out, results)
    if json_out:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    skipped = f", {len(summary.skipped)} skipped (not this store's)" if summary.skipped else ""
    typer.echo(f"report: {summary.out} ({summary.results} results files{skipped}; "
               f"sections: {', '.join(summary.sections)})")
