"""DDIM inversion on the real MNIST DDPM, the DDIM grid, and prompt sources."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from data_manifests.builders import DEMO_DIR
from featurestore.store import FeatureStore
from pipelines.extract.backbone import create_backbone
from pipelines.extract.noise import ddim_grid, ddim_invert, ddim_reconstruct
from pipelines.extract.prompts import parse_prompt, prompts_for


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("ddpm-mnist")


def digits(n: int) -> torch.Tensor:
    return torch.from_numpy(np.load(DEMO_DIR / "mnist-demo.npz")["images"][:n, None].astype(np.float32) / 255 - 0.5)


def test_ddim_grid_holds_every_requested_timestep():
    assert ddim_grid([100], 4) == [0, 25, 50, 75, 100]
    assert ddim_grid([30, 100], 4) == [0, 25, 30, 50, 75, 100]
    assert ddim_grid([0, 7], 50)[:2] == [0, 1] and ddim_grid([0, 7], 50)[-1] == 7


def test_ddim_inversion_reconstructs_and_moves_towards_noise(backbone):
    x0 = digits(16)
    alphas = backbone.alphas_cumprod()
    with torch.no_grad():
        states = ddim_invert(x0, [50, 200], backbone.predict_eps, alphas, steps=100)
        back = ddim_reconstruct(states[200], 200, backbone.predict_eps, alphas, steps=100)
    assert set(states) == {50, 200}
    # The inverted latent is noise-like: its variance is near 1 - a_t + a_t var(x0), far from x0.
    assert (states[200] - x0).abs().mean() > 0.1
    error = (back - x0).abs().max().item()
    assert error < 0.05, error  # stated tolerance: max |x0 - reconstruction| < 0.05 with 100 steps to t=200
    coarse = ddim_reconstruct(ddim_invert(x0, [200], backbone.predict_eps, alphas, steps=5)[200], 200,
                              backbone.predict_eps, alphas, steps=5)
    assert (coarse - x0).abs().max().item() > error  # fewer steps, larger inversion error


def test_ddim_inversion_does_not_depend_on_the_batch(backbone):
    x0 = digits(12)
    alphas = backbone.alphas_cumprod()
    with torch.no_grad():
        whole = ddim_invert(x0, [100], backbone.predict_eps, alphas, steps=10)[100]
        parts = torch.cat([ddim_invert(x0[i:i + 5], [100], backbone.predict_eps, alphas, steps=10)[100] for i in range(0, 12, 5)])
    assert torch.equal(whole, parts)


def test_extract_with_ddim_inversion_stores_the_inverted_features(tmp_path, backbone):
    store = tmp_path / "s.zarr"
    result = CliRunner().invoke(app, ["extract", "--dataset", "demo", "--store", str(store), "--limit", "8",
                                      "--timesteps", "100", "--noise", "ddim-inversion", "--ddim-steps", "10",
                                      "--blocks", "block3", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    (run,) = FeatureStore.open(str(store)).runs()
    assert run.spec["noise"] == "ddim-inversion" and run.spec["ddim"] == {"steps": 10, "guidance_scale": 1.0}
    with torch.no_grad():
        x_t = ddim_invert(digits(8), [100], backbone.predict_eps, backbone.alphas_cumprod(), steps=10)[100]
        expected = backbone.forward_blocks(x_t, torch.full((8,), 100), ["block3"])["block3"]
    np.testing.assert_array_equal(run.numpy(100, "block3"), expected.numpy())


def test_prompt_sources(tmp_path):
    ids, names = ["a", "b"], ["golden_retriever", "cat"]
    assert prompts_for(parse_prompt("null"), ids, names) == ["", ""]
    assert prompts_for(parse_prompt("classnames"), ids, names) == ["a photo of a golden retriever", "a photo of a cat"]
    assert prompts_for(parse_prompt("classnames:a sketch of a {}"), ids, names)[1] == "a sketch of a cat"
    assert prompts_for(parse_prompt("fixed:a drawing"), ids, names) == ["a drawing"] * 2
    assert prompts_for(parse_prompt("blip"), ids, names, ["x", "y"]) == ["x", "y"]
    table = tmp_path / "p.csv"
    table.write_text("id,prompt\nb,second\na,first\n")
    source = parse_prompt(f"file:{table}")
    assert prompts_for(source, ids, names) == ["first", "second"]
    assert source.spec.startswith("file:sha256:")
    with pytest.raises(ValueError, match="no prompt for 1 images: c"):
        prompts_for(source, ["a", "c"], names)
    for bad in ("classnames:no slot", "fixed:", "file:/no/such.csv", "nonsense"):
        with pytest.raises(ValueError, match="--prompt"):
            parse_prompt(bad)
