"""`featurestore extract` end to end through the CLI on the other model families, with weights the
tests write themselves: a tiny diffusers SD folder with BLIP captions, an ADM checkpoint in the
official key layout, and a timestep-free ResNet expert."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from pipelines.extract.backbone import create_backbone
from pipelines.extract.captioners import BlipCaptioner
from pipelines.extract.noise import q_sample
from pipelines.extract.reader import to_input
from data_manifests.manifest import load_dataset
from data_manifests.sources import load_image

HERE = Path(__file__).parent


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def demo_inputs(backbone, n: int) -> torch.Tensor:
    manifest = load_dataset("demo")
    pixels = np.stack([to_input(load_image(*manifest.path_of(i)), backbone.input) for i in range(n)])
    return torch.from_numpy(np.ascontiguousarray(pixels))  # the reader's layout: convolutions round by layout


def test_sd15_with_blip_captions_stored_once_and_reused(tmp_path, tiny_sd, tiny_blip, monkeypatch):
    config = tmp_path / "sd.json"
    config.write_text(json.dumps({"image_size": 64}))
    store = tmp_path / "s.zarr"
    calls = []
    original = BlipCaptioner.caption
    monkeypatch.setattr(BlipCaptioner, "caption", lambda self, images: calls.append(len(images)) or original(self, images))
    common = ["extract", "--dataset", "demo", "--limit", "6", "--backbone", "sd15", "--weights", tiny_sd,
              "--backbone-config", config, "--store", store, "--prompt", "blip", "--captioner", tiny_blip,
              "--caption-max-tokens", "8", "--batch-size", "8", "--dtype", "float32"]
    first = cli(*common, "--timesteps", "10,500", "--blocks", "down0,mid,up1", "--attention-maps")
    assert first.exit_code == 0, first.output
    assert sum(calls) == 6
    second = cli(*common, "--timesteps", "300", "--blocks", "mid")
    assert second.exit_code == 0, second.output
    assert sum(calls) == 6  # the second run found every caption in the store

    s = FeatureStore.open(str(store))
    assert len(s.run_ids()) == 2
    run = next(r for r in s.runs() if r.timesteps == [10, 500])
    key = run.spec["captions"]
    captions, done = s.captions(key)
    assert done.all() and all(captions)
    assert s.group["captions"][key].attrs["max_new_tokens"] == 8
    backbone = create_backbone("sd15", tiny_sd, {"image_size": 64})
    assert set(run.blocks) == {"down0", "down0.attn", "mid", "mid.attn", "up1", "up1.attn"}
    for block in ("down0.attn", "mid.attn"):
        maps = run.numpy(10, block)
        assert maps.shape[1] == 77 and np.allclose(maps.sum(axis=1), 1.0, atol=1e-4)

    # the stored features are one direct forward of the captioned, noised latents
    with torch.no_grad():
        prepared = backbone.prepare(demo_inputs(backbone, 6), captions[run.rows].tolist())
        x_t = q_sample(prepared.x0, [f"mnist-demo.npz#{i}" for i in range(6)], 500, 0, backbone.alphas_cumprod())
        direct = backbone.forward_blocks(x_t, torch.full((6,), 500), ["mid"], prepared.cond)["mid"]
    np.testing.assert_array_equal(run.numpy(500, "mid"), direct.numpy())


def test_sd15_classname_prompts_change_the_features(tmp_path, tiny_sd):
    config = tmp_path / "sd.json"
    config.write_text(json.dumps({"image_size": 64}))
    store = tmp_path / "s.zarr"
    for prompt in ("null", "classnames:a drawing of a {}"):
        result = cli("extract", "--dataset", "demo", "--limit", "3", "--backbone", "sd15", "--weights", tiny_sd,
                     "--backbone-config", config, "--store", store, "--prompt", prompt, "--timesteps", "200",
                     "--blocks", "up1")
        assert result.exit_code == 0, result.output
    null, named = sorted(FeatureStore.open(str(store)).runs(), key=lambda r: r.spec["prompt"] != "null")
    assert named.spec["prompt"] == "classnames:a drawing of a {}"
    assert not np.array_equal(null.numpy(200, "up1"), named.numpy(200, "up1"))


def test_adm_checkpoint_in_the_official_layout(tmp_path):
    flags = json.loads((HERE / "adm_tiny_flags.json").read_text())
    source = create_backbone("adm", "random", flags)
    checkpoint = tmp_path / "adm.pt"
    torch.save(source.module.state_dict(), checkpoint)
    store = tmp_path / "s.zarr"
    result = cli("extract", "--dataset", "demo", "--limit", "5", "--backbone", "adm", "--backbone-config",
                 HERE / "adm_tiny_flags.json", "--weights", checkpoint, "--timesteps", "150,300",
                 "--blocks", "b2,b5", "--store", store, "--dtype", "float32", "--json")
    assert result.exit_code == 0, result.output
    (run,) = FeatureStore.open(str(store)).runs()
    assert run.blocks == {b: list(source.blocks[b]) for b in ("b2", "b5")}
    x0 = demo_inputs(source, 5)
    assert x0.shape == (5, 3, 32, 32) and x0.min() >= -1 and x0.max() <= 1
    with torch.no_grad():
        x_t = q_sample(x0, [f"mnist-demo.npz#{i}" for i in range(5)], 300, 0, source.alphas_cumprod())
        direct = source.forward_blocks(x_t, torch.full((5,), 300), ["b5"])["b5"]
    np.testing.assert_allclose(run.numpy(300, "b5"), direct.numpy(), rtol=1e-5, atol=1e-6)

    wrong = dict(source.module.state_dict())
    wrong["input_blocks.0.0.weight"] = wrong["input_blocks.0.0.weight"][:, :2]
    torch.save(wrong, tmp_path / "wrong.pt")
    refused = cli("extract", "--dataset", "demo", "--limit", "2", "--backbone", "adm", "--backbone-config",
                  HERE / "adm_tiny_flags.json", "--weights", tmp_path / "wrong.pt", "--store", tmp_path / "w.zarr")
    assert refused.exit_code == 1 and "input_blocks.0.0.weight" in refused.output


def test_an_expert_is_stored_once_under_timestep_none(tmp_path):
    weights = tmp_path / "r20.pt"
    torch.save(create_backbone("resnet20-cifar10", "random").module.state_dict(), weights)
    store = tmp_path / "s.zarr"
    result = cli("extract", "--dataset", "demo", "--limit", "4", "--backbone", "resnet20-cifar10",
                 "--weights", weights, "--store", store, "--blocks", "layer3,pool")
    assert result.exit_code == 0, result.output
    (run,) = FeatureStore.open(str(store)).runs()
    assert run.timesteps == [None] and run.spec["noise"] is None
    assert run.array_path(None, "pool").endswith("/tnone/pool") and run.numpy(None, "layer3").shape == (4, 64, 8, 8)
    again = cli("extract", "--dataset", "demo", "--limit", "4", "--backbone", "resnet20-cifar10",
                "--weights", weights, "--store", store, "--timesteps", "10")
    assert again.exit_code == 1 and "ignores timesteps" in again.output


def test_class_name_embeddings_from_the_sd_text_encoder_feed_a_cosine_head(tmp_path, tiny_sd):
    """text-embed writes CLIP's pooled embedding of each class prompt; the cosine head reads it back."""
    from safetensors import safe_open

    from pipelines.heads.text_embeddings import read_text_embeddings

    store = tmp_path / "s.zarr"
    assert cli("extract", "--dataset", "demo", "--limit", "100", "--store", store, "--timesteps", "10",
               "--blocks", "block1").exit_code == 0
    out = tmp_path / "text.safetensors"
    result = cli("text-embed", store, "--weights", tiny_sd, "--out", out, "--template", "a drawing of a {}", "--json")
    assert result.exit_code == 0, result.output
    classes = [str(d) for d in range(10)]
    text = read_text_embeddings(str(out), classes)
    backbone = create_backbone("sd15", tiny_sd)
    ids = backbone.tokenizer([f"a drawing of a {c}" for c in classes], padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = backbone.text_encoder(ids).pooler_output
    assert torch.allclose(text, direct, atol=1e-6) and text.shape == (10, 32)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["template"] == "a drawing of a {}"
    with pytest.raises(ValueError, match="classes do not match"):
        read_text_embeddings(str(out), classes[::-1])
    probe = cli("probe", store, "--head", "linear", "--block", "block1", "--timestep", "10", "--classifier", "cosine",
                "--text-embeddings", out, "--epochs", "2", "--holdout", "0.25", "--out", tmp_path / "r", "--json")
    assert probe.exit_code == 0, probe.output
