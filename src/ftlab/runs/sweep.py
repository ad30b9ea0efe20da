"""`ftlab sweep RECIPE`: one pretraining run per (seed, K) in a plain loop, then a table and a plot.

    sweep: {seeds: [0, 1, 2], num_categories: [1, 2, 4]}

Each run is an ordinary run (runs/pretrain/<stamp>_<name>_s<seed>_k<K>/) of the recipe with `seed` and
`pretrain.num_categories` set. Before the first run, every (seed, K) is checked against the corpus (K
categories must exist), so a bad K fails in seconds, not after hours of earlier runs. The sweep directory
(runs/sweep/<stamp>_<name>/) gets summary.csv and summary.md (rewritten after every run, so a sweep cut
short still shows what finished) and val_loss_vs_k.png: the final validation loss and bits per byte against K,
one line per seed and their mean.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ftlab.errors import UserError
from ftlab.runs.rundir import RunDir

log = logging.getLogger("ftlab")

COLUMNS = ["seed", "k", "categories", "steps", "train_tokens", "final_train_loss", "final_val_loss",
           "final_val_bits_per_byte", "best_val_loss", "status", "run"]


def run_sweep(recipe: str, overrides: list[str], cfg: DictConfig) -> Path:
    from ftlab.config import load_recipe
    from ftlab.train import run_training

    seeds, ks = list(cfg.sweep.seeds), list(cfg.sweep.num_categories)
    if cfg.train.method != "pretrain":
        raise UserError(f"ftlab sweep runs pretraining recipes (train.method: pretrain); got {cfg.train.method}")
    if not ks or not seeds:
        raise UserError("sweep.num_categories and sweep.seeds must each list at least one value")
    if not cfg.train.eval_every:
        raise UserError("ftlab sweep compares final validation losses: set train.eval_every (the last step is always "
                        "evaluated)")
    plan = [(s, k) for s in seeds for k in ks]
    cfgs = {(s, k): load_recipe(recipe, list(overrides) + [f"seed={s}", f"pretrain.num_categories={k}",
                                                           f"name={cfg.name}_s{s}_k{k}"]) for s, k in plan}
    check_feasible(cfgs)
    sweep = RunDir.create(cfg.output_dir, "sweep", cfg.name, cfg, cfg.seed)
    rows: list[dict[str, Any]] = []
    try:
        for i, (s, k) in enumerate(plan):
            log.info("sweep run %d of %d: seed %d, K %d", i + 1, len(plan), s, k)
            run = run_training(cfgs[(s, k)])
            rows.append(result_row(s, k, run.path))
            write_tables(sweep.path, rows)
    except BaseException as e:
        sweep.finish("interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                     error=f"{type(e).__name__}: {e}", runs=[r["run"] for r in rows])
        raise
    plot = plot_sweep(rows, sweep.path / "val_loss_vs_k.png", cfg.name)
    sweep.finish("complete", runs=[r["run"] for r in rows], table=str(sweep.path / "summary.md"), plot=str(plot))
    log.info("sweep complete: %s", sweep.path)
    return sweep.path


def check_feasible(cfgs: dict[tuple[int, int], DictConfig]) -> None:
    """Every (seed, K) can choose its categories (one tokenizer load, one corpus open)."""
    from ftlab.data.corpus import Corpus
    from ftlab.train.pretrain import select_categories

    corpora: dict[str, Corpus] = {}
    for cfg in cfgs.values():
        path = cfg.pretrain.corpus
        if not path:
            raise UserError("pretrain.corpus is not set (a directory made by: ftlab prepare-corpus INPUT --out DIR)")
        corpora.setdefault(path, Corpus.open(path))
        select_categories(cfg, corpora[path])


def result_row(seed: int, k: int, run: Path) -> dict[str, Any]:
    import json

    from ftlab.runs.trackers import read_metrics

    metrics = read_metrics(run / "metrics.jsonl")
    train = [r for r in metrics if "train/loss" in r]
    evals = [r for r in metrics if "eval/loss" in r]
    summary = json.loads((run / "summary.json").read_text())
    return {"seed": seed, "k": k, "categories": " ".join(summary.get("categories") or []),
            "steps": summary.get("steps"), "train_tokens": sum(r.get("train/predicted_tokens", 0) for r in train),
            "final_train_loss": train[-1]["train/loss"] if train else None,
            "final_val_loss": evals[-1]["eval/loss"] if evals else None,
            "final_val_bits_per_byte": evals[-1].get("eval/bits_per_byte") if evals else None,
            "best_val_loss": min(r["eval/loss"] for r in evals) if evals else None,
            "status": summary.get("status"), "run": str(run)}


def write_tables(folder: Path, rows: list[dict[str, Any]]) -> None:
    from ftlab.runs.report import markdown_table

    with (folder / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    shown = [c for c in COLUMNS if c != "run"]
    table = markdown_table(shown + ["run"], [[r[c] for c in shown] + [Path(r["run"]).name] for r in rows])
    (folder / "summary.md").write_text(table + "\n", encoding="utf-8")


def plot_sweep(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ks = sorted({r["k"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in zip(axes, ("final_val_loss", "final_val_bits_per_byte"),
                              ("final validation loss (nats / token)", "final validation bits per byte")):
        table = {(r["seed"], r["k"]): r[key] for r in rows if r[key] is not None}
        for s in seeds:
            pts = [(k, table[(s, k)]) for k in ks if (s, k) in table]
            if pts:
                ax.plot(*zip(*pts), "o-", lw=1, alpha=0.6, label=f"seed {s}")
        means = [(k, float(np.mean([table[(s, k)] for s in seeds if (s, k) in table]))) for k in ks
                 if any((s, k) in table for s in seeds)]
        if means:
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
