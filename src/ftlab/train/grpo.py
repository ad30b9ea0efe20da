"""GRPO (online RL from verifiable rewards) as an objective of the one training loop (`train/loop.py`).

A *round* is one batch of rollouts: P prompts, each sampled G times (`grpo.num_generations`) by the HF engine
(`HFEngine.generate_full`, one shared prefill per prompt, per-row seeds from the run's seed and the round's
first step), on the policy as it is (unwrapped, eval mode, under the loop's autocast), or by vLLM in this
process, given the policy's weights first (`grpo.engine: vllm`, `grpo_vllm.py`). The rewards score every
completion (`train/rewards.py`), `group_advantages` makes them relative to the prompt's group, and the loop then
takes `grpo.num_iterations` (mu) optimizer steps on the round's completions. A step trains on
train.batch_size x train.grad_accum x processes completions, so P = that / G.

How it fits the loop. The loop asks the objective's plan for a step's micro-batches first thing in every step
(`plan.step_indices(step)`); here that call samples the round when a new one starts (`RolloutPlan`), and
returns indices into the round's completions. Each process samples its share of the prompts and scores it,
then every process gathers all of them (rewards and advantages are computed from the whole round, identically
everywhere), and keeps its share of micro-batches: every rank runs exactly grad_accum micro-batches, some
possibly empty, as the loop needs. A failing reward is gathered too, so every rank stops with its message.

The loss (`grpo_loss.py`): the loop divides the summed loss by the loss units of the whole step over all
processes, so each loss type gets its unit (dapo: completion tokens; grpo: completions; dr_grpo: completions x
max_completion_length; bnpo: micro-batches, TRL's per-micro-batch normalisation). With mu = 1 the old
log-probs are the current ones detached (ratio 1: only the gradient acts); with mu > 1 they are kept from the
round's first step (that step's own forward, so no extra pass) and the later steps clip against them. With
beta > 0 the k3 KL to the reference is added per token: the reference is the model with its adapters disabled
for a fresh LoRA, else a frozen copy of the initial weights (taken before a checkpoint is restored).

Resume: the round's completions come from the seed and the step, so a run resumed at a round's start samples
what the uninterrupted run sampled. Resumed inside a round (mu > 1), the round is sampled again from the restored
weights (said in the log). Diagnostics: per step, each reward's mean and std, frac_reward_zero_std, completion
lengths and truncated share, generation time, and from the training forward entropy, clipped shares and KL;
every round's completions go to <run>/completions/step_NNNNNN.jsonl.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from ftlab.data.collate import pad_collate
from ftlab.data.preference import shifted
from ftlab.data.sft import prompt_ids
from ftlab.data.sources import GENERIC
from ftlab.errors import UserError
from ftlab.losses import compute_entropy, logits_at, token_log_probs
from ftlab.runs.rundir import RunDir
from ftlab.train.grpo_loss import (
    group_advantages,
    loss_sum_and_units,
    nanstd,
    token_losses,
    zero_std_groups,
)
from ftlab.train.objective import Objective
from ftlab.train.plan import StepPlan
from ftlab.train.rewards import Reward, resolve_rewards, score_completions

log = logging.getLogger("ftlab")

# A logits hook for a round's prompts: (their rows, the HF engine) -> `ftlab.generate.sampling.LogitsHook`
Constraint = Callable[[list["PromptRow"], Any], Any]
UNITS = {"dapo": "completion_tokens", "grpo": "completions", "dr_grpo": "completion_slots", "bnpo": "micro_batches"}
TOKEN_MEANS = ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl")


@dataclass
class PromptRow:
    text: str                    # the rendered prompt, as generation sees it
    ids: list[int]               # its tokens (`prompt_ids`, the engine's rule)
    fields: dict[str, Any]       # the dataset fields the rewards get
    example: Any = None          # the task's Example (None for generic rows)


@dataclass
class Round:
    """One round's completions over all processes, prompt-major (a group's G completions are consecutive)."""

    index: int
    rows: list[int]              # prompt (dataset row) of each completion
    ids: list[list[int]]         # completion token ids
    texts: list[str]
    truncated: list[bool]        # stopped at max_completion_length
    rewards: torch.Tensor        # (completions, rewards), NaN where a reward returned None
    advantages: torch.Tensor     # (completions,)
    micro: list[list[int]]       # this process's micro-batches of one step: indices into the completions
    units: float                 # loss units of one step over all processes
    tokens: float                # completion tokens that carry loss in one step, over all processes
    metrics: dict[str, float]
    old_logps: dict[int, torch.Tensor] = field(default_factory=dict)  # mu > 1: from the round's first step
    ref_logps: dict[int, torch.Tensor] = field(default_factory=dict)


class RolloutPlan:
    """The loop's view of the data (a `StepPlan`'s interface): step -> this process's micro-batches. Asking for a
    step's micro-batches samples the step's round when a new round starts (see the module docstring)."""

    def __init__(self, prompts: StepPlan, iterations: int, micro_batches: Callable[[int], list[list[int]]]):
        self.prompts, self.lengths, self.micro_batches = prompts, prompts.lengths, micro_batches
        self.steps_per_epoch = prompts.steps_per_epoch * iterations

    def step_indices(self, step: int) -> list[list[int]]:
        return self.micro_batches(step)


class GRPOObjective(Objective):
    name = "grpo"

    def __init__(self, cfg: DictConfig, prompts: list[PromptRow], dropped: int, rewards: list[Reward], task: Any,
                 tokenizer: Any, rank: int = 0, world: int = 1, constraint: Constraint | None = None):
        t, self.g = cfg.train, cfg.grpo
        self.cfg, self.prompts, self.dropped, self.rewards, self.task = cfg, prompts, dropped, rewards, task
        self.tokenizer, self.rank, self.world, self.pad_id = tokenizer, rank, world, tokenizer.pad_token_id
        self.group, self.mu = self.g.num_generations, self.g.num_iterations
        self.units_name = UNITS[self.g.loss_type]
        self.per_step = t.batch_size * t.grad_accum * world
        prompt_plan = StepPlan([len(p.ids) for p in prompts], self.per_step // self.group, 1, cfg.seed)
        self.plan = RolloutPlan(prompt_plan, self.mu, self.micro_batches)
        self.current: Round | None = None
        self.loop: Any = None
        self.reference: Any = None  # beta > 0: "adapters_off" or a frozen copy (before_training)
        self.constraint = constraint
        self.vllm: Any = None       # grpo.engine=vllm where vLLM runs: `grpo_vllm.VLLMRollouts` (before_training)
        from ftlab.train.sft import generation_examples, val_batches

        self._val = val_batches(cfg, tokenizer) if cfg.data.task != GENERIC else []
        self.generation_task = generation_examples(cfg)

    # -- rounds ------------------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[list[int]]:
        index, iteration = divmod(step, self.mu)
        if self.current is None or self.current.index != index:
            if iteration:
                log.warning("resumed inside a round (step %d is update %d of %d on the round's completions): the "
                            "round is sampled again from the restored weights", step + 1, iteration + 1, self.mu)
            self.current = self.sample_round(index, step)
        return self.current.micro

    def sample_round(self, index: int, step: int) -> Round:
        """Generate, score and gather the round's completions; advantages; this process's micro-batches."""
        chosen = self.plan.prompts.global_step(index)[0]  # P prompts (fewer at an epoch's end)
        mine = list(range(len(chosen)))[self.rank::self.world]
        began = time.time()
        generated = self.generate([chosen[j] for j in mine], generation_seed(self.cfg.seed, index * self.mu))
        entries = [(j, s, c.token_ids, c.text, c.finish_reason == "length")
                   for j, per_prompt in zip(mine, generated) for s, c in enumerate(per_prompt)]
        table, error = [], None
        try:
            table = self.score([chosen[e[0]] for e in entries], [e[3] for e in entries], [e[2] for e in entries])
        except UserError as e:  # every rank must hear of it, or the others wait in the gather forever
            error = str(e)
        gathered = [(entries, table, error)]
        if self.world > 1:
            from accelerate.utils import gather_object

            gathered = gather_object(gathered)
        errors = [err for _, _, err in gathered if err]
        if errors:
            raise UserError(errors[0])
        # prompt-major: the gathered shares back in (prompt, sample) order, each entry with its rewards
        rows = sorted(((e, [col[k] for col in t]) for es, t, _ in gathered for k, e in enumerate(es)),
                      key=lambda x: x[0][:2])
        entries, values = zip(*rows)
        rewards = torch.tensor(values, dtype=torch.float32).view(len(entries), len(self.rewards))
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        total = (rewards * weights).nansum(dim=1)
        total[torch.isnan(rewards).all(dim=1)] = math.nan  # no reward applies: advantage 0 (TRL)
        advantages = group_advantages(total, self.group, self.g.scale_rewards)
        out = Round(index=index, rows=[chosen[e[0]] for e in entries], ids=[list(e[2]) for e in entries],
                    texts=[e[3] for e in entries], truncated=[e[4] for e in entries], rewards=rewards,
                    advantages=advantages, micro=[], units=0.0, tokens=0.0, metrics={})
        self.assign(out)
        out.metrics = self.round_metrics(out, total, time.time() - began)
        self.write_completions(out, total, step)
        return out

    def generate(self, rows: list[int], seed: int) -> list[list[Any]]:
        from ftlab.generate import GenerationConfig
        from ftlab.train.grpo_vllm import hf_generate

        if not rows:
            return []
        model = self.loop.accelerator.unwrap_model(self.loop.model)
        cfg = GenerationConfig(max_new_tokens=self.g.max_completion_length, temperature=self.g.temperature,
                               top_p=self.g.top_p, n=self.group, batch_size=self.g.generation_batch_size, seed=seed)
        texts = [self.prompts[i].text for i in rows]
        if self.vllm is not None:
            return self.vllm.generate(model, texts, cfg, f"step {self.loop.done + 1}")
        hook = None if self.constraint is None else (lambda engine: self.constraint([self.prompts[i] for i in rows],
                                                                                      engine))
        return hf_generate(model, self.tokenizer, texts, cfg, self.loop.autocast, hook)

    def score(self, rows: list[int], texts: list[str], ids: list[list[int]]) -> list[list[float]]:
        """Every reward's values for these completions (see `train/rewards.py` for the arguments)."""
        if not rows:
            return []
        prompts = [self.prompts[i] for i in rows]
        keys = dict.fromkeys(k for p in prompts for k in p.fields)  # generic rows may differ in their fields
        kwargs: dict[str, Any] = {k: [p.fields.get(k) for p in prompts] for k in keys}
        kwargs.update(prompts=[p.text for p in prompts], completions=texts, completion_ids=ids,
                      examples=[p.example for p in prompts], task=self.task)
        return score_completions(self.rewards, kwargs, len(rows))

    def loss_tokens(self, r: Round, i: int) -> int:
        return 0 if self.g.mask_truncated and r.truncated[i] else len(r.ids[i])

    def part_units(self, r: Round, part: list[int]) -> float:
        lt = self.g.loss_type
        if lt == "dapo":
            return float(sum(self.loss_tokens(r, i) for i in part))
        if lt == "grpo":
            return float(len(part))
        if lt == "dr_grpo":
            return float(len(part) * self.g.max_completion_length)
        return float(bool(part))

    def assign(self, r: Round) -> None:
        """Cut the completions into grad_accum global micro-batches of batch_size x world; rank k takes every
        world-th of each (`StepPlan`'s rule). Counts the step's units and loss tokens over all processes."""
        gb, accum = self.cfg.train.batch_size * self.world, self.cfg.train.grad_accum
        order = list(range(len(r.ids)))
        chunks = [order[k * gb:(k + 1) * gb] for k in range(accum)]
        parts = [[c[rank::self.world] for c in chunks] for rank in range(self.world)]
        r.micro = parts[self.rank]
        r.units = sum(self.part_units(r, p) for rank_parts in parts for p in rank_parts)
        r.tokens = float(sum(self.loss_tokens(r, i) for i in order))
        if r.tokens == 0:
            log.warning("round %d: every completion was cut at grpo.max_completion_length=%d and "
                        "grpo.mask_truncated drops them all: no loss this round", r.index + 1, self.g.max_completion_length)

    def round_metrics(self, r: Round, total: torch.Tensor, seconds: float) -> dict[str, float]:
        lengths = torch.tensor([len(x) for x in r.ids], dtype=torch.float32)
        out = {"reward": torch.nanmean(total), "reward_std": nanstd(total),
               "frac_reward_zero_std": zero_std_groups(total, self.group).float().mean(),
               "completions/mean_length": lengths.mean(), "completions/max_length": lengths.max(),
               "completions/min_length": lengths.min(),
               "completions/truncated_share": torch.tensor(r.truncated, dtype=torch.float32).mean(),
               "timing/generate_seconds": seconds}
        for k, reward in enumerate(self.rewards):
            out[f"rewards/{reward.name}/mean"] = torch.nanmean(r.rewards[:, k])
            out[f"rewards/{reward.name}/std"] = nanstd(r.rewards[:, k])
        values = {k: float(v) for k, v in out.items()}
        return {k: v for k, v in values.items() if math.isfinite(v)}  # a std of one value is NaN: left out

    # -- micro-batches and the loss ----------------------------------------------------------------------
    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        r = self.current
        idx = indices or [0]  # empty: completion 0 with nothing trained (the loop's all-masked micro-batch)
        seqs = [shifted(self.prompts[r.rows[i]].ids + r.ids[i], len(self.prompts[r.rows[i]].ids)) for i in idx]
        out = pad_collate(seqs, self.pad_id)
        width = max(len(r.ids[i]) for i in idx)
        completion = torch.zeros(len(idx), width, dtype=torch.bool)
        for b, i in enumerate(idx):
            completion[b, :len(r.ids[i])] = True
        keep = torch.tensor([bool(indices) and self.loss_tokens(r, i) > 0 for i in idx])
        out.update(completion_mask=completion, loss_mask=completion & keep[:, None],
                   advantages=r.advantages[idx].clone(), index=torch.tensor(idx),
                   units=torch.tensor(self.part_units(r, indices)),
                   n_real_tokens=torch.tensor(sum(len(s["input_ids"]) + 1 for s in seqs) if indices else 0))
        for key, cache in (("old_logps", r.old_logps), ("ref_logps", r.ref_logps)):
            if indices and all(i in cache for i in idx):
                out[key] = torch.nn.utils.rnn.pad_sequence([cache[i] for i in idx], batch_first=True)
        return out

    def loss(self, model: Any, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "advantages" not in micro:  # a validation batch: NLL of the task's reference responses
            from ftlab.train.sft import forward_log_probs

            return -forward_log_probs(model, micro).sum(), {}
        logps, entropy = completion_logps(model, micro, entropy=True)
        old = micro.get("old_logps")
        if old is None:
            old = logps.detach()
            self.keep(self.current.old_logps, micro, old)
        ref = None
        if self.g.beta > 0:
            ref = micro.get("ref_logps")
            if ref is None:
                ref = self.reference_logps(micro)
                self.keep(self.current.ref_logps, micro, ref)
        terms = token_losses(logps, old, micro["advantages"], epsilon=self.g.epsilon, epsilon_high=self.g.epsilon_high,
                             ref_logps=ref, beta=self.g.beta)
        mask = micro["loss_mask"]
        total, _ = loss_sum_and_units(terms.loss, mask, self.g.loss_type, self.g.max_completion_length)
        m = mask.float()
        extras = {"entropy": (entropy * m).sum(), "clip_ratio/low_mean": (terms.clipped_low * m).sum(),
                  "clip_ratio/high_mean": (terms.clipped_high * m).sum(),
                  "clip_ratio/region_mean": ((terms.clipped_low | terms.clipped_high) * m).sum()}
        if terms.kl is not None:
            extras["kl"] = (terms.kl.detach() * m).sum()
        return total, extras

    def keep(self, cache: dict[int, torch.Tensor], micro: dict[str, torch.Tensor], values: torch.Tensor) -> None:
        """mu > 1: a completion's per-token values, for the round's later steps (collate pads them again)."""
        if self.mu > 1 and bool(micro["loss_mask"].any()):
            for b, (i, n) in enumerate(zip(micro["index"].tolist(), micro["completion_mask"].sum(1).tolist())):
                cache[i] = values[b, :n].detach().float().cpu()

    def reference_logps(self, micro: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's log-probs of the completion tokens: the model with adapters disabled, or the copy."""
        inner = self.loop.accelerator.unwrap_model(self.loop.model)
        model = inner if self.reference == "adapters_off" else self.reference
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), (inner.disable_adapter() if model is inner else nullcontext()):
                logps, _ = completion_logps(model, micro)
        finally:
            model.train(was_training)
        return logps

    def more_metrics(self, loop: Any, metrics: dict[str, Any], axis: str) -> dict[str, Any]:
        if axis != "train" or self.current is None:
            return {}
        # The loop divided the forward's token sums by the step's loss units; per-token means need its tokens.
        scale = self.current.units / max(self.current.tokens, 1.0)
        out = {k: metrics[k] * scale for k in TOKEN_MEANS if k in metrics}
        return {**out, **self.current.metrics}

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        return self._val

    # -- set-up and logs ---------------------------------------------------------------------------------
    def before_training(self, loop: Any) -> None:
        self.loop = loop
        if self.g.engine == "vllm":
            from ftlab.train.grpo_vllm import start_vllm

            self.vllm = start_vllm(self.cfg, loop, self.tokenizer, self.rank, self.world)
        if self.g.beta > 0:
            if fresh_lora(self.cfg):
                self.reference = "adapters_off"  # LoRA starts at zero: the base is the initial policy
            else:  # before a checkpoint is restored: the initial weights
                self.reference = copy.deepcopy(loop.accelerator.unwrap_model(loop.model)).requires_grad_(False).eval()
                log.debug("grpo.beta=%s: reference = a frozen copy of the initial weights", self.g.beta)

    def close(self) -> None:
        """Shut vLLM down (its weights and KV cache); the loop itself has no end-of-run hook, `run_grpo` calls this."""
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None

    def log_preflight(self) -> None:
        g, p = self.g, self.per_step // self.group
        log.info("GRPO: %d prompts x %d completions per step (%s), loss %s, epsilon %s/%s, beta %s, "
                 "%d update(s) per round, rewards: %s", p, self.group, f"{self.per_step} completions",
                 g.loss_type, g.epsilon, g.epsilon_high if g.epsilon_high is not None else g.epsilon, g.beta, self.mu,
                 ", ".join(f"{r.name} x {r.weight:g}" for r in self.rewards))
        if self.dropped:
            log.info("%d prompts left out: with grpo.max_completion_length=%d they would not fit data.max_length=%d",
                     self.dropped, g.max_completion_length, self.cfg.data.max_length)
        log.info("first prompt as generation sees it:\n%s", self.prompts[0].text)

    def write_completions(self, r: Round, total: torch.Tensor, step: int) -> None:
        """<run>/completions/step_NNNNNN.jsonl (rank 0; written whole, then renamed), and a group in the log."""
        if self.loop is None or self.loop.run is None:
            return
        names = [rw.name for rw in self.rewards]
        rows = [{"step": step + 1, "id": self.prompts[row].fields.get("id", row), "prompt": self.prompts[row].text,
                 "completion": text, "rewards": {n: _finite(v) for n, v in zip(names, r.rewards[k].tolist())},
                 "reward": _finite(float(total[k])), "advantage": float(r.advantages[k]), "tokens": len(r.ids[k]),
                 "truncated": r.truncated[k]} for k, (row, text) in enumerate(zip(r.rows, r.texts))]
        folder = self.loop.run_path / "completions"
        folder.mkdir(exist_ok=True)
        target = folder / f"step_{step + 1:06d}.jsonl"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        os.replace(tmp, target)
        every = self.g.log_completions_every
        if every and (step == 0 or any(s % every == 0 for s in range(step + 1, step + self.mu + 1))):
            log.info("completions of step %d (first prompt, id %s; all in %s):\n%s", step + 1, rows[0]["id"], target,
                     "\n".join(f"  [advantage {x['advantage']:+.2f} | " +
                               " ".join(f"{n}={_short(v)}" for n, v in x["rewards"].items()) +
                               f"] {_clip(x['completion'])}" for x in rows[:self.group]))


# -- the forward ---------------------------------------------------------------------------------------------
def completion_logps(model: Any, micro: dict[str, torch.Tensor], entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, entropies) of the completion tokens, (sequences, completion tokens), zero on padding; the
    LM head runs on completion positions only. Entropy is a diagnostic: computed without gradient."""
    mask, completion = micro["response_mask"], micro["completion_mask"]
    logits = logits_at(model, mask, input_ids=micro["input_ids"], attention_mask=micro["attention_mask"],
                       use_cache=False)
    flat = token_log_probs(logits, micro["labels"][mask])
    # response positions in row-major order are each row's completion tokens in order: the same layout
    logps = torch.zeros(completion.shape, dtype=flat.dtype, device=flat.device).masked_scatter(completion, flat)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = torch.zeros_like(logps).masked_scatter(completion, compute_entropy(logits.detach()))
    return logps, ent


def generation_seed(seed: int, step: int) -> int:
    """The sampling seed of the round starting at `step` (0-based) of a run with `seed`."""
    digest = hashlib.blake2b(repr(("grpo", seed, step)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _short(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def _clip(text: str, n: int = 200) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[:n] + " ..."


# -- data ----------------------------------------------------------------------------------------------------
def load_prompts(cfg: DictConfig, tokenizer: Any) -> tuple[Any, list[PromptRow], int]:
    """(task, prompts that leave room for a completion, how many did not): the task's examples rendered as
    evaluation renders them, or generic JSONL rows (`prompt` text, or chat `messages` ending with a user turn)."""
    d, room = cfg.data, cfg.data.max_length - cfg.grpo.max_completion_length
    if not d.train:
        raise UserError("data.train is not set (the prompts to sample completions for)")
    if d.task == GENERIC:
        task, rows = None, generic_prompts(d.train, tokenizer, d.chat_template, d.limit)
    else:
        from ftlab.tasks import get_task

        task = get_task(d.task, **d.task_options)
        rows = [PromptRow(task.render_prompt(ex, shots=d.shots, tokenizer=tokenizer, chat_template=d.chat_template),
                          [], example_fields(ex), ex) for ex in task.load(d.train, split=d.train_split, limit=d.limit)]
    for row in rows:
        row.ids = prompt_ids(tokenizer, row.text)
    kept = [r for r in rows if len(r.ids) <= room]
    dropped = len(rows) - len(kept)
    if not kept or dropped / len(rows) > d.max_bad_share:
        raise UserError(f"{dropped} of {len(rows)} prompts are longer than data.max_length - "
                        f"grpo.max_completion_length = {room} tokens (more than data.max_bad_share="
                        f"{d.max_bad_share}); raise data.max_length or lower grpo.max_completion_length")
    return task, kept, dropped


def example_fields(ex: Any) -> dict[str, Any]:
    return {"id": ex.id, "question": ex.question, "target": ex.target, "gold": ex.gold, **ex.meta}


def generic_prompts(path: str, tokenizer: Any, chat_template: bool, limit: int | None) -> list[PromptRow]:
    from ftlab.data.jsonl import iter_jsonl
    from ftlab.data.sources import check_messages, prompt_text

    rows = []
    for lineno, r in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in r and check_messages(r["messages"], where)[-1]["role"] != "user":
            raise UserError(f"{where}: for GRPO 'messages' must end with a user turn (the model answers it)")
        rows.append(PromptRow(prompt_text(r, where, tokenizer, chat_template), [], dict(r)))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{path}: file is empty (no JSON records)")
    return rows


# -- checks and entry points -----------------------------------------------------------------------------------
def fresh_lora(cfg: DictConfig) -> bool:
    """A new LoRA adapter on a plain base: disabling the adapters gives the initial policy."""
    from ftlab.train.reference import starts_from_adapter

    return bool(cfg.lora.enabled and not cfg.model.adapter and not starts_from_adapter(cfg))


def check_recipe(cfg: DictConfig, origin: Callable[[str], str] = lambda key: "") -> None:
    """Settings GRPO cannot run with, refused when the recipe loads (before any model or sampling)."""
    d, g = cfg.data, cfg.grpo
    if d.packing:
        raise UserError(f"{origin('data.packing')}data.packing does not apply to train.method=grpo (completions are "
                        "padded rows)")
    if d.filter_correct:
        raise UserError(f"{origin('data.filter_correct')}data.filter_correct selects SFT data; with "
                        "train.method=grpo the rewards say what is correct")
    if g.max_completion_length >= d.max_length:
        raise UserError(f"{origin('grpo.max_completion_length')}grpo.max_completion_length={g.max_completion_length} "
                        f"leaves no room for a prompt within data.max_length={d.max_length}")
    if d.task == GENERIC and not g.rewards:
        raise UserError(f"{origin('grpo.rewards')}data.task is generic (no checker to score completions) and "
                        "grpo.rewards is empty: name reward functions, e.g. grpo.rewards=[{fn: 'my_module:my_reward'}]")
    if g.beta > 0 and cfg.lora.quantize and not fresh_lora(cfg):
        raise UserError(f"{origin('grpo.beta')}grpo.beta={g.beta} needs a reference model, and none is available: "
                        "the 4-bit base cannot be copied, and disabling the adapters would drop the starting adapter; "
                        "use grpo.beta=0, or a fresh LoRA (lora.enabled=true without model.adapter)")


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage of this launch (None: not DeepSpeed); the loop's accelerator already exists."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin
    return None if plugin is None else plugin.zero_stage


def build_objective(cfg: DictConfig, tokenizer: Any, rank: int = 0, world: int = 1,
                    constraint: Constraint | None = None) -> GRPOObjective:
    """Everything checked before the run directory exists and before any sampling: batch, rewards, prompts.
    `constraint`: a logits hook factory for the HF engine's sampling (the OaK loop's Action-line constraint)."""
    if deepspeed_zero_stage() == 3:
        raise UserError("train.method=grpo under DeepSpeed ZeRO-3: sampling needs whole weights on every process; "
                        "use ZeRO-2 or DDP")
    check_batch(cfg, world)
    rewards = resolve_rewards(list(cfg.grpo.rewards), None if cfg.data.task == GENERIC else cfg.data.task)
    task, prompts, dropped = load_prompts(cfg, tokenizer)
    return GRPOObjective(cfg, prompts, dropped, rewards, task, tokenizer, rank, world, constraint)


def check_batch(cfg: DictConfig, world: int = 1) -> None:
    t, g = cfg.train, cfg.grpo
    per_step = t.batch_size * t.grad_accum * world
    if per_step % g.num_generations:
        raise UserError(f"train.batch_size x train.grad_accum x processes = {t.batch_size} x {t.grad_accum} x {world} "
                        f"= {per_step} completions per step is not a multiple of grpo.num_generations="
                        f"{g.num_generations} (each prompt's group must be whole)")


def run_grpo(cfg: DictConfig, constraint: Constraint | None = None) -> RunDir | None:
    """Train as the recipe says; returns the finished run directory (None on ranks other than 0)."""
    from ftlab.train.loop import train

    made: list[GRPOObjective] = []

    def build(cfg: DictConfig, tokenizer: Any, rank: int, world: int) -> GRPOObjective:
        made.append(build_objective(cfg, tokenizer, rank, world, constraint))
        return made[-1]

    try:
        return train(cfg, build)
    finally:
        for objective in made:
            objective.close()
