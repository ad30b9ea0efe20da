"""The curves a report overlays and the final values it tabulates, read from metric rows."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ftlab.config.schema import metric_direction
from ftlab.report.runs import Run, parse_time, read_json, tokens_by_step

AXES = {"step": "step (a loop: iteration)", "tokens": "tokens learned from", "time": "wall time (s)"}


@dataclass(frozen=True)
class Panel:
    """One plot: a run draws the first of `keys` it logged. `comparison` names the flags that apply."""

    title: str
    keys: tuple[str, ...]
    comparison: str
    log_y: bool = False


PANELS = (
    Panel("training loss", ("train/loss",), "train"),
    Panel("validation loss", ("eval/loss",), "eval"),
    Panel("validation bits per byte", ("eval/bits_per_byte",), "eval"),
    Panel("accuracy", ("eval/accuracy", "eval/answer_accuracy"), "accuracy"),
    Panel("fully valid proofs", ("eval/fully_valid",), "accuracy"),
    Panel("learning rate", ("train/lr",), "train"),
    Panel("gradient norm (before clipping)", ("train/grad_norm",), "train", log_y=True),
    Panel("tokens/s (wall clock)", ("train/tokens_per_s",), "train"),
    Panel("entropy", ("train/entropy", "eval/entropy"), "train"),
    Panel("response length (tokens)", ("train/completions/mean_length", "eval/mean_response_length"), "train"),
    Panel("reward", ("train/reward",), "train"),
    Panel("DPO reward accuracy (batch)", ("train/rewards/accuracies",), "train"),
    Panel("DPO reward margin", ("train/rewards/margins",), "train"),
)


def number(v: Any) -> float | None:
    """A finite float, or None (a non-finite value is logged as a string such as "nan")."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def panel_key(run: Run, panel: Panel) -> str | None:
    logged = {k for r in run.rows for k in r}
    return next((k for k in panel.keys if k in logged), None)


def series(run: Run, key: str, axis: str) -> tuple[list[float], list[float]] | None:
    """(x, y) of one metric on the chosen axis, or None where the run has no such axis (an evaluation has no
    steps; a loop counts no tokens and keeps no clock)."""
    tokens = tokens_by_step(run) if axis == "tokens" else {}
    start = run_start(run) if axis == "time" else None
    xs, ys = [], []
    for r in run.rows:
        y = number(r.get(key))
        step = r.get("train_step", r.get("eval_step"))
        if y is None or not isinstance(step, int):
            continue
        if axis == "step":
            x: float | None = step
        elif axis == "tokens":
            x = max((t for s, t in tokens.items() if s <= step), default=None)
        else:
            x = number(r.get("time")) - start if start is not None and number(r.get("time")) is not None else None
        if x is not None:
            xs.append(float(x))
            ys.append(y)
    return (xs, ys) if xs else None


def run_start(run: Run) -> float | None:
    """The run's start (env.json) as epoch seconds; else its first metrics row's time."""
    started = parse_time(read_json(run.path / "env.json", []).get("started"))
    if started is not None:
        return started
    times = [t for r in run.rows if (t := number(r.get("time"))) is not None]
    return min(times) if times else None


# -- final and best values ---------------------------------------------------------------------------
HEADLINES = ("train/loss", "eval/loss", "eval/bits_per_byte", "eval/accuracy", "eval/answer_accuracy",
             "eval/fully_valid", "eval/step_validity", "train/reward")
RESULT_HEADLINES = ("accuracy", "answer_accuracy", "fully_valid", "step_validity", "mae_norm", "pearson_r")
ACCURACY = re.compile(r"(^|/)(accuracy|answer_accuracy|fully_valid)$")


@dataclass
class Final:
    """A metric's last and best value, with the number of answers behind an accuracy (for its interval)."""

    key: str
    final: float
    best: float | None
    n: int | None = None


def finals(run: Run) -> list[Final]:
    """Headline metrics: an evaluation's metrics.json, a loop's last iteration, a training run's last and best
    logged values."""
    out = []
    if run.kind in ("eval", "loop") and run.result:
        n = run.result.get("n") or run.result.get("problems")
        for key in RESULT_HEADLINES:
            if (v := number(run.result.get(key))) is not None:
                best = best_of(run, f"eval/{key}") if run.kind == "loop" else None
                out.append(Final(key, v, best, int(n) if isinstance(n, int) else None))
        return out
    for key in HEADLINES:
        values = [v for r in run.rows if (v := number(r.get(key))) is not None]
        if values:
            out.append(Final(key, values[-1], best_of(run, key)))
    return out


def best_of(run: Run, key: str) -> float | None:
    direction = metric_direction(key.split("/", 1)[-1]) or ("higher" if "reward" in key or ACCURACY.search(key) else None)
    values = [v for r in run.rows if (v := number(r.get(key))) is not None]
    if not values or direction is None:
        return None
    return max(values) if direction == "higher" else min(values)
