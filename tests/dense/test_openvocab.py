"""Open-vocabulary segmentation: nothing of an unseen class is read in training."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app

CLASSES = ["background", "ring", "blob"]


def text_table(path, rows: np.ndarray, classes=CLASSES):
    save_file({"embeddings": torch.from_numpy(rows.astype(np.float32))}, str(path),
              metadata={"classes": json.dumps(classes)})
    return path


def run_openvocab(store, text, out, *extra):
    result = CliRunner().invoke(app, [str(a) for a in (
        "segment", store, "--block", "fine", "--timestep", "0", "--text-embeddings", text, "--unseen", "blob",
        "--epochs", "6", "--lr", "0.05", "--batch-size", "8", "--quiet", "--out", out, "--json", *extra)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (head,) = doc["heads"]
    return doc, head, load_file(f"{doc['out']}/{head['weights']}")


def test_unseen_pixels_labels_features_and_text_never_reach_training(tmp_path, build_dense_store, one_torch_thread):
    """The linear head on a map at the mask's size is per pixel (LayerNorm, 1x1 conv, no resampling):
    changing what an unseen pixel holds (its label among unseen/ignored, its features) and the
    unseen class's text embedding leaves the trained weights bit-identical."""
    run, data = build_dense_store(tmp_path / "a.zarr", n=32, depth=False)
    rng = np.random.default_rng(5)
    text = rng.normal(size=(3, 6))
    doc, head, weights = run_openvocab(tmp_path / "a.zarr", text_table(tmp_path / "t.safetensors", text),
                                       tmp_path / "ra")
    assert head["unseen_classes"] == ["blob"] and head["seen_classes"] == ["background", "ring"]
    assert head["miou_seen"] > 0.5 and head["harmonic_variant"].startswith("harmonic mean")
    expected = 2 * head["miou_seen"] * head["miou_unseen"] / (head["miou_seen"] + head["miou_unseen"])
    assert head["harmonic"] == pytest.approx(expected)
    assert head["miou_seen"] == pytest.approx(np.mean([head["per_class_iou"][c] for c in ("background", "ring")]))
    assert head["miou_unseen"] == head["per_class_iou"]["blob"]

    # the same store, but every unseen ("blob" = 2) pixel ignored (255) and its features replaced
    masks, fine = data["masks"].copy(), data["fine"].copy()
    unseen = masks == 2
    masks[unseen] = 255
    fine.transpose(0, 2, 3, 1)[unseen] = rng.normal(0, 50, (int(unseen.sum()), 4))
    from featurestore.store import FeatureStore
    from featurestore.targets import RowTargets, write_targets

    store = FeatureStore.open(str(tmp_path / "b.zarr"), mode="a")
    n = len(masks)
    rows = store.add_images("toyseg", {"id": data["ids"], "label": [0] * n, "class_name": ["x"] * n,
                                       "split": ["train" if i % 2 else "test" for i in range(n)],
                                       "domain": ["x"] * n, "source": data["ids"]})
    other = store.create_run({"dataset": "toyseg", "name": "dense"}, arrays={"fine": (4, 8, 8), "coarse": (6, 4, 4)},
                             timesteps=[0], rows=rows, chunk_rows=16, dtype="float32",
                             provenance={"backbone": {"input": {"size": 8}}})
    for c in range(other.n_chunks):
        s = other.chunk_slice(c)
        other.write_chunk(c, {(0, "fine"): fine[s], (0, "coarse"): data["coarse"][s]}, np.zeros(16, bool), [""] * 16)
    write_targets(store, "toyseg", rows, resize="crop", size=8, info={"mask": {"classes": CLASSES}},
                  load=lambda k: RowTargets((8, 8), np.array([1.0, 0, 1, 0]), mask=masks[k]))
    changed_text = text.copy()
    changed_text[2] = rng.normal(size=6)  # the unseen class's embedding
    _, _, weights_b = run_openvocab(tmp_path / "b.zarr", text_table(tmp_path / "u.safetensors", changed_text),
                                    tmp_path / "rb")
    assert weights.keys() == weights_b.keys()
    for name in weights:
        assert torch.equal(weights[name], weights_b[name]), name


def test_open_vocabulary_errors(tmp_path, build_dense_store):
    build_dense_store(tmp_path / "s.zarr", n=8, depth=False)
    text = text_table(tmp_path / "t.safetensors", np.ones((3, 4)))
    base = ["segment", str(tmp_path / "s.zarr"), "--block", "fine", "--timestep", "0", "--out", str(tmp_path)]
    for extra, message in [
        (["--text-embeddings", str(text), "--unseen", "dragon"], "--unseen names classes the targets lack: dragon"),
        (["--text-embeddings", str(text), "--unseen", "background,ring,blob"], "leaves no seen class"),
        (["--text-embeddings", str(text_table(tmp_path / "v.safetensors", np.ones((2, 4)), CLASSES[:2])),
          "--unseen", "ring"], "no embedding for class(es) blob"),
    ]:
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output, result.output
