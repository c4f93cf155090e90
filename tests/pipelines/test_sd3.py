"""`sd3`: SD3-medium's MMDiT on meta weights (block table, parameters, flow-matching noise), and a
tiny random diffusers SD3 folder (CLIP-L + CLIP-G + T5 as StableDiffusion3Pipeline encodes them,
latents with the shift factor, flow noising against FlowMatchEulerDiscreteScheduler, image tokens of
each joint block against the module's own forward, stopping early, strict loading)."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipelines.extract.backbone import create_backbone
from pipelines.extract.weights import WeightsError
from tiny_transformers import as_map, copy_of, hooked_outputs, images, pre_hooks, rename_a_key, write

PATHS = {f"layer{i}": f"transformer_blocks.{i}" for i in range(3)}
TOKENS = 16  # T5 max_sequence_length of the tiny runs


def test_meta_sd3_medium_table_parameters_and_noise():
    result = CliRunner().invoke(app, ["backbones", "show", "sd3", "--weights", "meta", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["parameters"] == 2_028_328_000  # SD3-medium's published 2B MMDiT
    assert doc["blocks"] == {f"layer{i}": [1536, 64, 64] for i in range(24)}
    assert doc["input"]["size"] == 1024 and doc["timesteps"] == 1000
    assert "x_t = (1 − σ)·x0 + σ·eps, t = 1000·σ" in doc["noise_process"]
    assert "shift 3.0" in doc["noise_process"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write(tmp_path_factory.mktemp("tiny-sd3"), "sd3")


@pytest.fixture(scope="module")
def backbone(folder):
    return create_backbone("sd3", folder, {"image_size": 64, "max_sequence_length": TOKENS})


def pipeline_encode(folder, prompts):
    """StableDiffusion3Pipeline.encode_prompt: (tokens (B, 77 + TOKENS, 32), pooled (B, 8 + 16))."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    hidden, pooled = [], []
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        ids = CLIPTokenizer.from_pretrained(folder / tokenizer)(prompts, padding="max_length", max_length=77,
                                                                truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = CLIPTextModelWithProjection.from_pretrained(folder / encoder).eval()(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.nn.functional.pad(torch.cat(hidden, -1), (0, 32 - 24))
    ids = T5TokenizerFast.from_pretrained(folder / "tokenizer_3")(prompts, padding="max_length", max_length=TOKENS,
                                                                  truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_3").eval()(ids)[0]
    return torch.cat([clip, t5], 1), torch.cat(pooled, -1)


def test_flow_noise_equals_the_scheduler_and_ddim_inversion_is_refused(backbone):
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert backbone.num_timesteps == 1000 and "shift 3.0" in backbone.noise_process  # from the folder's scheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # its timesteps are then the integers 1000..1
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    for t in (1, 250, 999):
        assert float(scheduler.timesteps[1000 - t]) == t
        expected = scheduler.scale_noise(x0, torch.tensor([float(t)]), eps)
        torch.testing.assert_close(backbone.add_noise(x0, eps, t), expected)
        torch.testing.assert_close(backbone.add_noise(x0, eps, t), (1 - t / 1000) * x0 + t / 1000 * eps)
    assert torch.equal(backbone.add_noise(x0, eps, 0), x0)
    with pytest.raises(ValueError, match="flow-matching .* --noise ddim-inversion is not implemented"):
        backbone.alphas_cumprod()


def test_prompts_latents_and_image_tokens_equal_the_module_forward(backbone, folder):
    from diffusers import AutoencoderKL

    assert backbone.blocks == {name: (16, 4, 4) for name in PATHS}
    prompts = ["a photo of a cat", ""]
    x = images(2)
    with torch.no_grad():
        prepared = backbone.prepare(x, prompts)
        latents = (AutoencoderKL.from_pretrained(folder / "vae").encode(x).latent_dist.mean - 0.0609) * 1.5305
    tokens, pooled = pipeline_encode(folder, prompts)
    torch.testing.assert_close(prepared.x0, latents)
    assert prepared.cond.shape == (2, 77 + TOKENS + 1, 32)
    torch.testing.assert_close(prepared.cond[:, :-1], tokens)
    torch.testing.assert_close(prepared.cond[:, -1, :24], pooled)
    assert not prepared.cond[:, -1, 24:].any()
    eps = torch.randn(prepared.x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = backbone.add_noise(prepared.x0, eps, 400)
    t = torch.tensor([400, 400])
    module = backbone.module
    direct = hooked_outputs(module, PATHS, 1, lambda: module(hidden_states=x_t, timestep=t,
                                                             encoder_hidden_states=tokens, pooled_projections=pooled))
    with torch.no_grad():
        got = backbone.forward_blocks(x_t, t, list(PATHS), prepared.cond)
    for name in PATHS:  # the image stream: 16 tokens, not the 77 + 16 text tokens
        torch.testing.assert_close(got[name], as_map(direct[name], 4, 4))
    ran, handles = pre_hooks(module, {**PATHS, "head": "norm_out"})
    try:
        with torch.no_grad():
            backbone.forward_blocks(x_t, t, ["layer1"], prepared.cond)
    finally:
        for h in handles:
            h.remove()
    assert ran == ["layer0", "layer1"]


def test_loading_without_t5_and_refusals(folder, tmp_path):
    copy = copy_of(folder, tmp_path)
    shutil.rmtree(copy / "text_encoder_3")
    shutil.rmtree(copy / "tokenizer_3")
    no_t5 = create_backbone("sd3", copy, {"image_size": 64, "max_sequence_length": TOKENS})
    with torch.no_grad():
        cond = no_t5.encode_prompts(["a cat"])
    assert cond.shape == (1, 77 + TOKENS + 1, 32) and not cond[:, 77:-1].any()  # zeros, as the pipeline without T5
    assert no_t5.truncated_prompts(["a cat"]) == (77, 0)
    key = rename_a_key(copy / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match=rf"missing keys: {key}"):
        create_backbone("sd3", copy)
    shutil.rmtree(copy / "tokenizer_2")
    with pytest.raises(WeightsError, match="no tokenizer_2/"):
        create_backbone("sd3", copy)
    with pytest.raises(ValueError, match="more than the transformer's pos_embed_max_size 8"):
        create_backbone("sd3", folder, {"image_size": 256})
