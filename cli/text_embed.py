"""`featurestore text-embed`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from cli.app import JsonFlag, RunOption, app, user_errors


@app.command("text-embed")
@user_errors
def text_embed(
    store: Annotated[str, typer.Argument(help="Store path or URL: the class names come from its run.")],
    out: Annotated[str, typer.Option(help="The .safetensors file to write (for probe --text-embeddings).")],
    weights: Annotated[Optional[str], typer.Option(help="SD model folder or hub id in the local cache.")] = None,
    backbone: Annotated[str, typer.Option(help="A backbone with a text encoder.")] = "sd15",
    backbone_config: Annotated[Optional[str], typer.Option(help="JSON config of the backbone.")] = None,
    run: RunOption = None,
    template: Annotated[str, typer.Option(help="Prompt per class; {} is the class name.")] = "a photo of a {}",
    device: Annotated[str, typer.Option(help="Torch device; never falls back silently.")] = "cpu",
    json_out: JsonFlag = False,
) -> None:
    """Embed the class names of a run with the backbone's text encoder, for cosine classifiers."""
    from featurestore.store import FeatureStore
    from pipelines.device import resolve_device
    from pipelines.extract.backbone import create_backbone
    from pipelines.extract.runner import read_backbone_config
    from pipelines.heads.logistic import resolve_run
    from pipelines.heads.probe import class_names
    from pipelines.heads.text_embeddings import write_text_embeddings

    resolve_device(device)
    chosen = resolve_run(FeatureStore.open(store), run)
    classes = class_names(chosen.labels, chosen.images.class_name)
    model = create_backbone(backbone, weights, read_backbone_config(backbone_config), device)
    path = write_text_embeddings(model, classes, out, template)
    doc = {"out": str(path), "classes": classes, "template": template, "backbone": backbone}
    typer.echo(json.dumps(doc, indent=2) if json_out else f"wrote {len(classes)} class embeddings to {path}")
