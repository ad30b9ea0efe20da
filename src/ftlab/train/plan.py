"""Which examples each process sees at each optimizer step: a pure function of (seed, step).

Shared by every objective (SFT, DPO, pretraining), so data order, accumulation and data parallelism
are written once:

* an epoch is a list of *global* micro-batches (`batch_size x world` example indices), shuffled or
  length-grouped by `seed + epoch`; an optimizer step takes `grad_accum` of them;
* each process takes every `world`-th index of a global micro-batch (`b[rank::world]`);
* every process gets exactly `grad_accum` micro-batches in every step, some possibly empty (the last
  step of an epoch, or a global micro-batch with fewer indices than processes). The objective turns
  an empty list into an all-masked micro-batch, so every rank runs the same number of forward and
  backward passes: DDP's gradient all-reduce and DeepSpeed's accumulation boundary line up, where a
  rank that skipped its backward would leave the others waiting forever.

Because step -> micro-batches is a pure function, a resumed run replays exactly the batches the
uninterrupted run would have seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ftlab.data.collate import length_grouped_batches


@dataclass
class StepPlan:
    lengths: list[int]          # one entry per example (tokens; used for length grouping)
    batch_size: int             # examples per micro-batch on one process
    grad_accum: int
    seed: int
    group_by_length: bool = False
    rank: int = 0
    world: int = 1
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.global_batch)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / self.grad_accum)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Global micro-batches (example indices) of one epoch, deterministic in (seed, epoch)."""
        if self.group_by_length:
            return length_grouped_batches(self.lengths, self.global_batch, seed=self.seed + epoch)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        return [order[i:i + self.global_batch] for i in range(0, len(order), self.global_batch)]

    def global_step(self, step: int) -> list[list[int]]:
        """The global micro-batches of optimizer step `step` (0-based); fewer than grad_accum at an epoch's end."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._cache.get("epoch") != epoch:  # one epoch's plan is kept at a time
            self._cache.update(epoch=epoch, batches=self.epoch_batches(epoch))
        return self._cache["batches"][k * self.grad_accum:(k + 1) * self.grad_accum]

    def step_indices(self, step: int) -> list[list[int]]:
        """This process's share of step `step`: exactly grad_accum lists of indices, some possibly empty."""
        chunk = self.global_step(step)
        mine = [b[self.rank::self.world] for b in chunk]
        return mine + [[] for _ in range(self.grad_accum - len(mine))]
