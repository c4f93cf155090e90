"""Stage 2 never answers silently wrong (issue 9): non-finite features, incomplete runs and constant
features end with one line (or say what they left out), and results files never overwrite another
setting's numbers nor show up in another store's report. Every store is built through the store API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from pipelines.analysis import write_json

N, CHUNK, CLASSES = 48, 8, 3
INF_ROW = 9  # a sketch of class 0 in chunk 1
FAILED_ROW = 20  # failed during extraction: its features are NaN and must never be read
PENDING_CHUNK = 5  # rows 40..47


def images(n: int = N) -> dict[str, list]:
    """Label i % 3; domains alternate every 3 images, splits every 6: every (class, domain, split) occurs."""
    ids = [f"img{i}" for i in range(n)]
    return {"id": ids, "label": [i % CLASSES for i in range(n)], "class_name": [f"c{i % CLASSES}" for i in range(n)],
            "split": ["train" if (i // 6) % 2 else "test" for i in range(n)],
            "domain": ["sketch" if (i // 3) % 2 else "photo" for i in range(n)], "source": ids}


def build(path: Path, features: dict[tuple[int, str], np.ndarray], name: str = "run",
          pending: tuple[int, ...] = ()) -> str:
    """A store with one run over `images()`: every chunk written except `pending`, FAILED_ROW failed
    (its features NaN, as a failed image may hold anything). Returns the run id."""
    store = FeatureStore.open(str(path), mode="a")
    table_rows = store.add_images("synthetic", images())
    run = store.create_run({"name": name}, arrays={b: x.shape[1:] for (_, b), x in features.items()},
                           timesteps=sorted({t for t, _ in features}), rows=table_rows, chunk_rows=CHUNK,
                           dtype="float32", provenance={})
    for c in range(run.n_chunks):
        if c in pending:
            continue
        s = run.chunk_slice(c)
        failed = np.arange(s.start, s.stop) == FAILED_ROW
        values = {k: x[s].copy() for k, x in features.items()}
        for x in values.values():
            x[failed] = np.nan
        run.write_chunk(c, values, failed, ["decode error" if f else "" for f in failed])
    return run.run_id


def signal(rng: np.random.Generator, shape=(4, 2, 2), strength: float = 2.0) -> np.ndarray:
    """Noise maps where class k adds `strength` to channel k."""
    x = rng.normal(size=(N, *shape)).astype(np.float32)
    x[np.arange(N), np.arange(N) % CLASSES] += strength
    return x


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    """The output of a refused command: exit 1, one line starting with `error: `, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)  # typer.Exit, not a crash
    return result.output


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (Python's json reads them by default)."""
    def refuse(name: str):
        raise AssertionError(f"{name} in results JSON")
    return json.loads(text, parse_constant=refuse)


# commands of stage 2, each on block a at t=5, small enough to run in a second or two
COMMANDS = {
    "knn": ["knn", "--block", "a", "--timestep", "5", "--k", "1,3"],
    "probe": ["probe", "--block", "a", "--timestep", "5", "--pool", "1"],
    "probe-linear": ["probe", "--head", "linear", "--block", "a", "--timestep", "5", "--epochs", "1", "--batch-size", "8"],
    "sweep": ["sweep", "--k", "3"],
    "cka": ["cka", "--timestep", "5"],
    "fewshot": ["fewshot", "--shots", "1", "--seeds", "0"],
    "retrieve": ["retrieve", "--block", "a", "--timestep", "5", "--map-at", "all", "--precision-at", "2"],
}


def command(name: str, store: Path, out: Path, *extra: str) -> list[str]:
    verb, *options = COMMANDS[name]
    return [verb, str(store), *options, "--out", str(out), *extra]


# -- non-finite features ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inf_store(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    a, b = signal(rng), signal(rng)
    a[INF_ROW, 1, 0, 0] = np.inf
    path = tmp_path_factory.mktemp("inf") / "store.zarr"
    build(path, {(5, "a"): a, (5, "b"): b})
    return path


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_refuses_non_finite_features_in_one_line(inf_store, tmp_path, name):
    line = one_error_line(invoke(*command(name, inf_store, tmp_path / "out")))
    assert "array t5/a chunk 1 holds non-finite values (inf/NaN) for 1 images" in line  # FAILED_ROW's NaN: not counted
    assert not list(tmp_path.glob("out/**/*.json"))  # nothing saved


# -- incomplete runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def incomplete(tmp_path_factory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(1)
    a = signal(rng, strength=1.0)
    path = tmp_path_factory.mktemp("incomplete") / "store.zarr"
    build(path, {(5, "a"): a, (5, "b"): signal(rng)}, pending=(PENDING_CHUNK,))
    return path, a


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_refuses_an_incomplete_run_in_one_line(incomplete, tmp_path, name):
    line = one_error_line(invoke(*command(name, incomplete[0], tmp_path / "out")))
    assert f"is incomplete: 8 of {N} images pending; re-run the same `featurestore extract` to resume" in line
    assert "--allow-incomplete" in line


def test_knn_with_allow_incomplete_uses_only_the_extracted_images_and_says_so(incomplete, tmp_path):
    path, a = incomplete
    doc = strict_json(invoke(*command("knn", path, tmp_path / "out", "--pool", "1", "--allow-incomplete", "--json")).stdout)
    (run_id,) = doc["runs"]
    assert doc["runs"][run_id] == {"used": N - 8 - 1, "failed": 1, "pending": 8}
    # the same numbers, independently: rows extracted and not failed, a plain weighted vote (k=1, 3)
    split = np.array(images()["split"])
    labels = np.arange(N) % CLASSES
    usable = (np.arange(N) // CHUNK != PENDING_CHUNK) & (np.arange(N) != FAILED_ROW)
    train, test = np.flatnonzero(usable & (split == "train")), np.flatnonzero(usable & (split == "test"))
    assert (doc["train"], doc["test"]) == (len(train), len(test))
    x = a.astype(np.float64).mean(axis=(2, 3))  # --pool 1: the global average of each channel
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x[test] @ x[train].T
    for k in (1, 3):
        nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(test), CLASSES))
        for q in range(len(test)):
            for i in nearest[q]:
                votes[q, labels[train[i]]] += np.exp(sims[q, i] / 0.07)
        assert doc["top1"][str(k)] == pytest.approx(float((votes.argmax(1) == labels[test]).mean()), abs=1e-9)
    saved = strict_json(next((tmp_path / "out").glob("knn-*.json")).read_text())
    assert saved["runs"] == doc["runs"] and saved["settings"]["allow_incomplete"] is True
    text = invoke(*command("knn", path, tmp_path / "out", "--pool", "1", "--allow-incomplete")).output
    assert f"run {run_id}: {N - 9} of {N} images used, 1 failed (excluded), 8 pending" in text


def test_failed_images_are_counted_in_a_complete_run(tmp_path):
    rng = np.random.default_rng(2)
    build(tmp_path / "s.zarr", {(5, "a"): signal(rng)})
    result = invoke("probe", tmp_path / "s.zarr", "--block", "a", "--timestep", "5", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"{N - 1} of {N} images used, 1 failed (excluded)" in result.output and "pending" not in result.output


# -- CKA on constant features -------------------------------------------------------------------
def biased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA with the biased HSIC: |Yc^T Xc|_F^2 / (|Xc^T Xc|_F |Yc^T Yc|_F)."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_cka_with_a_constant_block_is_null_and_named_in_one_line(tmp_path):
    rng = np.random.default_rng(3)
    a, b = signal(rng), signal(rng)
    constant = np.full((N, 2, 1, 1), 0.5, np.float32)
    run_id = build(tmp_path / "s.zarr", {(5, "a"): a, (5, "b"): b, (5, "c"): constant})
    result = invoke("cka", tmp_path / "s.zarr", "--timestep", "5", "--pool", "1", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[4].split() == ["c", "n/a", "n/a", "n/a"]  # rows a, b, c of the unbiased matrix after its header
    named = [line for line in lines if "constant features" in line]
    assert named == [f"linear CKA undefined (null) for run {run_id} t5 block c: constant features "
                     f"(every one of the {N - 1} images has the same values)"]
    assert "nan" not in result.output.lower()
    (saved,) = (tmp_path / "out").glob("cka-*.json")
    doc = strict_json(saved.read_text())
    usable = np.arange(N) != FAILED_ROW
    for estimator in ("biased", "unbiased"):
        matrix = doc["matrices"][estimator]
        assert [row[2] for row in matrix] == [None] * 3 and matrix[2] == [None] * 3
    assert doc["matrices"]["biased"][0][1] == pytest.approx(  # --pool 1: the global average of each channel
        biased_cka(a[usable].mean(axis=(2, 3)), b[usable].mean(axis=(2, 3))), abs=1e-6)  # pooled in float32
    assert doc["undefined"] == named[0]

    # no pair of different blocks defined: refused with that line, nothing saved
    for blocks in ("c", "a,c"):
        line = one_error_line(invoke("cka", tmp_path / "s.zarr", "--timestep", "5", "--blocks", blocks,
                                     "--out", tmp_path / "refused"))
        assert f"run {run_id} t5 block c: constant features" in line
    assert not (tmp_path / "refused").exists()


def test_results_json_never_holds_nan(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json({"top1": float("nan")}, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


# -- results files ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_stores(tmp_path_factory) -> tuple[Path, str, Path, str]:
    """stores/a.zarr and stores/b.zarr, two different runs in one folder."""
    folder = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(4)
    run_a = build(folder / "a.zarr", {(5, "a"): signal(rng)}, name="a")
    run_b = build(folder / "b.zarr", {(5, "a"): signal(rng)}, name="b")
    return folder / "a.zarr", run_a, folder / "b.zarr", run_b


def test_settings_that_change_the_numbers_get_their_own_file(two_stores):
    store, run_id, _, _ = two_stores
    knn = ["knn", store, "--block", "a", "--timestep", "5", "--k", "1,3", "--json"]
    pool4 = strict_json(invoke(*knn, "--pool", "4").stdout)
    pool1 = strict_json(invoke(*knn, "--pool", "1").stdout)
    again = strict_json(invoke(*knn, "--pool", "1").stdout)
    folder = Path(f"{store}.results")  # the store's own results folder
    files = sorted(folder.glob(f"knn-{run_id}-t5-a-*.json"))
    assert len(files) == 2  # pool 4 and pool 1; the same settings again replaced their own file
    assert sorted(strict_json(f.read_text())["settings"]["pool"] for f in files) == [1, 4]
    assert pool1 == again
    assert (pool4["features"], pool1["features"]) == (16, 4)  # pool 4 leaves the 2x2 maps alone
    assert not (store.parent / "results").exists()


def test_the_logistic_probe_saves_its_result(two_stores, tmp_path):
    store, run_id, _, _ = two_stores
    printed = strict_json(invoke("probe", store, "--block", "a", "--timestep", "5", "--pool", "1",
                                 "--out", tmp_path, "--json").stdout)
    (saved,) = tmp_path.glob(f"probe-logistic-{run_id}-t5-a-*.json")
    assert strict_json(saved.read_text()) == printed and 0 <= printed["top1"] <= 1
    assert printed["settings"]["c"] == 1.0 and printed["runs"][run_id]["failed"] == 1


def test_report_shows_only_its_own_stores_results(two_stores, tmp_path):
    store_a, run_a, store_b, run_b = two_stores
    shared = tmp_path / "shared-results"
    for store in (store_a, store_b):
        assert invoke("knn", store, "--block", "a", "--timestep", "5", "--k", "3", "--out", shared).exit_code == 0
    (file_b,) = shared.glob(f"knn-{run_b}-*.json")
    result = invoke("report", store_a, "--results", shared, "--out", tmp_path / "a.html", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["results"] == 1 and doc["skipped"] == [
        {"file": file_b.name, "why": f"another store's: run(s) {run_b} are not in this store"}]
    page = (tmp_path / "a.html").read_text()
    assert f"knn-{run_a}-" in page and "another store&#x27;s" in page and page.count(run_b) == 2  # skipped table only


# -- options that would give numbers without meaning ----------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["knn", "--block", "a", "--timestep", "5", "--k", "3", "--temperature", "0"], "--temperature must be positive"),
    (["knn", "--block", "a", "--timestep", "5", "--k", "3", "--temperature", "-0.07"], "--temperature must be positive"),
    (["sweep", "--temperature", "0"], "--temperature must be positive"),
    (["fewshot", "--head", "knn", "--shots", "1", "--seeds", "0", "--temperature", "0"], "--temperature must be positive"),
    (["knn", "--block", "a", "--timestep", "5", "--k", "3", "--pool", "0"], "--pool takes a positive size, got 0"),
    (["probe", "--block", "a", "--timestep", "5", "--pool", "-1"], "--pool takes a positive size, got -1"),
    (["cka", "--timestep", "5", "--pool", "0"], "--pool takes a positive size, got 0"),
    (["probe", "--head", "linear", "--block", "a", "--timestep", "5", "--pool", "0"],
     "head sizes must be positive integers, got --pool 0"),
    (["probe", "--head", "mlp", "--block", "a", "--timestep", "5", "--hidden", "0"],
     "head sizes must be positive integers, got --hidden 0"),
])
def test_meaningless_vote_temperatures_and_pool_sizes_are_refused(two_stores, tmp_path, args, message):
    store = two_stores[0]
    line = one_error_line(invoke(args[0], store, *args[1:], "--out", tmp_path / "out"))
    assert message in line
    assert not (tmp_path / "out").exists()


def test_allow_incomplete_without_test_images_names_the_splits_of_the_usable_images(tmp_path):
    """Chunk 0 (all the test images) pending, chunk 1 (train) done: the refusal names the splits of
    the images that can be used, not of every image (before: "found: test, train")."""
    store = FeatureStore.open(str(tmp_path / "s.zarr"), mode="a")
    ids = [f"img{i}" for i in range(16)]
    rows = store.add_images("synthetic", {"id": ids, "label": [i % 2 for i in range(16)],
                                          "class_name": [f"c{i % 2}" for i in range(16)],
                                          "split": ["test"] * 8 + ["train"] * 8, "domain": ["photo"] * 16, "source": ids})
    run = store.create_run({"name": "half"}, arrays={"a": (2, 1, 1)}, timesteps=[5], rows=rows, chunk_rows=8,
                           dtype="float32", provenance={})
    run.write_chunk(1, {(5, "a"): np.ones((8, 2, 1, 1), np.float32)}, np.zeros(8, bool), [""] * 8)
    line = one_error_line(invoke("knn", tmp_path / "s.zarr", "--block", "a", "--timestep", "5", "--k", "1",
                                 "--allow-incomplete", "--out", tmp_path / "out"))
    assert "(they are in: train)" in line


def test_report_marks_results_computed_on_an_incomplete_run(incomplete, tmp_path):
    path = incomplete[0]
    out = tmp_path / "out"
    assert invoke(*command("knn", path, out, "--allow-incomplete")).exit_code == 0
    result = invoke("report", path, "--results", out, "--out", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert (f"{N - 9} of {N} images used, 8 pending (computed on an incomplete run, with --allow-incomplete), "
            "1 failed (left out)") in page
