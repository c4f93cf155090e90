"""`featurestore backbones list|show`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import JsonFlag, backbones_app, user_errors


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
    weights: Annotated[Optional[Path], typer.Option(help="Load and check this checkpoint strictly (default: meta weights, nothing loaded).")] = None,
    backbone_config: Annotated[Optional[Path], typer.Option(help="JSON config of a configurable backbone.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Parameter count, input and block table (C, H, W) of a backbone; nothing is downloaded."""
    from pipelines.extract.backbone import create_backbone
    from pipelines.extract.runner import read_backbone_config
    from pipelines.extract.weights import META

    doc = create_backbone(name, weights or META, read_backbone_config(backbone_config)).describe()
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(f"{doc['name']}: {doc['parameters']:,} parameters, input {doc['input']}")
    for block, chw in doc["blocks"].items():
        typer.echo(f"  {block:10s} {chw}")
