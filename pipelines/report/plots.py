"""The report's figures, drawn with matplotlib (Agg) from the results JSON.

Each `*_figure` function returns a matplotlib Figure (so tests can read its titles, lines and
colour limits); `png` turns one into PNG bytes and closes it. Accuracy plots carry a dashed chance
line (1 / number of classes, labelled) and mark their best point (the argmax, annotated with its
value and where it is). The t axis of accuracy-vs-t plots is linear or symmetric-log (`T_AXES`):
symlog is linear between 0 and the smallest positive t and logarithmic above it, so t=0 has a place
and 0, 10, 50 are not crowded into one corner next to 500.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

T_AXES = ("log", "linear")
MAX_TICKS = 16  # x values labelled one by one; more are left to a locator
DPI = 110
BEST_COLOUR = "#d1242f"
CHANCE_COLOUR = "#57606a"
NA_COLOUR = "#d0d7de"

Point = tuple[float, float]  # (x, accuracy)


@dataclass(frozen=True)
class Curve:
    label: str  # legend entry: a block, "t=100", a classifier
    points: list[Point]  # x ascending
    errors: list[float] | None = None  # one per point (a std over seeds), drawn as error bars


@dataclass(frozen=True)
class Panel:
    title: str
    curves: list[Curve]
    x_names: Mapping[float, str] = field(default_factory=dict)  # what each x means, for the best point's note


@dataclass(frozen=True)
class Best:
    label: str  # the curve it lies on
    x: float
    value: float
    where: str  # "t=0, block2"


def best_point(panel: Panel, x_name: str) -> Best | None:
    """The point of highest accuracy over every curve of the panel (the first one on ties, in curve
    then x order); None for a panel without points. `x_name` names the x value ("t=" for timesteps;
    "" with `panel.x_names` for categorical axes)."""
    best: Best | None = None
    for curve in panel.curves:
        for x, y in curve.points:
            if best is None or y > best.value:
                where = panel.x_names.get(x, f"{x_name}{x:g}")
                best = Best(curve.label, x, y, f"{where}, {curve.label}")
    return best


def accuracy_figure(
    title: str, panels: Sequence[Panel], xlabel: str, ylabel: str, chance: float | None, x_name: str,
    t_axis: str | None = None, categories: Sequence[str] | None = None, log2_x: bool = False,
) -> Figure:
    """Accuracy curves side by side (one panel each, shared y), one legend on the right for all
    (the panels draw the same curves). `chance`: the dashed chance line (None: unknown, not drawn);
    `t_axis` ("log": symlog, "linear", None: not a t axis); `categories`: x is the index into these
    names (blocks); `log2_x`: a base-2 log axis (shots). The best point of each panel is circled and
    its value written above it; its Line2D is labelled `best <value> (<where>)`."""
    if t_axis is not None and t_axis not in T_AXES:
        raise ValueError(f"--t-axis takes {' or '.join(T_AXES)}, got {t_axis!r}")
    fig = Figure(figsize=(4.9 * len(panels) + 1.9, 4.3), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    xs = sorted({x for p in panels for c in p.curves for x, _ in c.points})
    legend: list = []
    for ax, panel in zip(axes, panels):
        handles = []
        for curve in panel.curves:
            x, y = zip(*curve.points) if curve.points else ((), ())
            if curve.errors is not None:
                handles.append(ax.errorbar(x, y, yerr=curve.errors, marker="o", ms=4, capsize=3, label=curve.label))
            else:
                handles += ax.plot(x, y, marker="o", ms=4, label=curve.label)
        if chance is not None:
            handles.append(ax.axhline(chance, color=CHANCE_COLOUR, ls="--", lw=1.2, label=chance_label(chance)))
        best = best_point(panel, x_name)
        if best is not None:
            handles += ax.plot([best.x], [best.value], marker="o", ms=13, mfc="none", mec=BEST_COLOUR, mew=2, ls="none",
                               label=f"best {best.value:.3f} ({best.where})")
            ax.annotate(f"{best.value:.3f}", (best.x, best.value), xytext=(0, 10), textcoords="offset points",
                        ha="center", va="bottom", color=BEST_COLOUR, fontsize=9, fontweight="bold")
        legend = legend or handles
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if categories is not None:
            ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 6 else 0)
        elif xs:
            if t_axis == "log":
                ax.set_xscale("symlog", linthresh=min([x for x in xs if x > 0], default=1.0), linscale=0.4)
            elif log2_x:
                ax.set_xscale("log", base=2)
            if len(xs) <= MAX_TICKS:
                ax.set_xticks(xs, [f"{x:g}" for x in xs], rotation=45 if len(xs) > 8 else 0)
            else:  # many x values (epochs): let matplotlib choose whole numbers
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.minorticks_off()
    axes[0].set_ylabel(ylabel)
    top = max([y for p in panels for c in p.curves for _, y in c.points] + [chance or 0.0])
    axes[0].set_ylim(0, min(1.0, top) * 1.12 + 0.02)  # room above the best point for its value
    labels = [h.get_label() for h in legend]
    if legend and labels[-1].startswith("best"):
        labels[-1] = "best (circled,\nvalue above)"
    fig.legend(legend, labels, loc="outside right center", fontsize=8)
    fig.suptitle(title, fontsize=11)
    return fig


def chance_label(chance: float) -> str:
    """`chance 1/10 = 0.100` (`chance 0.123` when it is not one over a whole number of classes)."""
    classes = round(1 / chance)
    return f"chance 1/{classes} = {chance:.3f}" if abs(1 / classes - chance) < 1e-12 else f"chance {chance:.3f}"


def heatmap_figure(title: str, matrices: Mapping[str, list[list[float | None]]], rows: Sequence[str],
                   cols: Sequence[str], label: str) -> Figure:
    """One heatmap per matrix (`label (name)` over its colour bar), each coloured from its own
    smallest to its largest finite value (a range of width 0 is widened by 0.005 each way); None
    cells are grey and read n/a. Every cell shows its value."""
    fig = Figure(figsize=(max(3.6, 0.55 * len(cols) + 2.4) * len(matrices), max(3.2, 0.45 * len(rows) + 2.0)),
                 dpi=DPI)
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    for ax, (name, matrix) in zip(axes, matrices.items()):
        m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
        lo, hi = color_limits(m)
        ax.set_facecolor(NA_COLOUR)
        image = ax.imshow(np.ma.masked_invalid(m), vmin=lo, vmax=hi, cmap="viridis")
        ax.set_xticks(range(len(cols)), cols, rotation=45 if max(map(len, cols), default=0) > 3 else 0, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        small = len(cols) > 10
        for (i, j), value in np.ndenumerate(m):
            shade = 0.0 if np.isnan(value) else (value - lo) / (hi - lo)
            ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center", va="center",
                    fontsize=6 if small else 8, color="black" if np.isnan(value) or shade > 0.6 else "white")
        ax.set_title(name, fontsize=10)
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(f"{label} ({name})", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def color_limits(m: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax): the smallest and largest finite values of `m`; (0, 1) when none is finite."""
    finite = m[np.isfinite(m)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo - 0.005, hi + 0.005) if hi - lo < 1e-9 else (lo, hi)


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def dense_examples_figure(title: str, ids: Sequence[str], truth: np.ndarray, predictions: Mapping[str, np.ndarray],
                          ignore_index: int | None) -> Figure:
    """A row per test image: its ground truth, then each head's prediction, side by side. Masks
    (uint8 class indices, `ignore_index` set) share one categorical colour scale, ignored pixels
    grey; depth maps (ignore_index None; 0 = invalid, grey) share one viridis scale in metres."""
    columns = {"ground truth": truth, **predictions}
    fig = Figure(figsize=(1.5 * len(columns) + 0.6, 1.5 * len(ids) + 0.8), dpi=DPI)
    axes = fig.subplots(len(ids), len(columns), squeeze=False)
    if ignore_index is not None:
        valid = [m[m != ignore_index] for m in columns.values()]
        lo, hi, cmap = 0, max([int(v.max()) for v in valid if v.size] + [1]), "tab20"
    else:
        finite = truth[truth > 0]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        cmap = "viridis"
    for i, image_id in enumerate(ids):
        for j, (name, maps) in enumerate(columns.items()):
            ax = axes[i, j]
            m = maps[i].astype(float)
            hidden = m == ignore_index if ignore_index is not None else (truth[i] <= 0)
            ax.set_facecolor(NA_COLOUR)
            ax.imshow(np.ma.masked_where(hidden, m), vmin=lo, vmax=hi, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
            if j == 0:
                ax.set_ylabel(str(image_id)[-18:], fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
