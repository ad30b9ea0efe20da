"""Supervised fine-tuning (full, LoRA, QLoRA) as an objective of the one training loop (`train/loop.py`).

The objective supplies the data plan and `loss(model, micro) -> (summed loss, per-unit sums)`; the loss
unit is a supervised token, so the loop's normalisation (summed loss / supervised tokens of the whole
optimizer step, over all processes) makes accumulation and data parallelism exact.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from ftlab.data.collate import pack_examples, packed_collate, pad_collate
from ftlab.data.sft import PreflightReport, encode_sft_turns, preflight
from ftlab.data.sources import load_conversations
from ftlab.errors import UserError
from ftlab.losses import prompt_detached_log_probs, response_token_log_probs
from ftlab.runs.rundir import RunDir
from ftlab.train.loop import train
from ftlab.train.objective import Objective
from ftlab.train.plan import StepPlan

log = logging.getLogger("ftlab")


class SFTObjective(Objective):
    """Next-token loss on the supervised (response) tokens of encoded conversations."""

    name = "sft"
    units_name = "supervised_tokens"

    def __init__(self, cfg: DictConfig, encoded: list[dict], report: PreflightReport, tokenizer: Any,
                 rank: int = 0, world: int = 1):
        d = cfg.data
        self.encoded, self.report, self.tokenizer = encoded, report, tokenizer
        self.packing, self.max_length, self.pad_id = d.packing, d.max_length, tokenizer.pad_token_id
        self.detach_prompt = cfg.train.detach_prompt
        self.plan = StepPlan([len(e["input_ids"]) for e in encoded], cfg.train.batch_size, cfg.train.grad_accum,
                             cfg.seed, d.group_by_length and not d.packing, rank, world)
        self._val = val_batches(cfg, tokenizer)
        self.generation_task = generation_examples(cfg)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if not indices:  # all-masked: the forward/backward of example 0, contributing exactly nothing
            out = pad_collate([self.encoded[0]], self.pad_id)
            out["response_mask"].zero_()
            return {**out, "units": torch.tensor(0), "n_real_tokens": torch.tensor(0)}
        batch = [self.encoded[i] for i in indices]
        if self.packing:  # rows of up to max_length tokens, examples isolated by position_ids
            rows = pack_examples(batch, self.max_length)
            out = packed_collate([[batch[i] for i in row] for row in rows], self.pad_id)
        else:
            out = pad_collate(batch, self.pad_id)
        out["units"] = out["response_mask"].sum()
        out["n_real_tokens"] = torch.tensor(sum(len(e["input_ids"]) for e in batch))  # excludes padding
        return out

    def loss(self, model: Any, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.detach_prompt:
            return -prompt_detached_log_probs(model, micro["input_ids"], micro["labels"], micro["response_mask"],
                                              micro["attention_mask"]).sum(), {}
        return -forward_log_probs(model, micro).sum(), {}

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        return self._val

    def log_preflight(self) -> None:
        log.info("preflight: %s", self.report.summary())
        for s in self.report.samples:
            log.info("supervised span in «»:\n%s", s)


def forward_log_probs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probs (N,) of the batch's supervised tokens only: the LM head runs on those positions alone."""
    return response_token_log_probs(model, batch["input_ids"], batch["labels"], batch["response_mask"],
                                    attention_mask=batch.get("attention_mask"),
                                    position_ids=batch.get("position_ids"))


# -- data ------------------------------------------------------------------------------------------
def encode_conversations(samples: list[list[tuple[str, str]]], tokenizer: Any, max_length: int) -> list[dict | None]:
    return [encode_sft_turns(turns, tokenizer, max_length) for turns in samples]


def build_objective(cfg: DictConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> SFTObjective:
    """Load, encode and check the training data (preflight fails hard before any compute)."""
    d = cfg.data
    if not d.train:
        raise UserError("data.train is not set (a JSONL path or a datasets id)")
    samples = load_conversations(d, d.train, d.train_split, tokenizer, d.limit)
    encoded = encode_conversations(samples, tokenizer, d.max_length)
    report = preflight(encoded, tokenizer, n_show=2, max_bad_share=d.max_bad_share)
    return SFTObjective(cfg, [e for e in encoded if e is not None], report, tokenizer, rank, world)


def val_batches(cfg: DictConfig, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    d = cfg.data
    if not d.val:
        return []
    samples = load_conversations(d, d.val, d.val_split, tokenizer, d.val_limit)
    enc = [e for e in encode_conversations(samples, tokenizer, d.max_length) if e is not None]
    bs = cfg.train.batch_size
    batches = [pad_collate(enc[i:i + bs], tokenizer.pad_token_id) for i in range(0, len(enc), bs)]
    for b in batches:
        b["units"] = b["response_mask"].sum()
    return batches


def generation_examples(cfg: DictConfig) -> tuple[Any, list]:
    """Validation examples for accuracy / log_generations: only for task data (generic data has no checker)."""
    d, t = cfg.data, cfg.train
    if d.task == "generic" or not d.val or not (t.eval_every or t.log_generations_every):
        return None, []
    from ftlab.tasks import get_task

    task = get_task(d.task, **d.task_options)
    return task, task.load(d.val, split=d.val_split, limit=d.val_limit)


def run_sft(cfg: DictConfig) -> RunDir | None:
    """Train as the recipe says; returns the finished run directory (None on ranks other than 0)."""
    return train(cfg, build_objective)
