"""`featurestore datasets list`."""

from __future__ import annotations

import json

import typer

from cli.app import JsonFlag, datasets_app


@datasets_app.command("list")
def datasets_list(json_out: JsonFlag = False) -> None:
    """Names that --dataset accepts, each with the first line of its YAML's header comment."""
    from data_manifests.manifest import dataset_description, list_datasets

    entries = [{"name": name, "description": dataset_description(name)} for name in list_datasets()]
    if json_out:
        typer.echo(json.dumps(entries, indent=2))
        return
    for entry in entries:
        typer.echo(f"{entry['name']:20s} {entry['description']}".rstrip())
