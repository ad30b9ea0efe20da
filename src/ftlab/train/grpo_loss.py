"""GRPO's pure tensor functions: group-relative advantages and the clipped surrogate loss (TRL's definitions).

Per completion token t of sequence i, with the ratio r = exp(logp - old_logp) and the sequence's advantage A:

    loss_it = -min(r * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A)  [+ beta * k3_it]
    k3_it   = exp(ref - logp) - (ref - logp) - 1         (an unbiased, always >= 0 estimate of KL(policy || ref))

The loss types differ only in how the token losses of a batch are reduced (TRL's `_compute_loss`):

    grpo     mean over sequences of each sequence's token mean        (longer sequences: smaller per-token weight)
    dr_grpo  sum / (sequences x max_completion_length)                (a constant: no length bias)
    dapo     sum / completion tokens of the whole optimizer step      (every token weighs the same)
    bnpo     sum / completion tokens of this micro-batch              (dapo's rule, within one micro-batch)

On one batch, dapo and bnpo are the same number. They part under accumulation and data parallelism: TRL's dapo
divides by the tokens of the whole generation batch (all micro-batches, all processes), while its bnpo divides
each micro-batch by its own tokens and then averages the micro-batches, so bnpo changes with how a step is split
(TRL documents it so). `loss_sum_and_units` gives each type in the training loop's convention (a summed loss and
its loss units; the loop divides by the units of the whole step over all processes): dapo, grpo and dr_grpo are
then exact under any split, and bnpo's unit is a micro-batch, which reproduces TRL's per-micro-batch mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantage 0, not 0/0


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN where fewer than 2 values): TRL's nanstd."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    var = torch.nanmean((x - mean) ** 2, dim=dim) if dim is not None else torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    correction = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.full_like(var, float("nan")))
    return torch.sqrt(var * correction)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group") -> Tensor:
    """Advantages of `rewards` (sequences,), whose consecutive runs of `group_size` share a prompt.

    A = r - mean(group), divided by (std + 1e-4) where std is the group's (`scale="group"`), the whole
    batch's ("batch"), or not divided ("none", Dr. GRPO). NaN rewards (a completion no reward function could
    score) are left out of the means and stds and get advantage 0, as in TRL."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (sequences,) with a multiple of group_size={group_size}; "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (nanstd(grouped, dim=1).repeat_interleave(group_size) + STD_EPS)
    elif scale == "batch":
        advantages = advantages / (nanstd(rewards) + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Per group: True when its (scored) rewards are all equal, so every advantage in it is 0: no learning signal."""
    grouped = rewards.view(-1, group_size)
    low = torch.where(torch.isnan(grouped), torch.inf, grouped).amin(dim=1)
    high = torch.where(torch.isnan(grouped), -torch.inf, grouped).amax(dim=1)
    return ~(high > low)


@dataclass
class TokenLosses:
    """Per-token results of `token_losses`, each (sequences, tokens)."""

    loss: Tensor                 # the clipped surrogate (+ beta * k3)
    ratio: Tensor                # exp(logp - old_logp)
    clipped_low: Tensor          # bool: ratio < 1 - epsilon where A < 0 (the clip holds the update back)
    clipped_high: Tensor         # bool: ratio > 1 + epsilon_high where A > 0
    kl: Tensor | None            # k3 to the reference (None when beta == 0)


def token_losses(logps: Tensor, old_logps: Tensor, advantages: Tensor, *, epsilon: float = 0.2,
                 epsilon_high: float | None = None, ref_logps: Tensor | None = None,
                 beta: float = 0.0) -> TokenLosses:
    """The per-token GRPO loss of `logps` (sequences, tokens) given the sampling policy's `old_logps` and the
    per-sequence `advantages` (sequences,); see the module docstring."""
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    return TokenLosses(loss=loss, ratio=ratio, clipped_low=(ratio < 1 - epsilon) & (adv < 0),
                       clipped_high=(ratio > 1 + high) & (adv > 0), kl=kl)


def loss_sum_and_units(per_token: Tensor, mask: Tensor, loss_type: str,
                       max_completion_length: int | None = None) -> tuple[Tensor, float]:
    """(summed loss, loss units) of one micro-batch, such that sum / units over a whole optimizer step is the
    step's loss of `loss_type` (see the module docstring):

        grpo     sum_i (sum_t l_it m_it / max(1, sum_t m_it)),   units = sequences
        dr_grpo  sum_it l_it m_it,                               units = sequences x max_completion_length
        dapo     sum_it l_it m_it,                               units = completion tokens (mask)
        bnpo     sum_it l_it m_it / max(1, sum_it m_it),         units = 1 (a micro-batch)
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    sequences = per_token.shape[0]
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum(), float(sequences)
    if loss_type == "dr_grpo":
        length = per_token.shape[1] if max_completion_length is None else max_completion_length
        return masked.sum(), float(sequences * length)
    if loss_type == "dapo":
        return masked.sum(), float(mask.sum())
    return masked.sum() / mask.sum().clamp(min=1.0), 1.0


def grpo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, loss_type: str = "dapo",
              epsilon: float = 0.2, epsilon_high: float | None = None, ref_logps: Tensor | None = None,
              beta: float = 0.0, max_completion_length: int | None = None) -> Tensor:
    """The GRPO loss of one batch (a scalar), as TRL's GRPOTrainer computes it for one process without accumulation.

    `logps`, `old_logps`, `ref_logps` and `mask` are (sequences, completion tokens), right-padded (mask 0 on
    padding); `advantages` is (sequences,). `old_logps` is the sampling policy's log-probs (with one update per
    batch, `logps.detach()`: the ratio is 1 and only its gradient acts). dr_grpo divides by
    `max_completion_length` (default: the padded width)."""
    terms = token_losses(logps, old_logps, advantages, epsilon=epsilon, epsilon_high=epsilon_high,
                         ref_logps=ref_logps, beta=beta)
    total, units = loss_sum_and_units(terms.loss, mask, loss_type, max_completion_length)
    return total / max(units, 1.0)
