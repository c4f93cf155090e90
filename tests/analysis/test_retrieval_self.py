"""Same-domain retrieval: each query's own image is left out of its gallery (the standard protocol),
checked against a separate numpy mAP / P@K over the stored arrays; cross-domain retrieval has no
self-hits and is unchanged; a query set only partly inside the gallery is refused."""

from pathlib import Path

import numpy as np
import pytest

from featurestore.store import FeatureStore
from pipelines.analysis.retrieval import RetrievalConfig, Side, retrieve_run, self_positions

CLASSES = ["a", "b", "c"]
CHUNK = 5


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[FeatureStore, dict, str]:
    """3 classes x (5 "digit" + 3 "photo") images, shuffled, all extracted; a second run holds only
    the first 10 rows. Returns the store, what each row holds (independently of it), the second run."""
    rng = np.random.default_rng(3)
    rows = [(c, d) for c in CLASSES for d, n in (("digit", 5), ("photo", 3)) for _ in range(n)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    store = FeatureStore.open(Path(tmp_path_factory.mktemp("self")) / "store.zarr", "a")
    table = store.add_images("toy", {
        "id": [f"im{i}" for i in range(len(rows))], "label": [CLASSES.index(c) for c, _ in rows],
        "class_name": [c for c, _ in rows], "split": ["all"] * len(rows), "domain": [d for _, d in rows],
        "source": [f"img/{i}.png" for i in range(len(rows))],
    })
    values = (rng.normal(size=(len(CLASSES), 4))[[CLASSES.index(c) for c, _ in rows]]
              + 1.5 * rng.normal(size=(len(rows), 4))).astype(np.float32)[:, :, None, None]
    runs = []
    for seed, n in ((0, len(rows)), (1, 10)):  # another seed: another run
        run = store.create_run({"toy": seed}, arrays={"b": (4, 1, 1)}, timesteps=[10], rows=table[:n],
                               chunk_rows=CHUNK, dtype="float32", provenance={})
        for chunk in range(-(-n // CHUNK)):
            s = run.chunk_slice(chunk)
            run.write_chunk(chunk, {(10, "b"): values[s]}, np.zeros(len(values[s]), bool), [""] * len(values[s]))
        runs.append(run.run_id)
    truth = {"classes": np.array([c for c, _ in rows]), "domains": np.array([d for _, d in rows]),
             "x": values[:, :, 0, 0].astype(np.float64)}
    return store, truth, runs


def numpy_metrics(truth: dict, qi: np.ndarray, gi: np.ndarray, k: int = 4, p: int = 3) -> dict:
    """mAP@all, mAP@k (non-interpolated, / min(R, k)) and P@p (/ p) of queries at rows qi against
    the gallery rows gi, by a stable argsort of float64 cosine similarities; a query's own row is
    dropped from its ranking before anything is counted."""
    x = truth["x"] / np.linalg.norm(truth["x"], axis=1, keepdims=True)
    aps, aps_k, precisions = [], [], []
    for i in qi:
        others = gi[gi != i]
        ranked = others[np.argsort(-(x[others] @ x[i]), kind="stable")]
        hit = truth["classes"][ranked] == truth["classes"][i]
        precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
        aps.append(precision[hit].sum() / hit.sum())
        aps_k.append(precision[:k][hit[:k]].sum() / min(hit.sum(), k))
        precisions.append(hit[:p].sum() / p)
    return {"mAP@all": np.mean(aps), f"mAP@{k}": np.mean(aps_k), f"P@{p}": np.mean(precisions)}


def rows_of(truth: dict, domain: str, n: int | None = None) -> np.ndarray:
    return np.flatnonzero(truth["domains"][:n] == domain)


def config(query: str, gallery: str, map_at=(None, 4), runs=(None, None)) -> RetrievalConfig:
    return RetrievalConfig(query=Side(runs[0], 10, "b", query), gallery=Side(runs[1], 10, "b", gallery), pool=1,
                           map_at=map_at, precision_at=(3,), slab_rows=CHUNK)


def test_self_positions():
    assert self_positions(np.array([7, 2, 9, 4]), np.array([4, 5, 7, 2])).tolist() == [2, 3, -1, 0]


@pytest.mark.parametrize("map_at", [(None, 4), (4,)])  # two streamed passes (@all), or one top-K pass
def test_same_domain_leaves_each_query_out_of_its_gallery(toy, map_at):
    store, truth, runs = toy
    result = retrieve_run(store, config("digit", "digit", map_at, (runs[0], runs[0])))
    expected = numpy_metrics(truth, rows_of(truth, "digit"), rows_of(truth, "digit"))
    got = {name: m["value"] for name, m in result.metrics.items() if name != "chance"}
    assert got == pytest.approx({n: v for n, v in expected.items() if n in got}, abs=1e-12)
    assert result.self_left_out == 15 == result.query["images"]
    assert result.variants["gallery"].startswith("the query itself is left out of its gallery")
    assert result.metrics["chance"]["value"] == pytest.approx(4 / 14)  # R = 5 - 1 of a gallery of 15 - 1
    assert all(e["id"] not in [t["id"] for t in e["top"]] for e in result.examples)
    assert "gallery_protocol" in result.settings


def test_cross_domain_has_no_self_hits_and_is_unchanged(toy):
    store, truth, runs = toy
    result = retrieve_run(store, config("digit", "photo", runs=(runs[0], runs[0])))
    expected = numpy_metrics(truth, rows_of(truth, "digit"), rows_of(truth, "photo"))
    assert {n: m["value"] for n, m in result.metrics.items() if n != "chance"} == pytest.approx(expected, abs=1e-12)
    assert result.self_left_out == 0
    assert "gallery_protocol" not in result.settings and "gallery" not in result.variants


def test_queries_inside_a_larger_gallery_leave_themselves_out(toy):
    """Queries of the 10-row run against the whole run: every query is a gallery image."""
    store, truth, runs = toy
    result = retrieve_run(store, config("digit", "digit", runs=(runs[1], runs[0])))
    qi = rows_of(truth, "digit", 10)
    expected = numpy_metrics(truth, qi, rows_of(truth, "digit"))
    assert {n: m["value"] for n, m in result.metrics.items() if n != "chance"} == pytest.approx(expected, abs=1e-12)
    assert result.self_left_out == len(qi)


def test_gallery_holding_only_some_queries_is_refused(toy):
    store, _, runs = toy
    with pytest.raises(ValueError, match="queries are also gallery images and the others are not"):
        retrieve_run(store, config("digit", "digit", runs=(runs[0], runs[1])))
