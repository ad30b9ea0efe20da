"""Sweep plots: a final metric against a swept setting, one line per method.

    accuracy against training-set size (data.limit; unset: the run's own example count), log axis
    validation loss and bits per byte against K (pretrain.num_categories), log axis

A method is whatever else differs between the runs (lora.enabled, data.train, ...), read for an evaluation from
the training run whose model it scored. A plot is drawn only where the setting takes two or more values.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftlab.report.compare import differing_keys, is_setting
from ftlab.report.curves import finals
from ftlab.report.plots import Point, accuracy_point, sweep_plot
from ftlab.report.runs import Run, training_examples

ACCURACY_KEYS = ("accuracy", "answer_accuracy", "eval/accuracy", "eval/answer_accuracy")
# Per-run values that say nothing about the method: which weights an evaluation loaded, where it ran.
PER_RUN = ("seed", "model.adapter")


@dataclass
class SweepPlot:
    title: str
    path: Path
    runs: list[str]
    comparison: str
    left_out: list[str]


def settings(run: Run) -> dict[str, Any]:
    config = run.origin if run.kind == "eval" and run.origin else run.config
    return {k: v for k, v in config.items() if is_setting(k) and k not in PER_RUN}


def method_lines(runs: Sequence[Run], x_key: str) -> dict[str, str]:
    """Run label -> its line's name: the values of the settings (other than x) that differ between runs."""
    configs = [settings(r) for r in runs]
    keys = [k for k in differing_keys(configs) if k != x_key][:3]
    return {r.label: ", ".join(f"{k}={c.get(k)}" for k in keys) or "all runs" for r, c in zip(runs, configs)}


def accuracy_of(run: Run) -> tuple[float, int | None] | None:
    for f in finals(run):
        if f.key in ACCURACY_KEYS:
            return f.final, f.n
    return None


def final_of(key: str) -> Callable[[Run], tuple[float, None] | None]:
    def get(run: Run) -> tuple[float, None] | None:
        found = next((f for f in finals(run) if f.key == key), None)
        return (found.final, None) if found else None
    return get


def dataset_size(run: Run) -> float | None:
    if run.kind == "eval" and run.origin_path is None:  # a base model: its recipe's data.limit trained nothing
        return None
    limit = run.setting("data.limit")
    return float(limit) if isinstance(limit, int) else (float(n) if (n := training_examples(run)) else None)


def num_categories(run: Run) -> float | None:
    k = run.setting("pretrain.num_categories")
    return float(k) if isinstance(k, int) else None


def is_pretraining(run: Run) -> bool:
    return run.setting("train.method") == "pretrain"


def collect(runs: Sequence[Run], x_of: Callable[[Run], float | None], y_of: Callable[[Run], Any],
            x_key: str) -> tuple[list[Point], list[Run], list[str]]:
    """The points of one sweep plot, the runs behind them, and the labels of runs with y but no x."""
    have = [r for r in runs if r.status == "complete" and y_of(r) is not None]
    placed = [r for r in have if x_of(r) is not None]
    lines = method_lines(placed, x_key)
    points = []
    for r in placed:
        y, n = y_of(r)
        points.append(accuracy_point(lines[r.label], x_of(r), y, n) if n else Point(lines[r.label], x_of(r), y))
    return points, placed, [r.label for r in have if r not in placed]


def sweep_plots(runs: Sequence[Run], out: Path) -> list[SweepPlot]:
    specs = [
        ("accuracy against training-set size", "sweep_accuracy_vs_size.png", dataset_size, accuracy_of,
         "data.limit", "training examples (data.limit)", "accuracy", 2, "accuracy"),
        ("validation loss against K", "sweep_val_loss_vs_k.png", num_categories, final_of("eval/loss"),
         "pretrain.num_categories", "K (pretrain.num_categories)", "final validation loss", 2, "eval"),
        ("validation bits per byte against K", "sweep_bpb_vs_k.png", num_categories, final_of("eval/bits_per_byte"),
         "pretrain.num_categories", "K (pretrain.num_categories)", "final bits per byte", 2, "eval"),
    ]
    # A training run's in-training accuracy and an evaluation of its model would count the same model twice:
    # an evaluation (or a loop) speaks for the model it scored; a training run nothing evaluated speaks for itself.
    scored = [r for r in runs if r.kind in ("eval", "loop") and accuracy_of(r) is not None]
    evaluated = {r.origin_path for r in scored if r.origin_path is not None}
    scored += [r for r in runs if r.kind not in ("eval", "loop") and r.path not in evaluated]
    pretraining = [r for r in runs if is_pretraining(r)]  # K is a pretraining setting
    plots = []
    for title, name, x_of, y_of, x_key, xlabel, ylabel, base, comparison in specs:
        among = scored if comparison == "accuracy" else pretraining
        points, placed, left_out = collect(among, x_of, y_of, x_key)
        if len({p.x for p in points}) < 2:
            continue
        sweep_plot(points, out / name, title, xlabel, ylabel, base)
        plots.append(SweepPlot(title, out / name, [r.label for r in placed], comparison, left_out))
    return plots
