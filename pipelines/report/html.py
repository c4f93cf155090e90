"""`featurestore report`: the store summary and every result of that store, as one HTML page.

Two layers: `collect_report` reads the store (through `inspect_store`) and its results folder
(`<store>.results/` by default) into a typed `ReportData`; `render_html` turns that into one
self-contained page (inline CSS, every image a base64 data URI) that can be mailed or archived
without the folder it came from. Every string from the store or a JSON file is HTML-escaped. A
results file is shown only when every run it names (its `runs` field) is a run of this store; the
others are listed as skipped with the reason, and a file that cannot be read is listed with the
reason rather than stopping the report.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from featurestore.inspect import inspect_store
from featurestore.store import FeatureStore
from pipelines.analysis import results_dir
from pipelines.analysis.cka import CkaResult, plot_cka
from pipelines.analysis.sweep import SweepResult, SweepRow, plot_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES_SHOWN = 30
JSON_CHARS_SHOWN = 200_000  # a huge results file must not make the page unusable
HEADLINE_KEYS = ("task", "run_id", "timestep", "block", "best_head", "top1", "top5", "train_top1")

T = TypeVar("T")


# -- the data --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Figure:
    title: str  # the file it came from, or what a plot drawn from the JSON shows
    png: bytes
    drawn: bool = False  # no PNG was saved beside the JSON: drawn here with the analysis's own plot


@dataclass
class Loaded(Generic[T]):
    """One results file understood as a known kind (sweep, CKA) or shown as JSON."""

    name: str  # path relative to the folder it was found in
    value: T
    figures: list[Figure] = field(default_factory=list)


@dataclass(frozen=True)
class Unreadable:
    name: str
    note: str


@dataclass(frozen=True)
class Skipped:
    """A readable results file that is not this store's (or does not say whose it is)."""

    name: str
    why: str


@dataclass(frozen=True)
class DatasetSummary:
    """What the images table holds for one dataset: the class names are the store's own strings."""

    name: str
    images: int
    splits: dict[str, int]
    domains: dict[str, int]
    classes: list[str]


@dataclass
class ReportData:
    store: dict[str, Any]  # inspect_store's document
    datasets: list[DatasetSummary]
    results_dir: Path
    results_found: bool
    sweeps: list[Loaded[SweepResult]] = field(default_factory=list)
    ckas: list[Loaded[CkaResult]] = field(default_factory=list)
    others: list[Loaded[Any]] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def sections(self) -> list[str]:
        present = {"store": True, "images": bool(self.datasets), "sweeps": bool(self.sweeps), "cka": bool(self.ckas),
                   "results": bool(self.others), "unreadable": bool(self.unreadable), "skipped": bool(self.skipped)}
        return [name for name, shown in present.items() if shown]

    @property
    def results_count(self) -> int:
        """Results files of this store: shown, or listed as unreadable (skipped ones not counted)."""
        return sum(map(len, (self.sweeps, self.ckas, self.others, self.unreadable)))


@dataclass(frozen=True)
class ReportSummary:
    out: str
    sections: list[str]
    results: int
    skipped: list[Skipped]

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "sections": self.sections, "results": self.results,
                "skipped": [{"file": s.name, "why": s.why} for s in self.skipped]}


# -- collecting ------------------------------------------------------------------------------------
def collect_report(store_url: str, results: str | Path | None = None) -> ReportData:
    """The store summary plus every results JSON of this store under the results folder (default
    `<store>.results/`); results of other stores are listed in `skipped`."""
    doc = inspect_store(store_url)
    try:
        folder = results_dir(store_url, results).resolve()
    except ValueError:
        raise ValueError(f"{store_url} is not a local path: give --results DIR") from None
    store = FeatureStore.open(store_url)
    data = ReportData(doc, dataset_summaries(store), folder, folder.is_dir())
    files = result_files(folder) if data.results_found else []
    run_ids = set(store.run_ids())
    for path in files:
        name = str(path.relative_to(folder)) if path.is_relative_to(folder) else path.name
        try:
            add_result(data, name, path, run_ids)
        except Exception as exc:  # noqa: BLE001  any defect of one file is that file's note, never the report's end
            data.unreadable.append(Unreadable(name, f"{type(exc).__name__}: {exc}"))
    return data


def result_files(folder: Path) -> list[Path]:
    """JSON files under `folder`, not descending into zarr stores: their metadata is JSON too, and
    a store's thousands of chunk files are not worth walking."""
    found = []
    for root, dirs, files in os.walk(folder):
        if "zarr.json" in files or ".zgroup" in files:
            dirs.clear()
            continue
        found += [Path(root) / f for f in files if f.endswith(".json")]
    return sorted(found)


def add_result(data: ReportData, name: str, path: Path, run_ids: set[str]) -> None:
    """Parse one results file and file it under its kind, with its figures (drawn when missing),
    or under `skipped` when the runs it names (its `runs` field) are not all in `run_ids`."""
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        data.unreadable.append(Unreadable(name, f"not valid JSON: {exc}"))
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), dict) or not doc["runs"]:
        data.skipped.append(Skipped(name, "names no runs (no `runs` field: not a results file of this version)"))
        return
    foreign = sorted(set(doc["runs"]) - run_ids)
    if foreign:
        data.skipped.append(Skipped(name, f"another store's: run(s) {', '.join(foreign)} are not in this store"))
        return
    if {"run_id", "knn_k", "rows"} <= doc.keys():
        sweep = SweepResult(**{**doc, "rows": [SweepRow(**r) for r in doc["rows"]]})
        numbers([getattr(r, m) for r in sweep.rows for m in SWEEP_METRICS], "sweep accuracies")
        plots = [(by, path.with_name(f"{path.stem}-{suffix}.png")) for by, suffix in SWEEP_PLOTS.items()]
        figures = [png_figure(png) if png.is_file() else
                   Figure(f"accuracy vs {by}", drawn(lambda p, by=by: plot_sweep(sweep, p, by)), drawn=True)
                   for by, png in plots]
        data.sweeps.append(Loaded(name, sweep, figures))
    elif {"grid", "rows", "cols", "matrices"} <= doc.keys():
        cka = CkaResult(**doc)
        for estimator, matrix in cka.matrices.items():
            if np.asarray(matrix, dtype=float).shape != (len(cka.rows), len(cka.cols)):
                raise ValueError(f"the {estimator} matrix is not {len(cka.rows)} x {len(cka.cols)}")
        figures = pngs_of(path) or [Figure("linear CKA", drawn(lambda p: plot_cka(cka, p)), drawn=True)]
        data.ckas.append(Loaded(name, cka, figures))
    else:
        data.others.append(Loaded(name, doc, pngs_of(path)))


SWEEP_METRICS = ("linear_top1", "knn_top1", "knn_top5")
SWEEP_PLOTS = {"timestep": "vs-t", "block": "vs-block"}  # save_sweep's <stem>-<suffix>.png, in reading order


def numbers(values: Iterable[Any], what: str) -> None:
    """Refuse a results file whose numbers are not numbers (caught per file by `collect_report`)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what} are not all numbers")


def pngs_of(path: Path) -> list[Figure]:
    """The plots saved beside a results file: `<stem>.png` and `<stem>-*.png`, except those that
    belong to another results file (`<stem>-x.png` next to `<stem>-x.json`)."""
    own = [path.with_suffix(".png")] if path.with_suffix(".png").is_file() else []
    more = [p for p in sorted(path.parent.glob(f"{path.stem}-*.png")) if not p.with_suffix(".json").is_file()]
    return [png_figure(p) for p in own + more]


def png_figure(path: Path) -> Figure:
    png = path.read_bytes()
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path.name} is not a PNG file")
    return Figure(path.name, png)


def drawn(plot: Callable[[Path], Path]) -> bytes:
    """The PNG bytes of a plot function that writes to a path (the plots of the analyses themselves)."""
    with tempfile.TemporaryDirectory() as tmp:
        return plot(Path(tmp) / "plot.png").read_bytes()


def dataset_summaries(store: FeatureStore) -> list[DatasetSummary]:
    images = store.images
    out = []
    for name in dict.fromkeys(images.dataset.tolist()):
        rows = images.dataset == name
        out.append(DatasetSummary(
            str(name), int(rows.sum()), counts(images.split[rows]), counts(images.domain[rows]),
            sorted(set(images.class_name[rows].tolist()), key=str),
        ))
    return out


def counts(values: np.ndarray) -> dict[str, int]:
    keys, n = np.unique(values, return_counts=True)
    return {str(k): int(c) for k, c in zip(keys.tolist(), n.tolist())}


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
    rendered = "".join(f' {k.rstrip("_")}="{esc(v)}"' for k, v in attrs.items())
    return Html(f"<{name}{rendered}>{esc(body)}</{name}>")


def join(parts: Iterable[Any], sep: str = "") -> Html:
    return Html(sep.join(esc(p) for p in parts))


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], caption: str | None = None, grid: bool = False) -> Html:
    """A bordered table; numbers are right-aligned and formatted by `fmt`. A `grid` (a matrix with
    labels in its first column) right-aligns every other cell, the bold best ones included."""

    def cell(value: Any) -> Html:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return tag("td", fmt(value), class_="num")
        return tag("td", value if isinstance(value, Html) else fmt(value))

    head = tag("tr", join(tag("th", h) for h in headers))
    body = join(tag("tr", join(cell(v) for v in row)) for row in rows)
    inner = join([tag("caption", caption) if caption else "", tag("thead", head), tag("tbody", body)])
    return tag("table", inner, class_="grid") if grid else tag("table", inner)


def pivot(values: Mapping[tuple[int | None, str], float], caption: str) -> Html:
    """A row per timestep, a column per block, the best cell in bold."""
    timesteps = list(dict.fromkeys(t for t, _ in values))
    blocks = list(dict.fromkeys(b for _, b in values))
    best = max(values.values())

    def cell(key: tuple[int | None, str]) -> Any:
        if key not in values:
            return "—"
        return tag("b", fmt(values[key])) if values[key] == best else values[key]

    rows = [[label_t(t), *(cell((t, b)) for b in blocks)] for t in timesteps]
    return table(["t", *blocks], rows, caption, grid=True)


def label_t(t: int | None) -> str:
    return "none" if t is None else str(t)


def image(figure: Figure) -> Html:
    uri = "data:image/png;base64," + base64.b64encode(figure.png).decode("ascii")
    return tag("figure", join([Html(f'<img src="{uri}" alt="{esc(figure.title)}">'),
                               tag("figcaption", figure.title + (" (drawn from the JSON)" if figure.drawn else ""))]))


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
            ", ".join(map(label_t, run["timesteps"])), blocks, run["done"], run["failed"], run["pending"],
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
        table(headers, rows) if rows else tag("p", "No runs yet."),
        tag("p", f"Runs killed while being created (a re-run rebuilds them): {', '.join(incomplete)}",
            class_="note") if incomplete else "",
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


def figures(items: Sequence[Figure]) -> Html:
    return tag("div", join(image(f) for f in items), class_="figures")


def images_used(runs: Any) -> Html | str:
    """A warning line for a result computed without some images of its runs (`runs`: run id ->
    {"used", "failed", "pending"}): pending ones mean a partial run (--allow-incomplete), whose
    numbers are not those of the whole run; failed ones were left out. Empty when all were used."""
    lines = [f"run {run_id}: {n['used']} of {n['used'] + n['failed'] + n['pending']} images used"
             + (f", {n['pending']} pending (computed on an incomplete run, with --allow-incomplete)" if n["pending"] else "")
             + (f", {n['failed']} failed (left out)" if n["failed"] else "")
             for run_id, n in (runs or {}).items() if n.get("pending") or n.get("failed")]
    return tag("p", "; ".join(lines), class_="note") if lines else ""


def render_sweeps(sweeps: Sequence[Loaded[SweepResult]]) -> Html:
    parts = []
    for item in sweeps:
        s = item.value
        tables = [pivot({(r.timestep, r.block): getattr(r, metric) for r in s.rows}, caption)
                  for metric, caption in zip(SWEEP_METRICS, ("linear probe top-1", f"kNN top-1 (k={s.knn_k})",
                                                             f"kNN top-5 (k={s.knn_k})"))]
        parts += [tag("h3", item.name), images_used(s.runs),
                  tag("p", f"run {s.run_id}, pool {s.pool}, {len(s.rows)} (t, block) pairs in {s.seconds:.1f} s"),
                  tag("div", join(tables), class_="tables"), figures(item.figures)]
    return section("sweeps", "Sweeps: accuracy per (t, block)", *parts)


def render_ckas(ckas: Sequence[Loaded[CkaResult]]) -> Html:
    parts = []
    for item in ckas:
        c = item.value
        tables = [table(["", *c.cols], ([r, *row] for r, row in zip(c.rows, matrix)), f"linear CKA ({estimator})", grid=True)
                  for estimator, matrix in sorted(c.matrices.items())]
        parts += [tag("h3", item.name), images_used(c.runs),
                  tag("p", f"grid {c.grid}, method {c.method}, {c.images} images, pool {c.pool}"),
                  figures(item.figures), tag("div", join(tables), class_="tables")]
    return section("cka", "CKA", *parts)


def headline(doc: Any) -> dict[str, Any]:
    """The numbers worth a glance: ids, top-1/top-5 (per k for kNN) and retrieval metrics."""
    if not isinstance(doc, dict):
        return {}
    out: dict[str, Any] = {}
    for key in HEADLINE_KEYS:
        value = doc.get(key)
        if isinstance(value, dict):  # kNN: k -> accuracy
            out.update({f"{key} k={k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (str, int, float)):
            out[key] = value
    metrics = doc.get("metrics")
    if isinstance(metrics, dict):  # retrieval: name -> {"value", variant names}
        out.update({n: m["value"] for n, m in metrics.items() if isinstance(m, dict) and isinstance(m.get("value"), (int, float))})
    return out


def render_others(others: Sequence[Loaded[Any]]) -> Html:
    parts = []
    for item in others:
        numbers_ = headline(item.value)
        parts += [tag("h3", item.name), images_used(item.value.get("runs")),
                  table(list(numbers_), [list(numbers_.values())]) if numbers_ else
                  tag("p", "No headline numbers recognised in this file; its content is below.", class_="note"),
                  figures(item.figures) if item.figures else "", details("the whole file", item.value)]
    return section("results", "Other results", *parts)


def render_unreadable(unreadable: Sequence[Unreadable]) -> Html:
    return section("unreadable", "Results files not shown",
                   table(["file", "note"], [[Html(tag("code", u.name)), u.note] for u in unreadable]))


def render_skipped(skipped: Sequence[Skipped]) -> Html:
    return section("skipped", "Results files skipped (not this store's)",
                   table(["file", "why"], [[Html(tag("code", s.name)), s.why] for s in skipped]))


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1f2328;
       max-width: 1200px; margin: 2em auto; padding: 0 1.5em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; font-family: ui-monospace, "DejaVu Sans Mono", monospace; margin-top: 1.5em; }
nav a { margin-right: 1em; } .note { color: #8a6100; } .nowrap { white-space: nowrap; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num, table.grid td + td { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 2px; }
.tables, .figures { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
figure { margin: .5em 0; } figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { font-size: 12px; color: #57606a; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
details { margin: .4em 0; } summary { cursor: pointer; color: #0969da; }
pre { background: #f6f8fa; padding: .8em; overflow: auto; max-height: 28em; font-size: 12px; }
"""

TITLES = {"store": "Store", "images": "Images", "sweeps": "Sweeps", "cka": "CKA", "results": "Other results",
          "unreadable": "Not shown", "skipped": "Skipped"}


def render_html(data: ReportData) -> str:
    """One self-contained page: inline CSS, images as data URIs, links only to its own sections."""
    renderers: dict[str, Callable[[], Html]] = {
        "store": lambda: render_store(data.store), "images": lambda: render_images(data.datasets),
        "sweeps": lambda: render_sweeps(data.sweeps), "cka": lambda: render_ckas(data.ckas),
        "results": lambda: render_others(data.others),
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
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def write_report(store_url: str, out: str | Path | None = None, results: str | Path | None = None) -> ReportSummary:
    """Collect, render and write the page (default: `report.html` in the results folder)."""
    data = collect_report(store_url, results)
    path = Path(out) if out is not None else data.results_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return ReportSummary(str(path), data.sections, data.results_count, data.skipped)
