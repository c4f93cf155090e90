"""Retrieval from a store: row selection (domain, finished, not failed), zero-shot splits (loading,
validation, unseen classes only), agreement with a brute-force ranking of the stored arrays, the
results files and the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import cli.retrieve  # noqa: F401  (registers the command on the app)
from cli.app import app
from featurestore.store import FeatureStore
from pipelines.analysis.retrieval import (
    HitRanks,
    RetrievalConfig,
    Side,
    average_precision,
    averaged,
    precision_at,
    retrieve_run,
    save_results,
)
from pipelines.analysis.splits import SplitError, list_splits, load_split

CLASSES = ["cat", "cow", "dog", "owl", "pig"]
SPLIT = {"name": "toy", "seen": ["cat", "dog"], "unseen": ["cow", "owl", "pig"]}
CHUNK = 7


def write_store(path: Path, seed: int = 0) -> tuple[FeatureStore, dict]:
    """A run over 5 classes x (4 sketches + 6 photos), shuffled; one failed photo, last chunk not done.
    Returns the store and, independently of it, what each run row holds."""
    rng = np.random.default_rng(seed)
    rows = [(c, d, i) for c in CLASSES for d, n in (("sketch", 4), ("photo", 6)) for i in range(n)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    ids = [f"{d}-{c}-{i}" for c, d, i in rows]
    store = FeatureStore.open(path, "a")
    table = store.add_images("toy", {
        "id": ids, "label": [CLASSES.index(c) for c, _, _ in rows], "class_name": [c for c, _, _ in rows],
        "split": ["all"] * len(rows), "domain": [d for _, d, _ in rows], "source": [f"img/{i}.png" for i in ids],
    })
    run = store.create_run({"toy": seed}, arrays={"b": (4, 2, 2)}, timesteps=[10], rows=table, chunk_rows=CHUNK,
                           dtype="float32", provenance={})
    centres = rng.normal(size=(len(CLASSES), 4, 1, 1))
    values = (centres[[CLASSES.index(c) for c, _, _ in rows]] + 1.2 * rng.normal(size=(len(rows), 4, 2, 2)))
    values = values.astype(np.float32)
    failed = np.zeros(len(rows), bool)
    failed[next(k for k, (c, d, _) in enumerate(rows) if (c, d) == ("cow", "photo"))] = True
    n_chunks = -(-len(rows) // CHUNK)
    for chunk in range(n_chunks - 1):  # the last chunk stays undone
        s = run.chunk_slice(chunk)
        run.write_chunk(chunk, {(10, "b"): values[s]}, failed[s], ["broken" if f else "" for f in failed[s]])
    usable = np.zeros(len(rows), bool)
    usable[: (n_chunks - 1) * CHUNK] = True
    usable &= ~failed
    truth = {"ids": np.array(ids), "classes": np.array([c for c, _, _ in rows]),
             "domains": np.array([d for _, d, _ in rows]), "values": values, "usable": usable, "run": run.run_id}
    return store, truth


def brute_force(truth: dict, classes: list[str]) -> tuple[HitRanks, np.ndarray]:
    """Queries: usable sketches of `classes`; gallery: usable photos of `classes`; global-average-pooled,
    L2-normalised, ranked by a stable argsort of the float64 similarity matrix."""
    keep = truth["usable"] & np.isin(truth["classes"], classes)
    q, g = keep & (truth["domains"] == "sketch"), keep & (truth["domains"] == "photo")
    x = truth["values"].mean(axis=(2, 3))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    order = np.argsort(-(x[q].astype(np.float64) @ x[g].astype(np.float64).T), axis=1, kind="stable")
    relevance = truth["classes"][g][order] == truth["classes"][q][:, None]
    return HitRanks.from_relevance(relevance, relevance.sum(axis=1)), truth["classes"][q]


def config(**changes) -> RetrievalConfig:
    """The toy run's last chunk is not done: allow_incomplete uses its extracted images."""
    base = {"query": Side(None, 10, "b", "sketch"), "gallery": Side(None, 10, "b", "photo"), "pool": 1,
            "map_at": (None, 5), "precision_at": (3, 10), "slab_rows": CHUNK, "allow_incomplete": True}
    return RetrievalConfig(**{**base, **changes})


@pytest.fixture
def toy(tmp_path):
    store, truth = write_store(tmp_path / "s.zarr")
    split = tmp_path / "toy.json"
    split.write_text(json.dumps(SPLIT))
    return store, truth, split


@pytest.mark.parametrize("use_split", [False, True])
def test_matches_brute_force_on_the_stored_arrays(toy, use_split):
    store, truth, split = toy
    classes = SPLIT["unseen"] if use_split else CLASSES
    result = retrieve_run(store, config(split=str(split) if use_split else None))
    hits, query_classes = brute_force(truth, classes)
    photos = truth["usable"] & np.isin(truth["classes"], classes) & (truth["domains"] == "photo")
    assert (result.query["images"], result.gallery["images"]) == (len(query_classes), photos.sum())
    expected = {
        "mAP@all": average_precision(hits, None).mean(), "mAP@5": average_precision(hits, 5).mean(),
        "P@3": precision_at(hits, 3).mean(), "P@10": precision_at(hits, 10).mean(),
        "chance": (hits.n_relevant / result.gallery["images"]).mean(),
    }
    assert {k: m["value"] for k, m in result.metrics.items()} == pytest.approx(expected, abs=1e-12)
    assert result.metrics["mAP@5"] == {"value": pytest.approx(expected["mAP@5"]), "ap": "noninterp",
                                       "normalisation": "min", "average": "queries"}
    assert result.metrics["P@3"]["denominator"] == "k"


def test_split_uses_unseen_classes_only(toy):
    store, truth, split = toy
    result = retrieve_run(store, config(split=str(split), examples=10))
    assert result.split == "toy" and result.classes == SPLIT["unseen"] == sorted(result.per_class)
    assert len(result.examples) == 3  # one per unseen class
    for example in result.examples:
        assert example["class"] in SPLIT["unseen"]
        assert {hit["class"] for hit in example["top"]} <= set(SPLIT["unseen"])
        assert not example["id"].startswith("photo") and all(h["id"].startswith("photo") for h in example["top"])
    unseen_usable = truth["usable"] & np.isin(truth["classes"], SPLIT["unseen"])
    assert result.query["images"] == (unseen_usable & (truth["domains"] == "sketch")).sum()
    assert result.gallery["images"] == (unseen_usable & (truth["domains"] == "photo")).sum()


def test_class_average_and_variants_are_named(toy):
    store, truth, _ = toy
    result = retrieve_run(store, config(ap="voc11", average="classes", precision_denominator="min"))
    hits, query_classes = brute_force(truth, CLASSES)
    per_class = [average_precision(hits, None, "voc11")[query_classes == c].mean() for c in CLASSES]
    assert result.metrics["mAP@all"]["value"] == pytest.approx(np.mean(per_class), abs=1e-12)
    assert result.metrics["mAP@all"] == {"value": pytest.approx(np.mean(per_class)), "ap": "voc11",
                                         "normalisation": None, "average": "classes"}
    assert result.metrics["P@10"]["denominator"] == "min"
    assert set(result.variants) == {"ap", "normalisation", "denominator", "average"}


def test_top_k_only_gives_the_same_numbers(toy):
    store, _, _ = toy
    full, top = retrieve_run(store, config()), retrieve_run(store, config(map_at=(5,)))
    for name in ("mAP@5", "P@3", "P@10", "chance"):
        assert top.metrics[name]["value"] == pytest.approx(full.metrics[name]["value"], abs=1e-12)
    assert top.examples == full.examples


def test_split_files_load_and_validate(tmp_path):
    assert {"pacs-unseen3", "quickdraw-pacs-unseen3", "quickdraw-cifar10-unseen3", "sketchy-unseen25",
            "sketchy-unseen21", "tu-berlin-unseen30", "quickdraw-unseen30"} == set(list_splits())
    pacs = load_split("pacs-unseen3")
    assert pacs.unseen == ("dog", "giraffe", "horse") and len(pacs.seen) == 4
    sketchy = load_split("sketchy-unseen21")
    assert len(sketchy.unseen) == 21 and len(sketchy.seen) + len(sketchy.unseen) == 125

    def bad(doc, message):
        path = tmp_path / "bad.json"
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(SplitError, match=message):
            load_split(path)

    bad("{not json", "not JSON")
    bad({"name": "x", "seen": ["a"], "unseen": ["a", "b"]}, "classes both seen and unseen: a")
    bad({"name": "x", "seen": ["a", "a"], "unseen": ["b"]}, "'seen' lists classes more than once: a")
    bad({"name": "x", "seen": ["a"], "unseen": []}, "'unseen' is empty")
    bad({"name": "x", "seen": ["a"], "unseen": ["b"], "unsen": ["c"]}, "unknown key.*unsen")
    bad({"name": "x", "seen": "a", "unseen": ["b"]}, "'seen' must be a list")
    with pytest.raises(SplitError, match="no split file 'nope'; shipped splits: .*pacs-unseen3"):
        load_split("nope")


def test_split_must_fit_the_data():
    split = load_split("pacs-unseen3")
    everything = {"dog", "elephant", "giraffe", "guitar", "horse", "house", "person"}
    split.check(everything, everything)
    with pytest.raises(SplitError, match="names classes absent from the data: person"):
        split.check(everything - {"person"}, everything - {"person"})
    with pytest.raises(SplitError, match="does not list classes of the data: cat"):
        split.check(everything | {"cat"}, everything)
    with pytest.raises(SplitError, match="unseen classes without gallery items: giraffe"):
        split.check(everything, everything - {"giraffe"})
    with pytest.raises(SplitError, match="unseen classes without queries: dog"):
        split.check(everything - {"dog"}, everything)


def test_results_files_and_grid(toy, tmp_path):
    store, truth, split = toy
    result = retrieve_run(store, config(split=str(split)))
    saved = save_results(result, tmp_path / "res", data_root=None)
    assert result.grid is None and "no --data-root" in result.grid_note
    assert json.loads(saved.read_text())["grid_note"] == result.grid_note
    for i in truth["ids"]:
        (tmp_path / "data" / "img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), (40, 90, 200) if i.startswith("photo") else "white").save(tmp_path / "data" / "img" / f"{i}.png")
    saved = save_results(result, tmp_path / "res", data_root=tmp_path / "data")
    assert result.grid_note is None and Path(result.grid).stat().st_size > 1000
    assert saved.name.startswith(f"retrieve-{truth['run']}-t10-b-toy-") and saved.suffix == ".json"
    other = retrieve_run(store, config(split=str(split), ap="voc11"))
    assert other.path(tmp_path, ".json") != saved  # another metric variant does not overwrite this file
    assert retrieve_run(store, config(split=str(split), pool=2)).path(tmp_path, ".json") != saved  # nor another pool
    (tmp_path / "data" / "img" / f"{result.examples[0]['top'][3]['id']}.png").unlink()
    save_results(result, tmp_path / "res", data_root=tmp_path / "data")
    assert result.grid is None and result.grid_note.startswith("grid skipped: cannot read")


def test_two_runs_and_bad_input(toy):
    store, truth, _ = toy
    second = store.create_run({"toy": "gallery"}, arrays={"c": (4, 1, 1)}, timesteps=[None],
                              rows=store.run(truth["run"]).rows, chunk_rows=100, dtype="float32", provenance={})
    second.write_chunk(0, {(None, "c"): truth["values"].mean(axis=(2, 3), keepdims=True)},
                       np.zeros(len(truth["ids"]), bool), [""] * len(truth["ids"]))
    two = config(query=Side(truth["run"], 10, "b", "sketch"), gallery=Side(second.run_id, None, "c", "photo"))
    result = retrieve_run(store, two)
    assert result.gallery["run_id"] == second.run_id and result.gallery["timestep"] is None
    # the second run has no failed or undone rows: every photo is in its gallery
    assert result.gallery["images"] == (truth["domains"] == "photo").sum()
    with pytest.raises(ValueError, match="holds 2 runs; pick one with --run"):
        retrieve_run(store, config())
    with pytest.raises(ValueError, match="no finished images in domain 'drawing'"):
        retrieve_run(store, config(query=Side(truth["run"], 10, "b", "drawing"), gallery=two.gallery))
    with pytest.raises(ValueError, match="--average must be one of queries, classes"):
        config(average="images")


def test_cli_json_and_errors(toy, tmp_path):
    store, truth, split = toy
    runner = CliRunner()
    args = ["retrieve", str(store.url), "--block", "b", "--timestep", "10", "--pool", "1", "--out", str(tmp_path / "out"),
            "--allow-incomplete"]
    result = runner.invoke(app, [*args, "--split", str(split), "--map-at", "all,5", "--precision-at", "3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert set(doc["metrics"]) == {"mAP@all", "mAP@5", "P@3", "chance"} and doc["classes"] == SPLIT["unseen"]
    assert len(list((tmp_path / "out").glob(f"retrieve-{truth['run']}-t10-b-toy-*.json"))) == 1
    assert doc["runs"] == {truth["run"]: {"used": int(truth["usable"].sum()), "failed": 1,
                                          "pending": int((~truth["usable"]).sum()) - 1}}
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "mAP@all:" in result.output and "grid skipped" in result.output
    bad_split = tmp_path / "bad.json"
    bad_split.write_text(json.dumps({"name": "bad", "seen": ["cat"], "unseen": ["cow", "yak"]}))
    result = runner.invoke(app, [*args, "--split", str(bad_split)])
    assert result.exit_code == 1 and "error: split 'bad'" in result.output and "absent from the data: yak" in result.output
    result = runner.invoke(app, [*args, "--map-at", "all,top5"])
    assert result.exit_code == 1 and "--map-at takes all or integers" in result.output
    result = runner.invoke(app, [*args, "--split", str(split), "--project-loss", "triplet"])
    assert result.exit_code == 1 and "--project-loss needs a projection: give --project-dim" in result.output
    result = runner.invoke(app, [*args, "--split", str(split), "--project-dim", "3", "--project-loss", "triplet",
                                 "--project-epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["projection"]["loss"] == "triplet" and doc["projection"]["trained_on_classes"] == SPLIT["seen"]
    assert doc["features"] == 3


def test_cli_names_the_voc_all_point_and_min_cutoff_variants(toy, tmp_path):
    store, truth, _ = toy
    args = ["retrieve", str(store.url), "--block", "b", "--timestep", "10", "--pool", "1", "--out", str(tmp_path / "out"),
            "--allow-incomplete", "--map-at", "all,5", "--precision-at", "3", "--ap", "voc-allpoint",
            "--precision-denominator", "min-cutoff"]
    hits, _ = brute_force(truth, CLASSES)
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["metrics"]["mAP@5"] == {"value": pytest.approx(average_precision(hits, 5, "voc-allpoint").mean()),
                                       "ap": "voc-allpoint", "normalisation": "min", "average": "queries"}
    assert doc["metrics"]["P@3"] == {"value": pytest.approx(precision_at(hits, 3, "min-cutoff").mean()),
                                     "denominator": "min-cutoff", "average": "queries"}
    assert "voc-allpoint" in doc["variants"]["ap"] and "min-cutoff" in doc["variants"]["denominator"]
    text = CliRunner().invoke(app, args).output
    assert "mAP@all: " in text and "(ap=voc-allpoint, normalisation=min, average=queries)" in text
    assert "(denominator=min-cutoff, average=queries)" in text
    result = CliRunner().invoke(app, [*args, "--ap", "voc"])
    assert result.exit_code == 1 and "error: --ap must be one of noninterp, voc11, voc-allpoint" in result.output


def write_class_names(path: Path, classes: list[str], width: int = 5) -> np.ndarray:
    """A class-name embedding table in the format of `featurestore text-embed`."""
    from safetensors.numpy import save_file

    table = np.random.default_rng(1).normal(size=(len(classes), width)).astype(np.float32)
    save_file({"embeddings": table}, str(path), metadata={"classes": json.dumps(classes)})
    return table


@pytest.mark.parametrize("loss, text", [("cross-entropy", False), ("triplet", False), ("cross-entropy", True)],
                         ids=["prototypes", "triplet", "text-embeddings"])
def test_trained_projection_never_sees_an_unseen_class(toy, monkeypatch, tmp_path, loss, text):
    from pipelines.analysis import projection, retrieval
    from pipelines.analysis.projection import ProjectionConfig

    store, truth, split = toy
    calls = []
    original = projection.train_projection

    def spy(x, labels, is_query, cfg, class_vectors=None):
        calls.append((x.copy(), labels.copy(), is_query.copy(), class_vectors))
        return original(x, labels, is_query, cfg, class_vectors)

    monkeypatch.setattr(retrieval, "train_projection", spy)
    names_file = tmp_path / "names.safetensors"
    table = write_class_names(names_file, CLASSES)  # the table holds unseen classes too; only seen rows may be used
    cfg = ProjectionConfig(dim=None if text else 3, loss=loss, epochs=5,
                           text_embeddings=str(names_file) if text else None)
    result = retrieve_run(store, config(split=str(split), projection=cfg))
    ((x, labels, is_query, class_vectors),) = calls
    # exactly the usable seen-class rows of both domains went into training, nothing else
    seen = truth["usable"] & np.isin(truth["classes"], SPLIT["seen"])
    pooled_seen = truth["values"][seen].mean(axis=(2, 3))
    assert len(x) == seen.sum() and sorted(set(labels.tolist())) == [0, 1]
    assert {tuple(np.round(r, 5)) for r in x} == {tuple(np.round(r, 5)) for r in pooled_seen}
    assert is_query.sum() == (seen & (truth["domains"] == "sketch")).sum()
    if text:  # the rows of cat and dog, in label order, and no other
        np.testing.assert_array_equal(class_vectors, table[[CLASSES.index(c) for c in SPLIT["seen"]]])
    else:
        assert class_vectors is None
    assert result.projection["trained_on_classes"] == SPLIT["seen"] and result.classes == SPLIT["unseen"]
    assert result.features == (5 if text else 3)  # retrieval ran in the projected space

    # the same numbers as ranking independently projected features by brute force
    weights = original(x, labels, is_query, cfg, class_vectors)
    projected = dict(truth, values=np.einsum("nchw,cd->ndhw", truth["values"], weights))
    hits, names = brute_force(projected, SPLIT["unseen"])
    assert result.metrics["mAP@all"]["value"] == pytest.approx(averaged(average_precision(hits), names), abs=1e-6)


def test_projection_into_text_embeddings_is_checked(toy, tmp_path):
    from pipelines.analysis.projection import ProjectionConfig

    store, _, split = toy
    names_file = tmp_path / "names.safetensors"
    write_class_names(names_file, ["cat", "cow"])
    with pytest.raises(ValueError, match="no embedding for class.*dog"):
        retrieve_run(store, config(split=str(split), projection=ProjectionConfig(text_embeddings=str(names_file))))
    write_class_names(names_file, CLASSES)
    with pytest.raises(ValueError, match="--project-dim 128 differs from the width 5"):
        retrieve_run(store, config(split=str(split), projection=ProjectionConfig(dim=128, text_embeddings=str(names_file))))


def test_projection_needs_a_split():
    from pipelines.analysis.projection import ProjectionConfig

    with pytest.raises(ValueError, match="needs --split"):
        config(projection=ProjectionConfig())


def test_voc11_refuses_a_normalisation_it_would_ignore():
    """voc11's recall is hits / R: a --map-normalisation was accepted and dropped from the output."""
    with pytest.raises(ValueError, match="--ap voc11 has no normalisation"):
        config(ap="voc11", normalisation="retrieved")
    assert config(ap="voc11").normalisation == "min"
