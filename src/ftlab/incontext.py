"""In-context loss: the mean loss at every position of many validation windows, for any model.

    ftlab in-context-loss RECIPE model.name=runs/pretrain/<run>/final      (or a hub id, or the embedded model)

The windows are the recipe's validation windows (`pretrain.*`: corpus, categories, seq_len, val_windows and the
seed), so for a model trained by that recipe the mean over all positions is exactly its eval/loss. Position k
(1-based) is the k-th predicted token of a window: it is predicted from k tokens of context. Writes
runs/incontext/<run>/in_context_loss.csv (position, mean loss, standard error, windows) and a plot, and the
in-context-learning score of Olsson et al. (2022), loss at position `pretrain.icl_late` minus loss at position
`pretrain.icl_early` (negative: the model uses its context; both clamped to the window).
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ftlab.runs.rundir import RunDir

log = logging.getLogger("ftlab")


@torch.no_grad()
def per_position_loss(model: Any, batches: list[torch.Tensor], device: Any,
                      precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """(sum of losses per position, sum of squares per position) over windows given as (B, T+1) id batches."""
    total = squares = None
    for x in batches:
        x = x.to(device)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16) \
            if precision != "fp32" else torch.autocast(device.type, enabled=False)
        with ctx:
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")
        loss = loss.double().cpu()
        total = loss.sum(0) if total is None else total + loss.sum(0)
        squares = (loss ** 2).sum(0) if squares is None else squares + (loss ** 2).sum(0)
    return total.numpy(), squares.numpy()


def icl_positions(seq_len: int, early: int, late: int) -> tuple[int, int]:
    late = min(late, seq_len)
    early = min(max(early, 1), late - 1) if late > 1 else 1
    return early, late


def run_in_context_loss(cfg: DictConfig) -> dict[str, Any]:
    from ftlab.data.windows import VAL_STREAM, WindowSampler
    from ftlab.models.load import check_context_window, load_model_and_tokenizer
    from ftlab.train.pretrain import open_corpus, select_categories

    p = cfg.pretrain
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    check_context_window(model, p.seq_len, key="pretrain.seq_len")
    corpus = open_corpus(cfg, tokenizer)
    categories = select_categories(cfg, corpus)
    val = WindowSampler(corpus, p.val_split, categories, p.seq_len, cfg.seed, VAL_STREAM)
    corpus.check_token_ids(model.get_input_embeddings().num_embeddings, val.pool)
    docs, offsets = val.windows(0, p.val_windows)  # the loop's validation windows
    rows = [torch.from_numpy(val.tokens(d, o)) for d, o in zip(docs.tolist(), offsets.tolist())]
    bs = cfg.train.batch_size
    batches = [torch.stack(rows[i:i + bs]) for i in range(0, len(rows), bs)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    run = RunDir.create(cfg.output_dir, "incontext", cfg.name, cfg, cfg.seed)
    try:
        total, squares = per_position_loss(model, batches, device, cfg.eval.precision if device.type == "cuda"
                                           else "fp32")
        n = len(rows)
        mean = total / n
        sem = np.sqrt(np.maximum(squares / n - mean ** 2, 0) / max(n - 1, 1))
        csv_path = run.path / "in_context_loss.csv"
        with csv_path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["position", "mean_loss", "stderr", "windows"])
            for k in range(len(mean)):
                w.writerow([k + 1, f"{mean[k]:.6f}", f"{sem[k]:.6f}", n])
        early, late = icl_positions(p.seq_len, p.icl_early, p.icl_late)
        score = float(mean[late - 1] - mean[early - 1])
        name = cfg.model.name if not cfg.model.scratch else f"scratch:{cfg.model.preset or 'config'} (random)"
        plot = plot_in_context(mean, sem, run.path / "in_context_loss.png", name, early, late)
        summary = {"model": name, "corpus": str(corpus.path), "categories": categories, "windows": n, "seq_len": p.seq_len,
                   "mean_loss": float(mean.mean()), "icl_early": early, "icl_late": late,
                   "loss_at_early": float(mean[early - 1]), "loss_at_late": float(mean[late - 1]),
                   "icl_score": score, "csv": str(csv_path), "plot": str(plot), "run": str(run.path)}
    except BaseException as e:
        run.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    run.finish("complete", **summary)
    log.info("in-context loss: mean %.4f, ICL score (loss at %d - loss at %d) %.4f; %s", summary["mean_loss"], late,
             early, score, csv_path)
    return summary


def plot_in_context(mean: np.ndarray, sem: np.ndarray, out: Path, label: str, early: int, late: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(1, len(mean) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, mean, lw=1.2, label=label)
    ax.fill_between(x, mean - sem, mean + sem, alpha=0.25)
    for k in (early, late):
        ax.axvline(k, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("token position in the window (context length)")
    ax.set_ylabel("mean loss (nats / token)")
    ax.set_title(f"in-context loss; ICL score {mean[late - 1] - mean[early - 1]:+.3f} ({late} vs {early})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
