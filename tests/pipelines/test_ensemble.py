"""`extract --ensemble K`: the stored block is the mean over K noise draws, against forwards
computed here; K = 1 is the plain run; batch size, interruption and resume do not change it;
inf/NaN of one draw is counted; deterministic noise and experts refuse it in one line."""

import hashlib
import json

import numpy as np
import pytest
import torch
from extract_helpers import BLOCKS, IMAGES, TIMESTEPS, config, only_run
from typer.testing import CliRunner

import pipelines.extract.runner as runner
from cli.main import app
from data_manifests.builders import DEMO_DIR
from pipelines.extract.backbone import Backbone, create_backbone
from pipelines.extract.noise import image_eps
from pipelines.extract.runner import extract

def arrays(run) -> dict:
    return {(t, b): run.numpy(t, b) for t in run.timesteps for b in run.blocks}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_draw_zero_is_the_stream_of_every_earlier_run_and_other_draws_differ():
    generator = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(b"7\x00img-1\x0010").digest()[:8], "little") & ((1 << 63) - 1))
    assert torch.equal(image_eps(7, "img-1", 10, (1, 4, 4)), torch.randn((1, 4, 4), generator=generator))
    assert torch.equal(image_eps(7, "img-1", 10, (1, 4, 4), draw=0), image_eps(7, "img-1", 10, (1, 4, 4)))
    draws = [image_eps(7, "img-1", 10, (1, 4, 4), draw=d) for d in range(3)]
    assert torch.equal(draws[2], image_eps(7, "img-1", 10, (1, 4, 4), draw=2))
    assert not any(torch.equal(draws[a], draws[b]) for a, b in ((0, 1), (0, 2), (1, 2)))
    assert not torch.equal(draws[1], image_eps(7, "img-1", 11, (1, 4, 4), draw=1))
    with pytest.raises(ValueError, match="non-negative"):
        image_eps(7, "img-1", 10, (1, 4, 4), draw=-1)


def test_ensemble_1_is_the_plain_run(tmp_path):
    plain, one = extract(config(tmp_path / "a.zarr")), extract(config(tmp_path / "b.zarr", ensemble=1))
    assert plain.run_id == one.run_id
    a, b = only_run(tmp_path / "a.zarr"), only_run(tmp_path / "b.zarr")
    assert "ensemble" not in a.spec and "ensemble" not in a.provenance
    for key, values in arrays(a).items():
        assert values.tobytes() == b.numpy(*key).tobytes(), key


def test_ensemble_3_stores_the_mean_of_three_forwards_on_draws_0_1_2(tmp_path):
    store = tmp_path / "s.zarr"
    result = cli("extract", "--dataset", "demo", "--store", store, "--limit", IMAGES, "--timesteps", "10,300",
                 "--blocks", "block1,block3", "--ensemble", 3, "--dtype", "float32", "--batch-size", 4, "--json")
    assert result.exit_code == 0, result.output
    run = only_run(store)
    assert run.spec["ensemble"] == 3 and run.provenance["ensemble"]["draws"] == 3

    backbone = create_backbone("ddpm-mnist")
    x0 = torch.from_numpy(np.load(DEMO_DIR / "mnist-demo.npz")["images"][:IMAGES, None].astype(np.float32) / 255 - 0.5)
    alpha_bar = backbone.alphas_cumprod()
    for t in TIMESTEPS:
        forwards = []
        for draw in range(3):
            eps = torch.stack([image_eps(0, f"mnist-demo.npz#{i}", t, (1, 28, 28), draw) for i in range(IMAGES)])
            x_t = alpha_bar[t].sqrt() * x0 + (1 - alpha_bar[t]).sqrt() * eps
            with torch.no_grad():
                forwards.append(backbone.forward_blocks(x_t, torch.full((IMAGES,), t), BLOCKS))
        for block in BLOCKS:
            expected = torch.stack([f[block] for f in forwards]).mean(0).numpy()
            np.testing.assert_allclose(run.numpy(t, block), expected, rtol=1e-5, atol=1e-6)
            assert not np.allclose(run.numpy(t, block), forwards[0][block].numpy(), rtol=1e-3, atol=1e-4)

    plain = extract(config(store, dtype="float32"))
    assert plain.run_id != run.run_id  # the ensemble is part of the spec

    doc = json.loads(cli("inspect", store, "--json").output)
    assert {r["run_id"]: r["ensemble"] for r in doc["runs"]} == {run.run_id: 3, plain.run_id: 1}
    text = cli("inspect", store).output
    assert "ensemble=3" in text and text.count("ensemble=") == 1


def test_ensemble_does_not_depend_on_the_batch_size(tmp_path):
    # one chunk of 6 rows: batches of 2+2+2 against 4+2
    two = extract(config(tmp_path / "a.zarr", ensemble=3, batch_size=2, chunk_rows=8))
    four = extract(config(tmp_path / "b.zarr", ensemble=3, batch_size=4, chunk_rows=8))
    assert two.run_id == four.run_id
    a, b = only_run(tmp_path / "a.zarr"), only_run(tmp_path / "b.zarr")
    for key, values in arrays(a).items():
        assert values.tobytes() == b.numpy(*key).tobytes(), key


def test_an_interrupted_ensemble_run_resumes_to_the_uninterrupted_arrays(tmp_path, monkeypatch):
    cfg = config(tmp_path / "cut.zarr", ensemble=2)
    compute, calls = runner.compute_chunk, []

    def stop_at_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return compute(*args, **kwargs)

    monkeypatch.setattr(runner, "compute_chunk", stop_at_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg)
    monkeypatch.setattr(runner, "compute_chunk", compute)
    resumed = extract(cfg)
    assert resumed.chunks_skipped == 1 and resumed.chunks_written == 2 and resumed.done == IMAGES

    clean = extract(config(tmp_path / "clean.zarr", ensemble=2))
    assert clean.run_id == resumed.run_id
    a, b = only_run(tmp_path / "cut.zarr"), only_run(tmp_path / "clean.zarr")
    for key, values in arrays(b).items():
        assert values.tobytes() == a.numpy(*key).tobytes(), key


def test_inf_in_one_draw_is_counted_as_computed_not_averaged_away(tmp_path, monkeypatch):
    add_noise, broken = Backbone.add_noise, {}

    def inf_in_draw_1(self, x0, eps, t):
        x_t = add_noise(self, x0, eps, t)
        if torch.equal(eps[0], image_eps(0, "mnist-demo.npz#0", t, eps.shape[1:], 1)):
            x_t[0, 0, 5, 5] = float("inf")
            broken[t] = x_t.clone()
        return x_t

    monkeypatch.setattr(Backbone, "add_noise", inf_in_draw_1)
    result = extract(config(tmp_path / "s.zarr", ensemble=3, dtype="float32", chunk_rows=8))
    backbone = create_backbone("ddpm-mnist")
    for t in TIMESTEPS:
        with torch.no_grad():
            drawn = backbone.forward_blocks(broken[t], torch.full((len(broken[t]),), t), BLOCKS)
        for block in BLOCKS:
            expected = int((~torch.isfinite(drawn[block])).sum())
            assert expected > 0
            assert result.nonfinite[f"t{t}/{block}"]["computed"] == expected


@pytest.mark.parametrize("extra, message", [
    (["--timesteps", "10", "--noise", "none"], "--noise none is deterministic"),
    (["--timesteps", "10", "--noise", "ddim-inversion"], "--noise ddim-inversion is deterministic"),
    (["--backbone", "resnet20-cifar10", "--weights", "random"], "resnet20-cifar10 takes no noise"),
    (["--timesteps", "10", "--ensemble", "0"], "--ensemble must be at least 1"),
])
def test_ensemble_refusals_are_one_line(tmp_path, extra, message):
    result = cli("extract", "--dataset", "demo", "--store", tmp_path / "s.zarr", "--limit", "4", "--ensemble", "2",
                 *extra)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "s.zarr").exists()
