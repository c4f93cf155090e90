"""`featurestore sweep`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.app import (
    AllowIncompleteFlag, HoldoutOption, JsonFlag, QuietFlag, ResultsOption, RunOption, StoreArgument, app, parse_blocks,
    parse_stored_timesteps, user_errors
)


@app.command()
@user_errors
def sweep(
    store: StoreArgument,
    run: RunOption = None,
    timesteps: Annotated[Optional[list[str]], typer.Option("--timesteps", "--timestep", help="all (default) or T,...; repeated or comma-separated (none for experts).")] = None,
    blocks: Annotated[Optional[list[str]], typer.Option("--blocks", "--block", help="all (default) or NAME,...; repeated or comma-separated.")] = None,
    pool: Annotated[Optional[int], typer.Option(help="Average-pool the maps to SIZE x SIZE first.")] = 4,
    k: Annotated[int, typer.Option("--k", help="Neighbours of the weighted kNN.")] = 20,
    temperature: Annotated[float, typer.Option(help="kNN vote weight exp(cosine / T).")] = 0.07,
    train_split: Annotated[str, typer.Option(help="Manifest split to train on.")] = "train",
    test_split: Annotated[str, typer.Option(help="Manifest split to test on.")] = "test",
    holdout: HoldoutOption = None,
    c: Annotated[float, typer.Option("--c", help="Inverse L2 strength of the logistic regression.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of --holdout.")] = 0,
    device: Annotated[str, typer.Option(help="kNN search device: cpu, or cuda (needs faiss-gpu).")] = "cpu",
    allow_incomplete: AllowIncompleteFlag = False,
    out: ResultsOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Linear probe and weighted kNN for every (t, block) of a run: a table (CSV, JSON) and plots of
    accuracy vs t and vs block."""
    from featurestore.store import FeatureStore
    from pipelines.analysis import images_note, results_dir, to_json
    from pipelines.analysis.sweep import save_sweep, sweep_run
    from pipelines.progress import set_quiet

    set_quiet(quiet)
    folder = results_dir(store, out)
    fs = FeatureStore.open(store)
    result = sweep_run(
        fs, run, parse_stored_timesteps(timesteps),
        parse_blocks(blocks), pool, k, train_split, test_split, holdout, c, seed, temperature, device,
        allow_incomplete,
    )
    saved = save_sweep(result, folder, fs)
    if json_out:
        typer.echo(to_json(result.to_dict()))
        return
    typer.echo(f"| t | block | linear top-1 | kNN top-1 (k={result.knn_k}) | kNN top-5 |")
    typer.echo("|---|---|---|---|---|")
    for r in result.rows:
        typer.echo(f"| {r.timestep} | {r.block} | {r.linear_top1:.3f} | {r.knn_top1:.3f} | {r.knn_top5:.3f} |")
    for line in images_note(result.runs):
        typer.echo(line)
    typer.echo(f"{len(result.rows)} (t, block) pairs in {result.seconds:.1f} s; saved " + ", ".join(str(p) for p in saved))
