"""Plots and markdown tables built only from what run directories contain."""
from __future__ import annotations

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


def plot_before_after(groups: list[str], before: list[float], after: list[float], out: Path,
                      title: str, xlabel: str, chance: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(groups))
    w = 0.38
    b1 = ax.bar([i - w / 2 for i in x], [100 * v for v in before], w, label="base model")
    b2 = ax.bar([i + w / 2 for i in x], [100 * v for v in after], w, label="after SFT")
    for bars in (b1, b2):
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    if chance is not None:
        ax.axhline(100 * chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(list(x), groups)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
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
