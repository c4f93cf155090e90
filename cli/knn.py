"""`featurestore knn`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.app import (
    AllowIncompleteFlag, HoldoutOption, JsonFlag, QuietFlag, ResultsOption, RunOption, StoreArgument, app, one_value,
    parse_ints, parse_timestep, user_errors
)

# --draws of every stage-2 command (pipelines/analysis/__init__.py defines each choice per command)
DrawsOption = Annotated[str, typer.Option(
    "--draws", help="Runs of several noise draws (extract --noise-draws): mean (float32 mean over the draws), "
                    "<k> (draw k only) or all (every draw its own training sample; scored images: the mean).")]


@app.command()
@user_errors
def knn(
    store: StoreArgument,
    block: Annotated[list[str], typer.Option("--block", "--blocks", help="Block to classify with (one).")],
    timestep: Annotated[list[str], typer.Option("--timestep", "--timesteps", help="Timestep (one: an integer, or none for an expert).")],
    run: RunOption = None,
    k: Annotated[str, typer.Option("--k", help="Neighbour counts, comma-separated.")] = "10,20,100,200",
    temperature: Annotated[float, typer.Option(help="Vote weight exp(cosine / T).")] = 0.07,
    pool: Annotated[Optional[int], typer.Option(help="Average-pool the map to SIZE x SIZE first.")] = 4,
    train_split: Annotated[str, typer.Option(help="Manifest split searched (the neighbours).")] = "train",
    test_split: Annotated[str, typer.Option(help="Manifest split classified (the queries).")] = "test",
    holdout: HoldoutOption = None,
    seed: Annotated[int, typer.Option(help="Seed of --holdout.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, or cuda (needs faiss-gpu).")] = "cpu",
    slab_rows: Annotated[int, typer.Option(help="Train rows searched at a time (rounded to whole store chunks).")] = 4096,
    allow_incomplete: AllowIncompleteFlag = False,
    draws: DrawsOption = "mean",
    out: ResultsOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Weighted kNN (DINO protocol) from the cache: cosine similarity, exact FAISS search, top-1/top-5
    (a class without a vote is never in the top 5)."""
    from featurestore.store import FeatureStore, parse_draws, timestep_text
    from pipelines.analysis import images_note, results_dir, to_json
    from pipelines.analysis.knn import knn_run, save_knn
    from pipelines.progress import set_quiet

    set_quiet(quiet)
    ks = parse_ints(k, "--k")
    block_name = one_value(block, "--block")
    t = parse_timestep(one_value(timestep, "--timestep"))
    folder = results_dir(store, out)
    result = knn_run(FeatureStore.open(store), run, t, block_name, ks, pool, train_split, test_split, holdout, seed,
                     temperature, device, slab_rows, allow_incomplete, parse_draws(draws))
    saved = save_knn(result, folder)
    if json_out:
        typer.echo(to_json(result.to_dict()))
        return
    for value in ks:
        typer.echo(f"{block_name} t={timestep_text(t)} k={value}: top-1 {result.top1[value]:.4f} top-5 {result.top5[value]:.4f}")
    for line in filter(None, [*images_note(result.runs), result.settings.get("draws_meaning")]):
        typer.echo(line)
    typer.echo(f"({result.train} train / {result.test} test images, {result.features} features; saved {saved})")
