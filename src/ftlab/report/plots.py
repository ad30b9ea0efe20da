"""Matplotlib figures of a report: overlaid curves (seed groups as a mean line with a 95% band) and sweep
plots (a final metric against a swept setting, one line per method)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are files; no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ftlab.report.compare import Group  # noqa: E402
from ftlab.report.curves import AXES, Panel, panel_key, series  # noqa: E402
from ftlab.report.stats import band, mean_interval, smooth, wilson_interval  # noqa: E402

DPI = 110


@dataclass
class CurvePlot:
    """A panel: its file (None when no run could be placed on the chosen axis), and the runs it could not place."""

    panel: Panel
    path: Path | None
    runs: list[str]
    off_axis: list[str] = field(default_factory=list)


def status_note(group: Group) -> str:
    run = group.runs[0]
    return "" if run.status == "complete" else f" [{run.status}, last step {run.last_step}]"


def plot_panel(panel: Panel, groups: Sequence[Group], axis: str, window: int, out: Path) -> CurvePlot | None:
    """One metric overlaid across runs; None when no run logged it."""
    drawn: list[tuple[Group, list[tuple[list[float], list[float]]]]] = []
    off_axis = []
    for g in groups:
        curves = []
        for run in g.runs:
            key = panel_key(run, panel)
            if key is None:
                continue
            xy = series(run, key, axis)
            if xy is None:
                off_axis.append(run.label)
                continue
            xs, ys = xy
            curves.append((xs, smooth(ys, window) if key.startswith("train/") else ys))
        if curves:
            drawn.append((g, curves))
    if not drawn:
        return CurvePlot(panel, None, [], off_axis) if off_axis else None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for g, curves in drawn:
        if len(curves) == 1:
            xs, ys = curves[0]
            ax.plot(xs, ys, "o-" if len(xs) <= 12 else "-", ms=3, lw=1.3, label=g.label + status_note(g))
            continue
        x, mean, lo, hi = band(curves)
        (line,) = ax.plot(x, mean, "-", lw=1.8, label=f"{g.label}: mean, 95% t band (n={len(curves)})")
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    if panel.log_y:
        ax.set_yscale("log")
    ax.set_xlabel(AXES[axis])
    ax.set_title(panel.title + (f" (smoothed over {window} points)" if window > 1 and panel.comparison == "train"
                                else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, out)
    return CurvePlot(panel, out, [r.label for g, _ in drawn for r in g.runs], off_axis)


@dataclass
class Point:
    """One run's final value at a swept setting; `interval` is its own (Wilson) interval, if any."""

    line: str
    x: float
    y: float
    interval: tuple[float, float] | None = None


def sweep_plot(points: Sequence[Point], out: Path, title: str, xlabel: str, ylabel: str, log_base: int) -> Path:
    """One line per method through the mean at each x; several runs at one x (seeds) get a 95% t interval,
    a single accuracy its Wilson interval."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for line in dict.fromkeys(p.line for p in points):
        mine = [p for p in points if p.line == line]
        xs = sorted({p.x for p in mine})
        ys, los, his = [], [], []
        for x in xs:
            here = [p for p in mine if p.x == x]
            if len(here) == 1 and here[0].interval:
                mean, (lo, hi) = here[0].y, here[0].interval
            else:
                mean, lo, hi = mean_interval([p.y for p in here])
            ys.append(mean)
            los.append(mean - lo if np.isfinite(lo) else 0.0)
            his.append(hi - mean if np.isfinite(hi) else 0.0)
        ax.errorbar(xs, ys, yerr=[los, his], fmt="o-", capsize=3, lw=1.4, label=line)
        ax.scatter([p.x for p in mine], [p.y for p in mine], s=8, color="grey", alpha=0.6, zorder=3)
    ax.set_xscale("log", base=log_base)
    ax.set_xticks(sorted({p.x for p in points}), [f"{p:g}" for p in sorted({p.x for p in points})])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, out)
    return out


def accuracy_point(line: str, x: float, accuracy: float, n: int | None) -> Point:
    return Point(line, x, accuracy, wilson_interval(accuracy, n) if n else None)


def save(fig: plt.Figure, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
