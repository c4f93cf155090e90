"""`pixart`: PixArt-α XL-2-1024-MS on meta weights (block table, parameters), and a tiny random
diffusers PixArt folder with a T5 encoder and additional conditions (prompts and their mask as the
pipeline encodes them, blocks against the module's own forward, stopping early, strict loading)."""

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
TOKENS = 16  # max_sequence_length of the tiny runs


def test_meta_pixart_alpha_1024_table_and_parameters():
    result = CliRunner().invoke(app, ["backbones", "show", "pixart", "--weights", "meta", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["parameters"] == 611_349_152  # PixArt-α's published 0.6B
    assert doc["blocks"] == {f"layer{i}": [1152, 64, 64] for i in range(28)}
    assert doc["input"]["size"] == 1024 and doc["timesteps"] == 1000 and doc["conditional"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write(tmp_path_factory.mktemp("tiny-pixart"), "pixart")


@pytest.fixture(scope="module")
def backbone(folder):
    return create_backbone("pixart", folder, {"image_size": 64, "max_sequence_length": TOKENS})


def t5_encode(folder, prompts):
    """PixArtAlphaPipeline.encode_prompt: padded T5 tokens, their mask, the hidden state under it."""
    from transformers import T5EncoderModel, T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(folder / "tokenizer")
    encoder = T5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    inputs = tokenizer(prompts, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return encoder(inputs.input_ids, attention_mask=inputs.attention_mask)[0], inputs.attention_mask


def test_prompts_latents_and_blocks_equal_the_module_forward(backbone, folder):
    from diffusers import AutoencoderKL

    assert backbone.blocks == {name: (24, 4, 4) for name in PATHS} and backbone.module.use_additional_conditions
    prompts = ["a photo of a cat", "", "a photo of a cat"]
    x = images(3)
    with torch.no_grad():
        prepared = backbone.prepare(x, prompts)
        latents = AutoencoderKL.from_pretrained(folder / "vae").encode(x).latent_dist.mean * 0.18215
    tokens, mask = t5_encode(folder, prompts)
    assert mask.sum(1).tolist() == [6, 1, 6]  # ▁a ▁photo ▁of ▁a ▁cat </s>; "" is the end token alone
    torch.testing.assert_close(prepared.x0, latents)
    torch.testing.assert_close(prepared.cond[..., :-1], tokens)
    assert torch.equal(prepared.cond[..., -1], mask.float())
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(prepared.x0.shape, generator=g)
    x_t = backbone.add_noise(prepared.x0, eps, 300)
    a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[300].float()
    torch.testing.assert_close(x_t, a.sqrt() * prepared.x0 + (1 - a).sqrt() * eps)
    t = torch.tensor([300, 300, 900])
    added = {"resolution": torch.tensor([[64.0, 64.0]] * 3), "aspect_ratio": torch.ones(3, 1)}  # pipeline's H, W, H/W
    module = backbone.module
    run = lambda: module(x_t, encoder_hidden_states=tokens, timestep=t, encoder_attention_mask=mask,  # noqa: E731
                         added_cond_kwargs=added)
    direct = hooked_outputs(module, PATHS, 0, run)
    with torch.no_grad():
        got = backbone.forward_blocks(x_t, t, list(PATHS), prepared.cond)
        predicted = backbone.predict_eps(x_t, t, prepared.cond)
        sample = run().sample
    for name in PATHS:
        torch.testing.assert_close(got[name], as_map(direct[name], 4, 4))
    torch.testing.assert_close(predicted, sample[:, :4])
    ran, handles = pre_hooks(module, PATHS)
    try:
        with torch.no_grad():
            backbone.forward_blocks(x_t, t, ["layer0"], prepared.cond)
    finally:
        for h in handles:
            h.remove()
    assert ran == ["layer0"]


def test_truncation_count_and_loading_refusals(backbone, folder, tmp_path):
    long = " ".join(["cat"] * 20)
    assert backbone.truncated_prompts(["a cat", long, long]) == (TOKENS, 2)
    copy = copy_of(folder, tmp_path)
    key = rename_a_key(copy / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match=rf"missing keys: {key}"):
        create_backbone("pixart", copy)
    shutil.rmtree(copy / "transformer")
    shutil.copytree(folder / "transformer", copy / "transformer")
    config = json.loads((copy / "text_encoder" / "config.json").read_text())
    (copy / "text_encoder" / "config.json").write_text(json.dumps({**config, "vocab_size": 8}))
    with pytest.raises(WeightsError, match="cannot load the T5 text encoder"):
        create_backbone("pixart", copy)
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(WeightsError, match="no tokenizer/"):
        create_backbone("pixart", copy)
    with pytest.raises(ValueError, match="max_sequence_length must be a int"):
        create_backbone("pixart", "meta", {"max_sequence_length": "120"})
    shutil.copytree(folder / "tokenizer", copy / "tokenizer")  # read before any weights are loaded:
    schedule = copy / "scheduler" / "scheduler_config.json"
    schedule.write_text(json.dumps({**json.loads(schedule.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match=r"pixart: prediction_type 'v_prediction' is not supported \(epsilon\)"):
        create_backbone("pixart", copy)
