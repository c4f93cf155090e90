"""The ddpm-mnist backbone: strict loading, the block table, stop-early, and the denoiser's error
on real MNIST digits against the figure of the checkpoint's fact sheet."""

import gzip
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app
from pipelines.extract.backbone import create_backbone
from pipelines.extract.weights import WeightsError, read_state_dict
from pipelines.extract.backbones.ddpm_mnist import DEFAULT_WEIGHTS


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("ddpm-mnist")


def test_block_table_and_parameters(backbone):
    doc = backbone.describe()
    assert doc["blocks"] == {"block0": [16, 28, 28], "block1": [32, 28, 28], "block2": [32, 28, 28], "block3": [16, 28, 28]}
    expected = sum(v.numel() for k, v in read_state_dict(DEFAULT_WEIGHTS).items() if k not in ("beta_t", "alpha_t", "gt.frequencies"))
    assert doc["parameters"] == expected == 146_961
    assert doc["input"] == {"size": 28, "channels": 1, "value_range": [-0.5, 0.5]}


def test_cli_backbones_show_json():
    result = CliRunner().invoke(app, ["backbones", "show", "ddpm-mnist", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["name"] == "ddpm-mnist" and doc["blocks"]["block1"] == [32, 28, 28]
    listed = CliRunner().invoke(app, ["backbones", "list"])
    assert "ddpm-mnist" in listed.output


def test_wrong_checkpoint_is_refused_naming_the_mismatches(tmp_path):
    state = read_state_dict(DEFAULT_WEIGHTS)
    state["gt.blocks.9.weight"] = state.pop("gt.blocks.4.weight")
    state["gt.blocks.1.net.0.bias"] = torch.zeros(33)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as err:
        create_backbone("ddpm-mnist", weights=path)
    message = str(err.value)
    assert "gt.blocks.4.weight" in message and "gt.blocks.9.weight" in message
    assert "gt.blocks.1.net.0.bias: checkpoint (33,) vs model (32,)" in message

    result = CliRunner().invoke(app, ["backbones", "show", "ddpm-mnist", "--weights", str(path), "--json"])
    assert result.exit_code == 1 and "missing keys" in result.output


def test_a_torch_checkpoint_loads_weights_only(tmp_path, backbone):
    path = tmp_path / "ddpm.pt"
    torch.save({"state_dict": read_state_dict(DEFAULT_WEIGHTS)}, path)
    other = create_backbone("ddpm-mnist", weights=path)
    for a, b in zip(backbone.module.state_dict().values(), other.module.state_dict().values()):
        assert torch.equal(a, b)
    assert other.weights_digest != backbone.weights_digest  # a different file


def test_forward_stops_after_the_last_requested_block(backbone):
    x = torch.randn(3, 1, 28, 28)
    t = torch.tensor([5, 50, 500])
    calls = []
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, blk in enumerate(backbone.module.gt.blocks)]
    try:
        with torch.no_grad():
            partial = backbone.forward_blocks(x, t, ["block1"])
            assert calls == [0, 1]
            calls.clear()
            full = backbone.forward_blocks(x, t, ["block0", "block1", "block2", "block3"])
            assert calls == [0, 1, 2, 3]
    finally:
        for h in hooks:
            h.remove()
    assert list(partial) == ["block1"]
    assert torch.equal(partial["block1"], full["block1"])


@pytest.mark.shared
def test_eps_prediction_error_on_real_mnist(shared_data, backbone):
    """First 2,000 MNIST test digits, t uniform in 1..999: MSE of eps within 0.0185 +- 0.002."""
    raw = gzip.open(shared_data / "mnist-test" / "t10k-images-idx3-ubyte.gz").read()
    x = torch.from_numpy(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28)[:2000].astype(np.float32) / 255 - 0.5)
    g = torch.Generator().manual_seed(1234)
    t = torch.randint(1, 1000, (len(x),), generator=g)
    eps = torch.randn(x.shape, generator=g)
    alpha_bar = backbone.alphas_cumprod()[t][:, None, None, None]
    z = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * eps
    with torch.no_grad():
        mse = ((backbone.predict_eps(z, t) - eps) ** 2).mean().item()
    assert abs(mse - 0.0185) <= 0.002, mse
