"""`featurestore inspect`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.app import StoreArgument, app, user_errors


def counted(n: int, noun: str) -> str:
    """"1 run", "2 runs", "0 runs"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


@app.command()
@user_errors
def inspect(
    store: StoreArgument,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full JSON document.")] = False,
) -> None:
    """Runs, specs, arrays and image counts of a store."""
    from featurestore.inspect import inspect_store
    from featurestore.store import timestep_key

    doc = inspect_store(store)
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(f"{doc['store']}: {counted(doc['images'], 'image')}, {counted(len(doc['runs']), 'run')}")
    for run in doc["runs"]:
        spec = run["spec"]
        ensemble = f"ensemble={run['ensemble']}  " if run["ensemble"] > 1 else ""
        draws = spec.get("noise_draws", 1)  # draws stored per (image, t) along the "draw" axis
        ensemble += f"noise_draws={draws}  " if draws > 1 else ""
        resize = f"resize={spec['resize']}  " if "resize" in spec else ""  # absent: crop
        typer.echo(
            f"  {run['run_id']}  {spec['backbone']} on {spec['dataset']}  t={spec['timesteps']}  "
            f"blocks={','.join(spec['blocks'])}  {spec.get('dtype', '')} {run['codec']}  {ensemble}{resize}"
            f"done {run['done']}/{run['images']}, "
            f"failed {run['failed']}, pending {run['pending']}"
        )
        bad = [f"{timestep_key(a['timestep'])}/{a['block']} ({a['nonfinite']['stored']:,})"
               for a in run["arrays"] if a["nonfinite"] and a["nonfinite"]["stored"]]
        if bad:
            typer.echo(f"    non-finite values stored (reading refused): {', '.join(bad)}")
    for run_id, error in doc["broken_runs"].items():
        typer.echo(f"  {run_id}  broken: {error}")
    if "targets" in doc:
        typer.echo("targets:")
    for array in doc.get("targets", []):
        typer.echo(f"  {array['path']}  {' x '.join(map(str, array['shape']))}  {array['dtype']}")
