"""`featurestore depth`: dense probes for monocular depth."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.app import (
    AllowIncompleteFlag, HoldoutOption, JsonFlag, QuietFlag, ResultsOption, RunOption, StoreArgument, app, user_errors
)
from cli.knn import DrawsOption
from cli.segment import (
    BatchOption, DenseBlocks, DenseHeadOption, DenseTimesteps, DeviceOption, EpochsOption, GridFlag, LrOption,
    SeedOption, TestSplitOption, TrainSplitOption, WarmupOption, WeightDecayOption, WidthOption, dense_config,
    print_heads
)


@app.command()
@user_errors
def depth(
    store: StoreArgument,
    block: DenseBlocks,
    timestep: DenseTimesteps,
    head: DenseHeadOption = "linear",
    grid: GridFlag = False,
    run: RunOption = None,
    width: WidthOption = 128,
    train_split: TrainSplitOption = "train",
    test_split: TestSplitOption = "test",
    holdout: HoldoutOption = None,
    draws: DrawsOption = "mean",
    depth_average: Annotated[str, typer.Option(help="image: each metric per test image, then their mean (BTS/AdaBins eval); pixel: one mean over all valid test pixels.")] = "image",
    seed: SeedOption = 0,
    epochs: EpochsOption = 10,
    batch_size: BatchOption = 16,
    lr: LrOption = 1e-3,
    weight_decay: WeightDecayOption = 0.01,
    warmup_epochs: WarmupOption = 1.0,
    device: DeviceOption = "cpu",
    allow_incomplete: AllowIncompleteFlag = False,
    out: ResultsOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Monocular depth from the cache: dense heads with one output channel (metres) trained by L1 on
    valid pixels, scored by AbsRel, RMSE, log10 and delta<1.25^k on the input grid, averaged per image
    (BTS) or over pixels (--depth-average), with the max-depth cap and Eigen crop of the dataset's
    target info, all named in the output."""
    from featurestore.store import FeatureStore
    from pipelines.analysis import results_dir, to_json
    from pipelines.dense.runner import dense_run
    from pipelines.progress import set_quiet

    set_quiet(quiet)
    cfg = dense_config("depth", head, block, timestep, grid, run_id=run, width=width, train_split=train_split,
                       test_split=test_split, holdout=holdout, allow_incomplete=allow_incomplete, draws=draws,
                       depth_average=depth_average, epochs=epochs, batch_size=batch_size, lr=lr,
                       weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed, device=device)
    doc = dense_run(FeatureStore.open(store), cfg, results_dir(store, out))
    if json_out:
        typer.echo(to_json(doc))
        return
    print_heads(doc, [("abs_rel", "AbsRel"), ("rmse", "RMSE"), ("log10", "log10"), ("delta1", "d<1.25"),
                      ("delta2", "d<1.25^2"), ("delta3", "d<1.25^3")])
