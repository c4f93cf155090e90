"""`featurestore heads import diffssl` and `probe --head-file`: an official-layout checkpoint with
random weights (the reference models of test_diffssl_heads.py, written from the official code),
imported through the CLI, gives the reference model's logits; tested on a store without training,
its top-1 is the reference model's argmax accuracy on the same features."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipelines.heads.modules import load_head

spec = importlib.util.spec_from_file_location("diffssl_reference", Path(__file__).with_name("test_diffssl_heads.py"))
ref_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref_models)

K, C, SIDE = 5, 6, 8
runner = CliRunner()


def official_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    torch.save({"model_head": model.state_dict(), "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, path)
    return path


def import_head(ckpt: Path, out: Path, *options: str):
    return runner.invoke(app, ["heads", "import", "diffssl", str(ckpt), *options, "--out", str(out)])


LINEAR = ["--head-type", "linear", "--t-list", "150", "--first-fw-b-list", "24", "--input-shape", f"{C},{SIDE},{SIDE}",
          "--num-classes", str(K), "--pre-pool-size", "2"]
ATTENTION = ["--head-type", "attention", "--t-list", "150", "--first-fw-b-list", "24", "--input-shape",
             f"{C},{SIDE},{SIDE}", "--num-classes", str(K), "--pre-pool-size", "4", "--norm-type", "layer",
             "--fusion-arc", "Use_CLS_Token:True:16,Insert_CLS_Token,Attention:16:4:2.5:2,Extract_CLS_Token"]


def reference_linear() -> torch.nn.Module:
    return ref_models.randomized(ref_models.RefLinearHead(C, 2, [], K))


def reference_attention() -> torch.nn.Module:
    return ref_models.randomized(ref_models.RefFusion({"24": (C, SIDE)}, 1, 4, "layer", 16, 4, 2.5, 2, K))


@pytest.mark.parametrize(("reference", "options", "kind"), [
    (reference_linear, LINEAR, "diffssl-linear"), (reference_attention, ATTENTION, "diffssl-attention"),
])
def test_imported_head_equals_the_official_module(tmp_path, reference, options, kind):
    ref = reference()
    ckpt = official_checkpoint(tmp_path / "latest.pth", ref)
    result = import_head(ckpt, tmp_path / "head.safetensors", *options)
    assert result.exit_code == 0, result.output
    head = load_head(tmp_path / "head.safetensors")
    assert head.spec.kind == kind and list(head.spec.inputs) == [(150, "b24")] and head.spec.num_classes == K
    x = torch.randn(4, C, SIDE, SIDE) * 2 + 1
    expected = ref(x) if kind == "diffssl-linear" else ref([[x]])
    torch.testing.assert_close(head({(150, "b24"): x}), expected, rtol=0, atol=1e-5)


def test_imported_difformer_equals_the_official_fusion_in_its_block_order(tmp_path):
    shapes = {"30": (6, 12), "19": (8, 4)}  # the official --first_fw_b_list order: 30, 19
    ref = ref_models.randomized(ref_models.RefFusion(shapes, 2, 6, "batch", 16, 2, 4, 2, K))
    ckpt = official_checkpoint(tmp_path / "latest.pth", ref)
    result = import_head(ckpt, tmp_path / "head.safetensors", "--t-list", "90,300", "--first-fw-b-list", "30,19",
                         "--input-shape", "6,12,12", "--input-shape", "8,4,4", "--num-classes", str(K),
                         "--pre-pool-size", "6", "--norm-type", "batch",
                         "--fusion-arc", "Use_CLS_Token:True:16,Insert_CLS_Token,Attention:16:2:4:2,Extract_CLS_Token")
    assert result.exit_code == 0, result.output
    head = load_head(tmp_path / "head.safetensors")
    assert head.spec.kind == "diffssl-difformer"
    x = {(t, f"b{b}"): torch.randn(3, c, side, side) for t in (90, 300) for b, (c, side) in shapes.items()}
    expected = ref([[x[(t, "b30")], x[(t, "b19")]] for t in (90, 300)])
    torch.testing.assert_close(head(x), expected, rtol=0, atol=1e-5)


def test_head_file_top1_is_the_reference_argmax_accuracy(tmp_path, build_run, rng):
    n = 60
    labels = np.arange(n) % K
    features = rng.standard_normal((n, C, SIDE, SIDE)).astype(np.float32)
    build_run(tmp_path / "s.zarr", {(150, "b24"): features}, labels)  # even images test, odd train
    ref = reference_attention()
    ckpt = official_checkpoint(tmp_path / "latest.pth", ref)
    assert import_head(ckpt, tmp_path / "head.safetensors", *ATTENTION).exit_code == 0

    result = runner.invoke(app, ["probe", str(tmp_path / "s.zarr"), "--head-file", str(tmp_path / "head.safetensors"),
                                 "--out", str(tmp_path / "res"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    test = np.arange(0, n, 2)
    with torch.no_grad():
        logits = ref([[torch.from_numpy(features[test])]]).numpy()
    assert doc["images"]["test"] == len(test)
    assert doc["top1"] == pytest.approx(float((logits.argmax(1) == labels[test]).mean()), abs=1e-12)
    ranked = np.argsort(-logits, axis=1)[:, :5]
    assert doc["top5"] == pytest.approx(float((ranked == labels[test, None]).any(1).mean()), abs=1e-12)
    digest = doc["config"]["head_file_sha256"]
    assert Path(doc["out"]).exists() and len(digest) == 64

    same = runner.invoke(app, ["probe", str(tmp_path / "s.zarr"), "--head-file", str(tmp_path / "head.safetensors"),
                               "--block", "b24", "--timestep", "150", "--out", str(tmp_path / "res"), "--json"])
    assert same.exit_code == 0 and json.loads(same.stdout)["top1"] == doc["top1"]
    other = runner.invoke(app, ["probe", str(tmp_path / "s.zarr"), "--head-file", str(tmp_path / "head.safetensors"),
                                "--block", "b24", "--timestep", "90", "--out", str(tmp_path / "res")])
    assert other.exit_code == 1 and "not the [[90, 'b24']] asked for" in other.output


def test_head_file_refuses_a_store_of_other_shapes_or_classes(tmp_path, build_run, rng):
    ckpt = official_checkpoint(tmp_path / "latest.pth", reference_linear())
    assert import_head(ckpt, tmp_path / "head.safetensors", *LINEAR).exit_code == 0
    wide = rng.standard_normal((20, C + 1, SIDE, SIDE)).astype(np.float32)
    build_run(tmp_path / "wide.zarr", {(150, "b24"): wide}, np.arange(20) % K)
    more = rng.standard_normal((20, C, SIDE, SIDE)).astype(np.float32)
    build_run(tmp_path / "more.zarr", {(150, "b24"): more}, np.arange(20) % (K + 1))
    for store, message in [("wide.zarr", "is (7, 8, 8) (C, H, W), the head"), ("more.zarr", "the store has 6 classes")]:
        result = runner.invoke(app, ["probe", str(tmp_path / store), "--head-file", str(tmp_path / "head.safetensors"),
                                     "--out", str(tmp_path / "res")])
        assert result.exit_code == 1 and message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "res").exists()


def test_import_errors_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "head.safetensors"
    (tmp_path / "text.pth").write_text("not a checkpoint")
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 1}, tmp_path / "other.pth")
    ckpt = official_checkpoint(tmp_path / "latest.pth", reference_linear())
    cases = [
        (tmp_path / "text.pth", LINEAR, "is not a torch checkpoint"),
        (tmp_path / "other.pth", LINEAR, "no 'model_head'"),
        (ckpt, [*LINEAR[:-1], "3"], "--pre-pool-size"),  # pre-pool 3: a classifier of 6*9 inputs, not 6*4
        (ckpt, [*LINEAR[:7], "7,8,8", *LINEAR[8:]], "--input-shape"),
        (ckpt, ATTENTION, "holds a linear/MLP head (fcs.*), not a diffssl-attention head"),
    ]
    for path, options, message in cases:
        result = import_head(path, out, *options)
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists()

    out.write_bytes(b"keep")
    result = import_head(ckpt, out, *LINEAR)
    assert result.exit_code == 1 and "exists" in result.output and out.read_bytes() == b"keep"
    assert import_head(ckpt, out, *LINEAR, "--force").exit_code == 0
    assert load_head(out).spec.kind == "diffssl-linear"


def test_a_probe_head_is_tested_only_with_the_split_it_was_trained_with(tmp_path, build_run, rng):
    """Another --holdout seed would test a saved head on images it was trained on: refused."""
    n = 60
    labels = np.arange(n) % K
    features = rng.standard_normal((n, C, SIDE, SIDE)).astype(np.float32)
    features[np.arange(n), labels] += 3.0
    build_run(tmp_path / "s.zarr", {(150, "b24"): features}, labels)
    store, res = str(tmp_path / "s.zarr"), str(tmp_path / "res")
    trained = runner.invoke(app, ["probe", store, "--head", "linear", "--block", "b24", "--timestep", "150",
                                  "--holdout", "0.3", "--epochs", "2", "--out", res, "--json", "--quiet"])
    assert trained.exit_code == 0, trained.output
    doc = json.loads(trained.stdout)
    head_file = next(Path(doc["out"]).glob("*.safetensors"))
    same = runner.invoke(app, ["probe", store, "--head-file", str(head_file), "--holdout", "0.3", "--out", res, "--json"])
    assert same.exit_code == 0, same.output
    assert json.loads(same.stdout)["top1"] == doc["heads"][0]["top1"]
    other = runner.invoke(app, ["probe", store, "--head-file", str(head_file), "--holdout", "0.3", "--seed", "1",
                                "--out", res])
    assert other.exit_code == 1 and len(other.output.strip().splitlines()) == 1
    assert "could score it on its own training images" in other.output
