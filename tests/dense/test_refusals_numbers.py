"""segment/depth refuse, in one line and before saving anything, numbers that cannot give a
meaningful score: a head whose training diverged, an unusable --text-embeddings table, and
non-finite or negative training options."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app
from pipelines.dense.train import DenseTrainConfig, DenseTrainee, segmentation_loss, train_dense
from pipelines.heads.data import Batch
from pipelines.heads.training import divergence

CLASSES = ["background", "ring", "blob"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, build_dense_store) -> str:
    """16 images (8 train): batch 1 gives 8 AdamW steps per epoch."""
    path = tmp_path_factory.mktemp("refusals") / "s.zarr"
    build_dense_store(path, n=16)
    return str(path)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, out, *messages):
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    for message in messages:
        assert message in result.output, result.output
    assert not out.exists() or not any(out.iterdir())  # nothing saved


@pytest.mark.parametrize("task", ["segment", "depth"])
def test_a_diverged_head_is_refused_and_nothing_is_saved(store, tmp_path, one_torch_thread, task):
    """--lr 1e6 with weight decay 0.01 multiplies the weights by about 1 - 1e4 per step: they overflow
    within the first epoch's 8 steps."""
    result = invoke(task, store, "--block", "fine", "--timestep", "0", "--lr", "1e6", "--epochs", "2",
                    "--batch-size", "1", "--quiet", "--out", tmp_path / "r")
    assert_refused(result, tmp_path / "r", "head linear_t0_fine diverged at epoch 1 (train loss nan", "lower --lr",
                   "nothing saved")


def test_a_diverged_head_leaves_no_predictions_folder(store, tmp_path, one_torch_thread):
    result = invoke("segment", store, "--block", "fine", "--timestep", "0", "--lr", "1e6", "--epochs", "2",
                    "--batch-size", "1", "--quiet", "--out", tmp_path / "r", "--save-predictions", tmp_path / "p")
    assert_refused(result, tmp_path / "r", "diverged at epoch 1")
    assert not (tmp_path / "p").exists()


class OnePass:
    """The part of StoreBatches that train_dense reads: the same two batches every epoch."""

    def __init__(self, batches):
        self.batches = batches

    def epoch_picks(self, rows, seed, epoch):
        return None

    def passes(self, groups, rng, picks):
        return [("train", b) for b in self.batches]


def test_a_grid_with_one_diverged_head_is_refused_whole_naming_that_head():
    cfg = DenseTrainConfig(epochs=3, batch_size=2, lr=0.01)
    gen = torch.Generator().manual_seed(0)
    batches = [Batch({(0, "x"): torch.randn(2, 3, 4, 4, generator=gen)}, {}, torch.randint(0, 2, (2, 4, 4),
                                                                                             generator=gen),
                     np.arange(2 * k, 2 * k + 2)) for k in range(2)]
    healthy = DenseTrainee("healthy", torch.nn.Conv2d(3, 2, 1), lambda m, b: m(b.features[(0, "x")]),
                           segmentation_loss, cfg, 2, torch.device("cpu"))
    # logits times inf: the loss of the first batch is nan
    broken = DenseTrainee("broken", torch.nn.Conv2d(3, 2, 1), lambda m, b: m(b.features[(0, "x")]) * float("inf"),
                          segmentation_loss, cfg, 2, torch.device("cpu"))
    with pytest.raises(ValueError) as refused:
        train_dense(OnePass(batches), [healthy, broken], np.arange(4), cfg)
    message = str(refused.value)
    assert message.startswith("head broken diverged at epoch 1 (train loss nan") and "healthy" not in message
    assert "\n" not in message and "grid of 2 heads" in message
    assert len(healthy.epoch_log) == 1  # refused after the first epoch, not after the last


def test_an_epoch_without_a_step_is_not_a_divergence():
    """No pixel to learn from in a whole epoch leaves its mean loss undefined (nan) but the weights
    untouched: that is not a diverged head."""
    module = torch.nn.Conv2d(3, 2, 1)
    assert divergence("h", 1, module, float("nan"), stepped=False) is None
    assert divergence("h", 2, module, float("inf"), stepped=True) == "head h diverged at epoch 2 (train loss inf)"
    with torch.no_grad():
        module.bias[0] = float("nan")
    assert divergence("h", 1, module, 0.5, stepped=True) == "head h diverged at epoch 1 (train loss 0.5, weights not finite)"


def table(path, rows: np.ndarray):
    save_file({"embeddings": torch.from_numpy(rows.astype(np.float32))}, str(path),
              metadata={"classes": json.dumps(CLASSES)})
    return path


@pytest.mark.parametrize(("rows", "message"), [
    (np.full((3, 4), np.nan), "non-finite values in the rows of 3 class(es): background, ring, blob"),
    (np.zeros((3, 4)), "the rows of 3 class(es) have norm 0"),
    (np.array([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 1.0, 0, 0]]), "the rows of 1 class(es) have norm 0 (no cosine is "
                                                                 "defined): ring"),
    (np.array([[1.0, 0, 0, 0], [0, np.inf, 0, 0], [0, 1.0, 0, 0]]), "non-finite values in the rows of 1 class(es): ring"),
    (None, "not a safetensors file"),
])
def test_unusable_text_embeddings_are_refused(store, tmp_path, rows, message):
    text = tmp_path / "t.safetensors"
    if rows is None:
        text.write_text("class,embedding\nring,0.1\n")
    else:
        table(text, rows)
    result = invoke("segment", store, "--block", "fine", "--timestep", "0", "--text-embeddings", text, "--unseen",
                    "blob", "--epochs", "1", "--quiet", "--out", tmp_path / "r")
    assert_refused(result, tmp_path / "r", f"--text-embeddings {text}: {message}")


@pytest.mark.parametrize("task", ["segment", "depth"])
@pytest.mark.parametrize(("flag", "value", "kind"), [
    ("--lr", "inf", "positive"), ("--lr", "nan", "positive"), ("--lr", "0", "positive"), ("--lr", "-1e-3", "positive"),
    ("--warmup-epochs", "inf", "non-negative"), ("--warmup-epochs", "nan", "non-negative"),
    ("--warmup-epochs", "-1", "non-negative"),
    ("--weight-decay", "nan", "non-negative"), ("--weight-decay", "inf", "non-negative"),
    ("--weight-decay", "-0.1", "non-negative"),
])
def test_non_finite_training_options_are_refused_before_training(store, tmp_path, task, flag, value, kind):
    result = invoke(task, store, "--block", "fine", "--timestep", "0", flag, value, "--epochs", "1", "--quiet",
                    "--out", tmp_path / "r")
    assert_refused(result, tmp_path / "r", f"{flag} must be a finite {kind} number, got {float(value)}")
