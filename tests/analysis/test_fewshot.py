"""Few-shot classification from the cache: shot sampling, scores on synthetic stores whose answer is
known (separable classes vs noise), mean ± std over seeds, holdout splits and the CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import cli.fewshot  # noqa: F401  (registers its command on cli.app.app)
from cli.app import app
from featurestore.store import FeatureStore
from pipelines.analysis.fewshot import (
    STD_DDOF,
    FewshotConfig,
    fewshot_run,
    knn_top1,
    sample_shots,
)
from pipelines.heads.logistic import split_rows
from pipelines.heads.training import TrainConfig

CLASSES, PER_CLASS, CHUNK = 4, 40, 32  # 40 images a class: 20 train, 20 test


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_store(path, features: np.ndarray, labels: np.ndarray, splits: list[str]) -> FeatureStore:
    """One run, block "b" at t=5, every chunk written."""
    store = FeatureStore.open(str(path), mode="a")
    ids = [f"img{i}" for i in range(len(labels))]
    rows = store.add_images("synthetic", {"id": ids, "label": labels, "class_name": [f"c{v}" for v in labels],
                                          "split": splits, "domain": ["x"] * len(ids), "source": ids})
    run = store.create_run({"synthetic": str(path)}, arrays={"b": features.shape[1:]}, timesteps=[5], rows=rows,
                           chunk_rows=CHUNK, dtype="float32", provenance={})
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        run.write_chunk(c, {(5, "b"): features[s]}, np.zeros(s.stop - s.start, bool), [""] * (s.stop - s.start))
    return store


def dataset(rng, signal: float):
    """Images sorted by class (like the cifar10 manifest), alternating test/train; class k adds
    `signal` to channel k."""
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    x = rng.normal(size=(len(labels), 8, 2, 2)).astype(np.float32)
    x[np.arange(len(labels)), labels] += signal
    return x, labels, ["train" if i % 2 else "test" for i in range(len(labels))]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("fewshot")
    return {name: write_store(folder / f"{name}.zarr", *dataset(rng, signal))
            for name, signal in (("separable", 6.0), ("noise", 0.0))}


# -- sampling -------------------------------------------------------------------------------------
def test_shots_are_k_per_class_from_the_pool_only():
    labels = np.repeat(np.arange(5), 30)
    pool = np.flatnonzero(np.arange(150) % 3 != 0)  # 20 train rows a class; the rest are test rows
    test = np.setdiff1d(np.arange(150), pool)
    sets = {(seed, k): sample_shots(pool, labels, k, seed, range(5)) for seed in (0, 1) for k in (1, 4, 16)}
    for (seed, k), shots in sets.items():
        assert np.array_equal(np.bincount(labels[shots], minlength=5), [k] * 5)
        assert np.isin(shots, pool).all() and not np.isin(shots, test).any()
        assert np.array_equal(shots, np.sort(shots)) and len(np.unique(shots)) == len(shots)
        assert np.array_equal(shots, sample_shots(pool[::-1], labels, k, seed, range(5)))  # pool order does not matter
    for k in (1, 4, 16):
        assert not np.array_equal(sets[(0, k)], sets[(1, k)])
    for seed in (0, 1):  # nested: the 1-shot images are among the 4-shot ones, those among the 16-shot ones
        assert np.isin(sets[(seed, 1)], sets[(seed, 4)]).all() and np.isin(sets[(seed, 4)], sets[(seed, 16)]).all()


def test_too_few_images_is_a_clear_error():
    labels = np.array([0] * 6 + [1] * 2 + [2] * 3)
    with pytest.raises(ValueError, match=r"4-shot needs 4 train images of every class; too few in 2 class\(es\): "
                                         r"dog \(2\), emu \(3\)"):
        sample_shots(np.arange(11), labels, 4, 0, [0, 1, 2], ["cat", "dog", "emu"])
    with pytest.raises(ValueError, match=r"too few in 1 class\(es\): 3 \(0\)"):  # a class only the test split has
        sample_shots(np.arange(11), np.append(labels, 3), 1, 0, [0, 1, 2, 3])


def test_knn_caps_the_neighbours_at_the_shots():
    rng = np.random.default_rng(1)
    train_x, test_x = rng.normal(size=(6, 5)), rng.normal(size=(30, 5))
    train_y, test_y = np.array([0, 0, 1, 1, 2, 2]), rng.integers(0, 3, 30)
    assert knn_top1(train_x, train_y, test_x, test_y, 200) == knn_top1(train_x, train_y, test_x, test_y, 6)


# -- from a store ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("head", "one_shot"), [("logistic", 0.75), ("knn", 0.95)])
def test_separable_scores_high_from_one_shot_and_noise_is_at_chance(stores, head, one_shot):
    """Chance is 0.25. 1-shot logistic stays near 0.8 here: it standardises 32 features with the
    statistics of 4 images, which lets the noise features weigh as much as the lit channels."""
    cfg = FewshotConfig(head=head, shots=[1, 16], seeds=[0, 1, 2], pool=None)
    good = fewshot_run(stores["separable"], cfg)
    (entry,) = good.classifiers
    one, sixteen = entry.scores
    assert entry.name == f"{head}_t5_b" and entry.keys == [(5, "b")]
    assert (good.classes, good.train_pool, good.test, good.std_ddof) == (4, 80, 80, STD_DDOF)
    assert (one.shots, one.train_images, sixteen.train_images) == (1, 4, 64)
    assert one.mean > one_shot and sixteen.mean >= one.mean and sixteen.mean > 0.95
    for score in (one, sixteen):
        assert len(score.top1) == 3
        assert score.mean == np.mean(score.top1) and score.std == np.std(score.top1, ddof=0)
    bad = fewshot_run(stores["noise"], cfg)
    assert all(abs(s.mean - 0.25) < 0.15 for s in bad.classifiers[0].scores)  # chance is 1/4


def test_a_trained_head_learns_from_the_shots(stores):
    cfg = FewshotConfig(head="linear", shots=[1, 4], seeds=[0, 1], lrs=[3e-2], head_options={"pool": 1},
                        train=TrainConfig(epochs=15, batch_size=16))
    result = fewshot_run(stores["separable"], cfg)
    (entry,) = result.classifiers
    assert entry.name == "linear_t5_b_lr0.03" and entry.keys == [(5, "b")]
    assert [s.train_images for s in entry.scores] == [4, 16]
    assert entry.scores[1].mean > 0.8
    assert entry.scores[0].top1 != entry.scores[1].top1


def test_single_split_data_needs_a_holdout(tmp_path):
    x, labels, _ = dataset(np.random.default_rng(2), 4.0)
    store = write_store(tmp_path / "s.zarr", x, labels, ["test"] * len(labels))
    with pytest.raises(ValueError, match="--holdout"):
        fewshot_run(store, FewshotConfig(head="knn", shots=[1], pool=None))
    result = fewshot_run(store, FewshotConfig(head="knn", shots=[1, 4], pool=None, holdout=0.5, split_seed=3))
    train, test = split_rows(store.run(result.run_id), "train", "test", 0.5, 3)
    assert (result.train_pool, result.test) == (len(train), len(test)) and len(train) + len(test) == len(labels)
    labels_of = store.run(result.run_id).labels
    for seed in (0, 1, 2):  # the default seeds draw from the holdout's train half only
        assert not np.isin(sample_shots(train, labels_of, 4, seed, range(CLASSES)), test).any()


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown head 'svm'"):
        FewshotConfig(head="svm")
    for official in ("diffssl-attention", "vermouth-uhead"):  # it has no place for their official options
        with pytest.raises(ValueError, match="fewshot does not train the papers' own heads"):
            FewshotConfig(head=official)
    with pytest.raises(ValueError, match="--shots must be distinct positive"):
        FewshotConfig(shots=[0, 1])
    with pytest.raises(ValueError, match="--seeds must be distinct"):
        FewshotConfig(seeds=[1, 1])


def test_cli_fewshot_json(stores, tmp_path):
    store = stores["separable"].url
    args = ["fewshot", store, "--head", "knn", "--shots", "1,4", "--seeds", "0,1", "--pool", "1",
            "--out", str(tmp_path), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["head"] == "knn" and doc["seeds"] == [0, 1] and doc["std_ddof"] == 0
    scores = doc["classifiers"][0]["scores"]
    assert [s["shots"] for s in scores] == [1, 4] and all(len(s["top1"]) == 2 for s in scores)
    saved = list(tmp_path.glob("fewshot-*-knn-*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["classifiers"] == doc["classifiers"]
    bad = CliRunner().invoke(app, ["fewshot", store, "--shots", "64", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "64-shot needs 64 train images" in bad.output
