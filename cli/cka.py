"""`featurestore cka`."""

from __future__ import annotations

from typing import Annotated, Optional, TypeVar

import typer

from cli.app import (
    AllowIncompleteFlag, JsonFlag, QuietFlag, ResultsOption, RunOption, StoreArgument, app, parse_timestep, split_items,
    user_errors
)
from cli.knn import DrawsOption

T = TypeVar("T")


def listed(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated option values; None for none given or `all`."""
    items = split_items(values)
    return None if items in ([], ["all"]) else items


def one(items: list[T] | None, option: str, grid: str, compared: str) -> T | None:
    """The single value of an option the grid holds fixed (None when not given)."""
    if items is not None and len(items) != 1:
        raise ValueError(f"--grid {grid} takes one {option}, got {','.join(map(str, items))}; "
                         f"--grid {compared} compares them")
    return None if items is None else items[0]


@app.command()
@user_errors
def cka(
    store: StoreArgument,
    grid: Annotated[str, typer.Option(help="blocks (block x block at one --timestep), timesteps (t x t at one "
                                           "--block), or runs (blocks of --run vs blocks of --other-run).")] = "blocks",
    run: RunOption = None,
    timesteps: Annotated[Optional[list[str]], typer.Option(
        "--timesteps", "--timestep", help="blocks and runs grids: the one timestep (an integer, or none for an "
                                          "expert); timesteps grid: all (default) or T,... Repeat or separate by commas.")] = None,
    blocks: Annotated[Optional[list[str]], typer.Option(
        "--blocks", "--block", help="timesteps grid: the one block; blocks and runs grids: all (default) or NAME,... "
                                    "of --run. Repeat or separate by commas.")] = None,
    other_run: Annotated[Optional[str], typer.Option(help="Run compared with --run in the runs grid.")] = None,
    other_timestep: Annotated[Optional[str], typer.Option(help="Its timestep (default: --timestep).")] = None,
    other_blocks: Annotated[Optional[list[str]], typer.Option(
        "--other-blocks", "--other-block", help="Its blocks: all (default) or NAME,...")] = None,
    pool: Annotated[Optional[int], typer.Option(help="Average-pool the maps to SIZE x SIZE first.")] = 4,
    method: Annotated[str, typer.Option(help="feature (exact, D x D float64 over the total width D, streamed), "
                                             "gram (exact, one N x N Gram per view, all pairs in one product), "
                                             "minibatch (Nguyen et al. unbiased), or auto: feature while D <= "
                                             "--max-features, else gram within --gram-memory, else minibatch.")] = "auto",
    max_features: Annotated[int, typer.Option(help="auto: the widest total feature count for the feature method "
                                                   "(its accumulator is D x D float64).")] = 8192,
    gram_memory: Annotated[float, typer.Option(help="GiB the gram method may hold (about views x N^2 x 4 bytes): "
                                                    "auto picks it within this; an explicit gram over it is refused.")] = 4.0,
    batch_size: Annotated[int, typer.Option(help="Minibatch size of the minibatch method.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the minibatch shuffle.")] = 0,
    slab_rows: Annotated[int, typer.Option(help="feature and minibatch: rows read at a time (rounded to whole "
                                                "store chunks).")] = 4096,
    allow_incomplete: AllowIncompleteFlag = False,
    draws: DrawsOption = "mean",
    out: ResultsOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Linear CKA (biased and unbiased HSIC) between blocks, timesteps or runs, from the store.
    --block/--blocks and --timestep/--timesteps are two spellings of one option each.
    CKA with a view of constant features is undefined: n/a (null in JSON), named in one line; when
    no pair is defined, that line is the error."""
    from featurestore.store import FeatureStore, parse_draws
    from pipelines.analysis import images_note, results_dir, to_json
    from pipelines.analysis.cka import cka_run, grid_views, save_cka
    from pipelines.progress import set_quiet

    set_quiet(quiet)
    folder = results_dir(store, out)
    fs = FeatureStore.open(store)
    block_list = listed(blocks)
    t_list = None if (items := listed(timesteps)) is None else [parse_timestep(t) for t in items]
    if grid == "timesteps":
        rows, cols = grid_views(fs, grid, run, block=one(block_list, "--block", grid, "blocks"), timesteps=t_list)
    else:
        rows, cols = grid_views(
            fs, grid, run, one(t_list, "--timestep", grid, "timesteps"), blocks=block_list, other_run_id=other_run,
            other_timestep=None if other_timestep is None else parse_timestep(other_timestep),
            other_blocks=listed(other_blocks),
        )
    result = cka_run(rows, cols, grid, pool, method, max_features, batch_size, seed, slab_rows, allow_incomplete,
                     gram_memory, parse_draws(draws))
    saved = save_cka(result, folder)
    if json_out:
        typer.echo(to_json(result.to_dict()))
        return
    width = max(len(label) for label in result.rows)
    for name, matrix in result.matrices.items():
        typer.echo(f"linear CKA, {name} ({result.method}, {result.images} {'rows' if draws == 'all' else 'images'})")
        typer.echo(" " * width + " " + " ".join(f"{c[-8:]:>8}" for c in result.cols))
        for label, values in zip(result.rows, matrix):
            typer.echo(f"{label:>{width}} " + " ".join("     n/a" if v is None else f"{v:8.3f}" for v in values))
    for line in filter(None, [result.undefined, *images_note(result.runs), result.draws]):
        typer.echo(line)
    typer.echo("saved " + ", ".join(str(p) for p in saved))
