"""`extract --noise-draws K`: draw d of every (t, block) is the forward on noise draw d, against
forwards computed here; K = 1 is the plain run; batch size, workers and kill -9 + resume do not
change a bit; `--ensemble K` is the float32 mean of the K draws; refusals are one line; the dry
run sizes scale by K."""

import json

import numpy as np
import pytest
import torch
from extract_helpers import BLOCKS, IMAGES, TIMESTEPS, config, kill_extract_after, only_run
from typer.testing import CliRunner

from cli.main import app
from data_manifests.builders import DEMO_DIR
from featurestore.store import FeatureStore
from pipelines.extract.backbone import create_backbone
from pipelines.extract.noise import image_eps
from pipelines.extract.runner import dry_run, extract

def raw(run) -> dict:
    """Every (t, block) array as stored, draw axis included."""
    return {(t, b): run.numpy(t, b, draws="all") for t in run.timesteps for b in run.blocks}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_draw_d_is_the_forward_on_noise_draw_d(tmp_path):
    store = tmp_path / "s.zarr"
    result = cli("extract", "--dataset", "demo", "--store", store, "--limit", IMAGES, "--timesteps", "10,300",
                 "--blocks", "block1,block3", "--noise-draws", 3, "--dtype", "float32", "--batch-size", 4, "--json")
    assert result.exit_code == 0, result.output
    run = only_run(store)
    assert run.spec["noise_draws"] == 3 and run.noise_draws == 3 and run.provenance["noise_draws"]["draws"] == 3
    array = run.array(10, "block1")
    assert array.shape == (IMAGES, 3, 32, 28, 28)
    assert array.metadata.dimension_names == ("image", "draw", "block1_channel", "block1_y", "block1_x")

    backbone = create_backbone("ddpm-mnist")
    x0 = torch.from_numpy(np.load(DEMO_DIR / "mnist-demo.npz")["images"][:IMAGES, None].astype(np.float32) / 255 - 0.5)
    alpha_bar = backbone.alphas_cumprod()
    for t in TIMESTEPS:
        for draw in range(3):
            eps = torch.stack([image_eps(0, f"mnist-demo.npz#{i}", t, (1, 28, 28), draw) for i in range(IMAGES)])
            x_t = alpha_bar[t].sqrt() * x0 + (1 - alpha_bar[t]).sqrt() * eps
            with torch.no_grad():
                expected = backbone.forward_blocks(x_t, torch.full((IMAGES,), t), BLOCKS)
            for block in BLOCKS:
                np.testing.assert_allclose(run.numpy(t, block, draws="all")[:, draw], expected[block].numpy(),
                                           rtol=1e-5, atol=1e-6)

    plain = extract(config(store, dtype="float32", batch_size=6, chunk_rows=8))
    assert plain.run_id != run.run_id  # the draws are part of the spec
    for block in BLOCKS:  # draw 0 is the plain run's noise
        np.testing.assert_array_equal(run.numpy(10, block, draws=0), FeatureStore.open(str(store)).run(
            plain.run_id).numpy(10, block))

    doc = json.loads(cli("inspect", store, "--json").output)
    shapes = {r["run_id"]: r["spec"].get("noise_draws", 1) for r in doc["runs"]}
    assert shapes == {run.run_id: 3, plain.run_id: 1}
    text = cli("inspect", store).output
    assert "noise_draws=3" in text and text.count("noise_draws=") == 1


def test_noise_draws_1_is_the_plain_run(tmp_path):
    plain, one = extract(config(tmp_path / "a.zarr")), extract(config(tmp_path / "b.zarr", noise_draws=1))
    assert plain.run_id == one.run_id
    b = only_run(tmp_path / "b.zarr")
    assert "noise_draws" not in b.spec and "noise_draws" not in b.provenance
    assert b.array(10, "block1").shape == (IMAGES, 32, 28, 28)


@pytest.mark.slow  # a two-process dask cluster
def test_draws_do_not_depend_on_batch_size_or_workers(tmp_path):
    two = extract(config(tmp_path / "a.zarr", noise_draws=2, batch_size=2, chunk_rows=8))  # 2+2+2 in one chunk
    four = extract(config(tmp_path / "b.zarr", noise_draws=2, batch_size=4, chunk_rows=8))  # 4+2
    workers = extract(config(tmp_path / "c.zarr", noise_draws=2, batch_size=5, chunk_rows=2, workers=2))
    assert two.run_id == four.run_id == workers.run_id and workers.seconds["workers"] == 2
    a = raw(only_run(tmp_path / "a.zarr"))
    for other in ("b.zarr", "c.zarr"):
        for key, values in raw(only_run(tmp_path / other)).items():
            assert values.tobytes() == a[key].tobytes(), (other, key)


@pytest.mark.slow  # a child process killed mid-run, then two extractions of 384 images x 3 draws
def test_resume_after_kill_9_gives_the_uninterrupted_draws(tmp_path):
    args = ["--dataset", "demo", "--limit", "384", "--timesteps", "50", "--blocks", "block2", "--noise-draws", "3",
            "--chunk-rows", "16", "--batch-size", "16"]
    killed = tmp_path / "killed.zarr"
    kill_extract_after(args, killed, done_chunks=2)
    status = json.loads(cli("inspect", killed, "--json").output)["runs"][0]
    assert 0 < status["done"] < 384 and status["pending"] > 0, status

    resumed = cli("extract", *args, "--store", killed, "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output)["chunks_skipped"] >= 2
    assert cli("extract", *args, "--store", tmp_path / "clean.zarr", "--json").exit_code == 0
    a, b = only_run(killed), only_run(tmp_path / "clean.zarr")
    assert a.run_id == b.run_id and a.noise_draws == 3
    for key, values in raw(b).items():
        assert values.tobytes() == raw(a)[key].tobytes(), key


def test_ensemble_8_is_the_float32_mean_of_noise_draws_8(tmp_path):
    common = dict(timesteps=[100], blocks=["block2", "block3"], dtype="float32", batch_size=6, chunk_rows=8)
    extract(config(tmp_path / "e.zarr", ensemble=8, **common))
    extract(config(tmp_path / "d.zarr", noise_draws=8, **common))
    ensemble, draws = only_run(tmp_path / "e.zarr"), only_run(tmp_path / "d.zarr")
    for block in common["blocks"]:
        every = draws.numpy(100, block, draws="all")
        assert every.shape[1] == 8
        mean64 = every.astype(np.float64).mean(axis=1)  # the exact mean of the stored float32 draws
        stored = ensemble.numpy(100, block)
        # fp32 rounding of a sum of 8 terms: a few ulp of the largest magnitude
        np.testing.assert_allclose(stored, mean64, rtol=0, atol=8 * np.finfo(np.float32).eps * np.abs(every).max())
        np.testing.assert_allclose(draws.numpy(100, block, draws="mean"), mean64, rtol=0,
                                   atol=8 * np.finfo(np.float32).eps * np.abs(every).max())
        assert not np.allclose(stored, every[:, 0], atol=1e-3)


def test_dry_run_sizes_scale_with_the_draws(tmp_path):
    one = dry_run(config(tmp_path / "a.zarr", warmup_images=4))
    four = dry_run(config(tmp_path / "b.zarr", noise_draws=4, warmup_images=4))
    for a, b in zip(one.arrays, four.arrays):
        assert b.shape == [4, *a.shape] and b.raw_bytes_per_image == 4 * a.raw_bytes_per_image
    assert four.stored_bytes_per_image > 3 * one.stored_bytes_per_image
    assert not (tmp_path / "b.zarr").exists()


@pytest.mark.parametrize("extra, message", [
    (["--timesteps", "10", "--noise", "none"], "--noise none is deterministic"),
    (["--timesteps", "10", "--noise", "ddim-inversion"], "--noise ddim-inversion is deterministic"),
    (["--backbone", "resnet20-cifar10", "--weights", "random"], "resnet20-cifar10 takes no noise"),
    (["--timesteps", "10", "--ensemble", "2"], "give one of them"),
    (["--timesteps", "10", "--noise-draws", "0"], "--noise-draws must be at least 1"),
])
def test_noise_draws_refusals_are_one_line(tmp_path, extra, message):
    result = cli("extract", "--dataset", "demo", "--store", tmp_path / "s.zarr", "--limit", "4", "--noise-draws", "2",
                 *extra)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "s.zarr").exists()
