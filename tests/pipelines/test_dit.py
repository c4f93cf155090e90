"""`dit`: DiT-XL/2-256 on meta weights (block table and parameter count through the CLI, against
the architecture's count written out), and a tiny random diffusers DiT folder (class prompts, VAE
latents, blocks against the module's own forward, stopping early, strict loading)."""

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


def dit_parameters(depth: int, width: int, patch: int, channels: int, classes: int, frequencies: int = 256) -> int:
    """DiT (Peebles & Xie, Fig. 3) as diffusers lays it out: every block's adaLN-Zero carries its own
    timestep MLP and class table (classes + 1 for the null class); the positional embedding is fixed."""
    linear = lambda i, o: i * o + o  # noqa: E731
    embedders = linear(frequencies, width) + linear(width, width) + (classes + 1) * width
    attention, mlp = 4 * linear(width, width), linear(width, 4 * width) + linear(4 * width, width)
    block = embedders + linear(width, 6 * width) + attention + mlp
    patchify = channels * patch * patch * width + width
    final = linear(width, 2 * width) + linear(width, patch * patch * 2 * channels)  # learned sigma: 2x channels out
    return patchify + depth * block + final


def test_meta_dit_xl_2_256_table_and_parameters():
    result = CliRunner().invoke(app, ["backbones", "show", "dit", "--weights", "meta", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["parameters"] == dit_parameters(28, 1152, 2, 4, 1000) == 749_826_464
    assert doc["blocks"] == {f"layer{i}": [1152, 16, 16] for i in range(28)}
    assert doc["input"] == {"size": 256, "channels": 3, "value_range": [-1.0, 1.0]}
    assert doc["timesteps"] == 1000 and doc["noise_process"].startswith("variance-preserving") and doc["conditional"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = write(tmp_path_factory.mktemp("tiny-dit"), "dit")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                         "id2label": {"0": "tench, Tinca tinca", "1": "goldfish"}}))
    return folder


@pytest.fixture(scope="module")
def backbone(folder):
    return create_backbone("dit", folder, {"image_size": 64})


def test_class_prompts_schedule_and_latents(backbone, folder):
    from diffusers import AutoencoderKL

    assert backbone.blocks == {name: (16, 4, 4) for name in PATHS}
    assert backbone.encode_prompts(["", "3", "Tinca tinca", "goldfish", "tench"]).tolist() == [10, 3, 0, 1, 0]
    for bad in ("10", "zebra", "a photo of a tench"):
        with pytest.raises(ValueError, match=r"dit takes a class as its prompt: .* index 0\.\.9"):
            backbone.encode_prompts([bad])
    assert backbone.truncated_prompts(["3", "goldfish", "3"]) == (1, 0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(backbone.alphas_cumprod(), torch.cumprod(1 - betas, 0).float())
    x = images(2)
    with torch.no_grad():
        prepared = backbone.prepare(x, ["goldfish", ""])
        latents = AutoencoderKL.from_pretrained(folder / "vae").encode(x).latent_dist.mean * 0.18215
    torch.testing.assert_close(prepared.x0, latents)
    assert prepared.cond.tolist() == [1, 10]


def test_blocks_equal_the_module_forward_and_the_forward_stops_early(backbone):
    g = torch.Generator().manual_seed(1)
    x_t, t, labels = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.tensor([3, 10])
    module = backbone.module
    direct = hooked_outputs(module, PATHS, 0, lambda: module(x_t, timestep=t, class_labels=labels))
    with torch.no_grad():
        got = backbone.forward_blocks(x_t, t, list(PATHS), labels)
        eps = backbone.predict_eps(x_t, t, labels)
        unconditional = backbone.forward_blocks(x_t, t, ["layer0"])["layer0"]
    for name in PATHS:
        torch.testing.assert_close(got[name], as_map(direct[name], 4, 4), rtol=0, atol=0)
    torch.testing.assert_close(eps, module(x_t, timestep=t, class_labels=labels).sample[:, :4])
    null = hooked_outputs(module, {"layer0": "transformer_blocks.0"}, 0,
                          lambda: module(x_t, timestep=t, class_labels=torch.tensor([10, 10])))
    torch.testing.assert_close(unconditional, as_map(null["layer0"], 4, 4))  # no prompt = the null class
    ran, handles = pre_hooks(module, {**PATHS, "head": "proj_out_1"})
    try:
        with torch.no_grad():
            assert list(backbone.forward_blocks(x_t, t, ["layer1"], labels)) == ["layer1"]
    finally:
        for h in handles:
            h.remove()
    assert ran == ["layer0", "layer1"]


def test_digest_covers_the_labels_and_loading_refusals(backbone, folder, tmp_path):
    copy = copy_of(folder, tmp_path)
    assert create_backbone("dit", copy, {"image_size": 64}).weights_digest == backbone.weights_digest
    (copy / "model_index.json").write_text(json.dumps({"id2label": {"0": "goldfish"}}))
    assert create_backbone("dit", copy, {"image_size": 64}).weights_digest != backbone.weights_digest
    key = rename_a_key(copy / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match=rf"missing keys: {key}"):
        create_backbone("dit", copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(WeightsError, match=r"not a DiT model folder: no vae/ \(expected transformer/, vae/"):
        create_backbone("dit", copy)
    with pytest.raises(ValueError, match="unknown keys"):
        create_backbone("dit", "meta", {"image_sise": 64})
    with pytest.raises(ValueError, match="image_size must be a multiple of 16"):
        create_backbone("dit", "meta", {"image_size": 72})


def test_sizes_must_be_positive_and_sequence_lengths_at_least_one():
    """Every transformer backbone refuses a non-positive image size in one line (-256 gave blocks of
    shape (1152, -16, -16); 0 silently became the default) and a prompt of no tokens."""
    for name in ("dit", "pixart", "sd3", "flux"):
        for size in (-256, 0):
            with pytest.raises(ValueError, match=rf"^{name} image_size must be a positive integer \(pixels\), got {size}$"):
                create_backbone(name, "meta", {"image_size": size})
    for name in ("pixart", "sd3", "flux"):
        with pytest.raises(ValueError, match=rf"^{name} max_sequence_length must be at least 1, got 0$"):
            create_backbone(name, "meta", {"max_sequence_length": 0})


def test_scheduler_configs_dit_cannot_reproduce_are_refused(folder, tmp_path):
    """As sd: betas only from beta_start, beta_end, beta_schedule, and DiT's output read as eps."""
    copy = copy_of(folder, tmp_path)
    config_file = copy / "scheduler" / "scheduler_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["beta_schedule"] == "linear" and "prediction_type" in saved  # the keys below are real ones
    for change, message in (({"trained_betas": [0.01] * 1000}, "trained_betas is not supported"),
                            ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr is not supported"),
                            ({"prediction_type": "v_prediction"},
                             r"dit: prediction_type 'v_prediction' is not supported \(epsilon\)")):
        config_file.write_text(json.dumps({**saved, **change}))
        with pytest.raises(ValueError, match=message):
            create_backbone("dit", copy, {"image_size": 64})
    config_file.write_text(json.dumps({**saved, "beta_end": 0.03, "prediction_type": "epsilon"}))
    betas = torch.linspace(saved["beta_start"], 0.03, 1000, dtype=torch.float64)  # DDPM's linear schedule
    torch.testing.assert_close(create_backbone("dit", copy, {"image_size": 64}).alphas_cumprod(),
                               torch.cumprod(1 - betas, 0).float())
