"""The HTML report: one self-contained file with the store summary and every result next to it."""

import base64
import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from featurestore.store import FeatureStore
from pipelines.analysis import results_dir, write_json
from pipelines.analysis.cka import cka_run, grid_views, save_cka
from pipelines.analysis.knn import knn_run
from pipelines.analysis.sweep import save_sweep, sweep_run
from pipelines.report.html import PNG_SIGNATURE, collect_report, render_html, write_report

EVIL = "<script>alert(1)</script>"


def write_run(store: FeatureStore, spec: dict, rows: np.ndarray, labels: np.ndarray, blocks: list[str],
              timesteps: list[int], rng: np.random.Generator, chunk_rows: int = 16) -> str:
    run = store.create_run(spec, arrays={b: (4, 2, 2) for b in blocks}, timesteps=timesteps, rows=rows,
                           chunk_rows=chunk_rows, dtype="float32", provenance={})
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        n = s.stop - s.start
        features = {}
        for t in timesteps:
            for b in blocks:
                x = rng.normal(size=(n, 4, 2, 2)).astype(np.float32)
                x[np.arange(n), labels[s], 0, 0] += 3.0  # class k lights up channel k
                features[(t, b)] = x
        run.write_chunk(c, features, np.zeros(n, bool), [""] * n)
    run.record_session({"chunks": run.n_chunks, "seconds": {"read": 0.1, "compute": 1.25, "write": 0.2, "total": 1.55}})
    return run.run_id


@pytest.fixture(scope="module")
def store_with_results(tmp_path_factory):
    """Two runs, a sweep, a CKA, a kNN result, an extra sweep JSON without plots and a malformed file."""
    path = tmp_path_factory.mktemp("report") / "store.zarr"
    rng = np.random.default_rng(0)
    n = 48
    labels = rng.integers(0, 3, n)
    ids = [f"img{i}" for i in range(n)]
    store = FeatureStore.open(str(path), mode="a")
    rows = store.add_images("toy", {
        "id": ids, "label": labels, "class_name": [EVIL if l == 0 else f"c{l}" for l in labels],
        "split": ["train", "test"] * (n // 2), "domain": ["x"] * n, "source": ids,
    })
    first = write_run(store, {"backbone": "tiny", "dataset": "toy", "weights_digest": "sha256:" + "ab" * 32},
                      rows, labels, ["b0", "b1"], [5, 50], rng)
    second = write_run(store, {"backbone": "other", "dataset": "toy"}, rows, labels, ["b0"], [5], rng)
    out = results_dir(str(path), None)
    sweep = sweep_run(store, first, pool=None, knn_k=5)
    sweep_json = save_sweep(sweep, out)[0]
    cka = cka_run(*grid_views(store, "blocks", first, timestep=5), "blocks", pool=None)
    save_cka(cka, out)
    knn = knn_run(store, second, 5, "b0", [5], pool=None)
    write_json({**knn.to_dict(), "note": "</pre>" + EVIL}, out / f"knn-{second}-t5-b0.json")
    (out / "copied").mkdir()
    shutil.copy(sweep_json, out / "copied" / "sweep-copy.json")  # no plots beside it: drawn
    (out / "broken.json").write_text('{"rows": [1, 2')
    return path, [first, second], sweep, cka


def test_report_is_one_self_contained_escaped_page(store_with_results, tmp_path):
    path, run_ids, sweep, cka = store_with_results
    summary = write_report(str(path), tmp_path / "page" / "report.html")
    assert [p.name for p in (tmp_path / "page").iterdir()] == ["report.html"]
    page = (tmp_path / "page" / "report.html").read_text()

    assert 'src="http' not in page and 'href="http' not in page and "url(" not in page
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 5  # the sweep's two plots, two drawn for the copied sweep, the CKA heatmap
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True).startswith(PNG_SIGNATURE)
    assert page.count("drawn from the JSON") == 2

    for run_id in run_ids:
        assert run_id in page
    assert "abababababab" in page and "compute 1.2 s" in page  # short weights digest, session timings
    for row in sweep.rows:
        for value in (row.linear_top1, row.knn_top1, row.knn_top5):
            assert f"{value:.3f}" in page
    for matrix in cka.matrices.values():
        for value in np.ravel(matrix):
            assert f"{value:.3f}" in page
    assert re.search(r"broken\.json.*not valid JSON", page, re.DOTALL)
    assert f"knn-{run_ids[1]}-t5-b0.json" in page and "top1 k=5" in page

    assert EVIL not in page
    assert html_escaped(EVIL) in page and html_escaped("</pre>" + EVIL) in page  # a class name; a JSON string
    assert summary.sections == ["store", "images", "sweeps", "cka", "results", "unreadable"]
    assert summary.results == 5


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_missing_results_folder_is_a_note(store_with_results, tmp_path):
    path, _, _, _ = store_with_results
    data = collect_report(str(path), tmp_path / "nothing-here")
    assert data.sections == ["store", "images"] and "No results folder" in render_html(data)


def test_cli_report_json(store_with_results, tmp_path):
    path, _, _, _ = store_with_results
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["out"] == str(out) and out.is_file() and doc["results"] == 5
    assert {"store", "sweeps", "cka", "results"} <= set(doc["sections"])
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "no-store.zarr")])
    assert missing.exit_code == 1 and "no feature store" in missing.output
