"""probe (and fewshot's trained heads) refuse, in one line and before saving anything, numbers that
cannot give a meaningful score: a head whose training diverged, an unusable --text-embeddings
table, and non-finite or negative training options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app

N = 96
CLASSES = ["c0", "c1", "c2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, build_run, lit_channel) -> str:
    """Block a at t=5 tells the class (lit channel); 48 train images."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, N)
    run = build_run(tmp_path_factory.mktemp("refusals") / "s.zarr", {(5, "a"): lit_channel(rng, labels, (4, 4, 4))},
                    labels)
    return run.store.url


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, out, *messages):
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    for message in messages:
        assert message in result.output, result.output
    assert not out.exists() or not any(out.iterdir())  # nothing saved


PROBE = ["--head", "linear", "--block", "a", "--timestep", "5", "--epochs", "2", "--batch-size", "4", "--quiet"]


def test_a_diverged_head_is_refused_and_nothing_is_saved(store, tmp_path, one_torch_thread):
    """--lr 1e6 with weight decay 0.01 multiplies the weights by about 1 - 1e4 per step: they overflow
    within the first epoch's ~11 steps."""
    result = invoke("probe", store, *PROBE, "--lr", "1e6", "--out", tmp_path / "r")
    assert_refused(result, tmp_path / "r", "head linear_t5_a_lr1e+06 diverged at epoch 1 (train loss nan",
                   "lower --lr", "nothing saved")


def test_a_grid_with_one_diverged_head_is_refused_whole_naming_that_head(store, tmp_path, one_torch_thread):
    result = invoke("probe", store, *PROBE, "--lr", "1e-3,1e6", "--out", tmp_path / "r")
    assert_refused(result, tmp_path / "r", "head linear_t5_a_lr1e+06 diverged at epoch 1",
                   "any diverged head refuses the grid of 2 heads")
    assert "lr0.001" not in result.output
    healthy = invoke("probe", store, *PROBE, "--lr", "1e-3", "--out", tmp_path / "ok", "--json")
    assert healthy.exit_code == 0, healthy.output  # the same head alone trains and is saved


@pytest.mark.parametrize(("rows", "message"), [
    (np.full((3, 8), np.nan), "non-finite values in the rows of 3 class(es): c0, c1, c2"),
    (np.zeros((3, 8)), "the rows of 3 class(es) have norm 0 (no cosine is defined): c0, c1, c2"),
    (np.eye(3, 8) * [[1], [0], [1]], "the rows of 1 class(es) have norm 0 (no cosine is defined): c1"),
    (None, "not a safetensors file"),
])
def test_unusable_text_embeddings_are_refused(store, tmp_path, rows, message):
    text = tmp_path / "t.safetensors"
    if rows is None:
        text.write_bytes(b"\x00" * 64)
    else:
        save_file({"embeddings": torch.tensor(rows, dtype=torch.float32)}, str(text),
                  metadata={"classes": json.dumps(CLASSES)})
    result = invoke("probe", store, *PROBE, "--classifier", "cosine", "--text-embeddings", text,
                    "--out", tmp_path / "r")
    assert_refused(result, tmp_path / "r", f"--text-embeddings {text}: {message}")


@pytest.mark.parametrize("command", ["probe", "fewshot"])
@pytest.mark.parametrize(("flag", "value", "kind"), [
    ("--lr", "inf", "positive"), ("--lr", "nan", "positive"), ("--lr", "0", "positive"), ("--lr", "-1e-3", "positive"),
    ("--warmup-epochs", "inf", "non-negative"), ("--warmup-epochs", "nan", "non-negative"),
    ("--warmup-epochs", "-1", "non-negative"),
    ("--weight-decay", "nan", "non-negative"), ("--weight-decay", "inf", "non-negative"),
    ("--weight-decay", "-0.1", "non-negative"),
])
def test_non_finite_training_options_are_refused_before_training(store, tmp_path, command, flag, value, kind):
    options = PROBE if command == "probe" else ["--head", "linear", "--block", "a", "--timestep", "5", "--shots",
                                                "1", "--seeds", "0", "--epochs", "1", "--quiet"]
    result = invoke(command, store, *options, flag, value, "--out", tmp_path / "r")
    assert_refused(result, tmp_path / "r", f"{flag} must be a finite {kind} number, got {float(value)}")
