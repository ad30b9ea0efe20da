"""Which examples each process sees at each optimizer step: a pure function of (seed, step).

Shared by every objective (SFT, DPO, pretraining), so data order, accumulation and data parallelism
are written once:

* an epoch is a list of optimizer steps, each `batch_size x world x grad_accum` examples, shuffled or
  length-grouped by `seed + epoch`, cut into `grad_accum` *global* micro-batches (`batch_size x world`);
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

    def epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        """Each optimizer step's global micro-batches (example indices) in one epoch, deterministic in (seed, epoch).

        A step's examples are chosen first (shuffled, or length-grouped), then cut into `grad_accum` global
        micro-batches, longest first: which examples a step sees does not depend on how it is split, so
        batch 8 x accumulation 1, batch 2 x accumulation 4 and 2 processes x batch 2 x accumulation 2 train on
        the same examples at every step (and give the same losses, to float rounding)."""
        per_step = self.global_batch * self.grad_accum
        if self.group_by_length:  # each group comes out sorted by length, longest first
            groups = length_grouped_batches(self.lengths, per_step, seed=self.seed + epoch)
        else:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.lengths), generator=gen).tolist()
            groups = [order[i:i + per_step] for i in range(0, len(order), per_step)]
        gb = self.global_batch
        return [[g[i:i + gb] for i in range(0, len(g), gb)] for g in groups]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All global micro-batches of one epoch, in step order."""
        return [b for step in self.epoch_steps(epoch) for b in step]

    def global_step(self, step: int) -> list[list[int]]:
        """The global micro-batches of optimizer step `step` (0-based); fewer than grad_accum at an epoch's end."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._cache.get("epoch") != epoch:  # one epoch's plan is kept at a time
            self._cache.update(epoch=epoch, steps=self.epoch_steps(epoch))
        return self._cache["steps"][k]

    def step_indices(self, step: int) -> list[list[int]]:
        """This process's share of step `step`: exactly grad_accum lists of indices, some possibly empty."""
        chunk = self.global_step(step)
        mine = [b[self.rank::self.world] for b in chunk]
        return mine + [[] for _ in range(self.grad_accum - len(mine))]
