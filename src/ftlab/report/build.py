"""`ftlab report RUN_OR_SWEEP_DIR... --out DIR`: one comparison of runs, from their directories alone.

The report holds, in this order: problems found while reading (damaged metrics lines, runs that never
started), a table of every run (status, last step, final and best metrics with intervals, trainable
parameters, wall time, tokens, peak memory, what makes it not comparable), seed groups (mean and 95% t
interval), paired differences of evaluations of the same rows, the overlaid curves, the sweep plots, and per kind of run the comparability properties and the
configuration keys that differ. Each comparability flag is written under the plot or table it spoils.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ftlab.errors import UserError
from ftlab.report import compare as C
from ftlab.report.curves import PANELS, Final, finals
from ftlab.report.paired import paired_section
from ftlab.report.render import (
    WARN,
    Block,
    Heading,
    Image,
    Table,
    Text,
    markdown,
    page,
    write_atomically,
)
from ftlab.report.runs import (
    Run,
    discover,
    load_run,
    peak_memory,
    tokens_seen,
    trainable_parameters,
    wall_seconds,
)
from ftlab.report.stats import mean_interval, wilson_interval

STAMP = re.compile(r"\d{8}_\d{6}_")  # run directories start with one; an evaluation's name may hold another


def build_report(paths: Sequence[str | Path], out: str | Path, axis: str = "step", window: int = 0) -> Path:
    """Write report.md, its PNGs and report.html into `out`; returns the folder."""
    found = discover(paths)  # no run at all: one line before anything is written
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    runs = [load_run(path, status) for path, status in tqdm(found, desc="runs", disable=not sys.stderr.isatty())]
    label_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    images = out / "img"
    shutil.rmtree(images, ignore_errors=True)  # an earlier report's plots must not linger beside this one
    images.mkdir()
    groups = C.seed_groups(runs)
    blocks: list[Block] = [Heading("Run report", 1), Text(intro(paths, runs, axis, window))]
    blocks += problems_section(runs)
    blocks += runs_section(runs, groups)
    blocks += groups_section(groups)
    blocks += paired_section(runs)
    blocks += curves_section(runs, groups, axis, window, images)
    blocks += sweeps_section(runs, groups, images)
    for kind in dict.fromkeys(r.kind for r in runs):
        blocks += kind_section(kind, [r for r in runs if r.kind == kind], groups)
    write_atomically(out / "report.md", markdown(blocks, out))
    write_atomically(out / "report.html", page(blocks, "ftlab report"))
    return out


def label_runs(runs: list[Run]) -> None:
    """Short unique names: the directory name without its time stamp (a repeat gets #2, #3, ...)."""
    seen: dict[str, int] = {}
    for run in runs:
        base = STAMP.sub("", run.name) or run.name
        seen[base] = seen.get(base, 0) + 1
        run.label = base if seen[base] == 1 else f"{base}#{seen[base]}"


def intro(paths: Sequence[str | Path], runs: list[Run], axis: str, window: int) -> str:
    smoothing = f"trailing mean over {window} points (training curves only)" if window > 1 else "off"
    return (f"{len(runs)} runs from {', '.join(map(str, paths))}. Curves by {axis}; smoothing {smoothing}. "
            "Intervals are 95%: Wilson for an accuracy over n answers, Student's t for a mean over seeds.")


def problems_section(runs: list[Run]) -> list[Block]:
    lines = [p for r in runs for p in r.problems]
    lines += [f"{r.label}: {r.status}, last step {step(r)}" for r in runs if r.status != "complete"]
    if not lines:
        return []
    return [Heading("Problems and unfinished runs"), *(Text(line, warn=True) for line in lines)]


# -- tables --------------------------------------------------------------------------------------------
def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def final_text(f: Final) -> str:
    text = f"{f.key} {fmt(f.final)}"
    if f.n:
        lo, hi = wilson_interval(f.final, f.n)
        text += f" [{lo:.3f}, {hi:.3f}] (n={f.n})"
    return text


def best_text(f: Final) -> str | None:
    return None if f.best is None else f"{f.key} {fmt(f.best)}"


def step(run: Run) -> str:
    return "—" if run.last_step is None else str(run.last_step)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s"


def runs_section(runs: list[Run], groups: list[C.Group]) -> list[Block]:
    size = {r.label: g.size for g in groups for r in g.runs}
    odd: dict[str, list[str]] = {}
    for kind in dict.fromkeys(r.kind for r in runs):
        mine = [r for r in runs if r.kind == kind]
        for what in C.SPOILS["table"]:
            for label in C.odd_ones(mine, what):
                odd.setdefault(label, []).append(what)
    header = ["run", "kind", "status", "last step", "seeds in group", "final", "best", "trainable params",
              "wall time", "tokens seen", "peak memory", f"{WARN} differs in",
              "directory"]
    rows = []
    for r in runs:
        fs = finals(r)
        rows.append([r.label, r.kind, r.status, step(r),
                     str(size[r.label]), "; ".join(final_text(f) for f in fs) or "—",
                     "; ".join(t for f in fs if (t := best_text(f))) or "—", trainable_parameters(r) or "—",
                     duration(wall_seconds(r)), C.human(tokens_seen(r)), str(peak_memory(r) or "not recorded"),
                     ", ".join(odd.get(r.label, [])) or "—", str(r.path)])
    return [Heading("Runs"), Table(header, rows, [r.label for r in runs])]


def groups_section(groups: list[C.Group]) -> list[Block]:
    seeded = [g for g in groups if g.size > 1]
    if not seeded:
        return []
    rows = []
    for g in seeded:
        per_run = [{f.key: f.final for f in finals(r)} for r in g.runs]
        keys = [k for k in per_run[0] if all(k in p for p in per_run)]
        cells = []
        for k in keys:
            mean, lo, hi = mean_interval([p[k] for p in per_run])
            cells.append(f"{k} {fmt(mean)} [{fmt(lo)}, {fmt(hi)}]")
        seeds = ", ".join(str(r.config.get("seed")) for r in g.runs)
        rows.append([g.label, str(g.size), seeds, "; ".join(cells) or "—"])
    return [Heading("Seed groups (runs that differ only in seed)"),
            Table(["group", "runs", "seeds", "final metrics: mean [95% t interval]"], rows)]


def kind_section(kind: str, runs: list[Run], groups: list[C.Group]) -> list[Block]:
    if len(runs) < 2:
        return []
    blocks: list[Block] = [Heading(f"{kind} runs: comparability and configuration")]
    table_flags = C.flags(runs, groups, "table")
    differing = {f.what for f in table_flags}
    header = ["run"] + [f"{WARN} {w}" if w in differing else w for w in C.PROPERTIES] + ["seeds in group"]
    size = {r.label: g.size for g in groups for r in g.runs}
    rows = []
    for r in runs:
        values = [C.PROPERTIES[w](r) for w in C.PROPERTIES]
        rows.append([r.label] + [("not recorded" if v is None else C.human(v) if w == "tokens seen" else str(v))
                                 for w, v in zip(C.PROPERTIES, values)] + [str(size[r.label])])
    blocks.append(Table(header, rows, [r.label for r in runs]))
    blocks += [Text(f.line(), warn=True) for f in table_flags]
    keys = C.differing_keys([r.config for r in runs])
    if keys:
        blocks.append(Text("Configuration keys that differ (every other key is equal):"))
        blocks.append(Table(["key"] + [r.label for r in runs],
                            [[k] + [str(r.config.get(k, "—")) for r in runs] for k in keys]))
    else:
        blocks.append(Text("The configurations are identical (names and output folders aside)."))
    return blocks


# -- plots ---------------------------------------------------------------------------------------------
# matplotlib is imported where a plot is drawn: this module registers `ftlab report` on every command's parser,
# and importing matplotlib there cost every ftlab command (each process of a launch) half a second.
def curves_section(runs: list[Run], groups: list[C.Group], axis: str, window: int, images: Path) -> list[Block]:
    from ftlab.report.plots import plot_panel

    blocks: list[Block] = []
    by_label = {r.label: r for r in runs}
    for i, panel in enumerate(PANELS):
        plot = plot_panel(panel, groups, axis, window, images / f"curve_{i:02d}_{slug(panel.title)}.png")
        if plot is None:
            continue
        shown = [by_label[label] for label in plot.runs]
        blocks.append(Heading(panel.title, 3))
        if plot.path is not None:
            blocks.append(Image(plot.path, f"{panel.title} by {axis}"))
        blocks += [Text(f"Not comparable here: {f.line()}", warn=True) for f in C.flags(shown, groups, panel.comparison)]
        if plot.off_axis:
            blocks.append(Text(f"Not on the {axis} axis (nothing recorded to place them): {', '.join(plot.off_axis)}"))
    return [Heading(f"Curves (x: {axis})"), *blocks] if blocks else []


def sweeps_section(runs: list[Run], groups: list[C.Group], images: Path) -> list[Block]:
    from ftlab.report.sweeps import sweep_plots

    blocks: list[Block] = []
    by_label = {r.label: r for r in runs}
    for plot in sweep_plots(runs, images):
        shown = [by_label[label] for label in plot.runs]
        blocks += [Heading(plot.title, 3), Image(plot.path, plot.title)]
        blocks += [Text(f"Not comparable here: {f.line()}", warn=True) for f in C.flags(shown, groups, plot.comparison)]
        if plot.left_out:
            blocks.append(Text(f"Left out (setting not recorded): {', '.join(plot.left_out)}"))
    return [Heading("Sweeps"), *blocks] if blocks else []


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# -- command line --------------------------------------------------------------------------------------
def add_report_verbs(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="compare runs and sweeps: report.md with plots, and one report.html",
                         description="overlaid curves, seed groups with 95%% bands, a summary table, configuration "
                                     "differences, comparability flags and sweep plots, from run directories only")
    rep.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                     help="run directories, sweep directories, or folders holding them (e.g. runs/)")
    rep.add_argument("--out", required=True, help="folder to write report.md, report.html and img/ into")
    rep.add_argument("--x", choices=["step", "tokens", "time"], default="step", help="x axis of the curves")
    rep.add_argument("--smooth", type=int, default=0, metavar="N",
                     help="trailing mean over N points on training curves (default: off)")
    rep.set_defaults(fn=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    if args.smooth < 0:
        raise UserError(f"--smooth must be >= 0, got {args.smooth}")
    out = build_report(args.paths, args.out, args.x, args.smooth)
    print(out / "report.md")
    print(out / "report.html")
    return 0
