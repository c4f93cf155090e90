"""Reading runs of several noise draws (`--draws mean|all|<k>`): the store's readers, kNN, the
logistic probe, CKA, retrieval and the trained heads' batches, against numpy computations written
here; results of other --draws never share a file."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from featurestore.store import FeatureStore, StoreError, parse_draws
from pipelines.analysis.cka import View, cka_run
from pipelines.analysis.knn import knn_run, save_knn
from pipelines.analysis.retrieval import RetrievalConfig, Side, retrieve_run
from pipelines.heads.data import StoreBatches
from pipelines.heads.logistic import probe_run
from pipelines.heads.modules import HeadSpec, build_head
from pipelines.heads.training import TrainConfig, Trainee, train_grid

N, K, CHUNK = 24, 3, 5
SHAPE = (4, 2, 2)


def write_run(path, values: np.ndarray, labels: np.ndarray, splits: list[str], domains: list[str] | None = None,
              name: str = "draws", dtype: str = "float16"):
    """A run whose (10, "b") array holds `values` as given: (N, K, C, H, W), or (N, C, H, W) for one draw."""
    draws = values.shape[1] if values.ndim == 5 else 1
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"img{i}" for i in range(len(labels))]
    rows = store.add_images("toy", {"id": ids, "label": labels, "class_name": [f"c{v}" for v in labels],
                                    "split": splits, "domain": domains or ["x"] * len(ids), "source": ids})
    spec = {"name": name, **({"noise_draws": draws} if draws > 1 else {})}
    run = store.create_run(spec, arrays={"b": SHAPE}, timesteps=[10], rows=rows, chunk_rows=CHUNK, dtype=dtype,
                           provenance={})
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        run.write_chunk(c, {(10, "b"): values[s]}, np.zeros(s.stop - s.start, bool), [""] * (s.stop - s.start))
    return FeatureStore.open(str(path)).run(run.run_id)


@pytest.fixture
def stored(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(N) % 3
    values = rng.standard_normal((N, K, *SHAPE)).astype(np.float16)
    values[np.arange(N), :, labels] += 2  # class k lights channel k in every draw
    splits = ["train" if i % 3 else "test" for i in range(N)]
    return write_run(tmp_path / "s.zarr", values, labels, splits), values, labels, np.array(splits)


def mean64(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float64).mean(axis=1)


def test_readers_select_mean_one_draw_or_all(stored):
    run, values, labels, splits = stored
    assert run.noise_draws == K and run.array(10, "b").shape == (N, K, *SHAPE)
    mean = run.numpy(10, "b")
    assert mean.dtype == np.float32 and mean.shape == (N, *SHAPE)
    np.testing.assert_allclose(mean, mean64(values), rtol=0, atol=4 * np.finfo(np.float32).eps * 8)
    for k in range(K):
        np.testing.assert_array_equal(run.numpy(10, "b", draws=k), values[:, k])
        np.testing.assert_array_equal(run.numpy(10, "b", draws=str(k)), values[:, k])
    np.testing.assert_array_equal(run.numpy(10, "b", rows=np.array([7, 2]), draws="all"), values[[7, 2]])

    train = np.flatnonzero(splits == "train")
    x, y = run.split("train", t=10, block="b", pool=1, draws="all")  # pool 1: the channel means
    expected = values[train].astype(np.float32).mean(axis=(3, 4)).reshape(len(train) * K, SHAPE[0])
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    np.testing.assert_array_equal(y, np.repeat(labels[train], K))
    x, y = run.split("train", t=10, block="b", pool=None)
    np.testing.assert_allclose(x, mean64(values[train]).reshape(len(train), -1), atol=1e-5)

    da = run.to_xarray(10, block="b", draws="all")
    assert da.dims == ("image", "draw", "channel", "y", "x")
    np.testing.assert_array_equal(da.values, values)
    np.testing.assert_array_equal(run.to_xarray(10, block="b", draws=1).values, values[:, 1])
    np.testing.assert_allclose(run.to_xarray(10, block="b").values, mean, rtol=0, atol=0)


def test_a_draw_the_run_lacks_and_bad_values_are_refused_in_one_line(stored, tmp_path):
    run = stored[0]
    with pytest.raises(StoreError, match=r"draw 3 asked for, but the run holds 3 noise draws \(0..2\)"):
        run.numpy(10, "b", draws=3)
    for bad in ("first", "-1", -1, "1.5"):
        with pytest.raises(ValueError, match="--draws takes mean, all or a draw index"):
            parse_draws(bad)
    one = write_run(tmp_path / "one.zarr", stored[1][:, 0], stored[2], ["train"] * N)
    np.testing.assert_array_equal(one.numpy(10, "b", draws=0), stored[1][:, 0])
    assert one.numpy(10, "b").dtype == np.float16  # one draw: as stored
    assert one.numpy(10, "b", draws="all").shape == (N, 1, *SHAPE)
    with pytest.raises(StoreError, match=r"draw 1 asked for, but the run holds 1 noise draw \(0..0\)"):
        one.numpy(10, "b", draws=1)


def knn_top1(bank: np.ndarray, bank_labels: np.ndarray, queries: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """Weighted kNN votes written out: cosine, the k most similar, exp(s / T) per class, argmax."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries.astype(np.float64) @ bank.T
    out = []
    for s in sims:
        near = np.argsort(-s, kind="stable")[:k]
        votes = np.zeros(bank_labels.max() + 1)
        np.add.at(votes, bank_labels[near], np.exp(s[near] / temperature))
        out.append(np.argmax(votes))
    return np.array(out)


def test_knn_all_searches_every_draw_and_queries_with_the_mean(stored, tmp_path):
    run, values, labels, splits = stored
    train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    bank = values[train].astype(np.float32).reshape(len(train) * K, -1)
    queries = mean64(values[test]).reshape(len(test), -1)
    for k in (1, 5):
        result = knn_run(store, None, 10, "b", [k], pool=None, temperature=0.5, draws="all")
        expected = knn_top1(bank, np.repeat(labels[train], K), queries, k, 0.5)
        assert result.top1[k] == pytest.approx(float((expected == labels[test]).mean()))
    assert "every draw of a train image is a neighbour" in result.settings["draws_meaning"]
    # the bank holds K samples per train image: k up to K x train images
    knn_run(store, None, 10, "b", [len(train) * K], pool=None, draws="all")
    with pytest.raises(ValueError, match=f"between 1 and the {len(train)} train images"):
        knn_run(store, None, 10, "b", [len(train) + 1], pool=None, draws=0)
    paths = {save_knn(knn_run(store, None, 10, "b", [3], pool=None, draws=d), tmp_path / "res") for d in ("mean", "all", 0)}
    assert len(paths) == 3  # other --draws never overwrite a result


def test_logistic_all_fits_every_draw_and_tests_on_the_mean(stored, tmp_path):
    from sklearn.linear_model import LogisticRegression

    run, values, labels, splits = stored
    train, test = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
    x = values[train].astype(np.float32).reshape(len(train) * K, -1)
    y = np.repeat(labels[train], K)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    model = LogisticRegression(max_iter=1000).fit((x - mu) / sd, y)
    predicted = model.predict((mean64(values[test]).astype(np.float32).reshape(len(test), -1) - mu) / sd)
    result = probe_run(FeatureStore.open(str(tmp_path / "s.zarr")), None, 10, "b", pool=None, draws="all")
    assert result.top1 == pytest.approx(float((predicted == labels[test]).mean()))
    assert result.train_top1 == pytest.approx(float((model.predict((x - mu) / sd) == y).mean()))
    assert result.settings["draws"] == "all" and result.train == len(train)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Biased linear CKA (Kornblith et al. 2019): |Xc^T Yc|_F^2 / (|Xc^T Xc|_F |Yc^T Yc|_F)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_cka_all_pairs_draw_d_with_draw_d_and_refuses_runs_of_other_draw_counts(stored, tmp_path):
    run, values, labels, splits = stored
    rng = np.random.default_rng(1)
    other_values = (values.astype(np.float32) ** 2 + rng.standard_normal(values.shape)).astype(np.float16)
    other = write_run(tmp_path / "s.zarr", other_values, labels, list(splits), name="other")
    views = [View(run, 10, "b", "a"), View(other, 10, "b", "o")]
    result = cka_run(views[:1], views[1:], "runs", pool=None, method="feature", draws="all")
    expected = linear_cka(values.astype(np.float64).reshape(N * K, -1), other_values.astype(np.float64).reshape(N * K, -1))
    assert result.images == N * K
    assert result.matrices["biased"][0][0] == pytest.approx(expected, rel=1e-6)
    mean = cka_run(views[:1], views[1:], "runs", pool=None, method="feature", draws="mean")
    assert mean.matrices["biased"][0][0] == pytest.approx(
        linear_cka(mean64(values).reshape(N, -1), mean64(other_values).reshape(N, -1)), rel=1e-5)
    one = write_run(tmp_path / "s.zarr", values[:, 0], labels, list(splits), name="one")
    with pytest.raises(ValueError, match="--draws all pairs draw d .* 3 draws .* 1 draws"):
        cka_run(views[:1], [View(one, 10, "b", "1")], "runs", pool=None, draws="all")


def test_retrieval_scores_the_mean_of_the_draws(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.arange(N) % 3
    values = rng.standard_normal((N, K, *SHAPE)).astype(np.float16)
    domains = ["sketch" if i < 9 else "photo" for i in range(N)]
    run = write_run(tmp_path / "r.zarr", values, labels, ["test"] * N, domains)
    config = RetrievalConfig(Side(None, 10, "b", "sketch"), Side(None, 10, "b", "photo"), pool=None,
                             map_at=(None,), precision_at=(5,), examples=3, draws="all")
    result = retrieve_run(FeatureStore.open(str(tmp_path / "r.zarr")), config)
    features = mean64(values).reshape(N, -1)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    ids = [str(i) for i in run.images.id]
    for example in result.examples:
        q = ids.index(example["id"])
        for item in example["top"]:
            assert item["similarity"] == pytest.approx(unit[q] @ unit[ids.index(item["id"])], abs=1e-5)
    assert result.settings["draws"] == "all" and "queries and gallery: the float32 mean" in result.draws


def test_trained_head_batches_take_one_picked_draw_per_train_image_and_the_mean_elsewhere(stored):
    run, values, labels, splits = stored
    data = StoreBatches(run, [(10, "b")], labels, batch_size=4, window_chunks=2, draws="all")
    train, val = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "test")
    picks = data.epoch_picks(train, seed=3, epoch=1)
    expected_picks = np.random.default_rng((3, 1, 1)).integers(K, size=N)
    np.testing.assert_array_equal(picks[train], expected_picks[train])
    assert (picks[val] == -1).all()
    assert not np.array_equal(picks, data.epoch_picks(train, seed=3, epoch=2))
    for group, batch in data.passes({"val": val, "train": train}, np.random.default_rng(0), picks):
        x = batch.features[(10, "b")].numpy()
        if group == "train":
            np.testing.assert_array_equal(x, values[batch.rows, picks[batch.rows]].astype(np.float32))
        else:
            np.testing.assert_allclose(x, mean64(values[batch.rows]), atol=1e-5)
    pinned = StoreBatches(run, [(10, "b")], labels, batch_size=4, draws=2)
    assert pinned.epoch_picks(train, 3, 1) is None
    for _, batch in pinned.passes({"train": train}, None):
        np.testing.assert_array_equal(batch.features[(10, "b")].numpy(), values[batch.rows, 2].astype(np.float32))


def test_training_feeds_every_epoch_its_own_draws(stored, monkeypatch, one_torch_thread):
    run, values, labels, splits = stored
    data = StoreBatches(run, [(10, "b")], labels, batch_size=8, draws="all")
    seen = []
    passes = data.passes

    def spy(groups, rng, picks=None):
        seen.append(None if picks is None else picks.copy())
        return passes(groups, rng, picks)

    monkeypatch.setattr(data, "passes", spy)
    cfg = TrainConfig(epochs=3, batch_size=8, patience=0, seed=5)
    train, val = np.flatnonzero(splits == "train")[:12], np.flatnonzero(splits == "train")[12:]
    torch.manual_seed(0)
    head = build_head(HeadSpec(kind="linear", inputs={(10, "b"): SHAPE}, num_classes=3, pool=1), None)
    train_grid(data, [Trainee("h", head, 1e-2, cfg, 2, torch.device("cpu"))], train, val, cfg)
    assert len(seen) == 4 and seen[-1] is None  # 3 epochs, then the validation-only pass on the mean
    for epoch, picks in enumerate(seen[:3]):
        np.testing.assert_array_equal(picks[train], np.random.default_rng((5, epoch, 1)).integers(K, size=N)[train])
        assert (picks[val] == -1).all()


def test_the_commands_name_the_choice_and_refuse_a_missing_draw_in_one_line(stored, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    store = str(tmp_path / "s.zarr")
    common = ["--block", "b", "--timestep", "10", "--pool", "1", "--out", str(tmp_path / "res")]
    runner = CliRunner()
    for command, extra in (("knn", ["--k", "3"]), ("probe", []), ("probe", ["--head", "linear", "--epochs", "1"])):
        for draws, line in (("all", "noise draws: all of 3 ("), ("1", "noise draws: draw 1 only (of 3)"),
                            ("mean", "noise draws: mean (float32 mean over the 3 draws of each image)")):
            result = runner.invoke(app, [command, store, *common, *extra, "--draws", draws, "-q"])
            assert result.exit_code == 0, result.output
            assert line in result.output, (command, extra, result.output)
        result = runner.invoke(app, [command, store, *common, *extra, "--draws", "3"])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert "draw 3 asked for, but the run holds 3 noise draws (0..2)" in lines[0]
    head = next((tmp_path / "res").glob("probe-linear-*/*.safetensors"))
    result = runner.invoke(app, ["probe", store, "--head-file", str(head), "--draws", "2", "-q", "--json",
                                 "--out", str(tmp_path / "res")])
    assert result.exit_code == 0, result.output
    assert '"draws": 2' in result.output and "draw 2 only (of 3)" in result.output


def test_on_a_run_of_one_draw_the_choice_is_not_a_setting_and_results_keep_their_names(tmp_path):
    """Every --draws gives the same numbers on a run of one draw, so the settings (and the results
    file's digest) leave it out: the digest is the one of the settings without it."""
    rng = np.random.default_rng(1)
    labels = np.arange(N) % 3
    values = rng.standard_normal((N, *SHAPE)).astype(np.float16)
    write_run(tmp_path / "one.zarr", values, labels, ["train" if i % 3 else "test" for i in range(N)])
    store = FeatureStore.open(str(tmp_path / "one.zarr"))
    results = [knn_run(store, None, 10, "b", [3], pool=None, draws=d) for d in ("mean", "all", 0)]
    assert {r.top1[3] for r in results} == {results[0].top1[3]}
    assert all("draws" not in r.settings and "draws_meaning" not in r.settings for r in results)
    paths = {save_knn(r, tmp_path / "res") for r in results}
    canonical = json.dumps({"command": "knn", "settings": results[0].settings}, sort_keys=True, separators=(",", ":"))
    assert [p.name.rsplit("-", 1)[1] for p in paths] == [hashlib.sha256(canonical.encode()).hexdigest()[:8] + ".json"]
