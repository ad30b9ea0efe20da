"""What a training method supplies to the one loop (`train/loop.py`): the `Objective` base class.

A method (SFT, DPO, pretraining) subclasses it, sets `name`, `units_name` and `plan`, and implements the four
required methods. The optional hooks below have no-op defaults, so the loop calls them unconditionally and
a method overrides only what it needs; each hook is documented here, once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ftlab.train.plan import StepPlan


class Objective:
    """Micro-batches are dicts of tensors with two scalar entries the loop reads: `units` (loss units:
    supervised tokens, pairs, ...) and `n_real_tokens` (throughput)."""

    name: str                 # written into checkpoints: a run resumes only a checkpoint of its own method
    units_name: str           # what a loss unit is, as logged: "supervised_tokens", "pairs", ...
    plan: StepPlan            # which examples each rank's micro-batches hold at each step
    # The run's length when train.max_steps is unset and epochs do not define it (pretraining's token budget).
    total_steps: int | None = None
    # (task, examples) whose generated answers the task's own checker scores at each evaluation, and
    # whose first 8 `train.log_generations_every` logs; (None, []) for none.
    generation_task: tuple[Any, list] = (None, [])

    # -- required ------------------------------------------------------------------------------------
    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Micro-batch of these examples; [] gives an all-masked micro-batch with units == 0."""
        raise NotImplementedError

    def loss(self, model: Any, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the micro-batch's units, other per-unit sums to log as averages)."""
        raise NotImplementedError

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        """Validation micro-batches for `eval/loss` (may be empty)."""
        raise NotImplementedError

    def log_preflight(self) -> None:
        """Log what will be trained (decoded samples with the supervised spans marked)."""
        raise NotImplementedError

    # -- optional hooks (every rank calls them, with values already reduced over processes) -------------
    def before_training(self, loop: Any) -> None:
        """Once on every rank, after the run directory exists and the model is prepared, before a checkpoint
        is restored and before step 1 (DPO computes its reference log-probs from the initial weights here).
        An error here marks the run failed."""

    def skip_update(self, loop: Any, step: int, loss: float) -> bool:
        """True: no optimizer update for this step (pretraining's loss-spike guard). `loss` is the step's mean."""
        return False

    def more_metrics(self, loop: Any, metrics: dict[str, Any], axis: str) -> dict[str, Any]:
        """Extra values for the "train" or "eval" row (`axis`), computed from that row's `metrics`."""
        return {}

    def on_nonfinite(self, loop: Any, step: int, batch: dict[str, torch.Tensor] | None, what: str) -> None:
        """Forensics before the gradients are cleared: `batch` is the offending micro-batch on the model's
        device (as the model saw it), `what` is "loss" or "grad_norm"."""
