"""`featurestore report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import QuietFlag, app, user_errors


@app.command()
@user_errors
def report(
    store: Annotated[str, typer.Argument(help="Store path (local: its results are looked for in <store>.results/).")],
    out: Annotated[Optional[Path], typer.Option(help="HTML file to write (default: report.html in the results folder).")] = None,
    results: Annotated[Optional[Path], typer.Option(help="Results folder (default: the store's own <store>.results/).")] = None,
    t_axis: Annotated[str, typer.Option(help="t axis of the accuracy-vs-t plots: log (symlog: linear from 0 to the "
                                             "smallest positive t, logarithmic above) or linear.")] = "log",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON: the page written, its sections, results found, "
                                                          "files skipped and why.")] = False,
    quiet: QuietFlag = False,
) -> None:
    """One self-contained HTML page: the store's runs and images, a sortable table of every result,
    sweep, few-shot and probe plots (chance line, best point), CKA heatmaps, tables of probe (per
    class, confusion matrix), kNN, few-shot and retrieval numbers; results of other stores' runs are
    listed as skipped."""
    from pipelines.progress import set_quiet
    from pipelines.report.html import write_report

    set_quiet(quiet)
    summary = write_report(store, out, results, t_axis)
    if json_out:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    skipped = f", {len(summary.skipped)} skipped (not this store's)" if summary.skipped else ""
    typer.echo(f"report: {summary.out} ({summary.results} results files{skipped}; "
               f"sections: {', '.join(summary.sections)})")
