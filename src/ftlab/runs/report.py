"""Plots and markdown tables built only from what run directories contain."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are files
import matplotlib.pyplot as plt  # noqa: E402

from ftlab.runs.trackers import read_metrics  # noqa: E402


def plot_loss(metrics_path: Path, out: Path, title: str = "training loss") -> Path:
    rows = read_metrics(metrics_path)
    train = [(r["train_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    evals = [(r["eval_step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_accuracy_by_hops(hops: list[int], series: dict[str, tuple[list[float], list[list[float] | None]]],
                          out: Path, title: str, ood: Sequence[int] = (), majority: list[float | None] | None = None
                          ) -> Path:
    """Accuracy against hop count, one line per model with its 95% interval as error bars; hop counts the
    model was not trained on shaded and labelled, the set's majority-class rate as a dashed reference."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    shift = 0.06 * (len(series) - 1)  # side by side, so the error bars do not hide each other
    for k, (label, (values, cis)) in enumerate(series.items()):
        x = [h - shift / 2 + k * 0.06 for h in hops]
        y = [100 * v for v in values]
        err = [[100 * (v - ci[0]) if ci else 0 for v, ci in zip(values, cis)],
               [100 * (ci[1] - v) if ci else 0 for v, ci in zip(values, cis)]]
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=f"{label} (95% interval)")
    if majority and all(m is not None for m in majority):
        ax.plot(hops, [100 * m for m in majority], "k--", lw=1, alpha=0.6, label="majority class")
    for i, h in enumerate(ood):
        ax.axvspan(h - 0.4, h + 0.4, color="grey", alpha=0.15, lw=0,
                   label="hop count not trained on" if i == 0 else None)
    ax.set_xticks(hops, [f"{h}" + ("\n(not trained)" if h in ood else "") for h in hops])
    ax.set_xlabel("reasoning depth (hops)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
