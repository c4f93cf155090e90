"""The zero-shot baseline from cached cross-attention maps, on a tiny store written here."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from featurestore.targets import RowTargets, write_targets

CLASSES = ["background", "ring", "blob"]


def attention_store(path, prompt="fixed:background ring blob", n=12, s=8, tokens=6, draws=1):
    """Random maps (n, tokens, s, s), or (n, draws, tokens, s, s) for a run of several noise draws."""
    rng = np.random.default_rng(3)
    masks = rng.integers(0, 3, (n, s, s)).astype(np.uint8)
    masks[:, 0, 0] = 255
    maps = rng.random((n, *((draws,) if draws > 1 else ()), tokens, s, s)).astype(np.float32)
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"i{k}" for k in range(n)]
    rows = store.add_images("att", {"id": ids, "label": [0] * n, "class_name": ["x"] * n,
                                    "split": ["test"] * n, "domain": ["x"] * n, "source": ids})
    spec = {"dataset": "att", "prompt": prompt, **({"noise_draws": draws} if draws > 1 else {})}
    run = store.create_run(spec, arrays={"mid": (4, 2, 2), "up1.attn": (tokens, s, s)},
                           timesteps=[50], rows=rows, chunk_rows=n, dtype="float32",
                           provenance={"backbone": {"input": {"size": s}}})
    run.write_chunk(0, {(50, "mid"): np.zeros((n, *maps.shape[1:-3], 4, 2, 2), np.float32), (50, "up1.attn"): maps},
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
    train = np.setdiff1d(np.arange(len(masks)), test)
    majority = int(np.argmax(np.bincount(masks[train][masks[train] != 255], minlength=3)))
    assert doc["baseline"]["class"] == CLASSES[majority]
    assert doc["baseline"]["pixel_accuracy"] == pytest.approx((truth == majority)[keep].mean())
    text = invoke("segment", tmp_path / "s.zarr", "--zero-shot-attention", "--block", "up1.attn", "--timestep", "50",
                  "--class-tokens", "1,2,3+4", "--holdout", "0.5", "--out", tmp_path)
    assert f"predict the most frequent training class everywhere ({CLASSES[majority]!r})" in text.output


def test_draws_choose_the_maps_of_a_two_draw_run_and_all_is_refused(tmp_path):
    maps, masks = attention_store(tmp_path / "s.zarr", draws=2)
    base = ["segment", tmp_path / "s.zarr", "--zero-shot-attention", "--block", "up1.attn", "--timestep", "50",
            "--class-tokens", "1,2,3", "--holdout", "0.5", "--out", tmp_path]
    test = np.flatnonzero(np.random.default_rng(0).random(len(masks)) < 0.5)
    truth = masks[test]
    keep = truth != 255
    for draws, chosen in (("1", maps[:, 1]), ("mean", maps.mean(axis=1, dtype=np.float32))):
        doc = json.loads(invoke(*base, "--draws", draws, "--json").stdout)
        pred = chosen[test][:, 1:4].argmax(1)
        assert doc["pixel_accuracy"] == pytest.approx((pred == truth)[keep].mean()), draws
        assert doc["settings"]["draws"] == (1 if draws == "1" else "mean")
    text = invoke(*base, "--draws", "1")
    assert "noise draws: draw 1 only (of 2)" in text.output and "grid: scored on the 8x8 input grid" in text.output
    refused = invoke(*base, "--draws", "all")
    assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert "--draws all: the zero-shot baseline trains nothing" in refused.output


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


def test_end_to_end_on_a_tiny_sd15_run_extracted_with_attention_maps(tmp_path):
    """extract (a tiny random SD folder, --attention-maps, a fixed prompt naming the classes) then
    the baseline; its mIoU equals one computed here from the stored maps and masks."""
    import sys
    from pathlib import Path

    import torch

    from featurestore.targets import run_targets

    sys.path.append(str(Path(__file__).parents[1] / "pipelines"))
    from tiny_models import write_tiny_sd  # noqa: E402  (tests/pipelines' helper)

    folder = write_tiny_sd(tmp_path / "sd")
    (tmp_path / "sd.json").write_text(json.dumps({"image_size": 64}))
    store = tmp_path / "s.zarr"
    names = "background zero one two three four five six seven eight nine"
    extracted = invoke("extract", "--dataset", "mnist-seg-demo", "--limit", "8", "--backbone", "sd15", "--weights",
                       folder, "--backbone-config", tmp_path / "sd.json", "--store", store, "--timesteps", "10",
                       "--blocks", "up1", "--attention-maps", "--prompt", f"fixed:{names}", "--dtype", "float32")
    assert extracted.exit_code == 0, extracted.output
    tokens = ",".join(str(p) for p in range(1, 12))
    result = invoke("segment", store, "--zero-shot-attention", "--block", "up1.attn", "--timestep", "10",
                    "--class-tokens", tokens, "--holdout", "0.5", "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    run = FeatureStore.open(str(store)).runs()[0]
    test = np.flatnonzero(np.random.default_rng(0).random(len(run)) < 0.5)
    maps = torch.from_numpy(run.numpy(10, "up1.attn", test)[:, 1:12])
    assert maps.shape[2:] == (8, 8)  # up1's attention runs on the 8 x 8 latents of a 64 px input: upsampled to 64
    pred = torch.nn.functional.interpolate(maps, size=(64, 64), mode="bilinear").argmax(1).numpy()
    truth = run_targets(run).masks(test)
    keep = truth != 255
    confusion = np.zeros((11, 11), int)
    np.add.at(confusion, (truth[keep], pred[keep]), 1)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    assert doc["miou"] == pytest.approx(np.mean(np.diag(confusion)[union > 0] / union[union > 0]))
    assert doc["prompt"] == f"fixed:{names}" and doc["images"]["test"] == len(test)
