"""The generic `sd` backbone and its SD 2.1 presets: released configs on meta weights (parameters,
block tables, CLI), and a tiny SD 2-style folder (linear projections, per-level heads, upcast
attention, a text encoder cut by one layer as diffusers' SD 2 conversion does, a v-prediction
scheduler): text layer, eps from v against diffusers' DDIM step, blocks against a direct forward,
stopping early, refusals. The `sd15` preset keeps its own tests (test_sd15.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipelines.extract.backbone import create_backbone
from pipelines.extract.weights import META, WeightsError, folder_digest

SD21_BLOCKS = {  # 768 px -> 96 x 96 latents, halved by every down block but the last
    "down0": [320, 48, 48], "down1": [640, 24, 24], "down2": [1280, 12, 12], "down3": [1280, 12, 12],
    "mid": [1280, 12, 12], "up0": [1280, 24, 24], "up1": [1280, 48, 48], "up2": [640, 96, 96], "up3": [320, 96, 96],
}
SD21_BASE_BLOCKS = {  # 512 px -> 64 x 64 latents: SD v1.5's table
    "down0": [320, 32, 32], "down1": [640, 16, 16], "down2": [1280, 8, 8], "down3": [1280, 8, 8],
    "mid": [1280, 8, 8], "up0": [1280, 16, 16], "up1": [1280, 32, 32], "up2": [640, 64, 64], "up3": [320, 64, 64],
}
SD2_UNET_PARAMETERS = 865_910_724  # the released SD 2.x UNet (1024-wide context, linear projections)
TINY_PATHS = {"down0": "down_blocks.0", "down1": "down_blocks.1", "mid": "mid_block", "up0": "up_blocks.0", "up1": "up_blocks.1"}


# -- helpers shared with test_sdxl.py -----------------------------------------------------------------

def blocks_by_hooks(unet: torch.nn.Module, paths: dict[str, str], *args, **kwargs) -> dict[str, torch.Tensor]:
    """Every block's output (first element of a tuple) from forward hooks on one full UNet forward."""
    direct: dict[str, torch.Tensor] = {}
    handles = [unet.get_submodule(path).register_forward_hook(
        lambda m, a, out, name=name: direct.__setitem__(name, out[0] if isinstance(out, tuple) else out))
        for name, path in paths.items()]
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return direct


def blocks_that_ran(backbone, paths: dict[str, str], request: list[str], *args) -> list[str]:
    """The blocks whose forward started while backbone.forward_blocks(*args) computed `request`."""
    ran: list[str] = []
    handles = [backbone.module.get_submodule(path).register_forward_pre_hook(lambda m, a, name=name: ran.append(name))
               for name, path in paths.items()]
    try:
        with torch.no_grad():
            assert list(backbone.forward_blocks(args[0], args[1], request, *args[2:])) == request
    finally:
        for h in handles:
            h.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in backbone.module.modules()) == 0
    return ran


# -- released configs on meta weights -------------------------------------------------------------------

def test_sd21_presets_on_meta_weights_have_the_released_table_and_parameters():
    result = CliRunner().invoke(app, ["backbones", "show", "sd21", "--weights", "meta", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["parameters"] == SD2_UNET_PARAMETERS and doc["blocks"] == SD21_BLOCKS
    assert doc["input"]["size"] == 768 and doc["prediction_type"] == "v_prediction"
    assert doc["default_timesteps"] == [261] and doc["attention_maps"]["up1.attn"] == [77, 24, 24]
    base = create_backbone("sd21-base", META).describe()
    assert base["parameters"] == SD2_UNET_PARAMETERS and base["blocks"] == SD21_BASE_BLOCKS
    assert base["input"]["size"] == 512 and base["prediction_type"] == "epsilon"


def test_sd_without_a_model_is_refused_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    for weights in (META, None):
        with pytest.raises(ValueError, match=r"sd is built from a model: pass --weights FOLDER.*use a preset: sd15, sd21"):
            create_backbone("sd", weights)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=r"someone/model is neither a model folder nor in the local Hugging Face "
                                           r"cache.*hf download someone/model"):
        create_backbone("sd", "someone/model")
    for config, message in (({"prediction_type": "sample"}, "prediction_type 'sample' is not supported"),
                            ({"image_size": "512"}, "image_size must be a positive integer"),
                            ({"text_layer": "first"}, "text_layer must be 'last' or 'penultimate'")):
        with pytest.raises(ValueError, match=message):
            create_backbone("sd21", META, config)


# -- a tiny SD 2-style folder -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd2_folder(tiny_sd, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """(folder, the uncut 3-layer text encoder): tiny_sd's VAE and tokenizer with an SD 2-style UNet,
    the text encoder minus its last layer, and a DDIM v-prediction scheduler."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("sd2") / "model"
    for part in ("vae", "tokenizer"):
        shutil.copytree(tiny_sd / part, folder / part)
    text = json.loads((tiny_sd / "text_encoder" / "config.json").read_text())
    config = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                   "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")}
    with torch.random.fork_rng():
        torch.manual_seed(1)
        full = CLIPTextModel(CLIPTextConfig(**config, num_hidden_layers=3)).eval()
        cut = CLIPTextModel(CLIPTextConfig(**config, num_hidden_layers=2))
        cut.load_state_dict({k: v for k, v in full.state_dict().items() if "layers.2." not in k}, strict=True)
        cut.save_pretrained(folder / "text_encoder")
        UNet2DConditionModel(
            sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
            norm_num_groups=32,
        ).save_pretrained(folder / "unet")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    return folder, full


@pytest.fixture(scope="module")
def sd2(sd2_folder):
    return create_backbone("sd", sd2_folder[0])


@pytest.fixture(scope="module")
def inputs(sd2):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        cond = sd2.encode_prompts(["a photo of a cat", "a dog"])
    return x_t, torch.tensor([10, 600]), cond


def test_the_folder_sets_size_prediction_type_schedule_and_digest(sd2, sd2_folder):
    from diffusers import DDPMScheduler

    folder = sd2_folder[0]
    assert sd2.name == "sd" and sd2.input.size == 64  # sample_size 8 x the VAE's factor 8
    assert sd2.prediction_type == "v_prediction" and sd2.describe()["prediction_type"] == "v_prediction"
    assert sd2.blocks == {"down0": (32, 4, 4), "down1": (64, 4, 4), "mid": (64, 4, 4), "up0": (64, 8, 8), "up1": (32, 8, 8)}
    expected = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(sd2.alphas_cumprod(), expected, rtol=0, atol=1e-6)
    assert sd2.weights_digest == folder_digest(folder, ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
    assert create_backbone("sd", folder, {"prediction_type": "epsilon", "image_size": 128}).input.size == 128


def test_a_text_encoder_cut_by_one_layer_gives_the_penultimate_layer_through_the_final_norm(sd2, sd2_folder):
    """SD 2's conditioning: OpenCLIP's penultimate layer, then ln_final (FrozenOpenCLIPEmbedder with
    layer="penultimate"); diffusers ships the text encoder without its last layer."""
    full = sd2_folder[1]
    ids = sd2.tokenizer(["a cat", "a photo of the dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = full.final_layer_norm(full(ids, output_hidden_states=True).hidden_states[-2])
        got = sd2.encode_prompts(["a cat", "a photo of the dog"])
        last_of_full = full(ids).last_hidden_state
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, last_of_full, atol=1e-3)


def test_eps_from_v_inverts_v_exactly(sd2, monkeypatch):
    """x_t = sqrt(ab) x0 + sqrt(1-ab) eps and v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho
    2022): a UNet that outputs v exactly must give back eps."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 261, 999])
    ab = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    monkeypatch.setattr(sd2, "module", lambda *args, **kwargs: SimpleNamespace(sample=v))
    torch.testing.assert_close(sd2.predict_eps(x_t, t, torch.zeros(3, 77, 32)), eps, atol=1e-5, rtol=1e-5)


def test_a_ddim_step_with_our_eps_equals_diffusers_ddim_step_on_the_v_output(sd2, sd2_folder, inputs):
    from diffusers import DDIMScheduler

    from pipelines.extract.noise import ddim_step

    x_t, _, cond = inputs
    scheduler = DDIMScheduler.from_pretrained(sd2_folder[0] / "scheduler")
    scheduler.set_timesteps(10)  # steps of 100: 601 -> 501 with steps_offset 1
    t = torch.tensor([601, 601])
    with torch.no_grad():
        v = sd2.module(x_t, t, encoder_hidden_states=cond).sample
        eps = sd2.predict_eps(x_t, t, cond)
    expected = scheduler.step(v, 601, x_t, eta=0.0).prev_sample
    ab = sd2.alphas_cumprod()
    torch.testing.assert_close(ddim_step(x_t, eps, ab[601], ab[501]), expected, atol=1e-5, rtol=1e-5)
    epsilon_model = create_backbone("sd", sd2_folder[0], {"prediction_type": "epsilon"})
    with torch.no_grad():
        assert torch.equal(epsilon_model.predict_eps(x_t, t, cond), v)  # epsilon: the output as it is


def test_forward_blocks_equal_hooks_and_stop_after_the_last_requested_block(sd2, inputs):
    x_t, t, cond = inputs
    direct = blocks_by_hooks(sd2.module, TINY_PATHS, x_t, t, encoder_hidden_states=cond)
    with torch.no_grad():
        got = sd2.forward_blocks(x_t, t, list(sd2.blocks), cond)
    for name, chw in sd2.blocks.items():
        assert got[name].shape == (2, *chw) and torch.equal(got[name], direct[name]), name
    assert blocks_that_ran(sd2, TINY_PATHS, ["down1"], x_t, t, cond) == ["down0", "down1"]
    assert blocks_that_ran(sd2, TINY_PATHS, ["mid", "down0"], x_t, t, cond) == ["down0", "down1", "mid"]
    with torch.no_grad():
        maps = sd2.forward_blocks(x_t, t, ["down0.attn", "up1.attn"], cond)
    assert maps["down0.attn"].shape == (2, 77, 8, 8)
    torch.testing.assert_close(maps["up1.attn"].sum(1), torch.ones(2, 8, 8))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_schedulers_and_unets_sd_cannot_handle_are_refused(sd2_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = copy_of(sd2_folder[0], tmp_path)
    config_file = folder / "scheduler" / "scheduler_config.json"
    saved = json.loads(config_file.read_text())
    for change, message in (({"prediction_type": "sample"}, "prediction_type 'sample' is not supported"),
                            ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr is not supported"),
                            ({"beta_schedule": "squaredcos_cap_v2"}, "unsupported beta_schedule 'squaredcos_cap_v2'")):
        config_file.write_text(json.dumps({**saved, **change}))
        with pytest.raises(ValueError, match=message):
            create_backbone("sd", folder)
    config_file.write_text(json.dumps(saved))
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         addition_embed_type="text_time", addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=80).save_pretrained(folder / "unet")
    with pytest.raises(WeightsError, match=r"takes added conditioning \(text_time\).*use sdxl"):
        create_backbone("sd", folder)


def test_a_scheduler_config_naming_no_prediction_type_leaves_the_presets(sd2_folder, tmp_path):
    """sd21 is a v-prediction model: a folder whose scheduler config omits prediction_type keeps it
    (it became diffusers' default epsilon); `sd` without a preset takes epsilon."""
    import numpy as np

    folder = copy_of(sd2_folder[0], tmp_path)
    config_file = folder / "scheduler" / "scheduler_config.json"
    saved = json.loads(config_file.read_text())
    del saved["prediction_type"]
    config_file.write_text(json.dumps(saved))
    sd21 = create_backbone("sd21", folder, {"image_size": 64})
    assert sd21.prediction_type == "v_prediction"
    assert create_backbone("sd21-base", folder, {"image_size": 64}).prediction_type == "epsilon"
    assert create_backbone("sd", folder).prediction_type == "epsilon"
    x_t, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v = sd21.module(x_t, t, encoder_hidden_states=cond).sample
        eps = sd21.predict_eps(x_t, t, cond)
    # SD's scaled_linear betas in numpy; eps = sqrt(ab)·v + sqrt(1 − ab)·x_t (Salimans & Ho 2022)
    ab = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)[300]
    torch.testing.assert_close(eps, float(np.sqrt(ab)) * v + float(np.sqrt(1 - ab)) * x_t, rtol=0, atol=1e-5)
