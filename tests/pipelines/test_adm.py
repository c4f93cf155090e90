"""The ADM (guided-diffusion) UNet: the official checkpoint's layout, the paper's block table, the
pieces of the computation checked against direct formulas, stop-early, strict loading, and flags."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cli.main import app
from pipelines.extract.backbone import create_backbone
from pipelines.extract.weights import WeightsError
from pipelines.extract.backbones.adm import (
    ADMFlags,
    ADMUNet,
    GroupNorm32,
    QKVAttention,
    ResBlock,
    schedule_alphas_cumprod,
    timestep_embedding,
)

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference"
TINY_FLAGS_PATH = Path(__file__).parent / "adm_tiny_flags.json"
TINY = json.loads(TINY_FLAGS_PATH.read_text())  # resblock up/down, scale-shift norm, legacy attention, learn_sigma
TINY_PLAIN = {  # conv resampling, additive embedding, new attention order, 3 output channels
    "image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": "32,16",
    "num_heads": 2, "resblock_updown": False, "use_scale_shift_norm": False, "use_new_attention_order": True,
    "learn_sigma": False, "noise_schedule": "cosine",
}


def reference(name: str) -> dict:
    """A file of ../shared/reference; the test is skipped when it is absent."""
    if not (REFERENCE / name).is_file():
        pytest.skip(f"{REFERENCE / name} not found: this test needs ../shared/reference")
    return json.loads((REFERENCE / name).read_text())


@pytest.fixture(scope="module")
def preset():
    return create_backbone("adm256-uncond", "meta")


# -- the released 256 px model, on the meta device ---------------------------------------------

def test_preset_has_the_official_keys_shapes_and_parameter_count(preset):
    assert preset.parameters == 552_814_086
    official = reference("adm256_uncond_state_dict.json")
    ours = {k: list(v.shape) for k, v in preset.module.state_dict().items()}
    assert len(official) == 566
    assert ours == official


def test_preset_block_table(preset):
    doc = preset.describe()
    assert len(doc["blocks"]) == 37 and doc["blocks"]["b24"] == [1024, 16, 16]
    assert doc["blocks"] == {f"b{k}": v for k, v in reference("adm256_block_shapes.json").items()}
    assert doc["input"] == {"size": 256, "channels": 3, "value_range": [-1.0, 1.0]}
    assert doc["timesteps"] == 1000 and doc["default_timesteps"] == [150] and doc["conditional"] is False


def test_cli_backbones_show_json():
    doc = json.loads(CliRunner().invoke(app, ["backbones", "show", "adm256-uncond", "--json"]).output)
    assert doc["parameters"] == 552_814_086 and doc["blocks"]["b19"] == [1024, 8, 8]
    result = CliRunner().invoke(app, ["backbones", "show", "adm", "--backbone-config", str(TINY_FLAGS_PATH), "--json"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)["blocks"]) == [f"b{i}" for i in range(1, 10)]


# -- pieces against direct formulas -------------------------------------------------------------

@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_is_cos_then_sin(dim):
    t = np.array([0, 1, 150, 999])
    half = dim // 2
    args = t[:, None] * np.exp(-math.log(10000) * np.arange(half) / half)[None]
    expected = np.concatenate([np.cos(args), np.sin(args), np.zeros((len(t), dim % 2))], axis=1)
    np.testing.assert_allclose(timestep_embedding(torch.from_numpy(t), dim).numpy(), expected, atol=1e-4)


def _softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """One head, (ch, T) each: softmax(Q K^T / sqrt(ch)) V, channels first."""
    logits = q.T @ k / math.sqrt(q.shape[0])
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return v @ (w / w.sum(axis=1, keepdims=True)).T


def test_attention_orders_against_direct_softmax():
    heads, ch, length = 2, 8, 10
    qkv = torch.randn(1, 3 * heads * ch, length)
    legacy = QKVAttention(heads, new_order=False)(qkv)[0].numpy()
    per_head = qkv[0].numpy().reshape(heads, 3, ch, length)  # legacy: each head holds its q, k, v
    expected = np.concatenate([_softmax_attention(*per_head[h]) for h in range(heads)])
    np.testing.assert_allclose(legacy, expected, rtol=1e-5, atol=1e-6)  # the softmax runs in float32

    new_layout = qkv.reshape(1, heads, 3, ch, length).transpose(1, 2).reshape(1, -1, length)  # q's, k's, v's
    np.testing.assert_allclose(QKVAttention(heads, new_order=True)(new_layout)[0].numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("resample", [None, "down", "up"])
def test_resblock_scale_shift_norm(resample):
    torch.manual_seed(0)
    block = ResBlock(32, 16, 64, dropout=0.0, scale_shift=True, resample=resample).eval()
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    resize = {None: lambda z: z, "down": lambda z: F.avg_pool2d(z, 2), "up": lambda z: F.interpolate(z, scale_factor=2)}[resample]
    i_norm, _, i_conv = block.in_layers
    o_norm, _, _, o_conv = block.out_layers
    h = i_conv(resize(F.silu(i_norm(x))))
    scale, shift = block.emb_layers[1](F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = o_conv(F.silu(o_norm(h) * (1 + scale) + shift))
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), block.skip_connection(resize(x)) + h)


def test_group_norm_computes_in_float32():
    norm = GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4) * 100
    out = norm(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, norm(x.to(torch.bfloat16).float()).to(torch.bfloat16), rtol=0, atol=0)


def test_noise_schedules():
    linear = schedule_alphas_cumprod("linear", 1000)
    assert linear.dtype == torch.float32 and linear.shape == (1000,)
    assert linear[0] == pytest.approx(1 - 1e-4) and linear[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    assert schedule_alphas_cumprod("linear", 4000)[0] == pytest.approx(1 - 0.25e-4)  # betas scaled by 1000 / steps
    cosine = schedule_alphas_cumprod("cosine", 1000).numpy()
    f = np.cos((np.arange(1, 1001) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    np.testing.assert_allclose(cosine[:-1], f[:-1], rtol=1e-5)  # alpha-bar telescopes until beta is clipped at 0.999


# -- tiny models: block table, stop-early, loading --------------------------------------------

@pytest.mark.parametrize("flags", [TINY, TINY_PLAIN], ids=["updown-scaleshift", "conv-additive"])
def test_declared_blocks_match_a_forward(flags):
    backbone = create_backbone("adm", "random", flags)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 150])
    with torch.no_grad():
        out = backbone.forward_blocks(x, t, list(backbone.blocks))
        eps = backbone.predict_eps(x, t)
        full = backbone.module(x, t)
    assert {b: tuple(h.shape[1:]) for b, h in out.items()} == backbone.blocks
    assert list(backbone.blocks) == [f"b{i}" for i in range(1, 10)] and backbone.blocks["b5"] == (64, 16, 16)
    assert full.shape[1] == backbone.module.flags.out_channels
    assert torch.equal(eps, full[:, :3])


def test_forward_stops_after_the_last_requested_block():
    backbone = create_backbone("adm", "random", TINY)
    unet = backbone.module
    modules = {**{f"in{i}": m for i, m in enumerate(unet.input_blocks)}, "mid": unet.middle_block,
               **{f"out{i}": m for i, m in enumerate(unet.output_blocks)}, "head": unet.out}
    calls = []
    hooks = [m.register_forward_hook(lambda *_, k=k: calls.append(k)) for k, m in modules.items()]
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([150])
    try:
        with torch.no_grad():
            mid = backbone.forward_blocks(x, t, ["b5"])
            assert calls == ["in0", "in1", "in2", "in3", "mid"]
            calls.clear()
            two = backbone.forward_blocks(x, t, ["b7", "b2"])
            assert calls == ["in0", "in1", "in2", "in3", "mid", "out0", "out1"]
    finally:
        for h in hooks:
            h.remove()
    assert list(mid) == ["b5"] and list(two) == ["b2", "b7"]
    with pytest.raises(ValueError, match="b1..b9"):
        backbone.forward_blocks(x, t, ["b10"])


def test_checkpoint_in_the_official_layout_loads_strictly(tmp_path):
    torch.manual_seed(1)
    saved = ADMUNet(ADMFlags.from_json(TINY)).eval()
    path = tmp_path / "adm.pt"
    torch.save(saved.state_dict(), path)
    loaded = create_backbone("adm", weights=path, config=TINY)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(loaded.predict_eps(x, t), saved(x, t)[:, :3])
    assert loaded.weights_digest.startswith("sha256:")

    state = saved.state_dict()
    state["input_blocks.1.0.in_layers.2.kernel"] = state.pop("input_blocks.1.0.in_layers.2.weight")
    state["out.2.bias"] = torch.zeros(5)
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        create_backbone("adm", weights=path, config=TINY)
    message = str(err.value)
    assert "1 missing keys: input_blocks.1.0.in_layers.2.weight" in message
    assert "1 unexpected keys: input_blocks.1.0.in_layers.2.kernel" in message
    assert "out.2.bias: checkpoint (5,) vs model (6,)" in message


# -- flags and refusals -----------------------------------------------------------------------

def test_flags_defaults_and_parsing():
    assert ADMFlags.from_json({}).mult == (1, 2, 3, 4)  # guided-diffusion's defaults: 64 px
    flags = ADMFlags.from_json({"image_size": 128, "attention_resolutions": "32,16,8", "dropout": 0})
    assert flags.mult == (1, 1, 2, 3, 4) and flags.attention_ds == (4, 8, 16) and flags.out_channels == 3
    assert ADMFlags.from_json({"image_size": 512}).mult == (0.5, 1, 1, 2, 2, 4, 4)
    # sampling flags pasted along with the model flags are ignored
    pasted = {"image_size": 128, "timestep_respacing": "250", "use_kl": False, "batch_size": 4, "rescale_timesteps": False}
    assert ADMFlags.from_json(pasted) == ADMFlags.from_json({"image_size": 128})


@pytest.mark.parametrize("flags, message", [
    ({"image_size": 32, "channel_mult": "1,2", "colour": 1}, "unknown ADM flags: colour"),
    ({"image_size": 32, "channel_mult": "1,2", "predict_xstart": True}, "change what the model predicts"),
    ({"learn_sigma": "True"}, "learn_sigma must be a bool"),
    ({"num_channels": 64.0}, "num_channels must be a int"),
    ({"image_size": 32}, "no default channel_mult for image_size 32"),
    ({"channel_mult": "1,x"}, "channel_mult must be comma-separated integers"),
    ({"noise_schedule": "sqrt"}, "noise_schedule must be one of linear, cosine"),
])
def test_bad_flags_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        create_backbone("adm", "meta", flags)


def test_refusals():
    with pytest.raises(ValueError, match="adm needs --backbone-config"):
        create_backbone("adm", "meta")
    with pytest.raises(ValueError, match="takes no --backbone-config"):
        create_backbone("adm256-uncond", "meta", TINY)
    with pytest.raises(WeightsError, match=r"--weights PATH to the official 256x256_diffusion_uncond\.pt"):
        create_backbone("adm256-uncond")
    with pytest.raises(ValueError, match="class-conditional ADM needs labels; not supported for extraction"):
        create_backbone("adm", "meta", {**TINY, "class_cond": True})


def test_class_conditional_model_adds_a_label_embedding():
    torch.manual_seed(0)
    unet = ADMUNet(ADMFlags.from_json({**TINY, "class_cond": True})).eval()
    assert unet.label_emb.weight.shape == (1000, 128)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 5])
    with torch.no_grad():
        a, b = unet(x, t, torch.tensor([1, 2])), unet(x, t, torch.tensor([2, 2]))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="needs class labels"):
        unet(x, t)
