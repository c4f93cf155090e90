"""What `featurestore report` shows, read from a store and its results folder.

`collect_report` reads the store (through `inspect_store`) and its results folder
(`<store>.results/` by default) into a typed `ReportData`; `pipelines/report/html.py` renders it. A
results file is shown only when every run it names (its `runs` field) is a run of this store; the
others are listed as skipped with the reason, and a file that cannot be read is listed with the
reason rather than stopping the report.

Each known kind of results file (sweep, CKA, logistic probe, trained heads, kNN, few-shot,
retrieval, correspondence) is parsed here, so a malformed one is caught here, and its figures are
drawn from its JSON (`pipelines/report/plots.py`): the titles name the backbone and dataset of its
runs (from their specs), t and block; accuracy plots carry the chance line (1 / number of classes
of the run) and their best point. Each file also gets an `Entry`: its row in the table of every result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure as MplFigure

from featurestore.inspect import inspect_store
from featurestore.store import FeatureStore, timestep_text
from pipelines.analysis import results_dir
from pipelines.analysis.cka import CkaResult
from pipelines.analysis.sweep import SweepResult, SweepRow
from pipelines.correspond.compute import THRESHOLDS
from pipelines.progress import bar
from pipelines.report.plots import (
    T_AXES, Curve, Panel, accuracy_figure, best_point, dense_examples_figure, heatmap_figure, png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADLINE_KEYS = ("task", "run_id", "timestep", "block", "best_head", "top1", "top5", "train_top1")
DEFAULT_T_AXIS = "log"


# -- the data --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Figure:
    title: str  # what it shows, or the file it came from
    png: bytes
    note: str = ""  # the chance line and best points, in words


@dataclass(frozen=True)
class RunInfo:
    """What the page says about a run: from its spec, and the distinct labels of its images."""

    run_id: str
    backbone: str
    dataset: str
    classes: int

    def describe(self) -> str:
        return f"{self.backbone} on {self.dataset} (run {self.run_id[:8]})"


@dataclass(frozen=True)
class Entry:
    """One row of the table of every result."""

    command: str
    runs: list[str]
    timesteps: str
    blocks: str
    settings: str
    metric: str  # what the score is, its variant named
    score: float | None


@dataclass
class Loaded:
    """One results file of this store, understood as a known kind or shown as JSON."""

    name: str  # path relative to the folder it was found in
    kind: str  # a key of SECTIONS
    value: Any  # SweepResult, CkaResult, or the results document
    title: str  # what it is: kind, backbone, dataset, t, block
    entry: Entry
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


# section anchor -> (heading, navigation label, kinds shown there), in page order
SECTIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sweeps": ("Sweeps: accuracy per (t, block)", "Sweeps", ("sweep",)),
    "cka": ("CKA", "CKA", ("cka",)),
    "probes": ("Probes", "Probes", ("probe", "heads")),
    "knn": ("kNN", "kNN", ("knn",)),
    "fewshot": ("Few-shot", "Few-shot", ("fewshot",)),
    "retrieval": ("Retrieval", "Retrieval", ("retrieve",)),
    "correspond": ("Semantic correspondence: PCK", "Correspondence", ("correspond",)),
    "dense": ("Dense prediction: segmentation and depth", "Dense", ("dense",)),
    "results": ("Other results", "Other results", ("other",)),
}


@dataclass
class ReportData:
    store: dict[str, Any]  # inspect_store's document
    datasets: list[DatasetSummary]
    runs: dict[str, RunInfo]
    results_dir: Path
    results_found: bool
    t_axis: str = DEFAULT_T_AXIS
    loaded: list[Loaded] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def of(self, kinds: Sequence[str]) -> list[Loaded]:
        return [item for item in self.loaded if item.kind in kinds]

    @property
    def sections(self) -> list[str]:
        present = {"store": True, "images": bool(self.datasets), "all": bool(self.loaded),
                   **{anchor: bool(self.of(kinds)) for anchor, (_, _, kinds) in SECTIONS.items()},
                   "unreadable": bool(self.unreadable), "skipped": bool(self.skipped)}
        return [name for name, shown in present.items() if shown]

    @property
    def results_count(self) -> int:
        """Results files of this store: shown, or listed as unreadable (skipped ones not counted)."""
        return len(self.loaded) + len(self.unreadable)


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
def collect_report(store_url: str, results: str | Path | None = None, t_axis: str = DEFAULT_T_AXIS) -> ReportData:
    """The store summary plus every results JSON of this store under the results folder (default
    `<store>.results/`); results of other stores are listed in `skipped`. `t_axis` ("log": symlog,
    or "linear") is the t axis of accuracy-vs-t plots. A bar on stderr counts the files."""
    if t_axis not in T_AXES:
        raise ValueError(f"--t-axis takes {' or '.join(T_AXES)}, got {t_axis!r}")
    doc = inspect_store(store_url)
    try:
        folder = results_dir(store_url, results).resolve()
    except ValueError:
        raise ValueError(f"{store_url} is not a local path: give --results DIR") from None
    store = FeatureStore.open(store_url)
    data = ReportData(doc, dataset_summaries(store), run_infos(store, doc), folder, folder.is_dir(), t_axis)
    files = result_files(folder) if data.results_found else []
    with bar("report", "results files", len(files)) as advance:
        for path in files:
            name = str(path.relative_to(folder)) if path.is_relative_to(folder) else path.name
            advance(0, name)
            try:
                add_result(data, name, path)
            except Exception as exc:  # noqa: BLE001  any defect of one file is that file's note, never the report's end
                data.unreadable.append(Unreadable(name, f"{type(exc).__name__}: {exc}"))
            advance()
    return data


def run_info(store: FeatureStore, run_id: str) -> RunInfo:
    """A run's backbone and dataset from its spec ("?" when the spec has none) and the number of
    distinct labels of its images (the chance line is 1 / that)."""
    run = store.run(run_id)
    return RunInfo(run.run_id, str(run.spec.get("backbone", "?")), str(run.spec.get("dataset", "?")),
                   len(np.unique(run.labels)))


def run_infos(store: FeatureStore, doc: Mapping[str, Any]) -> dict[str, RunInfo]:
    """`run_info` of every run listed in `doc["runs"]`."""
    return {run["run_id"]: run_info(store, run["run_id"]) for run in doc["runs"]}


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


def add_result(data: ReportData, name: str, path: Path) -> None:
    """Parse one results file as its kind, with its figures, or file it under `skipped` when the
    runs it names (its `runs` field) are not all runs of this store."""
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        data.unreadable.append(Unreadable(name, f"not valid JSON: {exc}"))
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("runs"), dict) or not doc["runs"]:
        data.skipped.append(Skipped(name, "names no runs (no `runs` field: not a results file of this version)"))
        return
    foreign = sorted(set(doc["runs"]) - set(data.runs))
    if foreign:
        data.skipped.append(Skipped(name, f"another store's: run(s) {', '.join(foreign)} are not in this store"))
        return
    kind = kind_of(doc)
    data.loaded.append(PARSERS[kind](name, path, doc, data))


def kind_of(doc: Mapping[str, Any]) -> str:
    keys = doc.keys()
    if {"run_id", "knn_k", "rows"} <= keys:
        return "sweep"
    if {"grid", "rows", "cols", "matrices"} <= keys:
        return "cka"
    if doc.get("task") == "probe" and isinstance(doc.get("heads"), list):
        return "heads"
    if doc.get("task") in DENSE_METRICS and isinstance(doc.get("heads"), list):
        return "dense"
    if {"query", "gallery", "metrics"} <= keys:
        return "retrieve"
    if {"classifiers", "seeds", "std_ddof"} <= keys:
        return "fewshot"
    if {"temperature", "top1", "top5"} <= keys and isinstance(doc["top1"], dict):
        return "knn"
    if {"top1", "train_top1", "timestep", "block"} <= keys:
        return "probe"
    if {"maps", "alphas", "upsample", "variants"} <= keys:
        return "correspond"
    return "other"


def numbers(values: Iterable[Any], what: str) -> None:
    """Refuse a results file whose numbers are not numbers (caught per file by `collect_report`)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{what} are not all numbers")


def run_text(data: ReportData, run_id: str) -> str:
    return data.runs[run_id].describe()


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def pooling(pool: int | None) -> str:
    return "features not pooled" if pool is None else f"features pooled to {pool}x{pool}"


def chance_note(chance: float, classes: int) -> str:
    return f"chance 1/{classes} = {chance:.3f} (dashed line)"


def settings_text(settings: Mapping[str, Any], leave_out: Iterable[str] = ()) -> str:
    """`key=value, ...` of a results file's settings: scalars that are set (not None, False or
    empty), nested dicts as `outer.key`; lists and the keys in `leave_out` (shown in their own
    columns) are left out."""
    skip = {"run_id", "timestep", "timesteps", "block", "blocks", "rows", "cols", *leave_out}
    items = []

    def walk(prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if key in skip:
                continue
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            elif isinstance(value, (str, int, float)) and value not in ("", None) and value is not False:
                items.append(f"{prefix}{key}={value}")

    walk("", settings)
    return ", ".join(items)


def joined(values: Iterable[Any]) -> str:
    return ", ".join(map(str, dict.fromkeys(values)))


# one parser per kind: (file name, path, document, the report so far) -> Loaded
def parse_sweep(name: str, path: Path, doc: dict, data: ReportData) -> Loaded:
    sweep = SweepResult(**{**doc, "rows": [SweepRow(**r) for r in doc["rows"]]})
    numbers([getattr(r, m) for r in sweep.rows for m in SWEEP_METRICS], "sweep accuracies")
    info = data.runs[sweep.run_id]
    figures = [sweep_figure(sweep, info, by, data.t_axis) for by in ("timestep", "block")
               if by == "block" or any(r.timestep is not None for r in sweep.rows)]
    best = max(sweep.rows, key=lambda r: r.linear_top1)
    entry = Entry("sweep", [sweep.run_id], joined(timestep_text(r.timestep) for r in sweep.rows),
                  joined(r.block for r in sweep.rows), settings_text(sweep.settings),
                  f"best linear-probe top-1 (test), at t={timestep_text(best.timestep)} {best.block}", best.linear_top1)
    title = (f"sweep: {info.describe()}, {count(len({r.timestep for r in sweep.rows}), 'timestep')} x "
             f"{count(len({r.block for r in sweep.rows}), 'block')}, {pooling(sweep.pool)}")
    return Loaded(name, "sweep", sweep, title, entry, figures)


SWEEP_METRICS = ("linear_top1", "knn_top1", "knn_top5")


def sweep_panels(sweep: SweepResult, by: str) -> list[Panel]:
    """Linear-probe and kNN top-1 against t (`by="timestep"`, a curve per block; rows of experts
    stored without a timestep left out) or against the block (`by="block"`, a curve per t)."""
    blocks = list(dict.fromkeys(r.block for r in sweep.rows))
    timesteps = list(dict.fromkeys(r.timestep for r in sweep.rows))
    panels = []
    for metric, what in (("linear_top1", "linear probe (logistic regression)"),
                         ("knn_top1", f"weighted kNN (k={sweep.knn_k})")):
        if by == "timestep":
            curves = [Curve(b, sorted((r.timestep, getattr(r, metric)) for r in sweep.rows
                                      if r.block == b and r.timestep is not None)) for b in blocks]
            panels.append(Panel(what, curves))
        else:
            curves = [Curve(f"t={timestep_text(t)}", [(blocks.index(r.block), getattr(r, metric)) for r in sweep.rows
                                                if r.timestep == t]) for t in timesteps]
            panels.append(Panel(what, curves, dict(enumerate(blocks))))
    return panels


def sweep_plot(sweep: SweepResult, info: RunInfo, by: str, t_axis: str) -> MplFigure:
    """The two panels of `sweep_panels` side by side, titled with the run's backbone and dataset,
    with the chance line and each panel's best point."""
    blocks = list(dict.fromkeys(r.block for r in sweep.rows))
    against = "timestep t, a line per block" if by == "timestep" else "block, a line per t"
    title = (f"{info.backbone} on {info.dataset}: top-1 vs {against}"
             f"\nrun {sweep.run_id[:8]}, {pooling(sweep.pool)}, test split")
    xlabel = ("timestep t" + (" (symlog scale)" if t_axis == "log" else "")) if by == "timestep" else "block"
    return accuracy_figure(title, sweep_panels(sweep, by), xlabel, "top-1 accuracy (test)", 1 / info.classes, "t=",
                           t_axis=t_axis if by == "timestep" else None, categories=blocks if by == "block" else None)


def sweep_figure(sweep: SweepResult, info: RunInfo, by: str, t_axis: str) -> Figure:
    """`sweep_plot` as a page figure, its chance line and best points in words below it."""
    bests = [(p.title.split(" (")[0], best_point(p, "t=")) for p in sweep_panels(sweep, by)]
    note = "; ".join([chance_note(1 / info.classes, info.classes),
                      *(f"best {what} {b.value:.3f} at {b.where}" for what, b in bests if b)])
    what = f"top-1 vs t ({'symlog' if t_axis == 'log' else 'linear'} t axis)" if by == "timestep" else "top-1 vs block"
    return Figure(what, png(sweep_plot(sweep, info, by, t_axis)), note)


def parse_cka(name: str, path: Path, doc: dict, data: ReportData) -> Loaded:
    cka = CkaResult(**doc)
    for estimator, matrix in cka.matrices.items():
        if np.asarray(matrix, dtype=float).shape != (len(cka.rows), len(cka.cols)):
            raise ValueError(f"the {estimator} matrix is not {len(cka.rows)} x {len(cka.cols)}")
    keys = list(cka.views.values())  # [run_id, timestep, block] per label
    run_ids = list(dict.fromkeys(k[0] for k in keys))
    timesteps = list(dict.fromkeys(k[1] for k in keys))
    blocks = list(dict.fromkeys(k[2] for k in keys))

    def side(run_id: str) -> str:  # a run, with its one timestep or one block when the grid has one
        ts = list(dict.fromkeys(k[1] for k in keys if k[0] == run_id))
        bs = list(dict.fromkeys(k[2] for k in keys if k[0] == run_id))
        return "".join([run_text(data, run_id), f", t={timestep_text(ts[0])}" if len(ts) == 1 else "",
                        f", block {bs[0]}" if len(bs) == 1 else ""])

    title = f"linear CKA, {cka.grid} grid: {' vs '.join(map(side, run_ids))}"
    ordered = {k: cka.matrices[k] for k in sorted(cka.matrices, key=lambda k: k != "unbiased")}
    fig = heatmap_figure(f"{title}\n{cka.method} method, {cka.images} images, {pooling(cka.pool)}", ordered,
                         cka.rows, cka.cols, "linear CKA")
    estimator = next(iter(ordered))
    off = [v for i, row in enumerate(ordered[estimator]) for j, v in enumerate(row)
           if v is not None and cka.views[cka.rows[i]] != cka.views[cka.cols[j]]]
    entry = Entry("cka", run_ids, joined(map(timestep_text, timesteps)), joined(blocks),
                  settings_text(cka.settings, ["grid"]) or f"method={cka.method}",
                  f"mean linear CKA ({estimator}) of different views", float(np.mean(off)) if off else None)
    return Loaded(name, "cka", cka, title, entry,
                  [Figure("linear CKA heatmap", png(fig), "colour scale from the smallest to the largest value; "
                                                           "grey cells: n/a (undefined)")])


def parse_probe(name: str, path: Path, doc: dict, data: ReportData) -> Loaded:
    numbers([doc["top1"], doc["train_top1"]], "probe accuracies")
    check_class_metrics(doc, doc["test"])
    t = timestep_text(doc["timestep"])
    title = f"linear probe (logistic regression): {run_text(data, doc['run_id'])}, t={t}, {doc['block']}"
    entry = Entry("probe", [doc["run_id"]], t, doc["block"], settings_text(doc.get("settings") or {}),
                  "linear-probe top-1 (test)", doc["top1"])
    return Loaded(name, "probe", doc, title, entry)


def check_class_metrics(doc: Mapping[str, Any], test: int) -> None:
    """Per-class top-1 and the confusion matrix, when present, must be numbers of the right shape
    whose counts add up to the test images."""
    if "confusion" not in doc:
        return
    confusion = np.asarray(doc["confusion"])
    k = len(doc["classes"])
    if confusion.shape != (k, k) or not np.issubdtype(confusion.dtype, np.integer):
        raise ValueError(f"the confusion matrix is not {k} x {k} counts")
    if confusion.sum() != test:
        raise ValueError(f"the confusion matrix counts {confusion.sum()} images, not the {test} tested")
    numbers(doc["per_class"].values(), "per-class accuracies")


def parse_heads(name: str, path: Path, doc: dict, data: ReportData) -> Loaded:
    for head in doc["heads"]:
        numbers([head["top1"], head["top5"]], f"accuracies of head {head.get('name')}")
        check_class_metrics({**head, "classes": doc["classes"]}, doc["images"]["test"])
    config = doc["config"]
    heads = {h["kind"] for h in doc["heads"]}
    title = f"trained heads ({', '.join(sorted(heads))}): {run_text(data, doc['run_id'])}"
    entry = Entry("probe", list(doc["runs"]), joined(map(timestep_text, config["timesteps"])), joined(config["blocks"]),
                  settings_text(config, ["lrs", "expert_blocks"]),
                  f"top-1 (test) of {doc['best_head']}, chosen on validation", doc["top1"])
    return Loaded(name, "heads", doc, title, entry, heads_figures(doc, data.runs[doc["run_id"]]))


def heads_figures(doc: Mapping[str, Any], info: RunInfo) -> list[Figure]:
    """Validation top-1 per epoch, a line per head, when the heads recorded it (`epoch_log`; results
    files of older versions have none): the best point is where the best head was chosen."""
    panel = Panel("", [Curve(h["name"], [(r["epoch"], r["val_top1"]) for r in h.get("epoch_log") or []
                                         if r["val_top1"] is not None]) for h in doc["heads"]])
    if not any(c.points for c in panel.curves):
        return []
    numbers([y for c in panel.curves for _, y in c.points], "validation accuracies")
    fig = heads_plot(doc, info, panel)
    best = best_point(panel, "epoch ")
    classes = len(doc["classes"])
    note = f"{chance_note(1 / classes, classes)}; best {best.value:.3f} at {best.where}, the head chosen"
    return [Figure("validation top-1 vs epoch", png(fig), note)]


def heads_plot(doc: Mapping[str, Any], info: RunInfo, panel: Panel) -> MplFigure:
    kinds = ", ".join(sorted({h["kind"] for h in doc["heads"]}))
    title = (f"{info.backbone} on {info.dataset}: validation top-1 vs epoch, a line per head ({kinds})"
             f"\nrun {info.run_id[:8]}, {doc['images']['val']} validation images")
    return accuracy_figure(title, [panel], "epoch", "top-1 accuracy (validation)", 1 / len(doc["classes"]), "epoch ")


def parse_knn(name: str, path: Path, doc: dict, data: ReportData) -> Loaded:
    numbers([*doc["top1"].values(), *doc["top5"].values()], "kNN accuracies")
    t = timestep_text(doc["timestep"])
    title = f"weighted kNN: {run_text(data, doc['run_id'])}, t={t}, {doc['block']}"
    k, top1 = max(doc["top1"].items(), key=lambda kv: kv[1])
    entry = Entry("knn", [doc["run_id"]], t, doc["block"], settings_text(doc.get("settings") or {}),
                  f"kNN top-1, best of k={', '.join(doc['top1'])} (k={k})", top1)
    return Loaded(name, "knn", doc, title, entry)


def parse_fewshot(name: str, path: Path, doc: dict, data: ReportData) -> Loaded:
    for c in doc["classifiers"]:
        numbers([v for s in c["scores"] for v in (s["mean"], s["std"], *s["top1"])], f"scores of {c['name']}")
    info = data.runs[doc["run_id"]]
    chance = 1 / doc["classes"]
    shots = sorted({s["shots"] for c in doc["classifiers"] for s in c["scores"]})
    panel = Panel(f"mean ± std over seeds {', '.join(map(str, doc['seeds']))} (ddof {doc['std_ddof']})",
                  [Curve(c["name"], [(s["shots"], s["mean"]) for s in c["scores"]], [s["std"] for s in c["scores"]])
                   for c in doc["classifiers"]], {s: f"{s}-shot" for s in shots})
    title = f"few-shot ({doc['head']}): {info.describe()}"
    fig = accuracy_figure(f"{info.backbone} on {info.dataset}: few-shot top-1 vs shots per class ({doc['head']})"
                          f"\nrun {info.run_id[:8]}, {doc['test']} test images", [panel], "shots per class (log2 scale)",
                          "top-1 accuracy (test)", chance, "", log2_x=True)
    best = best_point(panel, "")
    note = chance_note(chance, doc["classes"]) + (f"; best mean {best.value:.3f} at {best.where}" if best else "")
    keys = [k for c in doc["classifiers"] for k in c["keys"]]
    at_most = max(shots)
    top = max((s["mean"], c["name"]) for c in doc["classifiers"] for s in c["scores"] if s["shots"] == at_most)
    entry = Entry("fewshot", list(doc["runs"]), joined(timestep_text(k[0]) for k in keys), joined(k[1] for k in keys),
                  settings_text(doc["config"], ["shots", "seeds", "lrs"] + (["train", "head_options"] if doc["head"]
                                                                            in ("logistic", "knn") else [])),
                  f"{at_most}-shot top-1, mean over {len(doc['seeds'])} seeds, best classifier ({top[1]})", top[0])
    return Loaded(name, "fewshot", doc, title, entry, [Figure("few-shot top-1 vs shots", png(fig), note)])


def parse_retrieve(name: str, path: Path, doc: dict, data: ReportData) -> Loaded:
    numbers([m["value"] for m in doc["metrics"].values()], "retrieval metrics")
    q, g = doc["query"], doc["gallery"]

    def maps(s: Mapping[str, Any]) -> str:
        return f"{run_text(data, s['run_id'])}, t={timestep_text(s['timestep'])}, {s['block']}"

    if maps(q) == maps(g):
        title = f"retrieval: {q['domain']} queries vs {g['domain']} gallery, {maps(q)}"
    else:
        title = f"retrieval: {q['domain']} queries ({maps(q)}) vs {g['domain']} gallery ({maps(g)})"
    title += f", split {doc['split']}" if doc.get("split") else ""
    metric, values = next(iter(doc["metrics"].items()))
    entry = Entry("retrieve", list(doc["runs"]), joined([timestep_text(q["timestep"]), timestep_text(g["timestep"])]),
                  joined([q["block"], g["block"]]), settings_text(doc.get("settings") or {}, ["query", "gallery"]),
                  f"{metric} ({variant_text(values)})", values["value"])
    return Loaded(name, "retrieve", doc, title, entry, pngs_of(path))


def variant_text(metric: Mapping[str, Any]) -> str:
    """A retrieval metric's variant as its results entry names it: `ap=noninterp, normalisation=min, ...`."""
    return ", ".join(f"{k}={v}" for k, v in metric.items() if k != "value" and v is not None)


def parse_correspond(name: str, path: Path, doc: dict, data: ReportData) -> Loaded:
    """A `correspond` results file (pipelines/correspond/runner.py): every PCK must be a number
    (a threshold is null where undefined); its entry's score is `correspond_headline`."""
    for m in doc["maps"]:
        for threshold in THRESHOLDS:
            scores = m["pck"]["overall"][threshold]
            if scores is not None:
                numbers([scores[average][str(a)] for average in scores for a in doc["alphas"]],
                        f"PCK at t={timestep_text(m['timestep'])} {m['block']}")
    alpha, threshold, best = correspond_headline(doc)
    maps = doc["maps"]
    title = (f"semantic correspondence (upsample {doc['upsample']}): {run_text(data, doc['run_id'])}, "
             f"{count(len(maps), 'map')}, {doc['pairs']['scored']} pairs")
    entry = Entry("correspond", [doc["run_id"]], joined(timestep_text(m["timestep"]) for m in maps),
                  joined(m["block"] for m in maps), settings_text(doc["settings"]),
                  f"PCK@{alpha} per point, {threshold} threshold (best map, t={timestep_text(best['timestep'])} "
                  f"{best['block']})", best["pck"]["overall"][threshold]["per_point"][alpha])
    return Loaded(name, "correspond", doc, title, entry)


def correspond_headline(doc: Mapping[str, Any]) -> tuple[str, str, dict]:
    """(alpha, threshold, map) of a correspondence result's headline score: PCK per point at alpha
    0.1 (the first alpha when 0.1 was not asked for), on the bbox threshold (DIFT's) unless a map
    has it undefined, then on the image; the map where it is highest."""
    alphas = [str(a) for a in doc["alphas"]]
    alpha = "0.1" if "0.1" in alphas else alphas[0]
    bbox = all(m["pck"]["overall"]["bbox"] is not None for m in doc["maps"])
    threshold = "bbox" if bbox else "image"
    best = max(doc["maps"], key=lambda m: m["pck"]["overall"][threshold]["per_point"][alpha])
    return alpha, threshold, best


def parse_other(name: str, path: Path, doc: dict, data: ReportData) -> Loaded:
    numbers_ = headline(doc)
    score = next((v for k, v in numbers_.items() if k.startswith("top1") and isinstance(v, (int, float))), None)
    entry = Entry(name.split("/")[-1].split("-")[0].removesuffix(".json"), list(doc["runs"]),
                  timestep_text(doc["timestep"]) if "timestep" in doc else "—", str(doc.get("block", "—")),
                  settings_text(doc.get("settings") or {}), "top-1" if score is not None else "—", score)
    return Loaded(name, "other", doc, name, entry, pngs_of(path))


# dense results (`featurestore segment` / `depth`): the metric each task's table and plot show, its label
DENSE_METRICS = {"segment": ("miou", "mIoU (test)"), "openvocab": ("harmonic", "harmonic mean of seen and unseen mIoU"),
                 "depth": ("abs_rel", "AbsRel (test, lower is better)")}


def parse_dense(name: str, path: Path, doc: dict, data: ReportData) -> Loaded:
    """A `segment`/`depth` results.json: its heads' metric per (t, block), and the figures: the
    metric per (t, block) as a heatmap (single-map heads) and the examples.npz beside it (ground
    truth and every head's prediction of the first test images)."""
    key, label = DENSE_METRICS[doc["task"]]
    for h in doc["heads"]:
        numbers([v for v in (h[key],) if v is not None], f"{key} of head {h.get('name')}")
    info = data.runs[doc["run_id"]]
    config = doc["config"]
    title = f"{doc['task']} ({', '.join(sorted({h['kind'] for h in doc['heads']}))}): {run_text(data, doc['run_id'])}"
    scored = [h for h in doc["heads"] if h[key] is not None]
    best = (min if doc["task"] == "depth" else max)(scored, key=lambda h: h[key]) if scored else None
    which = f"{label} of the best head ({best['name']})" if best else f"{label}: undefined for every head"
    entry = Entry(doc["task"], list(doc["runs"]), joined(map(timestep_text, config["timesteps"])), joined(config["blocks"]),
                  settings_text(config, ["train"]), which, best[key] if best else None)
    figures = []
    single = {(h["keys"][0][0], h["keys"][0][1]): h[key] for h in doc["heads"] if len(h["keys"]) == 1}
    if len(single) > 1:
        timesteps = list(dict.fromkeys(t for t, _ in single))
        blocks = list(dict.fromkeys(b for _, b in single))
        matrix = [[single.get((t, b)) for b in blocks] for t in timesteps]
        fig = heatmap_figure(f"{info.backbone} on {info.dataset}\n{label} per (t, block)",
                             {key: matrix}, [f"t={timestep_text(t)}" for t in timesteps], blocks, label)
        figures.append(Figure(f"{label} per (t, block)", png(fig)))
    examples = path.parent / "examples.npz"
    if examples.is_file():
        with np.load(examples) as ex:
            heads = [h["name"] for h in doc["heads"] if h["name"] in ex.files][:6]
            fig = dense_examples_figure(f"{info.backbone} on {info.dataset}\nground truth and predictions (test)",
                                        [str(i) for i in ex["ids"]], ex["truth"], {h: ex[h] for h in heads},
                                        doc.get("ignore_index") if doc["task"] != "depth" else None)
        figures.append(Figure("ground truth and predictions of the first test images", png(fig),
                              "grey: ignored or invalid pixels"))
    return Loaded(name, "dense", doc, title, entry, figures)


PARSERS: dict[str, Callable[[str, Path, dict, ReportData], Loaded]] = {
    "sweep": parse_sweep, "cka": parse_cka, "probe": parse_probe, "heads": parse_heads, "knn": parse_knn,
    "fewshot": parse_fewshot, "retrieve": parse_retrieve, "dense": parse_dense, "correspond": parse_correspond,
    "other": parse_other,
}


def pngs_of(path: Path) -> list[Figure]:
    """The plots saved beside a results file: `<stem>.png` and `<stem>-*.png`, except those that
    belong to another results file (`<stem>-x.png` next to `<stem>-x.json`)."""
    own = [path.with_suffix(".png")] if path.with_suffix(".png").is_file() else []
    more = [p for p in sorted(path.parent.glob(f"{path.stem}-*.png")) if not p.with_suffix(".json").is_file()]
    return [png_figure(p) for p in own + more]


def png_figure(path: Path) -> Figure:
    png_bytes = path.read_bytes()
    if not png_bytes.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path.name} is not a PNG file")
    return Figure(path.name, png_bytes)


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


def headline(doc: Any) -> dict[str, Any]:
    """The numbers worth a glance of a file of no known kind: ids, top-1/top-5 (per k when a dict)."""
    if not isinstance(doc, dict):
        return {}
    out: dict[str, Any] = {}
    for key in HEADLINE_KEYS:
        value = doc.get(key)
        if isinstance(value, dict):
            out.update({f"{key} k={k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (str, int, float)):
            out[key] = value
    return out
