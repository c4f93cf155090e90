"""`featurestore probe`: the logistic probe (default) or a grid of trained heads, from the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import (
    AllowIncompleteFlag, DepthOption, ExpertRunOption, ExpertWidthOption, HiddenOption, HoldoutOption, JsonFlag,
    PoolingOption, QuietFlag, ResultsOption, RunOption, StoreArgument, app, parse_lrs, parse_timestep, split_items,
    user_errors
)

HEADS = ("logistic", "linear", "mlp", "attention", "difformer", "uhead", "diffssl-linear", "diffssl-mlp",
         "diffssl-attention", "diffssl-difformer", "vermouth-uhead")
FUSIONS = ("difformer", "diffssl-difformer")
# The training defaults of each --recipe; diffssl: scripts/attention.sh (--lr 5e-2, --epochs 28,
# --batch_size 32 on 4 GPUs) and finetune.py's final weights (no early stopping).
RECIPES = {
    "ours": {"lrs": [1e-3], "epochs": 30, "batch_size": 64, "patience": 5, "weight_decay": 0.01, "warmup_epochs": 1.0},
    "diffssl": {"lrs": [5e-2], "epochs": 28, "batch_size": 128, "patience": 0, "weight_decay": 0.0, "warmup_epochs": 0.0},
    # vermouth: Classification/train_few-shot.py (AdamW lr 1e-4 and weight decay 5e-4 as hard-coded
    # there, 100 epochs, --batch_size 64, no schedule, the final weights).
    "vermouth": {"lrs": [1e-4], "epochs": 100, "batch_size": 64, "patience": 0, "weight_decay": 5e-4, "warmup_epochs": 0.0},
}


@app.command()
@user_errors
def probe(
    store: StoreArgument,
    block: Annotated[Optional[list[str]], typer.Option("--block", "--blocks", help="Block(s) to probe; repeat or separate by commas (difformer, diffssl-difformer default: b19,b24,b30).")] = None,
    timestep: Annotated[Optional[list[str]], typer.Option("--timestep", "--timesteps", help="Timestep(s); repeat or separate by commas; 'none' for experts (difformer, diffssl-difformer default: 90,150,300).")] = None,
    head: Annotated[str, typer.Option(help=f"Head: {'|'.join(HEADS)}.")] = "logistic",
    run: RunOption = None,
    pool: Annotated[Optional[int], typer.Option(help="logistic, linear, mlp: average-pool the map to SIZE x SIZE.")] = 4,
    train_split: Annotated[str, typer.Option(help="Manifest split to train on.")] = "train",
    test_split: Annotated[str, typer.Option(help="Manifest split to test on.")] = "test",
    holdout: HoldoutOption = None,
    c: Annotated[float, typer.Option("--c", help="logistic: inverse L2 strength.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of --holdout, the validation split, shuffling and initial weights.")] = 0,
    lr: Annotated[Optional[list[str]], typer.Option(help="Learning rate(s); several train a grid.")] = None,
    recipe: Annotated[str, typer.Option(help="Trained heads: ours (AdamW, warmup + cosine) | diffssl (official: SGD, lr x 0.1 every 7 epochs; defaults --lr 5e-2 --epochs 28 --batch-size 128 --patience 0) | vermouth (official, vermouth-uhead only: AdamW at a constant lr, FuseClassifier gradients clipped to norm 1; --lr 1e-4 --weight-decay 5e-4 --epochs 100 --batch-size 64 --patience 0).")] = "ours",
    epochs: Annotated[Optional[int], typer.Option(help="Most epochs (early stopping may end sooner); 30 (diffssl recipe 28, vermouth 100).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Minibatch size; 64 (diffssl recipe 128).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay (0.01; vermouth recipe 5e-4); not in the diffssl recipe.")] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(help="Linear warmup before the cosine decay (1); not in the diffssl or vermouth recipe.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of the train images held out for validation.")] = 0.1,
    patience: Annotated[Optional[int], typer.Option(help="Stop a head after this many epochs without a better validation top-1; 0: never. 5 (diffssl, vermouth recipes 0).")] = None,
    classifier: Annotated[str, typer.Option(help="linear | cosine (against --text-embeddings).")] = "linear",
    text_embeddings: Annotated[Optional[str], typer.Option(help="safetensors: 'embeddings' (K, D), metadata 'classes' (JSON list in label order).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="cosine: logits are cosines / temperature (0.07; vermouth-uhead official 0.2).")] = None,
    expert_run: ExpertRunOption = None,
    expert_blocks: Annotated[Optional[list[str]], typer.Option(help="uhead, vermouth-uhead: blocks of the expert run (default: all; vermouth-uhead: three, the sizes of levels 2-4).")] = None,
    width: Annotated[Optional[int], typer.Option(help="attention, difformer: token width (128); uhead: pyramid width (128); diffssl-attention, diffssl-difformer: 1024.")] = None,
    depth: DepthOption = 2,
    attn_heads: Annotated[Optional[int], typer.Option(help="attention, difformer, uhead: attention heads (4); diffssl-attention, diffssl-difformer, vermouth-uhead: 8.")] = None,
    hidden: HiddenOption = 256,
    expert_width: ExpertWidthOption = 32,
    pooling: PoolingOption = "attention",
    pre_pool_size: Annotated[Optional[int], typer.Option(help="diffssl-*: adaptive average pool side (official default: linear, mlp 2; attention 16).")] = None,
    head_arc: Annotated[str, typer.Option(help="diffssl-mlp: hidden widths joined by '_', e.g. 1024 or 2048_1024 (required).")] = "",
    norm_type: Annotated[Optional[str], typer.Option(help="diffssl-attention, diffssl-difformer: layer (over the pooled [C, h, w], default) | batch.")] = None,
    mlp_ratio: Annotated[Optional[float], typer.Option(help="diffssl-attention, diffssl-difformer: transformer MLP width / token width (4).")] = None,
    fuse_arch: Annotated[Optional[str], typer.Option(help="vermouth-uhead: tiny (level widths 1024,768,512,256, default) | pico (256 x4) | small (tiny + a residual conv stage).")] = None,
    head_file: Annotated[Optional[Path], typer.Option(help="Test this saved head (probe's or `heads import`'s .safetensors) on the test split, without training; --block/--timestep: omit or give the head's.")] = None,
    device: Annotated[str, typer.Option(help="Torch device; never falls back silently.")] = "cpu",
    allow_incomplete: AllowIncompleteFlag = False,
    draws: Annotated[Optional[str], typer.Option(
        "--draws", help="Runs of several noise draws (extract --noise-draws): mean (float32 mean over the draws), "
                        "<k> (draw k only) or all: logistic fits every draw as its own sample, trained heads take one "
                        "draw per image per epoch; test images: the mean. Default: mean for logistic and --head-file, "
                        "all for trained heads.")] = None,
    out: ResultsOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Probe blocks from the cache: logistic regression, or trained heads (a grid of blocks x
    timesteps x learning rates in one pass over the cache per epoch). Trained heads' weights and
    results.json go to a folder probe-<head>-<run>-<digest>/ in the results folder."""
    from featurestore.store import FeatureStore, parse_draws, timestep_text
    from pipelines.analysis import images_note, results_dir, to_json
    from pipelines.heads.modules import DIFFORMER_BLOCKS, DIFFORMER_TIMESTEPS
    from pipelines.progress import set_quiet

    set_quiet(quiet)
    if head_file is not None:
        from pipelines.heads.probe import evaluate_head_file

        if head != "logistic" or lr or recipe != "ours" or epochs is not None:
            raise ValueError("--head-file tests a saved head as it is: no --head, --lr, --recipe or --epochs with it")
        asked = [(parse_timestep(t), b) for t in split_items(timestep) for b in split_items(block)]
        if bool(split_items(block)) != bool(split_items(timestep)):
            raise ValueError("--head-file: give both --block and --timestep (the head's) or neither")
        doc = evaluate_head_file(FeatureStore.open(store), head_file, results_dir(store, out), run_id=run,
                                 keys=asked or None, train_split=train_split, test_split=test_split,
                                 holdout=holdout, seed=seed, allow_incomplete=allow_incomplete,
                                 batch_size=batch_size or 64, device=device,
                                 draws=parse_draws(draws or "mean"))
        if json_out:
            typer.echo(to_json(doc))
            return
        typer.echo(f"{doc['spec']['kind']} head {head_file} on {doc['tested_on']} ({doc['images']['test']} images): "
                   f"top-1 {doc['top1']:.4f}  top-5 {doc['top5']:.4f}")
        for line in filter(None, [*images_note(doc["runs"]), doc["draws"]]):
            typer.echo(line)
        typer.echo(f"saved {doc['out']}")
        return
    if head not in HEADS:
        raise ValueError(f"unknown --head {head!r}; heads: {', '.join(HEADS)}")
    blocks = split_items(block) or (list(DIFFORMER_BLOCKS) if head in FUSIONS else [])
    timesteps = [parse_timestep(t) for t in split_items(timestep)] or (list(DIFFORMER_TIMESTEPS) if head in FUSIONS else [])
    if not blocks or not timesteps:
        raise ValueError(f"--head {head} needs --block and --timestep")
    folder = results_dir(store, out)
    fs = FeatureStore.open(store)

    if head == "logistic":
        from pipelines.heads.logistic import probe_run, save_probe

        if len(blocks) != 1 or len(timesteps) != 1:
            raise ValueError("the logistic probe takes one --block and one --timestep")
        trained_only = {"--lr": lr, "--recipe": None if recipe == "ours" else recipe, "--epochs": epochs,
                        "--batch-size": batch_size, "--weight-decay": weight_decay, "--warmup-epochs": warmup_epochs,
                        "--patience": patience, "--classifier": None if classifier == "linear" else classifier,
                        "--text-embeddings": text_embeddings, "--temperature": temperature, "--expert-run": expert_run,
                        "--width": width, "--attn-heads": attn_heads, "--pre-pool-size": pre_pool_size,
                        "--head-arc": head_arc or None, "--norm-type": norm_type, "--mlp-ratio": mlp_ratio,
                        "--fuse-arch": fuse_arch}
        given = [option for option, value in trained_only.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: options of the trained heads, not of the logistic probe "
                             "(it takes --pool, --c, the split options and --seed)")
        result = probe_run(fs, run, timesteps[0], blocks[0], pool, train_split, test_split, holdout, c, seed,
                           allow_incomplete, parse_draws(draws or "mean"))
        saved = save_probe(result, folder)
        if json_out:
            typer.echo(to_json(result.to_dict()))
            return
        typer.echo(f"{result.block} t={timestep_text(result.timestep)}: top-1 {result.top1:.4f} "
                   f"(train {result.train_top1:.4f}; {result.train} train / {result.test} test images)")
        for line in filter(None, [*images_note(result.runs), result.settings.get("draws_meaning")]):
            typer.echo(line)
        typer.echo(f"saved {saved}")
        return

    from pipelines.heads.probe import ProbeConfig, probe_heads
    from pipelines.heads.training import TrainConfig

    if recipe not in RECIPES:
        raise ValueError(f"unknown --recipe {recipe!r}; choose {' or '.join(RECIPES)}")
    if recipe == "diffssl" and (weight_decay is not None or warmup_epochs is not None):
        raise ValueError("--weight-decay and --warmup-epochs set the AdamW recipe (ours); the diffssl recipe has neither")
    if recipe == "vermouth" and warmup_epochs is not None:
        raise ValueError("--warmup-epochs sets our recipe's schedule; the vermouth recipe keeps the lr constant")
    defaults = RECIPES[recipe]

    options = {"width": width, "depth": depth, "num_heads": attn_heads, "hidden": hidden,
               "expert_width": expert_width, "pooling": pooling, "temperature": temperature,
               "pre_pool_size": pre_pool_size, "head_arc": head_arc, "norm_type": norm_type, "mlp_ratio": mlp_ratio,
               "fuse_arch": fuse_arch}
    if pool is not None:
        options["pool"] = pool
    cfg = ProbeConfig(
        head=head, blocks=blocks, timesteps=timesteps, lrs=parse_lrs(lr) or defaults["lrs"],
        run_id=run, classifier=classifier, text_embeddings=text_embeddings, expert_run=expert_run,
        expert_blocks=split_items(expert_blocks) or None, head_options=options,
        train_split=train_split, test_split=test_split, holdout=holdout, allow_incomplete=allow_incomplete,
        draws=parse_draws(draws or "all"),
        train=TrainConfig(epochs=defaults["epochs"] if epochs is None else epochs,
                          batch_size=defaults["batch_size"] if batch_size is None else batch_size,
                          weight_decay=defaults["weight_decay"] if weight_decay is None else weight_decay,
                          warmup_epochs=defaults["warmup_epochs"] if warmup_epochs is None else warmup_epochs,
                          val_fraction=val_fraction,
                          patience=defaults["patience"] if patience is None else patience, seed=seed, device=device,
                          recipe=recipe),
    )
    doc = probe_heads(fs, cfg, folder)
    if json_out:
        typer.echo(to_json(doc))
        return
    typer.echo(f"--recipe {recipe}: at most {cfg.train.epochs} epochs, batch {cfg.train.batch_size}, "
               f"lr {', '.join(f'{v:g}' for v in cfg.lrs)}")
    for h in doc["heads"]:
        typer.echo(f"{h['name']}: top-1 {h['top1']:.4f}  top-5 {h['top5']:.4f}  "
                   f"(val {h['val_top1']:.4f} after epoch {h['best_epoch']} of {h['epochs']})")
    for line in filter(None, [*images_note(doc["runs"]), doc["draws"]]):
        typer.echo(line)
    typer.echo(f"best on validation: {doc['best_head']}; {doc['seconds_per_epoch']:.2f} s per epoch; "
               f"weights and results.json in {doc['out']}")
