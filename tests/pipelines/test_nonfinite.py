"""Non-finite features: float16 overflow and a model that computes inf/NaN are counted before the
cast, the run is still written, one line names the arrays, and the exit code is EXIT_NONFINITE."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.app import EXIT_NONFINITE
from cli.main import app
from data_manifests.builders import DEMO_DIR
from featurestore.store import FeatureStore, NonFiniteError
from pipelines.extract.backbone import create_backbone
from pipelines.extract.backbones.ddpm_mnist import DEFAULT_WEIGHTS
from pipelines.extract.noise import image_eps
from pipelines.extract.weights import read_state_dict

IMAGES = 8
T = 10


def weights_with(tmp_path, name: str, change) -> str:
    state = read_state_dict(DEFAULT_WEIGHTS)
    change(state)
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    return str(path)


def extract(store, weights: str, *extra: str):
    return CliRunner().invoke(app, ["extract", "--dataset", "demo", "--limit", str(IMAGES), "--timesteps", str(T),
                                    "--store", str(store), "--weights", weights, "--json", *extra])


def stored_run(store):
    (run,) = FeatureStore.open(str(store)).runs()
    return run


def block1_overflows(weights: str) -> int:
    """inf values of block1 after a float32 forward cast to float16, computed directly."""
    backbone = create_backbone("ddpm-mnist", weights=weights)
    x0 = torch.from_numpy(np.load(DEMO_DIR / "mnist-demo.npz")["images"][:IMAGES, None].astype(np.float32) / 255 - 0.5)
    eps = torch.stack([image_eps(0, f"mnist-demo.npz#{i}", T, (1, 28, 28)) for i in range(IMAGES)])
    alpha_bar = backbone.alphas_cumprod()[T]
    with torch.no_grad():
        h = backbone.forward_blocks(alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps, torch.full((IMAGES,), T),
                                    ["block1"])["block1"]
    assert torch.isfinite(h).all()
    return int((~torch.isfinite(h.half())).sum())


def test_float16_overflow_is_stored_reported_in_one_line_and_refused_on_read(tmp_path):
    def scale_block1(state):
        state["gt.blocks.1.net.1.weight"] *= 1e5  # block1's LayerNorm gain: outputs up to ~1e5

    weights = weights_with(tmp_path, "loud", scale_block1)
    expected = block1_overflows(weights)
    assert expected > 0

    result = extract(tmp_path / "half.zarr", weights)
    assert result.exit_code == EXIT_NONFINITE, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"t{T}/block1 ({expected:,} values)" in lines[0] and "--dtype float32" in lines[0]
    assert "model itself" not in lines[0] and "block0" not in lines[0] and "block2" not in lines[0]
    doc = json.loads(result.stdout)
    assert doc["nonfinite"] == {f"t{T}/block1": {"computed": 0, "stored": expected}}

    run = stored_run(tmp_path / "half.zarr")
    assert run.status().done == IMAGES  # written, so it can be inspected
    with pytest.raises(NonFiniteError, match="float16 overflow"):
        run.numpy(T, "block1")
    assert np.isfinite(run.numpy(T, "block2")).all()
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "half.zarr")]).output
    assert f"float16 zstd  done {IMAGES}/{IMAGES}" in shown
    assert f"non-finite values stored (reading refused): t{T}/block1 ({expected:,})" in shown

    full = extract(tmp_path / "full.zarr", weights, "--dtype", "float32")
    assert full.exit_code == 0, full.output
    assert json.loads(full.stdout)["nonfinite"] == {} and full.stderr == ""
    assert np.abs(stored_run(tmp_path / "full.zarr").numpy(T, "block1")).max() > 65504


def test_inf_or_nan_computed_by_the_model_is_named_as_the_model_s(tmp_path):
    def poison_block2(state):
        state["gt.blocks.2.net.1.bias"][0, 0] = float("nan")  # one pixel of every block2 map

    result = extract(tmp_path / "nan.zarr", weights_with(tmp_path, "nan", poison_block2), "--dtype", "float32",
                     "--blocks", "block1,block2")
    assert result.exit_code == EXIT_NONFINITE, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    channels = 32
    assert f"model itself produced inf/NaN in t{T}/block2 ({IMAGES * channels:,} values)" in line, line
    assert "block1" not in line
    assert json.loads(result.stdout)["nonfinite"] == {
        f"t{T}/block2": {"computed": IMAGES * channels, "stored": IMAGES * channels}}
