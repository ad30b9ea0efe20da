"""Training entry point: `run_training(cfg)` dispatches on `train.method`."""
from __future__ import annotations

from typing import Any


def run_training(cfg: Any) -> Any:
    if cfg.train.method == "sft":
        from ftlab.train.sft import run_sft

        return run_sft(cfg)
    if cfg.train.method == "dpo":
        from ftlab.train.dpo import run_dpo

        return run_dpo(cfg)
    if cfg.train.method == "grpo":
        from ftlab.train.grpo import run_grpo

        return run_grpo(cfg)
    if cfg.train.method == "pretrain":
        from ftlab.train.pretrain import run_pretrain

        return run_pretrain(cfg)
    raise NotImplementedError(cfg.train.method)
