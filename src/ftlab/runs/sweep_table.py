"""A sweep's summary from its points' run directories: summary.csv and summary.md (one row per point: its values,
status and final metrics) and, for a K-sweep, val_loss_vs_k.png (see ftlab.runs.sweep)."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from ftlab.errors import UserError
from ftlab.runs.sweep_plan import K_KEY, Point, Sweep
from ftlab.runs.trackers import read_metrics

log = logging.getLogger("ftlab")

LEADING = ["steps", "train_tokens", "categories", "train/loss"]  # metric columns first in the table, when present


def stitched_metrics(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """The metrics.jsonl rows of a point's attempts as one run, by step: a resumed attempt's row replaces the row an
    earlier attempt logged for the same step (the steps after the checkpoint it resumed from)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for run in run_dirs:
        if (run / "metrics.jsonl").is_file():
            for row in read_metrics(run / "metrics.jsonl"):
                axis = next((a for a in ("train", "eval") if f"{a}_step" in row), None)
                if axis:
                    rows[(axis, row[f"{axis}_step"])] = row
    return [rows[key] for key in sorted(rows)]


def final_metrics(verb: str, run_dirs: list[Path]) -> dict[str, Any]:
    """A point's final metrics: training's last train/loss and last evaluation (and the best eval/loss), an
    evaluation's headline metrics, a loop's last evaluated iteration."""
    if not run_dirs:
        return {}
    summary_path = run_dirs[-1] / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if verb == "eval":
        return numbers(summary.get("metrics") or {})
    if verb == "loop":
        return {"iterations_evaluated": summary.get("iterations_evaluated"), **numbers(summary.get("last") or {})}
    rows = stitched_metrics(run_dirs)
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval_step" in r]
    out: dict[str, Any] = {"steps": max((r["train_step"] for r in train), default=None),
                           "train_tokens": sum(r.get("train/supervised_tokens", r.get("train/predicted_tokens", 0))
                                               for r in train) or None}
    if summary.get("categories"):
        out["categories"] = " ".join(summary["categories"])
    if train:
        out["train/loss"] = train[-1]["train/loss"]
    if evals:
        out.update(numbers({k: v for k, v in evals[-1].items() if k.startswith("eval/")}))
        losses = [r["eval/loss"] for r in evals if isinstance(r.get("eval/loss"), (int, float))]
        if losses:
            out["best eval/loss"] = min(losses)
    return out


def numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def point_row(sweep: Sweep, point: Point, sweep_dir: Path) -> dict[str, Any]:
    runs = [sweep_dir / a for a in point.attempts]
    try:
        metrics = final_metrics(sweep.verb, runs)
    except (UserError, ValueError) as e:  # a damaged metrics line or summary: the row says so, the table is made
        log.warning("sweep point %s: %s", point.label, e)
        metrics = {"error": str(e)}
    return {"point": point.label, **point.values, "status": point.status, **metrics, "run": point.run or ""}


def write_tables(sweep: Sweep, sweep_dir: Path) -> list[dict[str, Any]]:
    """summary.csv and summary.md, every point in plan order (pending ones too, so a sweep cut short shows
    what finished); returns the rows."""
    from ftlab.runs.report import markdown_table

    rows = [point_row(sweep, p, sweep_dir) for p in sweep.points]
    head = ["point", *sweep.grid, *(["seed"] if sweep.seeds is not None else []), "status"]
    seen = [k for r in rows for k in r if k not in head and k != "run"]
    metrics = [k for k in LEADING if k in seen] + [k for k in dict.fromkeys(seen) if k not in LEADING]
    columns = head + metrics + ["run"]
    tmp = sweep_dir / "summary.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(sweep_dir / "summary.csv")
    table = markdown_table(columns, [[cell(r.get(c)) for c in columns] for r in rows])
    (sweep_dir / "summary.md").write_text(table + "\n", encoding="utf-8")
    return rows


def cell(value: Any) -> Any:
    return "" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else value


def plot_k_sweep(rows: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Final validation loss and bits per byte against K: one line per seed and their mean (complete points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [r for r in rows if r["status"] == "complete" and K_KEY in r]
    if not done:
        return None
    ks = sorted({r[K_KEY] for r in done})
    seeds = sorted({r.get("seed", -1) for r in done})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(axes, ("eval/loss", "eval/bits_per_byte"),
                              ("final validation loss (nats / token)", "final validation bits per byte")):
        table = {(r.get("seed", -1), r[K_KEY]): r[key] for r in done if r.get(key) is not None}
        for s in seeds:
            pts = [(k, table[(s, k)]) for k in ks if (s, k) in table]
            if pts:
                ax.plot(*zip(*pts), "o-", lw=1, alpha=0.6, label=f"seed {s}" if s >= 0 else "run")
        means = [(k, float(np.mean([table[(s, k)] for s in seeds if (s, k) in table]))) for k in ks
                 if any((s, k) in table for s in seeds)]
        if means and len(seeds) > 1:
            ax.plot(*zip(*means), "s-", color="black", lw=2.2, label="mean")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (number of categories trained on)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
