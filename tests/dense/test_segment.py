"""`featurestore segment` and `depth` end to end on a tiny store, re-scored independently."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from pipelines.dense.heads import load_dense_head
from pipelines.dense.runner import prediction_file

FAST = ["--epochs", "12", "--lr", "0.05", "--batch-size", "8", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def independent_miou(truth: np.ndarray, pred: np.ndarray, k: int) -> tuple[float, list]:
    keep = truth != 255
    ious = []
    for c in range(k):
        t, p = (truth == c) & keep, (pred == c) & keep
        union = (t | p).sum()
        ious.append((t & p).sum() / union if union else None)
    return float(np.mean([v for v in ious if v is not None])), ious


def test_segment_saves_predictions_that_rescore_to_the_reported_miou(toy, tmp_path, one_torch_thread):
    path, run, data = toy
    result = invoke("segment", path, "--block", "fine", "--timestep", "0", *FAST, "--out", tmp_path / "r",
                    "--save-predictions", tmp_path / "pred", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (head,) = doc["heads"]
    assert head["miou"] > 0.8, head  # the classes are the largest of three channels
    test = [i for i in range(len(data["ids"])) if i % 2 == 0]
    with open(tmp_path / "pred" / "index.csv") as f:
        index = {row["id"]: row["file"] for row in csv.DictReader(f)}
    assert sorted(index) == sorted(data["ids"][i] for i in test)
    pred = np.stack([np.asarray(Image.open(tmp_path / "pred" / index[data["ids"][i]])) for i in test])
    truth = data["masks"][test]
    assert pred.dtype == np.uint8 and pred.shape == truth.shape
    assert np.array_equal(pred == 255, truth == 255)  # 255 exactly where the ground truth is ignored
    miou, ious = independent_miou(truth, pred, 3)
    assert head["miou"] == pytest.approx(miou)
    assert [head["per_class_iou"][c] for c in doc["classes"]] == pytest.approx(ious)
    assert head["pixel_accuracy"] == pytest.approx((pred == truth)[truth != 255].mean())
    assert "left out" in head["variant"]["miou"]
    assert head["variant"]["grid"].startswith("scored on the 8x8 input grid (crop-8): ground truth nearest-resampled")
    assert "draws" not in doc["config"]  # a run of one noise draw: --draws changes nothing, so it is not a setting
    train_pixels = data["masks"][1::2][data["masks"][1::2] != 255]  # odd rows are the train split
    majority = int(np.argmax(np.bincount(train_pixels, minlength=3)))
    base = doc["baseline"]
    assert base["class"] == doc["classes"][majority] and base["train_pixels"] == len(train_pixels)
    assert base["miou"] == pytest.approx(independent_miou(truth, np.full_like(truth, majority), 3)[0])
    assert base["pixel_accuracy"] == pytest.approx((truth == majority)[truth != 255].mean())
    assert base["pixels"] == head["pixels"] and base["variant"] == head["variant"]
    saved = json.loads((tmp_path / "r" / doc["out"].rsplit("/", 1)[1] / "results.json").read_text())
    assert saved == doc
    again = invoke("segment", path, "--block", "fine", "--timestep", "0", *FAST, "--out", tmp_path / "r", "--json")
    assert json.loads(again.stdout)["heads"][0]["miou"] == head["miou"]  # deterministic
    other = invoke("segment", path, "--block", "fine", "--timestep", "0", *FAST, "--seed", "1", "--out",
                   tmp_path / "r", "--json")
    assert other.exit_code == 0 and len(list((tmp_path / "r").glob("segment-*"))) == 2  # never overwritten


def test_text_output_prints_the_majority_baseline_beside_the_heads(toy, tmp_path, one_torch_thread):
    path, _, _ = toy
    result = invoke("segment", path, "--block", "fine", "--timestep", "0", "--epochs", "1", "--quiet", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("linear_t0_fine: mIoU")
    assert lines[1].startswith("majority-class baseline: predict the most frequent training class everywhere")
    assert "same test pixels: mIoU" in lines[1]


def test_grid_trains_one_head_per_block_and_hypercolumn_fuses_them(toy, tmp_path, one_torch_thread):
    path, _, _ = toy
    doc = json.loads(invoke("segment", path, "--blocks", "all", "--timesteps", "all", "--grid", *FAST,
                            "--out", tmp_path, "--json").stdout)
    assert doc["config"]["blocks"] == ["fine", "coarse"] and doc["config"]["timesteps"] == [0]
    assert [h["name"] for h in doc["heads"]] == ["linear_t0_fine", "linear_t0_coarse"]
    fine, coarse = (h["miou"] for h in doc["heads"])
    assert fine > 0.8 and coarse < 0.5  # the coarse block is noise
    fused = json.loads(invoke("segment", path, "--block", "fine", "--block", "coarse", "--timestep", "0", "--head",
                              "hypercolumn", *FAST, "--out", tmp_path, "--json").stdout)
    assert [h["keys"] for h in fused["heads"]] == [[[0, "fine"], [0, "coarse"]]]
    text = invoke("segment", path, "--block", "fine", "--timestep", "0", "--head", "uhead", "--block", "coarse",
                  "--width", "8", "--epochs", "1", "--quiet", "--out", tmp_path)
    assert text.exit_code == 0 and text.stdout.startswith("uhead_t0_fine+coarse: mIoU "), text.output


def test_depth_metrics_equal_an_independent_computation_from_the_saved_head(toy, tmp_path, one_torch_thread):
    path, _, data = toy
    args = ["depth", path, "--block", "fine", "--timestep", "0", "--epochs", "20", "--lr", "0.05", "--batch-size", "2",
            "--quiet", "--out", tmp_path, "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (head,) = doc["heads"]
    model = load_dense_head(tmp_path / doc["out"].rsplit("/", 1)[1] / head["weights"])
    test = np.arange(0, len(data["ids"]), 2)
    with torch.no_grad():
        pred = model({(0, "fine"): torch.from_numpy(data["fine"][test])})[:, 0].numpy().astype(np.float64)
    truth = data["depth"][test].astype(np.float64)
    keep = (truth > 1e-3) & (truth < 10)
    clipped = np.clip(pred, 1e-3, 10)
    # the default: BTS's average, each metric on one image's valid pixels, then the mean over images
    per_image = [(np.mean(np.abs(d - g) / g), np.sqrt(np.mean((d - g) ** 2)), np.mean(np.maximum(d / g, g / d) < 1.25))
                 for d, g in ((clipped[i][keep[i]], truth[i][keep[i]]) for i in range(len(test)))]
    assert head["average"] == "image" and head["images"] == len(test)
    assert [head["abs_rel"], head["rmse"], head["delta1"]] == pytest.approx(np.mean(per_image, axis=0), rel=1e-5)
    d, g = clipped[keep], truth[keep]
    constant = np.median(data["depth"][1::2][data["depth"][1::2] > 0])  # the train images' median depth
    assert np.mean(np.abs(d - g) / g) < 0.8 * np.mean(np.abs(constant - g) / g)  # it learned something
    assert doc["depth_info"]["max_depth"] == 10.0 and head["max_depth"] == 10.0
    assert "Eigen" in head["variant"]["depth"] and "BTS" in head["variant"]["average"]
    assert head["variant"]["grid"].startswith("scored on the 8x8 input grid (crop-8)")
    pooled = json.loads(invoke(*args, "--depth-average", "pixel").stdout)  # same seed: the same head
    (p,) = pooled["heads"]
    assert pooled["out"] != doc["out"] and p["average"] == "pixel" and "pixel-pooled" in p["variant"]["average"]
    assert p["abs_rel"] == pytest.approx(np.mean(np.abs(d - g) / g), rel=1e-5)
    assert p["rmse"] == pytest.approx(np.sqrt(np.mean((d - g) ** 2)), rel=1e-5)
    assert p["delta1"] == pytest.approx(np.mean(np.maximum(d / g, g / d) < 1.25))
    assert p["rmse"] != pytest.approx(head["rmse"], rel=1e-5)
    text = invoke(*args[:-1], "--depth-average", "pixel")
    assert "average: pixel-pooled" in text.stdout and "grid: scored on the 8x8 input grid" in text.stdout


def test_depth_with_the_eigen_crop_scores_only_the_pixels_inside_it(tmp_path, build_dense_store):
    # identity geometry on 8 x 8 images: the crop keeps pixel centres with y in [0.75, 7.85) and
    # x in [0.5125, 7.5125), i.e. rows 1..7 and columns 1..7
    _, data = build_dense_store(tmp_path / "s.zarr", n=16, eval_crop="eigen")
    result = invoke("depth", tmp_path / "s.zarr", "--block", "fine", "--timestep", "0", "--epochs", "1", "--quiet",
                    "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    (head,) = json.loads(result.stdout)["heads"]
    g = data["depth"][0::2]
    assert head["pixels"] == int((g[:, 1:, 1:] > 1e-3).sum()) < int((g > 1e-3).sum())


@pytest.mark.parametrize(("args", "message"), [
    (["--head", "linear", "--blocks", "fine,coarse"], "reads one (timestep, block)"),
    (["--head", "conv"], "unknown dense head 'conv'"),
    (["--block", "nope"], "no block 'nope'"),
    (["--grid", "--blocks", "fine,coarse", "--save-predictions", "P"], "one segmentation head: this grid has 2"),
    (["--unseen", "ring"], "needs both --text-embeddings and --unseen"),
    (["--epochs", "0"], "--epochs and --batch-size must be positive"),
    (["--draws", "first"], "--draws takes mean, all or a draw index k"),
    (["--draws", "1"], "draw 1 asked for, but the run holds 1 noise draw"),
    (["--text-embeddings", "/nope.safetensors", "--unseen", "ring"], "--text-embeddings /nope.safetensors: cannot read"),
])
def test_bad_options_give_one_line(toy, tmp_path, args, message):
    path, _, _ = toy
    base = ["--block", "fine", "--timestep", "0"]
    result = invoke("segment", path, *base, *[a.replace("P", str(tmp_path / "p")) for a in args], "--out", tmp_path,
                    "--quiet")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert message in result.output


def test_a_run_without_targets_is_refused_in_one_line(tmp_path, build_dense_store):
    from featurestore.store import FeatureStore

    store = FeatureStore.open(str(tmp_path / "s.zarr"), mode="a")
    rows = store.add_images("plain", {"id": ["a", "b"], "label": [0, 1], "class_name": ["x", "y"],
                                      "split": ["train", "test"], "domain": ["x", "x"], "source": ["a", "b"]})
    run = store.create_run({"dataset": "plain"}, arrays={"m": (2, 2, 2)}, timesteps=[0], rows=rows, chunk_rows=2,
                           dtype="float32", provenance={"backbone": {"input": {"size": 2}}})
    run.write_chunk(0, {(0, "m"): np.zeros((2, 2, 2, 2), np.float32)}, np.zeros(2, bool), ["", ""])
    result = invoke("segment", tmp_path / "s.zarr", "--block", "m", "--timestep", "0", "--out", tmp_path)
    assert result.exit_code == 1 and "has no targets" in result.output and result.output.count("\n") == 1


def test_prediction_file_names_are_safe_and_distinct():
    assert prediction_file("img_01.v2-a") == "img_01.v2-a.png"
    odd = ["a/b#1", "a_b_1", "a#b/1", ".hidden", "../up"]
    names = [prediction_file(i) for i in odd]
    assert len(set(names)) == len(names) and all("/" not in n and "#" not in n and not n.startswith(".") for n in names)
    assert names[0].startswith("a_b_1-") and names[1] == "a_b_1.png"


def test_ids_with_slashes_and_hashes_get_their_files(tmp_path, build_dense_store, one_torch_thread):
    ids = [f"dir/{i}.png#{i % 3}" for i in range(16)]
    build_dense_store(tmp_path / "s.zarr", n=16, ids=ids)
    result = invoke("segment", tmp_path / "s.zarr", "--block", "fine", "--timestep", "0", "--epochs", "1", "--quiet",
                    "--out", tmp_path / "r", "--save-predictions", tmp_path / "p")
    assert result.exit_code == 0, result.output
    with open(tmp_path / "p" / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ids[::2]
    assert all((tmp_path / "p" / r["file"]).is_file() and r["file"] == prediction_file(r["id"]) for r in rows)
    again = invoke("segment", tmp_path / "s.zarr", "--block", "fine", "--timestep", "0", "--epochs", "1", "--quiet",
                   "--out", tmp_path / "again", "--save-predictions", tmp_path / "p")
    assert again.exit_code == 1 and "is not empty" in again.output
    assert not (tmp_path / "again").exists()  # refused before training: no results folder was made


def draw_predictions(path, doc, features) -> np.ndarray:
    """The saved head's class predictions on (n, 4, S, S) features, 255 where the truth is ignored."""
    (head,) = doc["heads"]
    model = load_dense_head(path / doc["out"].rsplit("/", 1)[1] / head["weights"])
    with torch.no_grad():
        return model({(0, "fine"): torch.from_numpy(features)}).numpy().argmax(1)


@pytest.mark.parametrize(("draws", "meaning"), [
    ("1", "noise draws: draw 1 only (of 2)"),
    ("mean", "noise draws: mean (float32 mean over the 2 draws of each image)"),
    ("all", "noise draws: all of 2 (every epoch each train image feeds one of its draws"),
])
def test_draws_choose_the_features_of_a_two_draw_run(tmp_path, build_dense_store, one_torch_thread, draws, meaning):
    _, data = build_dense_store(tmp_path / "s.zarr", n=24, draws=2)
    args = ["segment", tmp_path / "s.zarr", "--block", "fine", "--timestep", "0", *FAST, "--out", tmp_path / "r",
            "--draws", draws]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["config"]["draws"] == (int(draws) if draws.isdigit() else draws)
    assert doc["config"]["draws_meaning"].startswith(meaning)
    test = np.arange(0, 24, 2)
    fine = data["fine"][test]  # (n, 2, 4, S, S)
    scored = fine[:, 1] if draws == "1" else fine.mean(axis=1, dtype=np.float32)  # "all" scores the mean
    truth = data["masks"][test]
    pred = draw_predictions(tmp_path / "r", doc, np.ascontiguousarray(scored))
    pred[truth == 255] = 255
    assert doc["heads"][0]["miou"] == pytest.approx(independent_miou(truth, pred, 3)[0])
    if draws == "1":
        assert doc["heads"][0]["miou"] > 0.8  # draw 1's rolled channels were learned, not draw 0's
    text = invoke(*args)
    assert meaning in text.stdout
