"""The `sdxl` backbone: the released UNet config on meta weights (parameters, block table, CLI), and
a tiny random SDXL folder checked against diffusers' own StableDiffusionXLPipeline (prompt
encoding, pooled embedding, time ids), blocks against a direct forward, stopping early, the VAE in
float32 under autocast, and the loading refusals."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_sd import blocks_by_hooks, blocks_that_ran
from typer.testing import CliRunner

from cli.main import app
from pipelines.extract.backbone import create_backbone
from pipelines.extract.weights import WeightsError, folder_digest

SDXL_BLOCKS = {  # 1024 px -> 128 x 128 latents; three levels, the last one not downsampled
    "down0": [320, 64, 64], "down1": [640, 32, 32], "down2": [1280, 32, 32], "mid": [1280, 32, 32],
    "up0": [1280, 64, 64], "up1": [640, 128, 128], "up2": [320, 128, 128],
}
PATHS = {**{f"down{i}": f"down_blocks.{i}" for i in range(3)}, "mid": "mid_block",
         **{f"up{i}": f"up_blocks.{i}" for i in range(3)}}
PROMPTS = ["a photo of a cat", "a dog", "a photo of a cat"]


def test_meta_sdxl_has_the_released_parameters_and_block_table():
    result = CliRunner().invoke(app, ["backbones", "show", "sdxl", "--weights", "meta", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["parameters"] == 2_567_463_684 and doc["blocks"] == SDXL_BLOCKS
    assert doc["input"]["size"] == 1024 and doc["time_ids"] == [1024, 1024, 0, 0, 1024, 1024]
    assert doc["prediction_type"] == "epsilon" and "two CLIP text encoders" in doc["parameters_note"]
    assert set(doc["attention_maps"]) == {"down1.attn", "down2.attn", "mid.attn", "up0.attn", "up1.attn"}


def write_tiny_sdxl(folder: Path, tiny_sd: Path, vae_force_upcast: bool = True) -> Path:
    """An SDXL folder: a three-level UNet with text_time conditioning (context 32 + 32, pooled 32,
    8-wide time features: 6 x 8 + 32 = 80), two 3-layer text encoders, tiny_sd's tokenizer twice,
    a VAE with SDXL's scaling factor, an Euler scheduler and model_index.json."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = json.loads((tiny_sd / "text_encoder" / "config.json").read_text())["vocab_size"]
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        UNet2DConditionModel(
            sample_size=8, layers_per_block=1, block_out_channels=(32, 32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80, norm_num_groups=32,
        ).save_pretrained(folder / "unet")
        AutoencoderKL(block_out_channels=(32, 64, 64, 64), layers_per_block=1, sample_size=64, latent_channels=4,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      scaling_factor=0.13025, force_upcast=vae_force_upcast).save_pretrained(folder / "vae")
        CLIPTextModel(CLIPTextConfig(**text)).save_pretrained(folder / "text_encoder")
        CLIPTextModelWithProjection(CLIPTextConfig(**text)).save_pretrained(folder / "text_encoder_2")
    for part in ("tokenizer", "tokenizer_2"):  # with CLIP's 77-token length, which the pipeline reads
        shutil.copytree(tiny_sd / "tokenizer", folder / part)
        config = json.loads((folder / part / "tokenizer_config.json").read_text())
        (folder / part / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                         "force_zeros_for_empty_prompt": True}))
    return folder


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_sd, tmp_path_factory) -> Path:
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl"), tiny_sd)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return create_backbone("sdxl", tiny_sdxl, {"image_size": 64})


@pytest.fixture(scope="module")
def pipe(sdxl, tiny_sdxl):
    """diffusers' own pipeline around the backbone's components: the reference for conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(sdxl.vae, *sdxl.text_encoders, *sdxl.tokenizers, sdxl.module,
                                     EulerDiscreteScheduler.from_pretrained(tiny_sdxl / "scheduler"),
                                     force_zeros_for_empty_prompt=True)


@pytest.fixture(scope="module")
def inputs(sdxl):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        prepared = sdxl.prepare(images, PROMPTS)
    x_t = prepared.x0[:2] + torch.randn(2, 4, 8, 8, generator=g)
    return images, prepared, x_t, torch.tensor([10, 600])


def test_tiny_folder_loads_with_its_table_time_ids_and_digest(sdxl, tiny_sdxl):
    assert sdxl.blocks == {"down0": (32, 4, 4), "down1": (32, 2, 2), "down2": (64, 2, 2), "mid": (64, 2, 2),
                           "up0": (64, 4, 4), "up1": (32, 8, 8), "up2": (32, 8, 8)}
    assert set(sdxl.attention_maps) == {"down1.attn", "down2.attn", "mid.attn", "up0.attn", "up1.attn"}
    assert sdxl.describe()["time_ids"] == [64, 64, 0, 0, 64, 64] and sdxl.prediction_type == "epsilon"
    assert sdxl.weights_digest == folder_digest(tiny_sdxl, ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                            "tokenizer_2", "scheduler", "model_index.json"])
    assert "model_index.json" in {p.name for p in tiny_sdxl.iterdir()}


def test_prompts_are_encoded_as_the_sdxl_pipeline_encodes_them(sdxl, pipe, inputs):
    images, prepared, _, _ = inputs
    with torch.no_grad():
        context, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                                    do_classifier_free_guidance=True)
        latents = sdxl.vae.encode(images).latent_dist.mean * 0.13025
    assert prepared.cond.shape == (3, 78, 64)
    torch.testing.assert_close(prepared.cond[:, :77], context)
    torch.testing.assert_close(prepared.cond[:, 77, :32], pooled)
    assert torch.equal(prepared.cond[:, 77, 32:], torch.zeros(3, 32))
    torch.testing.assert_close(prepared.x0, latents)
    with torch.no_grad():
        empty = sdxl.encode_prompts(["", "a dog"])
    assert torch.equal(uncond, torch.zeros_like(uncond)) and torch.equal(uncond_pooled, torch.zeros_like(uncond_pooled))
    assert torch.equal(empty[0], torch.zeros(78, 64)) and torch.equal(empty[1], prepared.cond[1])


def test_an_empty_prompt_is_encoded_when_the_folder_does_not_force_zeros(tiny_sdxl, tmp_path, pipe):
    folder = Path(shutil.copytree(tiny_sdxl, tmp_path / "copy"))
    (folder / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": False}))
    backbone = create_backbone("sdxl", folder, {"image_size": 64})
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt([""], device="cpu", do_classifier_free_guidance=False)
        empty = backbone.encode_prompts([""])
    torch.testing.assert_close(empty[:, :77], context)
    torch.testing.assert_close(empty[:, 77, :32], pooled)


def test_forward_blocks_equal_hooks_on_the_unet_with_the_pipelines_added_conditioning(sdxl, pipe, inputs):
    _, prepared, x_t, t = inputs
    cond = prepared.cond[:2]
    _, _, pooled, _ = pipe.encode_prompt(PROMPTS[:2], device="cpu", do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=32)
    added = {"text_embeds": pooled, "time_ids": time_ids.expand(2, -1)}
    direct = blocks_by_hooks(sdxl.module, PATHS, x_t, t, encoder_hidden_states=cond[:, :77], added_cond_kwargs=added)
    with torch.no_grad():
        got = sdxl.forward_blocks(x_t, t, list(sdxl.blocks), cond)
        eps = sdxl.predict_eps(x_t, t, cond)
        output = sdxl.module(x_t, t, encoder_hidden_states=cond[:, :77], added_cond_kwargs=added).sample
    for name, chw in sdxl.blocks.items():
        assert got[name].shape == (2, *chw)
        torch.testing.assert_close(got[name], direct[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(eps, output, rtol=0, atol=0)  # an epsilon model: the output as it is
    assert blocks_that_ran(sdxl, PATHS, ["down2"], x_t, t, cond) == ["down0", "down1", "down2"]
    assert blocks_that_ran(sdxl, PATHS, ["mid", "down1.attn"], x_t, t, cond) == ["down0", "down1", "down2", "mid"]


def test_time_ids_follow_the_configured_original_size_and_crop(tiny_sdxl):
    backbone = create_backbone("sdxl", tiny_sdxl, {"image_size": 64, "original_size": [128, 96], "crop_top_left": [4, 8]})
    inputs = backbone.unet_inputs(torch.zeros(2, 78, 64), 2)
    assert inputs["added_cond_kwargs"]["time_ids"].tolist() == [[128, 96, 4, 8, 64, 64]] * 2
    for config, message in (({"original_size": [128]}, "original_size must be two integers >= 1"),
                            ({"crop_top_left": [-1, 0]}, "crop_top_left must be two integers >= 0"),
                            ({"image_size": 48}, "image_size must be a multiple of 32"),
                            ({"text_layer": "last"}, "unknown keys \\['text_layer'\\]")):
        with pytest.raises(ValueError, match=message):
            create_backbone("sdxl", tiny_sdxl, config)


def test_the_vae_encodes_in_float32_under_reduced_precision_autocast(sdxl, inputs):
    images, prepared, _, _ = inputs
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents = sdxl.encode_latents(images)
        reference = sdxl.vae.encode(images).latent_dist.mean  # what autocast alone would compute
    assert latents.dtype == torch.float32 and reference.dtype == torch.bfloat16
    torch.testing.assert_close(latents, prepared.x0, rtol=0, atol=0)


def test_folders_that_are_not_sdxl_or_do_not_fit_are_refused(tiny_sdxl, tiny_sd, tmp_path):
    folder = Path(shutil.copytree(tiny_sdxl, tmp_path / "copy"))
    with pytest.raises(WeightsError, match=r"not an SDXL model folder: no text_encoder_2/, tokenizer_2/"):
        create_backbone("sdxl", tiny_sd)
    with pytest.raises(WeightsError, match=r"takes added conditioning \(text_time\).*use sdxl"):
        create_backbone("sd", folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["add_embedding.extra"] = state.pop("add_embedding.linear_1.weight")
    save_file(state, weights)
    with pytest.raises(WeightsError, match=r"missing keys: add_embedding\.linear_1\.weight.*unexpected keys: add_embedding\.extra"):
        create_backbone("sdxl", folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(tiny_sd / "unet", folder / "unet")
    with pytest.raises(WeightsError, match="addition_embed_type = None, not text_time: not an SDXL UNet"):
        create_backbone("sdxl", folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(tiny_sdxl / "unet", folder / "unet")
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    shutil.rmtree(folder / "text_encoder_2")
    CLIPTextModelWithProjection(CLIPTextConfig(**{**config, "projection_dim": 16})).save_pretrained(folder / "text_encoder_2")
    with pytest.raises(WeightsError, match=r"addition_time_embed_dim = 32 but text_encoder_2 projection_dim = 16"):
        create_backbone("sdxl", folder)


def test_extract_stores_one_forward_of_the_pipelines_conditioning(tiny_sdxl, pipe, tmp_path):
    """End to end through the CLI: the stored block is the UNet's own forward on the noised VAE
    latents with the conditioning diffusers' pipeline builds for the prompt."""
    from diffusers import DDPMScheduler
    from test_extract_models import cli, demo_inputs

    from featurestore.store import FeatureStore
    from pipelines.extract.noise import image_eps

    config = tmp_path / "sdxl.json"
    config.write_text(json.dumps({"image_size": 64}))
    result = cli("extract", "--dataset", "demo", "--limit", "3", "--backbone", "sdxl", "--weights", tiny_sdxl,
                 "--backbone-config", config, "--store", tmp_path / "s.zarr", "--prompt", "fixed:a photo of a dog",
                 "--timesteps", "500", "--blocks", "mid", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    run = FeatureStore.open(str(tmp_path / "s.zarr")).runs()[0]
    with torch.no_grad():
        latents = pipe.vae.encode(demo_inputs(create_backbone("sdxl", tiny_sdxl, {"image_size": 64}), 3)).latent_dist.mean
        eps = torch.stack([image_eps(0, f"mnist-demo.npz#{i}", 500, latents.shape[1:]) for i in range(3)])
        # the training forward process of the folder's betas: DDPMScheduler.add_noise (Euler's own
        # add_noise is x0 + sigma·eps, the same x_t before scale_model_input's 1/sqrt(sigma² + 1))
        x_t = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents * 0.13025, eps, torch.full((3,), 500))
        context, _, pooled, _ = pipe.encode_prompt(["a photo of a dog"] * 3, device="cpu", do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=32)
    direct = blocks_by_hooks(pipe.unet, {"mid": "mid_block"}, x_t, torch.full((3,), 500), encoder_hidden_states=context,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(3, -1)})["mid"]
    np.testing.assert_allclose(run.numpy(500, "mid"), direct.numpy(), rtol=0, atol=1e-5)
