"""The zero-shot baseline from cached cross-attention maps, on a tiny store written here."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from featurestore.targets import RowTargets, write_targets

CLASSES = ["background", "ring", "blob"]


def attention_store(path, prompt="fixed:background ring blob", n=12, s=8, tokens=6):
    rng = np.random.default_rng(3)
    masks = rng.integers(0, 3, (n, s, s)).astype(np.uint8)
    masks[:, 0, 0] = 255
    maps = rng.random((n, tokens, s, s)).astype(np.float32)
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"i{k}" for k in range(n)]
    rows = store.add_images("att", {"id": ids, "label": [0] * n, "class_name": ["x"] * n,
                                    "split": ["test"] * n, "domain": ["x"] * n, "source": ids})
    run = store.create_run({"dataset": "att", "prompt": prompt}, arrays={"mid": (4, 2, 2), "up1.attn": (tokens, s, s)},
                           timesteps=[50], rows=rows, chunk_rows=n, dtype="float32",
                           provenance={"backbone": {"input": {"size": s}}})
    run.write_chunk(0, {(50, "mid"): np.zeros((n, 4, 2, 2), np.float32), (50, "up1.attn"): maps},
                    np.zeros(n, bool), [""] * n)
    write_targets(store, "att", rows, resize="crop", size=s, info={"mask": {"classes": CLASSES}},
                  load=lambda k: RowTargets((s, s), np.array([1.0, 0, 1, 0]), mask=masks[k]))
    return maps, masks


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_each_pixel_takes_the_class_of_its_highest_token(tmp_path):
    maps, masks = attention_store(tmp_path / "s.zarr")
    result = invoke("segment", tmp_path / "s.zarr", "--zero-shot-attention", "--block", "up1.attn", "--timestep", "50",
                    "--class-tokens", "1,2,3+4", "--holdout", "0.5", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    test = np.flatnonzero(np.random.default_rng(0).random(len(masks)) < 0.5)  # --holdout 0.5 (seed 0)
    scores = np.stack([maps[:, 1], maps[:, 2], np.maximum(maps[:, 3], maps[:, 4])], axis=1)[test]
    pred, truth = scores.argmax(1), masks[test]
    keep = truth != 255
    ious = [((truth == c) & (pred == c) & keep).sum() / (((truth == c) | (pred == c)) & keep).sum() for c in range(3)]
    assert doc["miou"] == pytest.approx(np.mean(ious))
    assert doc["pixel_accuracy"] == pytest.approx((pred == truth)[keep].mean())
    assert doc["images"]["test"] == len(test) and "highest cross-attention" in doc["rule"]


@pytest.mark.parametrize(("args", "message"), [
    (["--block", "mid", "--class-tokens", "1,2,3"], "reads a cross-attention map (<block>.attn), not 'mid'"),
    (["--block", "up1.attn", "--class-tokens", "1,2"], "gives 2 classes, the masks have 3"),
    (["--block", "up1.attn", "--class-tokens", "1,2,9"], "positions [9] are outside the map's 6 tokens"),
    (["--block", "up1.attn", "--class-tokens", "1,a,2"], "--class-tokens takes token positions"),
    (["--block", "up1.attn"], "needs --class-tokens"),
    (["--block", "up1.attn", "--class-tokens", "1,2,3", "--grid"], "--grid: not options of --zero-shot-attention"),
])
def test_bad_input_is_refused_in_one_line(tmp_path, args, message):
    attention_store(tmp_path / "s.zarr")
    result = invoke("segment", tmp_path / "s.zarr", "--zero-shot-attention", "--timestep", "50", *args,
                    "--holdout", "0.5", "--out", tmp_path)
    assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output, result.output


def test_a_prompt_that_differs_per_image_is_refused(tmp_path):
    attention_store(tmp_path / "s.zarr", prompt="tags:{}")
    result = invoke("segment", tmp_path / "s.zarr", "--zero-shot-attention", "--block", "up1.attn", "--timestep", "50",
                    "--class-tokens", "1,2,3", "--holdout", "0.5", "--out", tmp_path)
    assert result.exit_code == 1 and "needs one prompt for every image" in result.output
