"""`featurestore fewshot`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from cli.app import (
    AllowIncompleteFlag, AttnHeadsOption, DepthOption, ExpertRunOption, ExpertWidthOption, HiddenOption, JsonFlag, PoolingOption,
    QuietFlag, ResultsOption, RunOption, StoreArgument, WidthOption, app, parse_blocks, parse_ints, parse_lrs,
    parse_stored_timesteps, user_errors
)


@app.command()
@user_errors
def fewshot(
    store: StoreArgument,
    head: Annotated[str, typer.Option(help="logistic | knn | linear | mlp | attention | difformer | uhead.")] = "logistic",
    shots: Annotated[str, typer.Option(help="Training images per class, comma-separated.")] = "1,2,4,8,16",
    seeds: Annotated[str, typer.Option(help="Seeds of the shot sampling (and of trained heads), comma-separated.")] = "0,1,2",
    timesteps: Annotated[Optional[list[str]], typer.Option("--timesteps", "--timestep", help="all (default) or T,...; repeated or comma-separated (none for experts).")] = None,
    blocks: Annotated[Optional[list[str]], typer.Option("--blocks", "--block", help="all (default) or NAME,...; repeated or comma-separated.")] = None,
    run: RunOption = None,
    pool: Annotated[Optional[int], typer.Option(help="Average-pool each map to SIZE x SIZE (logistic, knn, linear, mlp).")] = 4,
    train_split: Annotated[str, typer.Option(help="Manifest split the shots are drawn from.")] = "train",
    test_split: Annotated[str, typer.Option(help="Manifest split tested, in full.")] = "test",
    holdout: Annotated[Optional[float], typer.Option(help="Instead of splits: test on about this fraction (each image drawn with this probability from the seed), draw shots from the rest.")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of --holdout (one test set for every shot seed).")] = 0,
    c: Annotated[float, typer.Option("--c", help="logistic: inverse L2 strength.")] = 1.0,
    k: Annotated[int, typer.Option("--k", help="knn: neighbours (capped at the number of shots).")] = 20,
    temperature: Annotated[float, typer.Option(help="knn: vote weight exp(cosine / T).")] = 0.07,
    lr: Annotated[str, typer.Option(help="Trained heads: learning rate(s), comma-separated.")] = "1e-2",
    epochs: Annotated[int, typer.Option(help="Trained heads: epochs over the shots (no early stopping).")] = 100,
    batch_size: Annotated[int, typer.Option(help="Trained heads: minibatch size.")] = 32,
    weight_decay: Annotated[float, typer.Option(help="Trained heads: AdamW weight decay.")] = 0.01,
    warmup_epochs: Annotated[float, typer.Option(help="Trained heads: linear warmup before the cosine decay.")] = 1.0,
    width: WidthOption = 128,
    depth: DepthOption = 2,
    attn_heads: AttnHeadsOption = 4,
    hidden: HiddenOption = 256,
    expert_run: ExpertRunOption = None,
    expert_blocks: Annotated[Optional[str], typer.Option(help="uhead: blocks of the expert run (default: all).")] = None,
    expert_width: ExpertWidthOption = 32,
    pooling: PoolingOption = "attention",
    device: Annotated[str, typer.Option(help="Torch device of trained heads, and cpu|cuda of the kNN search.")] = "cpu",
    allow_incomplete: AllowIncompleteFlag = False,
    out: ResultsOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Few-shot classification (CoOp protocol): k training images per class for each seed, top-1 on
    the whole test split, mean and std (ddof 0) over seeds."""
    from featurestore.store import FeatureStore
    from pipelines.analysis import images_note, results_dir, to_json
    from pipelines.analysis.fewshot import FewshotConfig, fewshot_run, save_fewshot
    from pipelines.heads.training import TrainConfig
    from pipelines.progress import set_quiet

    set_quiet(quiet)
    options = {"width": width, "depth": depth, "num_heads": attn_heads, "hidden": hidden, "expert_width": expert_width,
               "pooling": pooling}
    if pool is not None:
        options["pool"] = pool
    cfg = FewshotConfig(
        head=head, shots=parse_ints(shots, "--shots"), seeds=parse_ints(seeds, "--seeds"),
        timesteps=parse_stored_timesteps(timesteps), blocks=parse_blocks(blocks), run_id=run, pool=pool,
        train_split=train_split, test_split=test_split, holdout=holdout, split_seed=split_seed,
        allow_incomplete=allow_incomplete, c=c, knn_k=k,
        temperature=temperature, lrs=parse_lrs([lr]), head_options=options,
        expert_run=expert_run, expert_blocks=parse_blocks([expert_blocks]) if expert_blocks else None,
        train=TrainConfig(epochs=epochs, batch_size=batch_size, weight_decay=weight_decay,
                          warmup_epochs=warmup_epochs, device=device),
    )
    folder = results_dir(store, out)
    result = fewshot_run(FeatureStore.open(store), cfg)
    saved = save_fewshot(result, folder)
    if json_out:
        typer.echo(to_json(result.to_dict()))
        return
    typer.echo("| classifier | " + " | ".join(f"{s.shots}-shot" for s in result.classifiers[0].scores) + " |")
    typer.echo("|---" * (1 + len(cfg.shots)) + "|")
    for entry in result.classifiers:
        typer.echo(f"| {entry.name} | " + " | ".join(f"{s.mean:.3f} ± {s.std:.3f}" for s in entry.scores) + " |")
    for line in images_note(result.runs):
        typer.echo(line)
    typer.echo(f"top-1 on {result.test} test images, mean ± std (ddof {result.std_ddof}) over seeds "
               f"{', '.join(map(str, result.seeds))}; {result.seconds:.1f} s; saved {saved}")
