"""`featurestore probe`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from cli.app import app, user_errors


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
