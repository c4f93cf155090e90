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
    store: Annotated[str, typer.Argument(help="Store path (local: results are looked for next to it).")],
    out: Annotated[Optional[Path], typer.Option(help="HTML file to write (default: report.html in the results folder).")] = None,
    results: Annotated[Optional[Path], typer.Option(help="Results folder (default: results/ next to the store).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON: the page written, its sections, results found.")] = False,
) -> None:
    """One self-contained HTML page: the store's runs and images, sweeps, CKA heatmaps and every
    other results JSON next to the store."""
    from pipelines.report.html import write_report

    summary = write_report(store, out, results)
    if json_out:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    typer.echo(f"report: {summary.out} ({summary.results} results files; sections: {', '.join(summary.sections)})")
