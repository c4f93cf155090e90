"""`featurestore segment`: dense probes for semantic segmentation (and open-vocabulary segmentation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import (
    AllowIncompleteFlag, HoldoutOption, JsonFlag, QuietFlag, ResultsOption, RunOption, StoreArgument, app, parse_blocks,
    one_value, parse_stored_timesteps, parse_timestep, split_items, user_errors
)
from cli.knn import DrawsOption

# Options `segment` and `depth` share (each keeps its own defaults).
DenseBlocks = Annotated[list[str], typer.Option("--block", "--blocks", help="Block(s); repeat or separate by commas; all: every block of the run.")]
DenseTimesteps = Annotated[list[str], typer.Option("--timestep", "--timesteps", help="Timestep(s); repeat or separate by commas; 'none' for experts; all: every timestep of the run.")]
GridFlag = Annotated[bool, typer.Option("--grid", help="One head per (timestep, block) (linear), or per timestep over the blocks (hypercolumn, uhead), all trained in one pass; without it, one head reads every (timestep, block) given.")]
DenseHeadOption = Annotated[str, typer.Option("--head", help="linear (LayerNorm + 1x1 conv, upsampled) | hypercolumn (ddpm-segmentation's pixel MLP over upsampled blocks) | uhead (the uhead pyramid, per-pixel outputs).")]
WidthOption = Annotated[int, typer.Option(help="uhead: pyramid width.")]
EpochsOption = Annotated[int, typer.Option(help="Epochs (the final weights are kept: no validation, no early stopping).")]
BatchOption = Annotated[int, typer.Option(help="Images per minibatch.")]
LrOption = Annotated[float, typer.Option("--lr", help="AdamW learning rate (linear warmup, then cosine decay).")]
WeightDecayOption = Annotated[float, typer.Option(help="AdamW weight decay.")]
WarmupOption = Annotated[float, typer.Option(help="Epochs of linear warmup.")]
SeedOption = Annotated[int, typer.Option(help="Seed of --holdout, shuffling and initial weights.")]
DeviceOption = Annotated[str, typer.Option(help="Torch device; never falls back silently.")]
TrainSplitOption = Annotated[str, typer.Option(help="Manifest split to train on.")]
TestSplitOption = Annotated[str, typer.Option(help="Manifest split to test on.")]


def dense_config(task: str, head: str, block: list[str], timestep: list[str], grid: bool, **kwargs):
    """The DenseConfig of a command's options (`train` options go to DenseTrainConfig)."""
    from featurestore.store import parse_draws
    from pipelines.dense.runner import DenseConfig
    from pipelines.dense.train import DenseTrainConfig

    kwargs["draws"] = parse_draws(kwargs["draws"])

    train = {k: kwargs.pop(k) for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "seed",
                                        "device")}
    return DenseConfig(task=task, head=head, blocks=parse_blocks(block), timesteps=parse_stored_timesteps(timestep),
                       grid=grid, train=DenseTrainConfig(**train), **kwargs)


def print_heads(doc: dict, metrics: list[tuple[str, str]]) -> None:
    """One line per head with its metrics, then where the results are."""
    from pipelines.analysis import images_note

    for h in doc["heads"]:
        values = "  ".join(f"{label} {'n/a' if h[key] is None else f'{h[key]:.4f}'}" for key, label in metrics)
        typer.echo(f"{h['name']}: {values}" + (f"  ({h['miou_classes']} classes in the mean)" if "miou_classes" in h else ""))
    if "baseline" in doc:
        typer.echo(baseline_line(doc["baseline"]))
    typer.echo(variant_line(doc["heads"][0]["variant"]))
    for line in filter(None, [*images_note(doc["runs"]), doc["config"].get("draws_meaning")]):
        typer.echo(line)
    typer.echo(f"({doc['images']['train']} train / {doc['images']['test']} test images; {doc['training']}; "
               f"saved {doc['out']})")


def variant_line(variant: dict) -> str:
    """A result's variants (which average, denominator, grid) in one line."""
    return "variant: " + "; ".join(f"{k}: {v}" for k, v in variant.items())


def baseline_line(baseline: dict) -> str:
    """The majority-class baseline of a segmentation result, in one line."""
    return (f"{baseline['name']} ({baseline['class']!r}), same test pixels: mIoU {baseline['miou']:.4f}  "
            f"pixel accuracy {baseline['pixel_accuracy']:.4f}  ({baseline['miou_classes']} classes in the mean)")


@app.command()
@user_errors
def segment(
    store: StoreArgument,
    block: DenseBlocks,
    timestep: DenseTimesteps,
    head: DenseHeadOption = "linear",
    grid: GridFlag = False,
    run: RunOption = None,
    width: WidthOption = 128,
    text_embeddings: Annotated[Optional[str], typer.Option(help="Open vocabulary: class-name embeddings (`text-embed`); the heads project pixels into this space and score cosines.")] = None,
    unseen: Annotated[Optional[list[str]], typer.Option(help="Open vocabulary: classes never trained on (their pixels are ignored in training); repeat or separate by commas.")] = None,
    temperature: Annotated[float, typer.Option(help="Open vocabulary: logits are cosines / temperature.")] = 0.07,
    zero_shot_attention: Annotated[bool, typer.Option("--zero-shot-attention", help="Train nothing: label each pixel by the class-name token with the highest value in the cross-attention map --block <block>.attn (a run extracted with --attention-maps and --prompt fixed:TEXT).")] = False,
    class_tokens: Annotated[Optional[str], typer.Option(help="--zero-shot-attention: the prompt position of each class's name token, in class order, comma-separated; '+' joins several tokens of one class (position 0 is the start token).")] = None,
    train_split: TrainSplitOption = "train",
    test_split: TestSplitOption = "test",
    holdout: HoldoutOption = None,
    draws: DrawsOption = "mean",
    seed: SeedOption = 0,
    epochs: EpochsOption = 10,
    batch_size: BatchOption = 16,
    lr: LrOption = 1e-3,
    weight_decay: WeightDecayOption = 0.01,
    warmup_epochs: WarmupOption = 1.0,
    save_predictions: Annotated[Optional[Path], typer.Option(help="A new folder: one 8-bit PNG of class indices per test image (255 = ignored) and index.csv (id, file); one head only.")] = None,
    device: DeviceOption = "cpu",
    allow_incomplete: AllowIncompleteFlag = False,
    out: ResultsOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Semantic segmentation from the cache: dense heads trained on the stored masks (cross-entropy,
    ignore index 255), scored by mIoU over all test pixels, per-class IoU and pixel accuracy. With
    --text-embeddings and --unseen: open-vocabulary segmentation (mIoU of seen and unseen classes and
    their harmonic mean)."""
    from featurestore.store import FeatureStore
    from pipelines.analysis import results_dir, to_json
    from pipelines.progress import set_quiet

    set_quiet(quiet)
    if zero_shot_attention:
        from pipelines.dense.zeroshot import attention_zero_shot, parse_class_tokens

        if class_tokens is None:
            raise ValueError("--zero-shot-attention needs --class-tokens (where each class's name sits in the prompt)")
        trained = [o for o, v in (("--text-embeddings", text_embeddings), ("--unseen", unseen),
                                  ("--save-predictions", save_predictions), ("--grid", grid or None)) if v]
        if trained:
            raise ValueError(f"{', '.join(trained)}: not options of --zero-shot-attention (it trains nothing)")
        doc = attention_zero_shot(FeatureStore.open(store), run, parse_timestep(one_value(timestep, "--timestep")),
                                  one_value(block, "--block"), parse_class_tokens(class_tokens),
                                  results_dir(store, out), train_split, test_split, holdout, seed, allow_incomplete,
                                  draws)
        if json_out:
            typer.echo(to_json(doc))
            return
        typer.echo(f"{doc['block']} t={doc['timestep']} (zero-shot, attention maps): mIoU {doc['miou']:.4f}  "
                   f"pixel accuracy {doc['pixel_accuracy']:.4f} ({doc['images']['test']} test images; "
                   f"saved {doc['out']})")
        for line in filter(None, [baseline_line(doc["baseline"]), variant_line(doc["variant"]),
                                  doc["settings"].get("draws_meaning")]):
            typer.echo(line)
        return
    if class_tokens is not None:
        raise ValueError("--class-tokens is an option of --zero-shot-attention")
    cfg = dense_config("segment", head, block, timestep, grid, run_id=run, width=width, train_split=train_split,
                       test_split=test_split, holdout=holdout, allow_incomplete=allow_incomplete, draws=draws,
                       epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       warmup_epochs=warmup_epochs, seed=seed, device=device)
    fs, folder = FeatureStore.open(store), results_dir(store, out)
    if text_embeddings is not None or unseen:
        from pipelines.dense.openvocab import openvocab_run

        if text_embeddings is None or not split_items(unseen):
            raise ValueError("open-vocabulary segmentation needs both --text-embeddings and --unseen")
        if save_predictions is not None:
            raise ValueError("--save-predictions is for the closed-vocabulary heads (no --text-embeddings)")
        doc = openvocab_run(fs, cfg, folder, text_embeddings, split_items(unseen), temperature)
        metrics = [("miou_seen", "mIoU seen"), ("miou_unseen", "mIoU unseen"), ("harmonic", "harmonic")]
    else:
        from pipelines.dense.runner import dense_run

        doc = dense_run(fs, cfg, folder, save_predictions)
        metrics = [("miou", "mIoU"), ("pixel_accuracy", "pixel accuracy")]
    if json_out:
        typer.echo(to_json(doc))
        return
    print_heads(doc, metrics)
