"""hooks.capture on a toy model, then the sd15 backbone: the real v1.5 UNet config on meta weights
(parameters, block table, CLI), and a tiny random diffusers folder (loading and its refusals,
VAE and text encoding, blocks against a direct forward, stopping early, cross-attention maps)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from pipelines.extract.backbone import create_backbone
from pipelines.extract.backbones.sd import PRESETS, SD_SCHEDULE
from pipelines.extract.diffusers_parts import alphas_cumprod_from
from pipelines.extract.weights import META, WeightsError, folder_digest
from pipelines.extract.hooks import capture

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "sd15_block_shapes.json"
SD15_BLOCKS = {  # ../shared/reference/sd15_block_shapes.json, hidden states at 512 px
    "down0": [320, 32, 32], "down1": [640, 16, 16], "down2": [1280, 8, 8], "down3": [1280, 8, 8], "mid": [1280, 8, 8],
    "up0": [1280, 16, 16], "up1": [1280, 32, 32], "up2": [640, 64, 64], "up3": [320, 64, 64],
}
SD15_MAPS = {  # where each cross-attention block's attention runs: its input size
    "down0.attn": [77, 64, 64], "down1.attn": [77, 32, 32], "down2.attn": [77, 16, 16], "mid.attn": [77, 8, 8],
    "up1.attn": [77, 16, 16], "up2.attn": [77, 32, 32], "up3.attn": [77, 64, 64],
}
HUB_IDS = PRESETS["sd15"].hub_ids
TINY_PATHS = {"down0": "down_blocks.0", "down1": "down_blocks.1", "mid": "mid_block", "up0": "up_blocks.0", "up1": "up_blocks.1"}


# -- hooks.capture ------------------------------------------------------------------------------

class Pair(nn.Module):
    """Returns (hidden, extras) like a diffusers down block."""

    def forward(self, x):
        return 2 * x, [x]


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def hook_count(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


def test_capture_records_outputs_and_stops_after_the_last_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    ran = []
    net[2].register_forward_pre_hook(lambda module, args: ran.append("2"))
    with capture(net, {"lin": "0", "act": "1"}, stop_after="act") as out:
        net(x)
        pytest.fail("the forward should have stopped after 'act'")
    assert ran == [] and hook_count(net) == 0
    assert torch.equal(out["lin"], net[0](x)) and torch.equal(out["act"], net[1](net[0](x)))
    with capture(net, {"act": "1"}) as out:
        y = net(x)
    assert ran == ["2"] and torch.equal(y, net[2](out["act"])) and hook_count(net) == 0
    pair = nn.Sequential(nn.Linear(3, 4), Pair())
    with capture(pair, {"pair": "1"}) as out:
        pair(x)
    assert torch.equal(out["pair"], 2 * pair[0](x))  # a tuple output is recorded as its first element


def test_capture_removes_its_hooks_when_the_forward_raises():
    net = nn.Sequential(nn.Linear(3, 4), Boom())
    with pytest.raises(RuntimeError, match="boom"), capture(net, {"lin": "0"}):
        net(torch.randn(2, 3))
    assert hook_count(net) == 0
    with pytest.raises(ValueError, match="stop_after"), capture(net, {"lin": "0"}, stop_after="nope"):
        pass
    with pytest.raises(AttributeError), capture(net, {"lin": "0", "bad": "7"}):
        pass
    assert hook_count(net) == 0


# -- the real v1.5 layout on meta weights -------------------------------------------------------------

def test_meta_sd15_has_the_v15_parameters_blocks_and_schedule():
    from diffusers import DDPMScheduler

    backbone = create_backbone("sd15", META)
    doc = backbone.describe()
    assert doc["parameters"] == 859_520_964 and "UNet only" in doc["parameters_note"]
    assert doc["blocks"] == SD15_BLOCKS and doc["attention_maps"] == SD15_MAPS
    assert doc["input"] == {"size": 512, "channels": 3, "value_range": [-1.0, 1.0]}
    assert doc["conditional"] and doc["default_timesteps"] == [200] and doc["timesteps"] == 1000
    expected = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(backbone.alphas_cumprod(), expected, rtol=0, atol=1e-6)


def test_block_table_equals_the_shared_reference():
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not found (../shared is absent)")
    reference = json.loads(REFERENCE.read_text())
    paths = {**{f"down{i}": f"down_blocks.{i}" for i in range(4)}, "mid": "mid_block", **{f"up{i}": f"up_blocks.{i}" for i in range(4)}}
    shapes = {name: (ref["hidden_states"] if isinstance(ref, dict) else ref)[1:] for name, ref in
              ((name, reference[path]) for name, path in paths.items())}
    assert shapes == SD15_BLOCKS


def test_cli_backbones_show_sd15_json():
    result = CliRunner().invoke(app, ["backbones", "show", "sd15", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["parameters"] == 859_520_964 and doc["blocks"] == SD15_BLOCKS


# -- a tiny random diffusers folder -------------------------------------------------------------------

@pytest.fixture(scope="module")
def backbone(tiny_sd):
    return create_backbone("sd15", tiny_sd, {"image_size": 64})


@pytest.fixture(scope="module")
def inputs(backbone):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        prepared = backbone.prepare(images, ["a photo of a cat", "a dog"])
    return prepared.x0 + torch.randn(prepared.x0.shape, generator=g), torch.tensor([10, 600]), prepared.cond


def test_tiny_folder_loads_with_its_table_schedule_and_digest(backbone, tiny_sd):
    from diffusers import DDPMScheduler

    assert backbone.blocks == {"down0": (32, 4, 4), "down1": (64, 4, 4), "mid": (64, 4, 4), "up0": (64, 8, 8), "up1": (32, 8, 8)}
    assert backbone.attention_maps == {"down0.attn": (77, 8, 8), "mid.attn": (77, 4, 4), "up1.attn": (77, 8, 8)}
    expected = DDPMScheduler.from_pretrained(tiny_sd / "scheduler").alphas_cumprod
    torch.testing.assert_close(backbone.alphas_cumprod(), expected, rtol=0, atol=1e-6)
    assert backbone.weights_digest == folder_digest(tiny_sd, ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
    assert backbone.weights_digest.startswith("sha256:")


def test_prepare_encodes_latents_and_each_distinct_prompt_once(backbone, tiny_sd):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    images = torch.rand(3, 3, 64, 64) * 2 - 1
    prompts = ["a photo of a cat", "a dog", "a photo of a cat"]
    batches = []
    handle = backbone.text_encoder.register_forward_hook(lambda m, args, out: batches.append(len(args[0])))
    try:
        with torch.no_grad():
            prepared = backbone.prepare(images, prompts)
    finally:
        handle.remove()
    assert batches == [2]  # one text-encoder call for the batch, each distinct prompt once
    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * 0.18215
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        text = text_encoder(ids).last_hidden_state
    assert prepared.x0.shape == (3, 4, 8, 8)
    torch.testing.assert_close(prepared.x0, latents)
    torch.testing.assert_close(prepared.cond, text)
    with torch.no_grad():
        unconditional = backbone.prepare(images[:1]).cond
    torch.testing.assert_close(unconditional, backbone.encode_prompts([""]))


def test_penultimate_text_layer_is_the_layer_before_last_through_the_final_norm(backbone, tiny_sd):
    penultimate = create_backbone("sd15", tiny_sd, {"image_size": 64, "text_layer": "penultimate"})
    te, tokenizer = penultimate.text_encoder, penultimate.tokenizer
    ids = tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        got = penultimate.encode_prompts(["a cat"])
        expected = te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
        last = backbone.encode_prompts(["a cat"])
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, last)


def test_forward_blocks_equal_hooks_on_a_full_unet_forward(backbone, inputs):
    x_t, t, cond = inputs
    unet, direct = backbone.module, {}
    handles = [unet.get_submodule(path).register_forward_hook(
        lambda m, args, out, name=name: direct.__setitem__(name, out[0] if isinstance(out, tuple) else out))
        for name, path in TINY_PATHS.items()]
    try:
        with torch.no_grad():
            unet(x_t, t, encoder_hidden_states=cond)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        got = backbone.forward_blocks(x_t, t, list(backbone.blocks), cond)
    assert list(got) == list(TINY_PATHS)
    for name, chw in backbone.blocks.items():
        assert got[name].shape == (2, *chw)
        assert torch.equal(got[name], direct[name]), name


def test_forward_stops_after_the_last_requested_block(backbone, inputs):
    x_t, t, cond = inputs
    unet, ran = backbone.module, []
    handles = [unet.get_submodule(path).register_forward_pre_hook(lambda m, args, name=name: ran.append(name))
               for name, path in TINY_PATHS.items()]
    try:
        with torch.no_grad():
            assert list(backbone.forward_blocks(x_t, t, ["mid"], cond)) == ["mid"]
            assert ran == ["down0", "down1", "mid"]  # no up block ran
            ran.clear()
            backbone.forward_blocks(x_t, t, ["down0"], cond)
            assert ran == ["down0"]
    finally:
        for h in handles:
            h.remove()
    assert hook_count(unet) == 0


def test_cross_attention_maps_equal_a_direct_computation(backbone, inputs):
    x_t, t, cond = inputs
    unet = backbone.module
    processors = dict(unet.attn_processors)
    layers = {name: [n for n, m in unet.get_submodule(TINY_PATHS[name]).named_modules() if n.endswith("attn2")]
              for name in ("down0", "mid", "up1")}
    seen: dict[str, list] = {name: [] for name in layers}
    handles = [
        unet.get_submodule(f"{TINY_PATHS[name]}.{layer}").register_forward_pre_hook(
            lambda m, args, kwargs, name=name: seen[name].append((m, args[0], kwargs["encoder_hidden_states"])),
            with_kwargs=True)
        for name, names in layers.items() for layer in names
    ]
    try:
        with torch.no_grad():
            got = backbone.forward_blocks(x_t, t, ["down0.attn", "mid", "mid.attn", "up1.attn"], cond)
    finally:
        for h in handles:
            h.remove()
    assert dict(unet.attn_processors) == processors  # the original processors are back
    assert len(seen["up1"]) == 2  # up1 has two cross-attention layers: their maps are averaged
    for name, calls in seen.items():
        maps = []
        for attn, hidden, text in calls:
            q = attn.to_q(hidden).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            k = attn.to_k(text).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            maps.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1))
        size = backbone.attention_maps[f"{name}.attn"][1]
        expected = torch.stack(maps).mean(0).transpose(1, 2).reshape(2, 77, size, size)
        torch.testing.assert_close(got[f"{name}.attn"], expected)
        torch.testing.assert_close(got[f"{name}.attn"].sum(1), torch.ones(2, size, size))
    with torch.no_grad():
        assert torch.equal(got["mid"], backbone.forward_blocks(x_t, t, ["mid"], cond)["mid"])


# -- refusals: nothing is downloaded, every error says what to do ----------------------------------

@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_a_folder_without_scheduler_loads_but_one_missing_a_component_is_refused(tiny_sd, tmp_path):
    folder = copy_of(tiny_sd, tmp_path)
    shutil.rmtree(folder / "scheduler")  # optional: SD's schedule
    assert torch.equal(create_backbone("sd15", folder, {"image_size": 64}).alphas_cumprod(), alphas_cumprod_from(SD_SCHEDULE))
    shutil.rmtree(folder / "vae")
    with pytest.raises(WeightsError, match=r"no vae/ .*expected unet/, vae/"):
        create_backbone("sd15", folder, {"image_size": 64})


def test_a_unet_that_does_not_fit_is_refused(tiny_sd, tmp_path):
    folder = copy_of(tiny_sd, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.extra"] = state.pop("conv_out.weight")
    save_file(state, weights)
    with pytest.raises(WeightsError, match=r"missing keys: conv_out\.weight.*unexpected keys: conv_out\.extra"):
        create_backbone("sd15", folder, {"image_size": 64})
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 48}))
    with pytest.raises(WeightsError, match="cannot load the UNet"):
        create_backbone("sd15", folder, {"image_size": 64})


def test_a_two_token_tokenizer_is_refused(tiny_sd, tmp_path):
    from transformers import CLIPTokenizer

    folder = copy_of(tiny_sd, tmp_path)
    shutil.rmtree(folder / "tokenizer")
    CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1}, merges=[]).save_pretrained(folder / "tokenizer")
    with pytest.raises(WeightsError, match="tokenizer size = 2 but text_encoder vocab_size"):
        create_backbone("sd15", folder, {"image_size": 64})


def test_a_hub_id_not_in_the_local_cache_is_refused(empty_hub_cache):
    for weights in (None, HUB_IDS[1], empty_hub_cache / "no-such-folder"):
        with pytest.raises(WeightsError, match="nor in the local Hugging Face cache.*--weights FOLDER"):
            create_backbone("sd15", weights)
    with pytest.raises(ValueError, match="unknown keys"):
        create_backbone("sd15", META, {"image_sise": 64})


def test_the_default_hub_id_loads_from_the_local_cache(tiny_sd, empty_hub_cache):
    repo = empty_hub_cache / f"models--{HUB_IDS[0].replace('/', '--')}"
    shutil.copytree(tiny_sd, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    backbone = create_backbone("sd15", None, {"image_size": 64})
    assert backbone.weights_digest == create_backbone("sd15", tiny_sd, {"image_size": 64}).weights_digest
