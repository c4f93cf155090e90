"""The linear probe from the cache: pooling, splits, and accuracy on data whose answer is known."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from featurestore.pooling import pooled
from featurestore.store import FeatureStore
from pipelines.heads.logistic import fit_logistic_probe, probe_run


def make_store(path, features: np.ndarray, labels: np.ndarray, splits: list[str], chunk_rows: int = 16):
    store = FeatureStore.open(str(path), mode="a")
    n = len(labels)
    ids = [f"img{i}" for i in range(n)]
    rows = store.add_images("synthetic", {
        "id": ids, "label": labels, "class_name": [f"c{l}" for l in labels], "split": splits,
        "domain": ["x"] * n, "source": ids,
    })
    run = store.create_run({"synthetic": True}, arrays={"b": features.shape[1:]}, timesteps=[5], rows=rows,
                           chunk_rows=chunk_rows, dtype="float32", provenance={})
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        run.write_chunk(c, {(5, "b"): features[s]}, np.zeros(s.stop - s.start, bool), [""] * (s.stop - s.start))
    return store


def test_pooled_is_the_mean_of_each_window():
    x = np.random.default_rng(0).normal(size=(3, 2, 8, 8)).astype(np.float32)
    expected = np.array([[[[x[n, c, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean() for j in range(2)] for i in range(2)]
                          for c in range(2)] for n in range(3)]).reshape(3, -1)
    np.testing.assert_allclose(pooled(x, 2), expected, rtol=1e-6, atol=1e-7)
    assert pooled(x, None).shape == (3, 128)
    import torch

    for size in (3, 5):  # windows of unequal size: torch's adaptive pooling bins
        expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), size).reshape(3, -1).numpy()
        np.testing.assert_allclose(pooled(x, size), expected, rtol=1e-5)
    assert pooled(x[:, :, :2, :2], 4).shape == (3, 8)  # smaller maps are left alone


def test_separable_classes_are_found_and_noise_is_at_chance(tmp_path):
    rng = np.random.default_rng(0)
    n, classes = 400, 4
    labels = rng.integers(0, classes, n)
    features = rng.normal(size=(n, 8, 2, 2)).astype(np.float32)
    features[np.arange(n), labels, 0, 0] += 6.0  # class k lights up channel k
    splits = ["train" if i % 2 else "test" for i in range(n)]
    store = make_store(tmp_path / "s.zarr", features, labels, splits)
    result = probe_run(store, None, 5, "b", pool=None)
    assert result.top1 == 1.0 and (result.train, result.test) == (200, 200) and result.features == 32

    noise = make_store(tmp_path / "n.zarr", rng.normal(size=(n, 8, 2, 2)).astype(np.float32), labels, splits)
    assert probe_run(noise, None, 5, "b", pool=None).top1 < 0.4  # chance is 0.25


def test_probe_uses_the_manifest_split_rows(tmp_path):
    rng = np.random.default_rng(1)
    n = 90
    labels = rng.integers(0, 3, n)
    features = rng.normal(size=(n, 4, 4, 4)).astype(np.float32) + labels[:, None, None, None]
    splits = ["train"] * 60 + ["test"] * 30
    store = make_store(tmp_path / "s.zarr", features, labels, splits)
    x = pooled(features, 2)
    expected = fit_logistic_probe(x[:60], labels[:60], x[60:], labels[60:])
    result = probe_run(store, None, 5, "b", pool=2)
    assert (result.top1, result.train_top1) == expected


def test_single_split_needs_a_holdout(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 50)
    store = make_store(tmp_path / "s.zarr", rng.normal(size=(50, 2, 1, 1)).astype(np.float32), labels, ["test"] * 50)
    with pytest.raises(ValueError, match="--holdout"):
        probe_run(store, None, 5, "b", pool=None)
    result = probe_run(store, None, 5, "b", pool=None, holdout=0.3, seed=3)
    assert result.train + result.test == 50 and 5 <= result.test <= 25


def test_cli_probe_json(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 64)
    features = rng.normal(size=(64, 2, 4, 4)).astype(np.float32)
    features[:, 0] += 4 * labels[:, None, None]
    make_store(tmp_path / "s.zarr", features, labels, ["train", "test"] * 32)
    result = CliRunner().invoke(app, ["probe", str(tmp_path / "s.zarr"), "--block", "b", "--timestep", "5", "--pool", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["top1"] == 1.0 and doc["features"] == 2
    bad = CliRunner().invoke(app, ["probe", str(tmp_path / "s.zarr"), "--block", "nope", "--timestep", "5"])
    assert bad.exit_code == 1 and "no block 'nope'" in bad.output


@pytest.mark.parametrize("extra", [["--recipe", "diffssl"], ["--pre-pool-size", "2"], ["--lr", "0.1", "--epochs", "3"]])
def test_cli_logistic_probe_refuses_the_trained_heads_options(tmp_path, extra):
    """They were accepted and ignored: the results file did not even record them."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 32)
    make_store(tmp_path / "s.zarr", rng.normal(size=(32, 2, 4, 4)).astype(np.float32), labels, ["train", "test"] * 16)
    result = CliRunner().invoke(app, ["probe", str(tmp_path / "s.zarr"), "--block", "b", "--timestep", "5", *extra])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"error: {extra[0]}") and "not of the logistic probe" in result.output
    assert not (tmp_path / "s.zarr.results").exists()
