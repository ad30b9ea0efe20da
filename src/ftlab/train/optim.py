"""Optimizers and learning-rate schedules (transformers' get_scheduler has them all)."""
from __future__ import annotations

import math
from typing import Any

import torch

from ftlab.errors import UserError


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying norm gains and biases pulls them towards 0, which only
    hurts (the nanoGPT / GPT-3 rule: parameters with fewer than 2 dimensions are not decayed)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    params = parameter_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if not torch.cuda.is_available():
        raise UserError(f"optim.name={cfg.name} (bitsandbytes 8-bit AdamW) needs a CUDA GPU; use optim.name=adamw")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"optim.name={cfg.name} needs bitsandbytes: pip install 'ftlab[gpu]'") from None
    cls = bnb.optim.PagedAdamW8bit if cfg.name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))
    name = {"constant": "constant_with_warmup"}.get(cfg.name, cfg.name)
    extra = {}
    if cfg.name == "cosine_with_min_lr":
        if cfg.min_lr is None:
            raise UserError("schedule.min_lr must be set for schedule.name=cosine_with_min_lr")
        extra = {"min_lr": cfg.min_lr}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=extra)
