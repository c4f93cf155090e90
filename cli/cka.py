"""`featurestore cka`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.app import (
    AllowIncompleteFlag, JsonFlag, ResultsOption, RunOption, StoreArgument, app, parse_blocks, parse_stored_timesteps,
    parse_timestep, user_errors
)


@app.command()
@user_errors
def cka(
    store: StoreArgument,
    grid: Annotated[str, typer.Option(help="blocks (block x block at --timestep), timesteps (t x t at --block), "
                                           "or runs (blocks of --run vs blocks of --other-run).")] = "blocks",
    run: RunOption = None,
    timestep: Annotated[Optional[str], typer.Option(help="Timestep of the blocks and runs grids (an integer or none).")] = None,
    block: Annotated[Optional[str], typer.Option(help="Block of the timesteps grid.")] = None,
    blocks: Annotated[str, typer.Option(help="Blocks of --run: all or NAME,...")] = "all",
    timesteps: Annotated[str, typer.Option(help="Timesteps of the timesteps grid: all or T,... (none for experts).")] = "all",
    other_run: Annotated[Optional[str], typer.Option(help="Run compared with --run in the runs grid.")] = None,
    other_timestep: Annotated[Optional[str], typer.Option(help="Its timestep (default: --timestep).")] = None,
    other_blocks: Annotated[str, typer.Option(help="Its blocks: all or NAME,...")] = "all",
    pool: Annotated[Optional[int], typer.Option(help="Average-pool the maps to SIZE x SIZE first.")] = 4,
    method: Annotated[str, typer.Option(help="feature (exact, biased and unbiased, streamed), minibatch "
                                             "(Nguyen et al. unbiased), or auto (feature up to --max-features).")] = "auto",
    max_features: Annotated[int, typer.Option(help="auto: the widest total feature count for the feature method "
                                                   "(its accumulator is D x D float64).")] = 8192,
    batch_size: Annotated[int, typer.Option(help="Minibatch size of the minibatch method.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the minibatch shuffle.")] = 0,
    slab_rows: Annotated[int, typer.Option(help="Rows read at a time (rounded to whole store chunks).")] = 4096,
    allow_incomplete: AllowIncompleteFlag = False,
    out: ResultsOption = None,
    json_out: JsonFlag = False,
) -> None:
    """Linear CKA (biased and unbiased HSIC) between blocks, timesteps or runs, streamed over the store.
    CKA with a view of constant features is undefined: n/a (null in JSON), named in one line; when
    no pair is defined, that line is the error."""
    from featurestore.store import FeatureStore
    from pipelines.analysis import images_note, results_dir, to_json
    from pipelines.analysis.cka import cka_run, grid_views, save_cka

    folder = results_dir(store, out)
    fs = FeatureStore.open(store)
    rows, cols = grid_views(
        fs, grid, run, None if timestep is None else parse_timestep(timestep), block, parse_blocks(blocks),
        parse_stored_timesteps(timesteps),
        other_run, None if other_timestep is None else parse_timestep(other_timestep), parse_blocks(other_blocks),
    )
    result = cka_run(rows, cols, grid, pool, method, max_features, batch_size, seed, slab_rows, allow_incomplete)
    saved = save_cka(result, folder)
    if json_out:
        typer.echo(to_json(result.to_dict()))
        return
    width = max(len(label) for label in result.rows)
    for name, matrix in result.matrices.items():
        typer.echo(f"linear CKA, {name} ({result.method}, {result.images} images)")
        typer.echo(" " * width + " " + " ".join(f"{c[-8:]:>8}" for c in result.cols))
        for label, values in zip(result.rows, matrix):
            typer.echo(f"{label:>{width}} " + " ".join("     n/a" if v is None else f"{v:8.3f}" for v in values))
    for line in [*([result.undefined] if result.undefined else []), *images_note(result.runs)]:
        typer.echo(line)
    typer.echo("saved " + ", ".join(str(p) for p in saved))
