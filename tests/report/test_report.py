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
from pipelines.analysis.fewshot import FewshotConfig, fewshot_run, save_fewshot
from pipelines.analysis.knn import knn_run
from pipelines.analysis.retrieval import RetrievalConfig, Side, retrieve_run, save_results
from pipelines.analysis.sweep import save_sweep, sweep_run
from pipelines.heads.logistic import class_metrics, probe_run, save_probe
from pipelines.heads.probe import ProbeConfig, probe_heads
from pipelines.heads.training import TrainConfig, accuracy_metrics
from pipelines.report.html import render_html, write_report
from pipelines.report.plots import Curve, Panel, heatmap_figure
from pipelines.report.results import PNG_SIGNATURE, collect_report, heads_figures, heads_plot, sweep_plot

EVIL = "<script>alert(1)</script>"
CLASSES = 3


def write_run(store: FeatureStore, spec: dict, rows: np.ndarray, labels: np.ndarray, blocks: list[str],
              timesteps: list[int | None], rng: np.random.Generator, chunk_rows: int = 16) -> str:
    run = store.create_run(spec, arrays={b: (4, 2, 2) for b in blocks}, timesteps=timesteps, rows=rows,
                           chunk_rows=chunk_rows, dtype="float32", provenance={})
    for c in range(run.n_chunks):
        s = run.chunk_slice(c)
        n = s.stop - s.start
        features = {}
        for t in timesteps:
            for b in blocks:
                x = rng.normal(size=(n, 4, 2, 2)).astype(np.float32)
                x[np.arange(n), labels[s], 0, 0] += 3.0 * (1 + blocks.index(b)) / (1 + (t or 0) / 50)  # class k lights up channel k
                features[(t, b)] = x
        run.write_chunk(c, features, np.zeros(n, bool), [""] * n)
    run.record_session({"chunks": run.n_chunks, "seconds": {"read": 0.1, "compute": 1.25, "write": 0.2, "total": 1.55}})
    return run.run_id


@pytest.fixture(scope="module")
def store_with_results(tmp_path_factory):
    """Two runs; results of every kind (sweep, CKA, kNN, logistic probe, trained heads, few-shot,
    retrieval), an extra sweep JSON in a subfolder, and a malformed file."""
    path = tmp_path_factory.mktemp("report") / "store.zarr"
    rng = np.random.default_rng(0)
    n = 48
    labels = rng.integers(0, CLASSES, n)
    ids = [f"img{i}" for i in range(n)]
    store = FeatureStore.open(str(path), mode="a")
    rows = store.add_images("toy", {
        "id": ids, "label": labels, "class_name": [EVIL if l == 0 else f"c{l}" for l in labels],
        "split": ["train", "test"] * (n // 2), "domain": ["sketch", "sketch", "photo", "photo"] * (n // 4), "source": ids,
    })
    first = write_run(store, {"backbone": "tiny", "dataset": "toy", "weights_digest": "sha256:" + "ab" * 32},
                      rows, labels, ["b0", "b1"], [5, 50], rng)
    second = write_run(store, {"backbone": "other", "dataset": "toy"}, rows, labels, ["b0"], [5], rng)
    out = results_dir(str(path), None)
    sweep = sweep_run(store, first, pool=None, knn_k=5)
    sweep_json = save_sweep(sweep, out, store)[0]
    cka = cka_run(*grid_views(store, "blocks", first, timestep=5), "blocks", pool=None)
    save_cka(cka, out)
    knn = knn_run(store, second, 5, "b0", [5, 10], pool=None)
    write_json({**knn.to_dict(), "note": "</pre>" + EVIL}, out / f"knn-{second}-t5-b0.json")
    probe = probe_run(store, first, 50, "b1", pool=None)
    save_probe(probe, out)
    heads = probe_heads(store, ProbeConfig("linear", ["b0"], [5], lrs=[1e-2, 1e-1], run_id=first,
                                           train=TrainConfig(epochs=2, batch_size=16, patience=0)), out)
    fewshot = fewshot_run(store, FewshotConfig(head="knn", shots=[1, 2, 4], seeds=[0, 1], run_id=first, timesteps=[5],
                                               blocks=["b0", "b1"], pool=None))
    save_fewshot(fewshot, out)
    retrieval = retrieve_run(store, RetrievalConfig(Side(first, 5, "b1", "sketch"), Side(first, 5, "b1", "photo"),
                                                    pool=None, map_at=(None, 5), precision_at=(3,)))
    save_results(retrieval, out, None)
    (out / "copied").mkdir()
    shutil.copy(sweep_json, out / "copied" / "sweep-copy.json")
    (out / "broken.json").write_text('{"rows": [1, 2')
    results = {"sweep": sweep, "cka": cka, "knn": knn, "probe": probe, "heads": heads, "fewshot": fewshot,
               "retrieve": retrieval}
    return path, [first, second], results


@pytest.fixture(scope="module")
def page(store_with_results, tmp_path_factory):
    path, _, _ = store_with_results
    out = tmp_path_factory.mktemp("page") / "report.html"
    summary = write_report(str(path), out)
    return out.read_text(), summary


def test_report_is_one_self_contained_escaped_page(store_with_results, page):
    _, run_ids, results = store_with_results
    text, summary = page

    assert not re.search(r'(src|href)\s*=\s*"?(https?:)?//', text) and "url(" not in text
    assert "<link" not in text and not re.search(r"<script[^>]*\bsrc", text)
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', text))
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 7  # two sweeps x (vs t, vs block), the CKA heatmap, the few-shot curve, heads per epoch
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True).startswith(PNG_SIGNATURE)

    for run_id in run_ids:
        assert run_id in text
    assert "abababababab" in text and "compute 1.2 s" in text  # short weights digest, session timings
    for row in results["sweep"].rows:
        for value in (row.linear_top1, row.knn_top1, row.knn_top5):
            assert f"{value:.3f}" in text
    for matrix in results["cka"].matrices.values():
        for value in np.ravel(matrix):
            assert f"{value:.3f}" in text
    for k in (5, 10):
        assert f"{results['knn'].top1[k]:.3f}" in text and f"{results['knn'].top5[k]:.3f}" in text
    assert re.search(r"broken\.json.*not valid JSON", text, re.DOTALL)

    assert EVIL not in text
    assert html_escaped(EVIL) in text and html_escaped("</pre>" + EVIL) in text  # a class name; a JSON string
    assert summary.sections == ["store", "images", "all", "sweeps", "cka", "probes", "knn", "fewshot", "retrieval",
                                "unreadable"]
    assert summary.results == 9  # 8 shown (two sweeps), 1 unreadable


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def headings(text: str) -> list[str]:
    return [re.sub(r"<[^>]+>", " ", h) for h in re.findall(r"<h3[^>]*>(.*?)</h3>", text, re.DOTALL)]


def test_titles_name_backbone_dataset_t_and_block(store_with_results, page):
    _, run_ids, _ = store_with_results
    found = headings(page[0])
    expected = {  # a word of the kind -> what the title must name
        "sweep": ["tiny on toy", f"run {run_ids[0][:8]}", "2 timesteps x 2 blocks"],
        "linear CKA": ["tiny on toy", "blocks grid", "t=5"],
        "linear probe": ["tiny on toy", "t=50", "b1"],
        "weighted kNN": ["other on toy", "t=5", "b0"],
        "trained heads": ["tiny on toy"],
        "few-shot": ["tiny on toy"],
        "retrieval": ["sketch", "photo", "tiny on toy", "t=5", "b1"],
    }
    for kind, words in expected.items():
        titles = [h for h in found if h.startswith(kind)]
        assert titles, (kind, found)
        for title in titles:
            assert all(w in title for w in words), (title, words)


def sweep_lines(data, by: str, t_axis: str = "log"):
    """The matplotlib figure of the first sweep, against t or block, and the Line2D objects of its first panel."""
    item = data.of(["sweep"])[0]
    fig = sweep_plot(item.value, data.runs[item.value.run_id], by, t_axis)
    return item.value, fig, fig.axes[0].get_lines()


def test_sweep_plot_has_chance_line_best_point_and_labels(store_with_results, page):
    path, _, _ = store_with_results
    text = page[0]
    data = collect_report(str(path), results=results_dir(str(path), None) / "copied")
    sweep, fig, lines = sweep_lines(data, "timestep")
    assert "tiny on toy" in fig._suptitle.get_text() and fig.axes[0].get_xlabel() == "timestep t (symlog scale)"
    assert fig.axes[0].get_xscale() == "symlog" and fig.axes[0].get_ylabel() == "top-1 accuracy (test)"

    chance = [line for line in lines if line.get_label().startswith("chance")]
    assert len(chance) == 1 and np.allclose(chance[0].get_ydata(), 1 / CLASSES)
    assert chance[0].get_label() == "chance 1/3 = 0.333" and "chance 1/3 = 0.333 (dashed line)" in text
    assert "top-1 vs t (symlog t axis)" in text  # the default

    best_row = max(sweep.rows, key=lambda r: r.linear_top1)  # independent argmax over the sweep's rows
    best = [line for line in lines if line.get_label().startswith("best")]
    assert len(best) == 1
    assert (best[0].get_xdata()[0], best[0].get_ydata()[0]) == (best_row.timestep, best_row.linear_top1)
    assert f"best {best_row.linear_top1:.3f} (t={best_row.timestep}, {best_row.block})" == best[0].get_label()
    assert f"best linear probe {best_row.linear_top1:.3f} at t={best_row.timestep}, {best_row.block}" in text

    _, fig, lines = sweep_lines(data, "block")
    assert fig.axes[0].get_xlabel() == "block" and [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["b0", "b1"]
    best = [line for line in lines if line.get_label().startswith("best")][0]
    assert best.get_ydata()[0] == best_row.linear_top1 and best.get_xdata()[0] == ["b0", "b1"].index(best_row.block)

    _, fig, _ = sweep_lines(data, "timestep", "linear")
    assert fig.axes[0].get_xscale() == "linear" and fig.axes[0].get_xlabel() == "timestep t"
    with pytest.raises(ValueError, match="--t-axis takes log or linear"):
        collect_report(str(path), t_axis="loglog")


def test_heads_plot_marks_the_head_chosen_on_validation(store_with_results):
    path, run_ids, results = store_with_results
    doc = results["heads"]
    chosen = next(h for h in doc["heads"] if h["name"] == doc["best_head"])
    info = collect_report(str(path), results=results_dir(str(path), None) / "copied").runs[run_ids[0]]
    panel = Panel("", [Curve(h["name"], [(r["epoch"], r["val_top1"]) for r in h["epoch_log"]]) for h in doc["heads"]])
    fig = heads_plot(doc, info, panel)
    best = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("best")][0]
    assert (best.get_xdata()[0], best.get_ydata()[0]) == (chosen["best_epoch"], chosen["val_top1"])
    assert best.get_label() == f"best {chosen['val_top1']:.3f} (epoch {chosen['best_epoch']}, {chosen['name']})"
    assert heads_figures({**doc, "heads": [{**h, "epoch_log": None} for h in doc["heads"]]}, info) == []  # older files


def test_cka_heatmap_scale_fits_the_data_and_marks_undefined_cells():
    matrix = [[1.0, 0.82, None], [0.82, 1.0, None], [None, None, None]]
    fig = heatmap_figure("t", {"unbiased": matrix}, ["a", "b", "c"], ["a", "b", "c"], "linear CKA")
    image = fig.axes[0].get_images()[0]
    assert image.get_clim() == (0.82, 1.0)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "linear CKA (unbiased)"  # the colour bar
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("n/a") == 5 and texts.count("0.82") == 2


def test_tables_for_fewshot_retrieval_and_probes(store_with_results, page):
    _, _, results = store_with_results
    text = page[0]
    fewshot = results["fewshot"]
    assert all(f"<th>{k}-shot</th>" in text for k in (1, 2, 4))
    for c in fewshot.classifiers:
        assert f">{c.name}<" in text
        for s in c.scores:
            assert f"{s.mean:.3f} ± {s.std:.3f}" in text

    retrieval = results["retrieve"]
    for name, metric in retrieval.metrics.items():
        variant = ", ".join(f"{k}={v}" for k, v in metric.items() if k != "value" and v is not None)
        assert re.search(rf"<td>{re.escape(name)}</td><td class=\"num\">{metric['value']:.3f}</td><td>{re.escape(variant)}</td>",
                         text), name
    assert "ap=noninterp, normalisation=min, average=queries" in text and "denominator=k, average=queries" in text

    probe = results["probe"]
    assert f"{probe.top1:.3f}" in text and "per-class top-1 (test)" in text
    for name, value in probe.per_class.items():
        assert f"<td>{html_escaped(name)}</td>" in text and f"{value:.3f}" in text
    heads = results["heads"]
    for head in heads["heads"]:
        assert head["name"] in text and f"{head['top1']:.3f}" in text
    assert f"{heads['best_head']} (best on validation)" in text


def confusion_tables(text: str) -> list[np.ndarray]:
    """Every confusion matrix of the page, read back from its HTML cells."""
    out = []
    for body in re.findall(r'<table class="grid confusion">.*?<tbody>(.*?)</tbody>', text, re.DOTALL):
        rows = re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)
        out.append(np.array([[int(v) for v in re.findall(r'<td class="num"[^>]*>(\d+)</td>', r)] for r in rows]))
    return out


def test_confusion_matrix_equals_an_independent_computation(store_with_results, page):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import confusion_matrix

    path, run_ids, results = store_with_results
    probe = results["probe"]
    run = FeatureStore.open(str(path)).run(run_ids[0])
    split, labels = run.images.split, run.labels
    x = np.asarray(run.array(50, "b1")[:]).reshape(len(run), -1).astype(np.float64)
    train, test = split == "train", split == "test"
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-6
    predicted = LogisticRegression(max_iter=1000).fit((x[train] - mean) / std, labels[train]).predict((x[test] - mean) / std)
    expected = confusion_matrix(labels[test], predicted, labels=range(CLASSES))

    assert np.array_equal(probe.confusion, expected)
    assert np.trace(expected) / expected.sum() == pytest.approx(probe.top1)
    for c, name in enumerate(probe.classes):
        assert probe.per_class[name] == pytest.approx(expected[c, c] / expected[c].sum())
    best = next(h for h in results["heads"]["heads"] if h["name"] == results["heads"]["best_head"])
    assert np.trace(best["confusion"]) / np.sum(best["confusion"]) == pytest.approx(best["top1"])
    shown = confusion_tables(page[0])  # in file-name order: the trained heads' folder, then the logistic probe
    assert len(shown) == 2 and np.array_equal(shown[0], best["confusion"]) and np.array_equal(shown[1], expected)


def test_class_metrics_by_hand():
    labels = np.array([0, 0, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 2, 0, 2])
    got = class_metrics(labels, predicted, ["a", "b", "c", "d"])
    assert got["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert got["per_class"] == {"a": 0.5, "b": 1.0, "c": pytest.approx(2 / 3)}  # d has no images
    logits = np.eye(4)[predicted] + 0.1
    assert accuracy_metrics(logits, labels, ["a", "b", "c", "d"])["confusion"] == got["confusion"]


def test_sortable_table_has_a_row_per_results_file(store_with_results, page):
    path, _, _ = store_with_results
    text = page[0]
    table = re.search(r'<table class="sortable">.*?<tbody>(.*?)</tbody>', text, re.DOTALL).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.DOTALL)
    folder = results_dir(str(path), None)
    readable = [p for p in folder.rglob("*.json") if p.name != "broken.json"]
    assert len(rows) == len(readable) == 8
    names = sorted(re.search(r'<a href="#result-\d+">([^<]*)</a>', r).group(1) for r in rows)
    assert names == sorted(str(p.relative_to(folder)) for p in readable)
    assert all(re.search(r'data-sort="[0-9.]+"', r) for r in rows)  # every file here has a score to sort by
    assert 'querySelectorAll("table.sortable th")' in text


def test_missing_results_folder_is_a_note(store_with_results, tmp_path):
    path, _, _ = store_with_results
    data = collect_report(str(path), tmp_path / "nothing-here")
    assert data.sections == ["store", "images"] and "No results folder" in render_html(data)


def test_cli_report_json(store_with_results, tmp_path):
    path, _, _ = store_with_results
    out = tmp_path / "r.html"
    copied = results_dir(str(path), None) / "copied"  # one sweep: the command's wiring, not every kind again
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(out), "--results", str(copied), "--json",
                                      "--quiet", "--t-axis", "linear"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["out"] == str(out) and out.is_file() and doc["results"] == 1
    assert doc["sections"] == ["store", "images", "all", "sweeps"] and "top-1 vs t (linear t axis)" in out.read_text()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "no-store.zarr")])
    assert missing.exit_code == 1 and "no feature store" in missing.output
    bad = CliRunner().invoke(app, ["report", str(path), "--out", str(out), "--t-axis", "cubic"])
    assert bad.exit_code == 1 and "error: --t-axis takes log or linear, got 'cubic'" in bad.output


def test_a_run_with_corrupt_metadata_is_named_and_the_others_shown(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.array([0, 1] * 4)
    store = FeatureStore.open(str(tmp_path / "s.zarr"), mode="a")
    rows = store.add_images("toy", {"id": [f"i{i}" for i in range(8)], "label": labels,
                                    "class_name": [f"c{l}" for l in labels], "split": ["train", "test"] * 4,
                                    "domain": ["x"] * 8, "source": [f"i{i}" for i in range(8)]})
    good = write_run(store, {"backbone": "tiny", "dataset": "toy"}, rows, labels, ["b0"], [5], rng)
    bad = write_run(store, {"backbone": "tiny", "dataset": "toy", "seed": 1}, rows, labels, ["b0"], [5], rng)
    (tmp_path / "s.zarr" / "runs" / bad / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    text = render_html(collect_report(str(tmp_path / "s.zarr")))
    assert good in text and f"Run {bad} not shown: its metadata cannot be read" in text


def test_sweep_of_an_expert_run_saves_no_empty_plot_against_t(tmp_path):
    """An expert stores its features once, under t=None: its sweep has nothing to draw against t, so
    only the plot against the block is saved, drawn by the report's own figure code (chance line)."""
    rng = np.random.default_rng(1)
    n = 32
    labels = np.arange(n) % CLASSES
    store = FeatureStore.open(str(tmp_path / "store.zarr"), mode="a")
    rows = store.add_images("toy", {"id": [f"e{i}" for i in range(n)], "label": labels,
                                    "class_name": [f"c{l}" for l in labels], "split": ["train", "test"] * (n // 2),
                                    "domain": ["photo"] * n, "source": [f"e{i}" for i in range(n)]})
    run_id = write_run(store, {"backbone": "resnet", "dataset": "toy"}, rows, labels, ["layer3"], [None], rng)
    sweep = sweep_run(store, run_id, pool=None, knn_k=3)
    saved = save_sweep(sweep, tmp_path / "results", store)
    assert [p.suffix for p in saved] == [".json", ".csv", ".png"]
    assert saved[-1].name.endswith("-vs-block.png") and saved[-1].stat().st_size > 0
