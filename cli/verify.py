"""`featurestore verify`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from cli.app import EXIT_ERROR, JsonFlag, StoreArgument, app, user_errors


@app.command()
@user_errors
def verify(
    store: StoreArgument,
    run: Annotated[Optional[str], typer.Option(help="Check only this run.")] = None,
    repair: Annotated[bool, typer.Option("--repair", help="Mark damaged chunks not done and remove broken "
                                                          "runs, so that extracting the same spec again "
                                                          "recomputes them.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Check that every done chunk of every run has its files and decodes; exit 1 on damage."""
    from featurestore.verify import verify_store

    result = verify_store(store, run, repair)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        for line in result.lines():
            typer.echo(line)
    if not result.ok:
        raise typer.Exit(EXIT_ERROR)
