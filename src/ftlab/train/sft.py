"""Supervised fine-tuning: full, LoRA or QLoRA, as one readable loop on accelerate.

Loss = summed log-loss of supervised tokens / supervised tokens in the whole optimizer step
(torchtitan-style), so gradient accumulation and data parallelism are exact. Data order is a pure
function of (seed, epoch), and step -> micro-batches is a pure function of the step, so a resumed run
replays exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ftlab.data.collate import length_grouped_batches, pack_examples, packed_collate, pad_collate
from ftlab.data.sft import encode_sft_turns, preflight
from ftlab.data.sources import load_conversations
from ftlab.errors import UserError
from ftlab.losses import response_token_log_probs
from ftlab.runs.rundir import RunDir
from ftlab.runs.trackers import Trackers
from ftlab.train import checkpoint as ck
from ftlab.train.optim import build_optimizer, build_scheduler

log = logging.getLogger("ftlab")


class TrainingDiverged(UserError):
    """Non-finite loss, gradients or weights: reported as one line (usually lr/eps/precision)."""


# -- data ------------------------------------------------------------------------------------------
@dataclass
class SFTData:
    """Encoded examples plus the step -> micro-batches plan."""

    encoded: list[dict]
    batch_size: int          # examples per micro-batch on this process
    grad_accum: int
    seed: int
    packing: bool
    group_by_length: bool
    max_length: int
    pad_id: int
    rank: int = 0
    world: int = 1

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(len(self.encoded) / (self.batch_size * self.world))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / self.grad_accum)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Global micro-batches (indices) of one epoch, deterministic in (seed, epoch)."""
        size = self.batch_size * self.world
        lengths = [len(e["input_ids"]) for e in self.encoded]
        if self.group_by_length and not self.packing:
            return length_grouped_batches(lengths, size, seed=self.seed + epoch)
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return [order[i:i + size] for i in range(0, len(order), size)]

    def step_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's collated micro-batches for optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if getattr(self, "_epoch", None) != epoch:  # one epoch's plan is cached at a time
            self._epoch, self._batches = epoch, self.epoch_batches(epoch)
        chunk = self._batches[k * self.grad_accum:(k + 1) * self.grad_accum]
        return [self.collate(b[self.rank::self.world]) for b in chunk if b[self.rank::self.world]]

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = [self.encoded[i] for i in idx]
        if self.packing:  # rows of up to max_length tokens, examples isolated by position_ids
            rows = pack_examples(batch, self.max_length)
            out = packed_collate([[batch[i] for i in row] for row in rows], self.pad_id)
        else:
            out = pad_collate(batch, self.pad_id)
        out["n_real_tokens"] = torch.tensor(sum(len(e["input_ids"]) for e in batch))  # excludes padding
        return out


def encode_conversations(samples: list[list[tuple[str, str]]], tokenizer: Any, max_length: int) -> list[dict | None]:
    return [encode_sft_turns(turns, tokenizer, max_length) for turns in samples]


def prepare_data(cfg: DictConfig, tokenizer: Any, rank: int = 0, world: int = 1) -> tuple[SFTData, Any]:
    d = cfg.data
    if not d.train:
        raise UserError("data.train is not set (a JSONL path or a datasets id)")
    samples = load_conversations(d, d.train, d.train_split, tokenizer, d.limit)
    encoded = encode_conversations(samples, tokenizer, d.max_length)
    report = preflight(encoded, tokenizer, n_show=2, max_bad_share=d.max_bad_share)
    kept = [e for e in encoded if e is not None]
    data = SFTData(kept, cfg.train.batch_size, cfg.train.grad_accum, cfg.seed, d.packing, d.group_by_length,
                   d.max_length, tokenizer.pad_token_id, rank, world)
    return data, report


def val_batches(cfg: DictConfig, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    d = cfg.data
    if not d.val:
        return []
    samples = load_conversations(d, d.val, d.val_split, tokenizer, d.val_limit)
    enc = [e for e in encode_conversations(samples, tokenizer, d.max_length) if e is not None]
    bs = cfg.train.batch_size
    return [pad_collate(enc[i:i + bs], tokenizer.pad_token_id) for i in range(0, len(enc), bs)]


# -- model -----------------------------------------------------------------------------------------
def prepare_model(cfg: DictConfig) -> tuple[Any, Any]:
    from ftlab.models.adapters import (apply_lora, enable_gradient_checkpointing, quantization_config,
                                       trainable_summary)
    from ftlab.models.load import load_model_and_tokenizer

    if cfg.lora.quantize and not cfg.lora.enabled:
        raise UserError("lora.quantize is set but lora.enabled is false (QLoRA = quantized base + LoRA)")
    quantization_config(cfg.lora)  # fails early on CPU
    model, tokenizer = load_model_and_tokenizer(cfg.model, trainable_adapter=True)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    log.info("trainable parameters: %s", trainable_summary(model))
    return model, tokenizer


# -- loop ------------------------------------------------------------------------------------------
def forward_log_probs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probs (N,) of the batch's supervised tokens only: the LM head runs on those positions alone."""
    return response_token_log_probs(model, batch["input_ids"], batch["labels"], batch["response_mask"],
                                    attention_mask=batch.get("attention_mask"),
                                    position_ids=batch.get("position_ids"))


@torch.no_grad()
def eval_loss(model: Any, batches: list[dict[str, torch.Tensor]], accelerator: Any) -> float:
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        b = {k: v.to(accelerator.device) for k, v in b.items()}
        with accelerator.autocast():
            lp = forward_log_probs(model, b)
        total += float(-lp.sum())
        count += lp.numel()
    model.train()
    return total / max(count, 1)


def generation_examples(cfg: DictConfig) -> tuple[Any, list]:
    """Validation examples for accuracy / log_generations: only for task data (generic data has no checker)."""
    d, t = cfg.data, cfg.train
    if d.task == "generic" or not d.val or not (t.eval_every or t.log_generations_every):
        return None, []
    from ftlab.tasks import get_task

    task = get_task(d.task, **d.task_options)
    return task, task.load(d.val, split=d.val_split, limit=d.val_limit)


def val_accuracy(cfg: DictConfig, model: Any, tokenizer: Any, task: Any, examples: list) -> dict[str, float]:
    from ftlab.evaluate import evaluate_examples

    ecfg = OmegaConf.merge(cfg.eval, {"shots": cfg.data.shots, "chat_template": cfg.data.chat_template})
    was_training = model.training
    model.eval()
    _, metrics = evaluate_examples(model, tokenizer, task, examples, ecfg, cfg.seed, progress=False)
    model.train(was_training)
    return {k: v for k, v in metrics.items() if k.startswith(("accuracy", "parse_rate")) and isinstance(v, float)}


def dump_bad_batch(run: RunDir, step: int, batch: dict[str, torch.Tensor], what: str) -> Path:
    path = run.path / "nonfinite" / f"step_{step:06d}.pt"
    path.parent.mkdir(exist_ok=True)
    torch.save({"step": step, "what": what, "batch": {k: v.cpu() for k, v in batch.items()}}, path)
    return path


def run_sft(cfg: DictConfig) -> RunDir:
    """Train as the recipe says; returns the finished run directory."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from accelerate.state import AcceleratorState

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
    # accelerate keeps one global state per process; a second run in the same process (the quickstart,
    # notebooks, tests) may ask for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    model, tokenizer = prepare_model(cfg)
    data, report = prepare_data(cfg, tokenizer, accelerator.process_index, accelerator.num_processes)
    val = val_batches(cfg, tokenizer)
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * data.steps_per_epoch)

    resume_from = None
    if cfg.train.resume:
        resume_from = ck.find_resume_checkpoint(resolve_resume_path(cfg))
        if resume_from is None:
            raise UserError(f"train.resume: no complete checkpoint under {cfg.train.resume!r}")

    # Everything a user can get wrong has been checked: only now does the run directory appear.
    run = RunDir.create(cfg.output_dir, cfg.kind, cfg.name, cfg, cfg.seed) if accelerator.is_main_process else None
    try:
        summary = train_loop(cfg, accelerator, model, tokenizer, data, val, total_steps, run, resume_from, report)
    except KeyboardInterrupt:
        if run:
            run.finish("interrupted")
        raise
    except BaseException as e:
        if run:
            run.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    if run:
        run.finish("complete", **summary)
        log.info("run complete: %s", run.path)
    return run


def resolve_resume_path(cfg: DictConfig) -> Path:
    if cfg.train.resume == "latest":
        return Path(cfg.output_dir) / cfg.kind / "latest"
    return Path(cfg.train.resume)


def train_loop(cfg: DictConfig, accelerator: Any, model: Any, tokenizer: Any, data: SFTData,
               val: list, total_steps: int, run: RunDir | None, resume_from: Path | None, report: Any) -> dict:
    from tqdm.auto import tqdm

    t = cfg.train
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    tracker = Trackers(run, cfg.track, OmegaConf.to_container(cfg, resolve=True)) if run else None
    start, best = 0, None
    if resume_from is not None:
        start, best = restore(resume_from, accelerator.unwrap_model(model), optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, start)
    if run:
        log.info("preflight: %s", report.summary())
        for s in report.samples:
            log.info("supervised span in «»:\n%s", s)
        log.info("%d steps (%d per epoch), %d examples, batch %d x accum %d x %d process(es), precision %s",
                 total_steps, data.steps_per_epoch, len(data.encoded), t.batch_size, t.grad_accum,
                 accelerator.num_processes, t.precision)
        run.update_summary(total_steps=total_steps, resumed_from=str(resume_from) if resume_from else None)
    ckpt_dir = run.path / "checkpoints" if run else None
    gen_task, gen_examples = generation_examples(cfg)
    model.train()
    started, tokens_seen, last = time.time(), 0, {}
    bar = tqdm(range(start, total_steps), desc="train", disable=not accelerator.is_main_process,
               initial=start, total=total_steps)
    for step in bar:
        stats = train_step(model, optimizer, scheduler, accelerator, data.step_batches(step), t, run, step)
        if stats is None:  # non-finite step skipped (nan_policy=skip)
            continue
        tokens_seen += stats.pop("tokens")
        stats["tokens_per_s"] = tokens_seen / max(time.time() - started, 1e-9)
        last = stats
        bar.set_postfix(loss=f"{stats['loss']:.4f}")
        done = step + 1
        if tracker and (done % t.log_every == 0 or done == total_steps):
            tracker.log({**stats, "epoch": done / data.steps_per_epoch}, done)
        if t.eval_every and (done % t.eval_every == 0 or done == total_steps) and val:
            ev = {"loss": eval_loss(model, val, accelerator)}
            if gen_examples and run:  # accuracy through the task's own checker
                ev.update(val_accuracy(cfg, accelerator.unwrap_model(model), tokenizer, gen_task, gen_examples))
            if tracker:
                tracker.log(ev, done, axis="eval")
            last["eval_loss"] = ev["loss"]
            best = maybe_save_best(cfg, run, ev, best, accelerator.unwrap_model(model), tokenizer, done)
        if run and gen_examples and t.log_generations_every and done % t.log_generations_every == 0:
            from ftlab.evaluate import log_generations

            log_generations(accelerator.unwrap_model(model), tokenizer, gen_task, gen_examples[:8], cfg.eval,
                            step=done, run=run, tracker=tracker, seed=cfg.seed)
        if run and t.save_every and done % t.save_every == 0 and done < total_steps:
            guard_finite(accelerator.unwrap_model(model), done)
            ck.save_checkpoint(ckpt_dir, done, accelerator.unwrap_model(model), tokenizer, optimizer, scheduler,
                               {"best": best})
            ck.prune_checkpoints(ckpt_dir, t.keep_last)
        if t.max_minutes and (time.time() - started) / 60 > t.max_minutes:
            log.info("train.max_minutes=%s reached at step %d; stopping", t.max_minutes, done)
            break
    out: dict[str, Any] = {"final_loss": last.get("loss"), "steps": bar.n,
                           "tokens_per_s": last.get("tokens_per_s"), "train_seconds": time.time() - started}
    if run and t.save_final:
        final = save_outputs(cfg, run, accelerator.unwrap_model(model), tokenizer)
        out["final_model"] = str(final)
    if tracker:
        tracker.close()
    return out


def train_step(model: Any, optimizer: Any, scheduler: Any, accelerator: Any, micro: list[dict], t: Any,
               run: RunDir | None, step: int) -> dict | None:
    """One optimizer step over the step's micro-batches; None if skipped for a non-finite loss."""
    device = accelerator.device
    micro = [{k: v.to(device) for k, v in b.items()} for b in micro]
    n_tok = torch.tensor(sum(int(b["response_mask"].sum()) for b in micro), device=device)
    n_tok = accelerator.reduce(n_tok, "sum") if accelerator.num_processes > 1 else n_tok
    loss_sum = 0.0
    for i, b in enumerate(micro):
        sync = accelerator.no_sync(model) if i < len(micro) - 1 else nullcontext()
        with sync, accelerator.autocast():
            lp = forward_log_probs(model, b)  # supervised tokens only, float32
            # token-normalised over the whole step (see ftlab.losses.accumulation_loss); x world: DDP averages
            loss = -lp.sum() / n_tok * accelerator.num_processes
        if not torch.isfinite(loss):
            return nonfinite(run, step, b, "loss", optimizer, t)
        accelerator.backward(loss)
        loss_sum += float(loss.detach()) / accelerator.num_processes
    grad_norm = grad_norm_after = None
    if t.grad_clip:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), t.grad_clip))
        grad_norm_after = grad_norm * min(1.0, t.grad_clip / (grad_norm + 1e-6))
        if not math.isfinite(grad_norm):
            return nonfinite(run, step, micro[0], "grad_norm", optimizer, t)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["n_real_tokens"]) for b in micro)
    return {"loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "grad_norm_clipped": grad_norm_after, "supervised_tokens": int(n_tok), "tokens": tokens}


def nonfinite(run: RunDir | None, step: int, batch: dict, what: str, optimizer: Any, t: Any) -> None:
    path = dump_bad_batch(run, step + 1, batch, what) if run else None
    optimizer.zero_grad(set_to_none=True)
    msg = f"non-finite {what} at step {step + 1}; batch saved to {path}"
    if t.nan_policy == "stop":
        raise TrainingDiverged(msg)
    log.warning("%s; skipping the step (train.nan_policy=skip)", msg)
    return None


def guard_finite(model: Any, step: int) -> None:
    if not ck.model_is_finite(model):
        raise TrainingDiverged(f"model weights are non-finite at step {step}; refusing to save them")


def maybe_save_best(cfg: DictConfig, run: RunDir | None, metrics: dict, best: Any, model: Any, tokenizer: Any,
                    step: int) -> Any:
    key = cfg.train.best_metric
    if not run or not key or key.removeprefix("eval/") not in metrics:
        return best
    value = metrics[key.removeprefix("eval/")]
    lower_better = "loss" in key
    if best is None or (value < best["value"] if lower_better else value > best["value"]):
        guard_finite(model, step)
        ck.save_model(model, tokenizer, run.path / "best")
        best = {"metric": key, "value": value, "step": step}
        run.update_summary(best=best)
    return best


def restore(path: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[int, Any]:
    import json

    ck.load_trainable_weights(model, path / "model")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    ck.set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    state = json.loads((path / "state.json").read_text())
    return int(state["step"]), state.get("best")


def save_outputs(cfg: DictConfig, run: RunDir, model: Any, tokenizer: Any) -> Path:
    """final/: adapter (LoRA) or full model; merged/: LoRA folded into the base, if asked."""
    guard_finite(model, -1)
    final = run.path / "final"
    ck.save_model(model, tokenizer, final)
    if cfg.lora.enabled and cfg.train.save_merged:
        merged = model.merge_and_unload()
        ck.save_model(merged, tokenizer, run.path / "merged")
    return final
