"""`featurestore probe --head ...` end to end on a tiny synthetic store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app

N = 96


@pytest.fixture(scope="module")
def store(tmp_path_factory, build_run, lit_channel, noise) -> str:
    """Read-only, shared by the module's tests: block a at t=5 tells the class; the rest is noise."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, N)
    run = build_run(tmp_path_factory.mktemp("cli") / "s.zarr", {
        (5, "a"): lit_channel(rng, labels, (4, 32, 32)), (5, "b"): noise(rng, N, (4, 8, 8)),
        (None, "a"): noise(rng, N, (4, 32, 32)), (None, "b"): noise(rng, N, (4, 8, 8)),
    }, labels)
    return run.store.url


def test_attention_head_prints_results_json(store, tmp_path):
    result = CliRunner().invoke(app, [
        "probe", store, "--head", "attention", "--block", "a", "--timestep", "5", "--lr", "3e-3", "--epochs", "4",
        "--batch-size", "16", "--width", "16", "--attn-heads", "2", "--depth", "1", "--out", str(tmp_path / "out"), "--json",
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # the epoch lines are on stderr
    (head,) = doc["heads"]
    assert head["name"] == "attention_t5_a_lr0.003" and head["keys"] == [[5, "a"]]
    assert doc["top1"] == head["top1"] >= 0.9 and {"top5", "per_class"} <= head.keys()
    folder = tmp_path / "out" / f"probe-attention-{doc['run_id']}-{doc['out'][-8:]}"  # the digest of the config
    assert doc["out"] == str(folder) and (folder / "results.json").exists() and (folder / head["weights"]).exists()


def test_lists_of_blocks_timesteps_and_lrs_make_a_grid(store, tmp_path):
    result = CliRunner().invoke(app, [
        "probe", store, "--head", "linear", "--block", "a,b", "--timestep", "5", "--timestep", "none",
        "--lr", "1e-3,1e-2", "--epochs", "1", "--pool", "1", "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "--recipe ours: at most 1 epochs, batch 64, lr 0.001, 0.01"
    names = [line.split(":")[0] for line in lines[1:-1]]
    assert names == [f"linear_{t}_{b}_lr{lr}" for t in ("t5", "tnone") for b in "ab" for lr in ("0.001", "0.01")]


def test_epoch_lines_go_to_stderr_and_records_to_results_json(store, tmp_path):
    """--json: stdout is the JSON alone; one line per head and epoch on stderr, the same numbers as
    the head's `epoch_log` in results.json; --quiet drops the lines, and a rerun (other seconds)
    replaces the same results folder: the per-epoch seconds are not in the digest."""
    args = ["probe", store, "--head", "linear", "--blocks", "a", "--timesteps", "5,none", "--epochs", "3",
            "--patience", "0", "--out", str(tmp_path), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert json.loads((Path(doc["out"]) / "results.json").read_text()) == doc
    expected = []
    for h in doc["heads"]:
        records = h["epoch_log"]
        assert [r["epoch"] for r in records] == [1, 2, 3] and h["epochs"] == 3
        assert max(r["val_top1"] for r in records) == h["val_top1"] == records[h["best_epoch"] - 1]["val_top1"]
        expected += [(h["name"], f"epoch {r['epoch']}/3", f"train loss {r['train_loss']:.4f}",
                      f"val top-1 {r['val_top1']:.4f}", f"lr {r['lr']:.3g}", f"{r['seconds']:.2f} s") for r in records]
    lines = [tuple(line.split("  ")) for line in result.stderr.splitlines()]
    assert sorted(lines) == sorted(expected) and len(lines) == 2 * 3

    quiet = CliRunner().invoke(app, [*args, "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr
    again = json.loads(quiet.stdout)
    assert again["out"] == doc["out"] and [h["val_top1"] for h in again["heads"]] == [h["val_top1"] for h in doc["heads"]]
    assert [p.name for p in tmp_path.iterdir()] == [Path(doc["out"]).name]


@pytest.mark.parametrize(("args", "message"), [
    (["--head", "difformer", "--block", "a", "--timestep", "5"], "at least two --block"),
    (["--head", "linear", "--block", "c", "--timestep", "5"], "no block 'c'"),
    (["--head", "linear", "--block", "a", "--timestep", "7"], "no timestep 7"),
    (["--head", "linear", "--block", "a", "--timestep", "x"], "--timestep takes integers or 'none'"),
    (["--head", "logistic", "--block", "a,b", "--timestep", "5"], "one --block and one --timestep"),
    (["--head", "linear", "--timestep", "5"], "needs --block and --timestep"),
    (["--head", "attention", "--block", "a", "--timestep", "5", "--classifier", "cosine"], "needs text embeddings"),
    (["--head", "attention", "--block", "a", "--timestep", "5", "--text-embeddings", "missing.safetensors",
      "--classifier", "cosine"], "missing.safetensors"),
    (["--head", "mlp", "--block", "a", "--timestep", "5", "--expert-run", "abc"], "uhead only"),
    (["--head", "svm", "--block", "a", "--timestep", "5"], "unknown --head 'svm'"),
])
def test_bad_input_ends_with_one_line_and_exit_1(store, args, message):
    result = CliRunner().invoke(app, ["probe", store, *args, "--epochs", "1"])
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and message in result.output
