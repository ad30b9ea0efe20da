"""Intervals for a report: Wilson for an accuracy over n answers, Student's t for a mean over seeds, a paired
bootstrap for the difference of two runs on the same questions."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from ftlab.data.jsonl import iter_jsonl
from ftlab.tasks.scoring import bootstrap_ci

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond 30 the normal quantile is
# within 2% of t). Seed groups are small (2-5 runs), where t is much wider than the normal 1.96.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = NormalDist().inv_cdf(0.975)


def wilson_interval(accuracy: float, n: int, z: float = Z975) -> tuple[float, float]:
    """The Wilson score interval of a proportion: unlike accuracy +- z*sd it stays inside [0, 1] and is not
    zero-width at 0% or 100% (5 of 5 right still leaves the true rate uncertain)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def t_quantile(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else Z975


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t interval of the mean of independent runs (seeds); one value has none."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def band(curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> tuple[np.ndarray, ...]:
    """(x, mean, low, high) of several (x, y) curves over the x range they all cover.

    Curves are interpolated onto the union of their x values inside the shared range, so runs logged at
    other steps (or on a tokens or time axis, which never lines up exactly) are still averaged point by point.
    """
    start = max(min(x) for x, _ in curves)
    stop = min(max(x) for x, _ in curves)
    grid = np.unique(np.concatenate([np.asarray(x, dtype=float) for x, _ in curves]))
    grid = grid[(grid >= start) & (grid <= stop)]
    ys = np.stack([np.interp(grid, np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in curves])
    mean = ys.mean(axis=0)
    half = t_quantile(len(curves) - 1) * ys.std(axis=0, ddof=1) / math.sqrt(len(curves))
    return grid, mean, mean - half, mean + half


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (the first points average what exists so far);
    window <= 1 leaves the values as they are."""
    if window <= 1:
        return list(values)
    cums = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return list((cums[idx] - cums[lo]) / (idx - lo))


def predictions_by_id(run_path: str | Path) -> dict[str, list[bool]]:
    """Per example id, the primary-rule correctness of its rows in predictions.jsonl (file order)."""
    rows: dict[str, list[bool]] = {}
    for _, r in iter_jsonl(Path(run_path) / "predictions.jsonl"):
        rows.setdefault(str(r["id"]), []).append(bool(r["correct"]))
    return rows


def paired_difference(base: dict[str, list[bool]], tuned: dict[str, list[bool]]) -> dict[str, Any]:
    """Tuned minus base accuracy over rows matched by example id, with a paired bootstrap 95% interval.

    Resampling the per-row differences (not the two accuracies separately) keeps the pairing: both
    models answered the same questions, so question difficulty cancels and the interval is narrower.
    Repeated ids are paired in order of appearance; rows whose id only one run has are counted apart.
    """
    diffs = [float(t) - float(b) for key in base.keys() & tuned.keys()
             for b, t in zip(base[key], tuned[key])]
    n_base, n_tuned = sum(map(len, base.values())), sum(map(len, tuned.values()))
    return {
        "accuracy_diff": sum(diffs) / len(diffs) if diffs else float("nan"),
        "accuracy_diff_ci95": bootstrap_ci(diffs),
        "n_paired": len(diffs),
        "n_unpaired": n_base + n_tuned - 2 * len(diffs),
    }
