"""`featurestore report`: the store summary and every result of that store, as one HTML page.

`pipelines/report/results.py` collects what is shown (`collect_report`); `render_html` turns it into
one self-contained page (inline CSS, a few lines of inline JavaScript that sort the table of every
result, every image a base64 data URI) that can be mailed or archived without the folder it came
from. Every string from the store or a JSON file is HTML-escaped. Numbers are tables: sweeps, CKA
matrices (n/a where undefined), few-shot (mean ± std), retrieval (every metric with its variant as
the results name it, per class), correspondence (PCK per map, alpha, threshold and average), kNN,
probes with per-class top-1 and the confusion matrix, and one table with a row per results file,
sorted by clicking a header.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store import timestep_text
from pipelines.analysis.cka import CkaResult
from pipelines.analysis.sweep import SweepResult
from pipelines.correspond.compute import AVERAGES, THRESHOLDS
from pipelines.correspond.runner import left_out_notes
from pipelines.report.results import (
    DEFAULT_T_AXIS,
    SECTIONS,
    SWEEP_METRICS,
    DatasetSummary,
    Figure,
    Loaded,
    ReportData,
    ReportSummary,
    Skipped,
    Unreadable,
    collect_report,
    headline,
    joined,
    pooling,
    variant_text,
)

CLASSES_SHOWN = 30
CONFUSION_MAX_CLASSES = 30  # a wider confusion matrix is listed by its largest confusions instead
CONFUSIONS_LISTED = 10
SETTINGS_SHOWN = 160  # characters of a result's settings in the table of every result (all of them on hover)
JSON_CHARS_SHOWN = 200_000  # a huge results file must not make the page unusable


# -- rendering -------------------------------------------------------------------------------------
class Html(str):
    """Markup that is already safe; every other value is escaped where it is put on the page."""


def esc(value: Any) -> Html:
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def fmt(value: Any) -> str:
    """Numbers as the page shows them: accuracies and CKA with three decimals."""
    if isinstance(value, float):
        return f"{value:.3f}"
    return "—" if value is None else str(value)


def tag(name: str, body: Any = "", **attrs: Any) -> Html:
    """`<name attrs>body</name>`; `class_` is written `class`, `data_sort` `data-sort`."""
    rendered = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items())
    return Html(f"<{name}{rendered}>{esc(body)}</{name}>")


def join(parts: Iterable[Any], sep: str = "") -> Html:
    return Html(sep.join(esc(p) for p in parts))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cell(value: Any) -> Html:
    if isinstance(value, Html) and value.startswith(("<td", "<th")):
        return value
    if is_number(value):
        return tag("td", fmt(value), class_="num")
    return tag("td", value if isinstance(value, Html) else fmt(value))


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], caption: str | None = None, grid: bool = False,
          class_: str = "") -> Html:
    """A bordered table; numbers are right-aligned and formatted by `fmt`, a ready `<td>`/`<th>` is kept.
    A `grid` (a matrix with labels in its first column) right-aligns every other cell. The caption is
    a line above the table, as wide as it needs (a `<caption>` would wrap at the table's width)."""
    head = tag("tr", join(tag("th", h) for h in headers))
    body = join(tag("tr", join(cell(v) for v in row)) for row in rows)
    inner = join([tag("thead", head), tag("tbody", body)])
    classes = " ".join(c for c in ("grid" if grid else "", class_) if c)
    out = tag("table", inner, class_=classes) if classes else tag("table", inner)
    return tag("div", join([tag("p", caption, class_="caption"), out])) if caption else out


def pivot(values: Mapping[tuple[int | None, str], float], caption: str) -> Html:
    """A row per timestep, a column per block, the best cell in bold."""
    timesteps = list(dict.fromkeys(t for t, _ in values))
    blocks = list(dict.fromkeys(b for _, b in values))
    best = max(values.values())

    def value(key: tuple[int | None, str]) -> Any:
        if key not in values:
            return "—"
        return tag("b", fmt(values[key])) if values[key] == best else values[key]

    rows = [[timestep_text(t), *(value((t, b)) for b in blocks)] for t in timesteps]
    return table(["t", *blocks], rows, caption, grid=True)


def image(figure: Figure) -> Html:
    uri = "data:image/png;base64," + base64.b64encode(figure.png).decode("ascii")
    caption = figure.title + (f" — {figure.note}" if figure.note else "")
    return tag("figure", join([Html(f'<img src="{uri}" alt="{esc(figure.title)}">'), tag("figcaption", caption)]))


def figures(items: Sequence[Figure]) -> Html:
    return tag("div", join(image(f) for f in items), class_="figures") if items else Html("")


def details(summary: str, doc: Any) -> Html:
    text = json.dumps(doc, indent=2, default=str)
    if len(text) > JSON_CHARS_SHOWN:
        text = text[:JSON_CHARS_SHOWN] + f"\n… ({len(text) - JSON_CHARS_SHOWN} more characters in the file)"
    return tag("details", join([tag("summary", summary), tag("pre", text)]))


def section(anchor: str, title: str, *parts: Any) -> Html:
    return tag("section", join([tag("h2", title), *parts]), id=anchor)


def when(stamp: str | None) -> str:
    """`2026-11-22T02:14:12+0000` as `2026-11-22 02:14:12+0000`, which wraps at the space in a narrow column."""
    return "—" if not stamp else str(stamp).replace("T", " ", 1)


def short_digest(digest: Any) -> str:
    return "—" if not digest else str(digest).removeprefix("sha256:")[:12]


def session_timings(sessions: Sequence[Mapping[str, Any]]) -> Html:
    """One line per extraction session: when it ended, its chunks, and seconds per phase."""
    lines = []
    for s in sessions:
        seconds = s.get("seconds") or {}
        phases = ", ".join(f"{k} {v:.1f} s" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in seconds.items())
        lines.append(f"{when(s.get('ended'))}: {s.get('chunks', '?')} chunks; {phases}")
    return join(tag("div", line) for line in lines) if lines else Html("—")


def render_store(doc: Mapping[str, Any]) -> Html:
    """The runs of `inspect_store`'s document as a table, each run's spec and provenance folded below."""
    rows = []
    for run in doc["runs"]:
        spec = run["spec"]
        digest = spec.get("weights_digest") or run["provenance"].get("backbone", {}).get("weights_digest")
        blocks = join(tag("div", f"{b} {'×'.join(map(str, chw))}", class_="nowrap") for b, chw in run["blocks"].items())
        rows.append([
            Html(tag("code", run["run_id"])), spec.get("backbone", "—"), spec.get("dataset", "—"),
            ", ".join(map(timestep_text, run["timesteps"])), blocks, run["done"], run["failed"], run["pending"],
            when(run["created"]), when(run["finished"]), Html(tag("code", short_digest(digest))), session_timings(run["sessions"]),
        ])
    headers = ["run", "backbone", "dataset", "timesteps", "blocks (C×H×W)", "done", "failed", "pending",
               "created", "finished", "weights", "sessions"]
    specs = join(details(f"run {run['run_id']}: spec and provenance",
                         {"spec": run["spec"], "provenance": run["provenance"], "failed_ids": run["failed_ids"]})
                 for run in doc["runs"])
    incomplete = doc.get("incomplete_runs") or []
    return section(
        "store", "Store",
        tag("p", join([tag("code", doc["store"]),
                       f" — {doc['images']} images, {len(doc['runs'])} run(s), format {doc['format_version']}"])),
        tag("div", table(headers, rows), class_="wide") if rows else tag("p", "No runs yet."),
        tag("p", f"Runs killed while being created (a re-run rebuilds them): {', '.join(incomplete)}",
            class_="note") if incomplete else "",
        join(tag("p", f"Run {run_id} not shown: its metadata cannot be read ({error}); featurestore verify "
                      "--repair removes it", class_="note") for run_id, error in (doc.get("broken_runs") or {}).items()),
        specs,
    )


def render_images(datasets: Sequence[DatasetSummary]) -> Html:
    def listing(values: Mapping[str, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in values.items())

    def classes(names: list[str]) -> str:
        more = len(names) - CLASSES_SHOWN
        return ", ".join(names[:CLASSES_SHOWN]) + (f" … and {more} more" if more > 0 else "")

    rows = [[d.name, d.images, listing(d.splits), listing(d.domains), len(d.classes), classes(d.classes)]
            for d in datasets]
    return section("images", "Images", table(["dataset", "images", "splits", "domains", "classes", "class names"], rows))


def images_used(runs: Any) -> Html | str:
    """A warning line for a result computed without some images of its runs (`runs`: run id ->
    {"used", "failed", "pending"}): pending ones mean a partial run (--allow-incomplete), whose
    numbers are not those of the whole run; failed ones were left out. Empty when all were used."""
    lines = [f"run {run_id}: {n['used']} of {n['used'] + n['failed'] + n['pending']} images used"
             + (f", {n['pending']} pending (computed on an incomplete run, with --allow-incomplete)" if n["pending"] else "")
             + (f", {n['failed']} failed (left out)" if n["failed"] else "")
             for run_id, n in (runs or {}).items() if n.get("pending") or n.get("failed")]
    return tag("p", "; ".join(lines), class_="note") if lines else ""


def anchor_of(data: ReportData, item: Loaded) -> str:
    return f"result-{data.loaded.index(item) + 1}"


def heading(data: ReportData, item: Loaded) -> Html:
    """A result's heading (what it is) with its file name, and the images-used warning."""
    return join([tag("h3", join([item.title, tag("span", item.name, class_="file")]), id=anchor_of(data, item)),
                 images_used(item.value.runs if isinstance(item.value, (SweepResult, CkaResult)) else item.value["runs"])])


def render_sweep(data: ReportData, item: Loaded) -> Html:
    s: SweepResult = item.value
    tables = [pivot({(r.timestep, r.block): getattr(r, metric) for r in s.rows}, caption)
              for metric, caption in zip(SWEEP_METRICS, ("linear probe top-1", f"kNN top-1 (k={s.knn_k})",
                                                         f"kNN top-5 (k={s.knn_k})"))]
    return join([heading(data, item),
                 tag("p", f"{len(s.rows)} (t, block) pairs in {s.seconds:.1f} s; kNN vote: {s.knn_vote}", class_="small"),
                 tag("div", join(tables), class_="tables"), figures(item.figures)])


def render_cka(data: ReportData, item: Loaded) -> Html:
    c: CkaResult = item.value
    tables = [table(["", *c.cols], ([r, *(Html(tag("td", "n/a", class_="na")) if v is None else v for v in row)]
                                    for r, row in zip(c.rows, matrix)), f"linear CKA ({estimator})", grid=True)
              for estimator, matrix in sorted(c.matrices.items(), key=lambda kv: kv[0] != "unbiased")]
    return join([heading(data, item), tag("p", f"{c.method} method, {c.images} images, {pooling(c.pool)}", class_="small"),
                 tag("p", c.undefined, class_="note") if c.undefined else "",
                 figures(item.figures), tag("div", join(tables), class_="tables")])


def per_class_table(classes: Sequence[str], columns: Mapping[str, Mapping[str, float]],
                    confusion: Sequence[Sequence[int]] | None) -> Html:
    """Per-class top-1, a column per classifier (`columns`: name -> {class: top-1}), with the test
    images per class (a confusion row's sum) when a confusion matrix is given."""
    counts_ = [sum(row) for row in confusion] if confusion is not None else None
    rows = []
    for i, name in enumerate(classes):
        if not any(name in col for col in columns.values()):
            continue  # no test image of this class
        rows.append([name, *([counts_[i]] if counts_ else []), *(col.get(name) for col in columns.values())])
    headers = ["class", *(["test images"] if counts_ else []), *(f"top-1 {n}" if n else "top-1" for n in columns)]
    return table(headers, rows, "per-class top-1 (test)", grid=True)


def confusion_table(classes: Sequence[str], confusion: Sequence[Sequence[int]], caption: str) -> Html:
    """The confusion matrix as a table (rows: true class, columns: predicted), each cell shaded by
    its share of the row; for more than CONFUSION_MAX_CLASSES classes, its largest confusions."""
    m = np.asarray(confusion, dtype=np.int64)
    if len(classes) > CONFUSION_MAX_CLASSES:
        off = m.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(-off, axis=None, kind="stable")[:CONFUSIONS_LISTED]
        rows = [[classes[i], classes[j], int(off[i, j])] for i, j in zip(*np.unravel_index(order, m.shape)) if off[i, j]]
        return table(["true class", "predicted", "images"], rows,
                     f"{caption}: the {CONFUSIONS_LISTED} largest confusions ({len(classes)} classes; "
                     "the whole matrix is in the JSON)")
    shares = m / np.maximum(m.sum(axis=1, keepdims=True), 1)

    def shaded(i: int, j: int) -> Html:
        alpha = 0.85 * shares[i, j]
        colour = "9,105,218" if i == j else "207,34,46"
        style = f"background: rgba({colour},{alpha:.2f})" + ("; color: #fff" if alpha > 0.5 else "")
        return tag("td", int(m[i, j]), class_="num", style=style, title=f"true {classes[i]}, predicted {classes[j]}")

    rows = [[Html(tag("th", name)), *(shaded(i, j) for j in range(len(classes)))] for i, name in enumerate(classes)]
    return table(["true \\ predicted", *classes], rows, caption, grid=True, class_="confusion")


def class_parts(doc: Mapping[str, Any], classes: Sequence[str], columns: Mapping[str, Mapping[str, float]],
                what: str) -> list[Html]:
    """Per-class table and confusion matrix of a probe result, or a note when it predates them."""
    if "confusion" not in doc:
        return [tag("p", "No per-class top-1 or confusion matrix in this results file (written by an older "
                         "version): run the probe again to get them.", class_="note")]
    return [tag("div", join([per_class_table(classes, columns, doc["confusion"]),
                             confusion_table(classes, doc["confusion"], f"confusion matrix of {what} "
                                             "(rows: true class, columns: predicted; test images)")]),
                class_="tables")]


def render_probe(data: ReportData, item: Loaded) -> Html:
    d = item.value
    numbers_ = table(["top-1 (test)", "top-1 (train)", "features", "train images", "test images", "pool", "C"],
                     [[d["top1"], d["train_top1"], d["features"], d["train"], d["test"],
                       "none" if d["pool"] is None else f"{d['pool']}x{d['pool']}", fmt((d.get("settings") or {}).get("c"))]])
    chance = f"chance 1/{len(d['classes'])} = {1 / len(d['classes']):.3f}" if d.get("classes") else ""
    return join([heading(data, item), numbers_, tag("p", chance, class_="small") if chance else "",
                 *class_parts(d, d.get("classes", []), {"": d.get("per_class", {})}, "the probe")])


def render_heads(data: ReportData, item: Loaded) -> Html:
    d = item.value
    rows = []
    for h in d["heads"]:
        name = tag("b", h["name"] + " (best on validation)") if h["name"] == d["best_head"] else h["name"]
        rows.append([name, h["kind"], h["lr"], joined(f"t={timestep_text(t)} {b}" for t, b in h["keys"]), h["top1"],
                     h["top5"], h.get("val_top1"), f"{h.get('best_epoch', '—')} of {h.get('epochs', '—')}"])
    images = d["images"]
    best = next(h for h in d["heads"] if h["name"] == d["best_head"])
    parts = [heading(data, item),
             tag("p", f"{images['train']} train / {images['val']} validation / {images['test']} test images; "
                      f"{d['epochs_run']} epochs, {d['seconds_per_epoch']:.2f} s per epoch; "
                      f"chance 1/{len(d['classes'])} = {1 / len(d['classes']):.3f}", class_="small"),
             table(["head", "kind", "lr", "maps", "top-1 (test)", "top-5 (test)", "top-1 (validation)", "best epoch"],
                   rows)]
    columns = {h["name"]: h.get("per_class", {}) for h in d["heads"]}  # every head's; the best head's confusion
    return join([*parts, figures(item.figures),
                 *class_parts(best, d["classes"], columns, f"the best head, {best['name']}")])


def render_knn(data: ReportData, item: Loaded) -> Html:
    d = item.value
    rows = [[k, d["top1"][k], d["top5"].get(k)] for k in d["top1"]]
    return join([heading(data, item),
                 table(["k", "top-1 (test)", "top-5 (test)"], rows,
                       f"{d['train']} train / {d['test']} test images, {d['features']} features "
                       f"({pooling(d['pool'])}), temperature {d['temperature']}"),
                 tag("p", f"vote: {d.get('vote', '—')}", class_="small")])


def render_fewshot(data: ReportData, item: Loaded) -> Html:
    d = item.value
    shots = sorted({s["shots"] for c in d["classifiers"] for s in c["scores"]})
    rows = []
    for c in d["classifiers"]:
        by_shots = {s["shots"]: s for s in c["scores"]}
        rows.append([c["name"], joined(f"t={timestep_text(t)} {b}" for t, b in c["keys"]),
                     *(Html(tag("td", f"{by_shots[k]['mean']:.3f} ± {by_shots[k]['std']:.3f}", class_="num",
                                data_sort=by_shots[k]["mean"])) if k in by_shots else "—" for k in shots)])
    caption = (f"top-1 on {d['test']} test images, mean ± std (ddof {d['std_ddof']}) over seeds "
               f"{', '.join(map(str, d['seeds']))}; shots drawn from {d['train_pool']} train images, {d['classes']} classes")
    return join([heading(data, item), table(["classifier", "maps", *(f"{k}-shot" for k in shots)], rows, caption),
                 figures(item.figures)])


def render_retrieve(data: ReportData, item: Loaded) -> Html:
    d = item.value
    metrics = table(["metric", "value", "variant"],
                    [[name, m["value"], variant_text(m)] for name, m in d["metrics"].items()],
                    f"{d['query']['images']} queries, {d['gallery']['images']} gallery images, {len(d['classes'])} classes, "
                    f"{d['features']} features")
    names = list(d["metrics"])
    per_class = table(["class", *names], [[c, *(v.get(n) for n in names)] for c, v in d["per_class"].items()],
                      "per class (mean over the class's queries)", grid=True)
    variants = tag("details", join([tag("summary", "what the variants mean"),
                                    table(["variant", "value", "meaning"],
                                          [[k, v, meaning] for k, options in (d.get("variants") or {}).items()
                                           for v, meaning in options.items()])]))
    projection = tag("p", f"trained projection: {json.dumps(d['projection'], default=str)}", class_="small") \
        if d.get("projection") else ""
    grid_note = tag("p", d["grid_note"], class_="note") if d.get("grid_note") else ""
    return join([heading(data, item), tag("div", join([metrics, per_class]), class_="tables"), variants, projection,
                 grid_note, figures(item.figures)])


def render_correspond(data: ReportData, item: Loaded) -> Html:
    """A correspondence result: how the matches were made, then PCK over all its pairs as a row per
    (t, block, threshold, average) and a column per alpha (n/a where a threshold is undefined; per
    category in the JSON), what was left out, and what the variants mean."""
    d = item.value
    alphas = [str(a) for a in d["alphas"]]
    rows = []
    for m in d["maps"]:
        for threshold in THRESHOLDS:
            scores = m["pck"]["overall"][threshold]
            for average in AVERAGES:
                values = ([Html(tag("td", f"n/a (no {threshold})", class_="na"))] * len(alphas) if scores is None
                          else [scores[average][a] for a in alphas])
                rows.append([timestep_text(m["timestep"]), m["block"], threshold, average, *values])
    caption = (f"PCK@α over {d['pairs']['scored']} of {d['pairs']['listed']} pairs ({d['points']['scored']} points); "
               f"{d['variants']['correct']}")
    notes = left_out_notes(d["pairs"], d["points"], d.get("blocks_left_out", ()))
    variants = tag("details", join([tag("summary", "what the variants mean"), table(
        ["variant", "value", "meaning"], [[kind, name, meaning] for kind in ("thresholds", "averages")
                                          for name, meaning in d["variants"][kind].items()])]))
    return join([heading(data, item),
                 tag("p", f"{d['dataset']}, geometry {d['geometry']}; upsample {d['upsample']}: {d['method']}",
                     class_="small"),
                 table(["t", "block", "threshold", "average", *(f"PCK@{a}" for a in alphas)], rows, caption),
                 tag("p", "left out: " + "; ".join(notes), class_="note") if notes else "", variants])


def render_other(data: ReportData, item: Loaded) -> Html:
    numbers_ = headline(item.value)
    return join([heading(data, item),
                 table(list(numbers_), [list(numbers_.values())]) if numbers_ else
                 tag("p", "No headline numbers recognised in this file; its content is below.", class_="note"),
                 figures(item.figures)])


def render_dense(data: ReportData, item: Loaded) -> Html:
    """A dense result: a row per head with its metrics, the metric per (t, block) as a table when
    the heads read one map each, per-class IoU (segmentation), the heatmap and the examples."""
    d = item.value
    if d["task"] == "depth":
        metrics = {"abs_rel": "AbsRel", "rmse": "RMSE", "log10": "log10", "delta1": "δ<1.25", "delta2": "δ<1.25²",
                   "delta3": "δ<1.25³"}
    elif d["task"] == "openvocab":
        metrics = {"miou_seen": "mIoU seen", "miou_unseen": "mIoU unseen", "harmonic": "harmonic mean", "miou": "mIoU"}
    else:
        metrics = {"miou": "mIoU", "pixel_accuracy": "pixel accuracy"}
    rows = [[h["name"], joined(f"t={timestep_text(t)} {b}" for t, b in h["keys"]), *(h[k] for k in metrics)]
            for h in d["heads"]]
    images = d["images"]
    parts = [heading(data, item),
             tag("p", f"{images['train']} train / {images['test']} test images; {d['training']}; "
                      f"targets at {d['target_size']} x {d['target_size']}", class_="small"),
             table(["head", "maps", *metrics.values()], rows, "test metrics")]
    key = next(iter(metrics)) if d["task"] != "openvocab" else "harmonic"
    single = {(h["keys"][0][0], h["keys"][0][1]): h[key] for h in d["heads"] if len(h["keys"]) == 1 and h[key] is not None}
    if len(single) > 1:
        parts.append(pivot(single, f"{metrics[key]} per (t, block)"))
    first = d["heads"][0]
    parts.append(tag("p", f"variant: {variant_of(first)}", class_="small"))
    if d["task"] != "depth":
        per_class = [[c, *(h["per_class_iou"].get(c) for h in d["heads"])] for c in d["classes"]]
        parts.append(table(["class", *(h["name"] for h in d["heads"])], per_class,
                           "per-class IoU (test; — where undefined: the class is in neither prediction nor "
                           "ground truth, and left out of the mean)", grid=True))
    return join([*parts, figures(item.figures)])


def variant_of(head: Mapping[str, Any]) -> str:
    variant = head.get("variant")
    return "; ".join(f"{k}: {v}" for k, v in variant.items()) if isinstance(variant, dict) else str(variant)


RENDERERS: dict[str, Callable[[ReportData, Loaded], Html]] = {
    "sweep": render_sweep, "cka": render_cka, "probe": render_probe, "heads": render_heads, "knn": render_knn,
    "fewshot": render_fewshot, "retrieve": render_retrieve, "dense": render_dense,
    "correspond": render_correspond, "other": render_other,
}


def render_kind(data: ReportData, anchor: str) -> Html:
    title, _, kinds = SECTIONS[anchor]
    return section(anchor, title, *(join([RENDERERS[item.kind](data, item), details("the whole file", item.value.to_dict()
                                          if isinstance(item.value, (SweepResult, CkaResult)) else item.value)])
                                    for item in data.of(kinds)))


def render_all(data: ReportData) -> Html:
    """Every result in one table, sorted by clicking a header (SORT_JS)."""
    rows = []
    for item in data.loaded:
        e = item.entry
        runs = join((tag("div", join([tag("code", r[:8]), f" {data.runs[r].backbone} / {data.runs[r].dataset}"]),
                         class_="nowrap") for r in e.runs))
        settings = e.settings if len(e.settings) <= SETTINGS_SHOWN else e.settings[:SETTINGS_SHOWN] + " …"
        rows.append([e.command, Html(tag("td", tag("a", item.name, href=f"#{anchor_of(data, item)}"), class_="file")),
                     runs, e.timesteps, e.blocks, Html(tag("td", settings, class_="settings", title=e.settings)), e.metric,
                     Html(tag("td", fmt(e.score), class_="num", data_sort="" if e.score is None else f"{e.score:.6f}"))])
    headers = ["command", "file", "run", "t", "block", "settings", "score is", "score"]
    return section("all", "Every result",
                   tag("p", "Click a header to sort by it (again to reverse).", class_="small"),
                   tag("div", table(headers, rows, class_="sortable"), class_="wide"))


def render_unreadable(unreadable: Sequence[Unreadable]) -> Html:
    return section("unreadable", "Results files not shown",
                   table(["file", "note"], [[Html(tag("code", u.name)), u.note] for u in unreadable]))


def render_skipped(skipped: Sequence[Skipped]) -> Html:
    return section("skipped", "Results files skipped (not this store's)",
                   table(["file", "why"], [[Html(tag("code", s.name)), s.why] for s in skipped]))


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1f2328;
       max-width: 1240px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin: 1.6em 0 .3em; }
h3 .file { display: block; font: 12px ui-monospace, "DejaVu Sans Mono", monospace; color: #57606a; font-weight: normal; }
nav a { margin-right: 1em; } .note { color: #8a6100; } .nowrap { white-space: nowrap; }
.small { font-size: 13px; color: #57606a; margin: .2em 0; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num, table.grid td + td { text-align: right; font-variant-numeric: tabular-nums; }
td.na { color: #8c959f; text-align: center; }
table.confusion td { min-width: 2.2em; }
td.settings { font-size: 11px; color: #57606a; max-width: 24em; }
td.file { font: 11px ui-monospace, "DejaVu Sans Mono", monospace; word-break: break-all; min-width: 15em; }
.wide { overflow-x: auto; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th[data-dir="asc"]::after { content: " \\25B2"; } table.sortable th[data-dir="desc"]::after { content: " \\25BC"; }
p.caption { font-weight: 600; font-size: 13px; margin: .6em 0 -.4em; max-width: 60em; }
.tables, .figures { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
figure { margin: .5em 0; max-width: 100%; } figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { font-size: 12px; color: #57606a; max-width: 70em; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
details { margin: .4em 0; } summary { cursor: pointer; color: #0969da; }
pre { background: #f6f8fa; padding: .8em; overflow: auto; max-height: 28em; font-size: 12px; }
"""

# Sorts a table.sortable by the clicked column: numbers (a cell's data-sort, else its text) before
# text, empty cells last; a second click reverses.
SORT_JS = """
document.querySelectorAll("table.sortable th").forEach((th, column) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], ascending = th.dataset.dir !== "asc";
  th.parentNode.querySelectorAll("th").forEach(h => delete h.dataset.dir);
  th.dataset.dir = ascending ? "asc" : "desc";
  const key = row => { const c = row.cells[column], v = (c.dataset.sort ?? c.textContent).trim();
                       return v === "" || v === "—" ? [2, ""] : isNaN(v) ? [1, v.toLowerCase()] : [0, Number(v)]; };
  const order = (a, b) => a[0] - b[0] || (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0);
  [...body.rows].map(r => [key(r), r]).sort((a, b) => a[0][0] === 2 || b[0][0] === 2 ? order(a[0], b[0])
    : (ascending ? 1 : -1) * order(a[0], b[0])).forEach(([, r]) => body.appendChild(r));
}));
"""

TITLES = {"store": "Store", "images": "Images", "all": "Every result",
          **{anchor: nav for anchor, (_, nav, _) in SECTIONS.items()}, "unreadable": "Not shown", "skipped": "Skipped"}


def render_html(data: ReportData) -> str:
    """One self-contained page: inline CSS and script, images as data URIs, links only to its own sections."""
    renderers: dict[str, Callable[[], Html]] = {
        "store": lambda: render_store(data.store), "images": lambda: render_images(data.datasets),
        "all": lambda: render_all(data), **{a: (lambda a=a: render_kind(data, a)) for a in SECTIONS},
        "unreadable": lambda: render_unreadable(data.unreadable),
        "skipped": lambda: render_skipped(data.skipped),
    }
    where = (f"Results from {data.results_dir}" if data.results_found
             else f"No results folder at {data.results_dir}: run sweep, cka, knn, probe or retrieve first.")
    nav = tag("nav", join(tag("a", TITLES[s], href=f"#{s}") for s in data.sections))
    title = f"featurestore report: {data.store['store']}"
    body = join([tag("h1", title), tag("p", where) if data.results_found else tag("p", where, class_="note"),
                 nav, *(renderers[s]() for s in data.sections)])
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n<script>{SORT_JS}</script>\n</body>\n</html>\n")


def write_report(store_url: str, out: str | Path | None = None, results: str | Path | None = None,
                 t_axis: str = DEFAULT_T_AXIS) -> ReportSummary:
    """Collect, render and write the page (default: `report.html` in the results folder)."""
    data = collect_report(store_url, results, t_axis)
    path = Path(out) if out is not None else data.results_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return ReportSummary(str(path), data.sections, data.results_count, data.skipped)
