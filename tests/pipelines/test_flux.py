"""`flux`: FLUX.1 [dev] on meta weights (double- and single-stream block table, parameters,
dynamic shift), and a tiny random diffusers FLUX folder (CLIP pooled + T5 as FluxPipeline encodes
them, packing and image ids against the pipeline's own functions, guidance, image tokens of both
block kinds against the module's own forward, stopping early, strict loading, one extract run)."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from pipelines.extract.backbone import create_backbone
from pipelines.extract.backbones.flux import FLUX_DEV, FLUX_SCHEDULE, OPTIONS, FluxBackbone, image_ids, pack
from pipelines.extract.diffusers_parts import parse_options
from pipelines.extract.noise import batch_eps
from pipelines.extract.token_maps import build_module
from pipelines.extract.weights import WeightsError
from test_extract_models import demo_inputs
from tiny_transformers import as_map, copy_of, hooked_outputs, images, pre_hooks, rename_a_key, write

PATHS = {"layer0": "transformer_blocks.0", "layer1": "transformer_blocks.1",
         "single0": "single_transformer_blocks.0", "single1": "single_transformer_blocks.1"}
TOKENS = 16  # T5 max_sequence_length of the tiny runs
CONFIG = {"image_size": 64, "max_sequence_length": TOKENS}


def test_meta_flux_dev_table_parameters_and_noise():
    result = CliRunner().invoke(app, ["backbones", "show", "flux", "--weights", "meta", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["parameters"] == 11_901_408_320  # FLUX.1's published 12B
    assert doc["blocks"] == {**{f"layer{i}": [3072, 64, 64] for i in range(19)},
                             **{f"single{i}": [3072, 64, 64] for i in range(38)}}
    assert doc["guidance"] == 3.5 and doc["input"]["size"] == 1024
    assert "t = 1000·σ" in doc["noise_process"] and "dynamic shift" in doc["noise_process"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write(tmp_path_factory.mktemp("tiny-flux"), "flux")


@pytest.fixture(scope="module")
def backbone(folder):
    return create_backbone("flux", folder, CONFIG)


def test_packing_and_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(pack(latents), FluxPipeline._pack_latents(latents, 2, 4, 8, 8), rtol=0, atol=0)
    torch.testing.assert_close(image_ids(4, 4, torch.device("cpu"), torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32), rtol=0, atol=0)


def pipeline_encode(folder, prompts):
    """FluxPipeline.encode_prompt: (T5 tokens (B, TOKENS, 32), CLIP pooled (B, 16))."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    ids = CLIPTokenizer.from_pretrained(folder / "tokenizer")(prompts, padding="max_length", max_length=77,
                                                              truncation=True, return_tensors="pt").input_ids
    t5_ids = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")(prompts, padding="max_length", max_length=TOKENS,
                                                                     truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()(ids).pooler_output
        tokens = T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval()(t5_ids)[0]
    return tokens, pooled


def test_prompts_latents_and_image_tokens_equal_the_module_forward(backbone, folder):
    from diffusers import AutoencoderKL, FluxPipeline

    assert backbone.blocks == {name: (16, 4, 4) for name in PATHS} and backbone.guidance == 3.5
    prompts = ["a photo of a dog", ""]
    x = images(2)
    with torch.no_grad():
        prepared = backbone.prepare(x, prompts)
        latents = (AutoencoderKL.from_pretrained(folder / "vae").encode(x).latent_dist.mean - 0.1159) * 0.3611
    tokens, pooled = pipeline_encode(folder, prompts)
    torch.testing.assert_close(prepared.x0, latents)
    torch.testing.assert_close(prepared.cond[:, :-1], tokens)
    torch.testing.assert_close(prepared.cond[:, -1, :16], pooled)
    eps = torch.randn(prepared.x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = backbone.add_noise(prepared.x0, eps, 600)
    torch.testing.assert_close(x_t, 0.4 * prepared.x0 + 0.6 * eps)
    t = torch.tensor([600, 600])
    module = backbone.module
    run = lambda: module(  # noqa: E731 - FluxPipeline's call: timestep / 1000 = sigma, guidance 3.5, 2-D ids
        hidden_states=FluxPipeline._pack_latents(x_t, 2, 4, 8, 8), timestep=torch.tensor([0.6, 0.6]),
        guidance=torch.tensor([3.5, 3.5]), pooled_projections=pooled, encoder_hidden_states=tokens,
        txt_ids=torch.zeros(TOKENS, 3), img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32))
    direct = hooked_outputs(module, PATHS, 1, run)
    with torch.no_grad():
        got = backbone.forward_blocks(x_t, t, list(PATHS), prepared.cond)
    for name in PATHS:  # the image stream: 16 packed tokens unpacked row by row
        assert direct[name].shape == (2, 16, 16)
        torch.testing.assert_close(got[name], as_map(direct[name], 4, 4))
    ran, handles = pre_hooks(module, PATHS)
    try:
        with torch.no_grad():
            backbone.forward_blocks(x_t, t, ["layer1"], prepared.cond)
            assert ran == ["layer0", "layer1"]  # no single-stream block ran
            ran.clear()
            backbone.forward_blocks(x_t, t, ["single0"], prepared.cond)
            assert ran == ["layer0", "layer1", "single0"]
    finally:
        for h in handles:
            h.remove()


def test_schnell_guidance_and_loading_refusals(folder, tmp_path):
    copy = copy_of(folder, tmp_path)
    config = json.loads((copy / "transformer" / "config.json").read_text())
    (copy / "transformer" / "config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    with pytest.raises(WeightsError, match="unexpected keys: time_text_embed.guidance_embedder"):
        create_backbone("flux", copy, CONFIG)  # guidance weights without a guidance embedding
    from diffusers import FluxTransformer2DModel

    schnell = build_module(FluxTransformer2DModel, {**FLUX_DEV, "guidance_embeds": False}, "meta", "cpu")
    options = parse_options("flux", {**CONFIG, "guidance": 1.0}, OPTIONS)
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxBackbone(schnell, options, "meta", FLUX_SCHEDULE, guidance_given=True)
    assert FluxBackbone(schnell, options, "meta", FLUX_SCHEDULE).guidance is None
    shutil.rmtree(copy / "transformer")
    shutil.copytree(folder / "transformer", copy / "transformer")
    key = rename_a_key(copy / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match=rf"missing keys: {key}"):
        create_backbone("flux", copy, CONFIG)
    shutil.rmtree(copy / "text_encoder_2")
    with pytest.raises(WeightsError, match="no text_encoder_2/"):
        create_backbone("flux", copy, CONFIG)
    with pytest.raises(ValueError, match="image_size must be a multiple of 16"):
        create_backbone("flux", "meta", {"image_size": 40})


def test_extract_stores_flux_maps_and_refuses_ddim_inversion(folder, tmp_path):
    config = tmp_path / "flux.json"
    config.write_text(json.dumps(CONFIG))
    common = ["extract", "--dataset", "demo", "--limit", "2", "--backbone", "flux", "--weights", str(folder),
              "--backbone-config", str(config), "--store", str(tmp_path / "s.zarr"), "--blocks", "single1",
              "--timesteps", "250", "--prompt", "fixed:a photo of a cat"]
    result = CliRunner().invoke(app, common)
    assert result.exit_code == 0, result.output
    (run,) = FeatureStore.open(str(tmp_path / "s.zarr")).runs()
    stored = run.numpy(250, "single1")
    backbone = create_backbone("flux", folder, CONFIG)
    with torch.no_grad():
        prepared = backbone.prepare(demo_inputs(backbone, 2), ["a photo of a cat"] * 2)
        eps = batch_eps([f"mnist-demo.npz#{i}" for i in range(2)], 250, 0, prepared.x0.shape[1:])
        x_t = 0.75 * prepared.x0 + 0.25 * eps
        direct = backbone.forward_blocks(x_t, torch.full((2,), 250), ["single1"], prepared.cond)
    assert stored.shape == (2, 16, 4, 4)
    np.testing.assert_allclose(stored, direct["single1"].numpy(), rtol=2e-3, atol=2e-3)  # stored as float16
    result = CliRunner().invoke(app, [*common, "--noise", "ddim-inversion"])
    assert result.exit_code != 0 and "--noise ddim-inversion is not implemented" in result.output
    assert len(FeatureStore.open(str(tmp_path / "s.zarr")).runs()) == 1  # refused before a run was made
