"""The one training loop: every method (SFT, DPO, pretraining) is an `Objective` run by `train(cfg, ...)`.

What the loop owns, so each method gets it once and tested once:

* set-up through accelerate (one process, DDP via torchrun/`accelerate launch`, DeepSpeed ZeRO), and FSDP2
  applied by ftlab itself (train.sharding=fsdp2: `train/fsdp.py`);
* exact accumulation and data parallelism: every micro-batch returns its *summed* loss, and the loop
  divides by the number of loss units (supervised tokens, pairs) of the whole optimizer step summed
  over all processes (torchtitan-style), so batch 8 x accumulation 1 on 1 process equals batch 2 x
  accumulation 2 on 2 processes;
* rank symmetry (`StepPlan`): every process runs the same number of micro-batches per step, and every
  decision (skip a non-finite step, stop at `max_minutes`, stop on SIGTERM) is taken from values
  reduced across processes, so no rank can leave the others waiting in a collective;
* logged values reduced across processes (loss, tokens/s are global, not rank 0's share);
* fp16 with a gradient scaler (an overflow skips the step and lowers the scale, it does not stop the run);
* checkpoints with every rank's state (RNG per rank, DeepSpeed's partitioned optimizer), written to a
  temp dir and renamed; resume falls back past damaged checkpoints, saying so;
* SIGTERM and SIGUSR1 (Slurm's time-limit warning, preemption): the current optimizer step is finished, the
  ranks agree to stop after it (a flag reduced at the step boundary, so every rank stops at the same step),
  a checkpoint of that step is written (also without train.save_every: a preempted job resumes from it), and
  the run ends `interrupted` like Ctrl-C (ftlab.launch.slurm requeues the job).
"""
from __future__ import annotations

import logging
import math
import signal
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from ftlab.config.schema import metric_direction
from ftlab.errors import Terminated, UserError
from ftlab.runs.rundir import RunDir
from ftlab.runs.trackers import Trackers
from ftlab.train import checkpoint as ck
from ftlab.train import fsdp
from ftlab.train.objective import Objective
from ftlab.train.optim import build_optimizer, build_scheduler
from ftlab.train.setup import (check_resumable, check_trainable_dtype, is_deepspeed, make_accelerator,
                               model_identity, prepare_model, resolve_resume)
from ftlab.train.telemetry import gpu_metrics

log = logging.getLogger("ftlab")
# SIGTERM: Slurm's time limit, preemption, `kill`; SIGUSR1: the warning `sbatch --signal` sends ahead of them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingDiverged(UserError):
    """Non-finite loss, gradients or weights: reported as one line (usually lr/eps/precision)."""


# -- the loop --------------------------------------------------------------------------------------
def train(cfg: DictConfig, build_objective: Callable[[DictConfig, Any, int, int], Objective],
          keep_model: bool = False) -> RunDir | None:
    """Train as the recipe says; returns the finished run directory (None on ranks other than 0). The model and
    optimizer are given back at the end, unless `keep_model` (`ftlab replay` inspects the model afterwards)."""
    from accelerate.utils import broadcast_object_list, set_seed

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    model, tokenizer = prepare_model(cfg, accelerator.local_process_index)
    check_trainable_dtype(cfg, model, is_deepspeed(accelerator))
    objective = build_objective(cfg, tokenizer, accelerator.process_index, accelerator.num_processes)
    t = cfg.train
    planned = objective.total_steps  # e.g. pretraining's train.token_budget
    total_steps = (t.max_steps if t.max_steps is not None else planned if planned is not None
                   else math.ceil(t.epochs * objective.plan.steps_per_epoch))
    resume = resolve_resume(cfg) if t.resume else []
    check_resumable(cfg, resume, objective.name, total_steps)
    # Everything a user can get wrong has been checked: only now does the run directory appear.
    run = RunDir.create(cfg.output_dir, cfg.kind, cfg.name, cfg, cfg.seed) if accelerator.is_main_process else None
    path = [str(run.path) if run else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(path)
    loop = Loop(cfg, accelerator, model, tokenizer, objective, run, Path(path[0]), total_steps)
    try:
        objective.before_training(loop)
        summary = loop.fit(resume)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM/SIGUSR1 (Terminated)
        if run:
            run.finish("interrupted", steps=loop.done, **loop.stopped)
        raise
    except BaseException as e:
        if run:
            run.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if not keep_model:
            loop.release()
    if run:
        log.info("run complete: %s", run.path)
        run.finish("complete", **summary)
    return run


class Loop:
    """State of one training run; `fit()` is the loop, the other methods are its parts."""

    def __init__(self, cfg: DictConfig, accelerator: Any, model: Any, tokenizer: Any, objective: Objective,
                 run: RunDir | None, run_path: Path, total_steps: int):
        self.cfg, self.t, self.accelerator = cfg, cfg.train, accelerator
        self.tokenizer, self.objective, self.plan = tokenizer, objective, objective.plan
        self.run, self.run_path, self.total_steps = run, run_path, total_steps
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.deepspeed = is_deepspeed(accelerator)
        self.zero3 = self.deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
        # Empty micro-batches only matter when several processes (or DeepSpeed's accumulation counter)
        # must see the same number of passes; alone, they are skipped (they add exactly nothing).
        self.symmetric = self.world > 1 or self.deepspeed
        self.fsdp = fsdp.enabled(cfg)
        if self.fsdp:  # sharded before the optimizer sees the weights, and kept from accelerate (it would add DDP)
            model = fsdp.shard(model, self.t.precision, accelerator.device)
        optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
        self.model, self.optimizer = (model, optimizer) if self.fsdp else accelerator.prepare(model, optimizer)
        self.device = accelerator.device
        fp16 = self.t.precision == "fp16" and not self.deepspeed  # DeepSpeed scales fp16 losses itself
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=self.t.fp16_init_scale) if fp16 else None
        self.tracker = Trackers(run, cfg.track, OmegaConf.to_container(cfg, resolve=True)) if run else None
        self.done, self.best, self.terminate, self.resumed_from = 0, None, False, None
        self.signal_name: str | None = None
        self.stopped: dict[str, Any] = {}  # why and where a stop signal ended the run (summary.json)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, resume: list[Path]) -> dict[str, Any]:
        from tqdm.auto import tqdm

        t = self.t
        if resume:
            self.done, self.best = self.restore(resume)
        self.log_start()
        self.model.train()
        started, last, saved, signalled = time.time(), {}, self.done, False
        tokens, step_seconds = 0, 0.0  # counted over applied steps only: the steps' own throughput
        bar = tqdm(total=self.total_steps, initial=self.done, desc="train", disable=self.rank != 0)
        previous = {s: signal.signal(s, self.on_stop_signal) for s in STOP_SIGNALS} if _main_thread() else {}
        try:
            while self.done < self.total_steps:
                began = time.time()
                stats = self.step(self.done)
                self.done += 1
                bar.update(1)
                # One reduction, and every rank acts on its result: a rank that got no signal (or got it a moment
                # later) stops at this same step, saves the same checkpoint and raises the same way.
                signalled, late = (v > 0 for v in self.sum_ranks([float(self.terminate), float(bool(
                    t.max_minutes and (time.time() - started) / 60 > t.max_minutes))]))
                stop = signalled or late
                if stats is not None:  # None: no update (a non-finite step under nan_policy=skip, a loss spike)
                    tokens += stats.pop("tokens")
                    step_seconds += time.time() - began
                    # wall-clock throughput includes evaluation, generation and checkpoints; the steps' own does not
                    stats["tokens_per_s"] = tokens / max(time.time() - started, 1e-9)
                    stats["step_tokens_per_s"] = tokens / max(step_seconds, 1e-9)
                    stats.update(self.objective.more_metrics(self, stats, "train"))
                    stats.update(gpu_metrics(self.device))  # CUDA memory, utilisation; {} on CPU
                    last = stats
                    bar.set_postfix(loss=f"{stats['loss']:.4f}")
                    if self.tracker and (self.done % t.log_every == 0 or self.done == self.total_steps):
                        self.tracker.log({**stats, "epoch": self.done / self.plan.steps_per_epoch}, self.done)
                # A step without an update is still a step: evaluation, checkpoints and stopping keep their
                # schedule (a skip on the last step keeps the final evaluation, one on a save step its checkpoint).
                if t.eval_every and (self.done % t.eval_every == 0 or self.done == self.total_steps):
                    last.update(self.evaluate())
                if self.run and t.log_generations_every and self.done % t.log_generations_every == 0:
                    self.log_generations()
                if ((t.save_every and (self.done % t.save_every == 0 or stop)) or signalled) \
                        and self.done < self.total_steps:
                    self.save_checkpoint()
                    saved = self.done
                if stop:
                    break
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        if signalled and self.done < self.total_steps:  # a signal during the last step lets the run finish
            why = self.signal_name or "a stop signal on another process"
            self.stopped = {"stopped_by": why, "checkpoint": str(self.run_path / "checkpoints" / ck.step_name(saved))}
            log.info("%s at step %d: checkpoint saved, stopping", why, self.done)
            raise Terminated(f"terminated by {why} at step {self.done}")
        if self.done < self.total_steps:
            log.info("train.max_minutes=%s reached after step %d; stopping", t.max_minutes, self.done)
        out: dict[str, Any] = {"final_loss": last.get("loss"), "steps": self.done,
                               "tokens_per_s": last.get("tokens_per_s"),
                               "step_tokens_per_s": last.get("step_tokens_per_s"),
                               "train_seconds": time.time() - started}
        if t.save_final:
            out.update(self.save_outputs())
        if self.tracker:
            self.tracker.close()
        return out

    def release(self) -> None:
        """Give back the model, optimizer and accelerate's references to them (it keeps every prepared object,
        a DeepSpeed engine included, until told): a stage that generates next (the OaK loop's vLLM engine)
        needs that memory."""
        self.model = self.optimizer = self.scheduler = self.scaler = None
        self.accelerator.free_memory()  # then collects garbage and empties the CUDA cache

    def on_stop_signal(self, signum: int, frame: Any) -> None:
        """Finish the current step, save a checkpoint, then stop (see `fit`)."""
        self.terminate, self.signal_name = True, signal.Signals(signum).name

    # -- one optimizer step ----------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, Any] | None:
        """One optimizer step over this step's micro-batches; None when skipped for a non-finite value."""
        micro = [self.objective.collate(ix) for ix in self.plan.step_indices(step) if ix or self.symmetric]
        units = self.sum_ranks([sum(float(m["units"]) for m in micro)])[0]
        # Each micro-batch contributes summed loss / all units of the step. DDP averages gradients over
        # processes and DeepSpeed divides by its accumulation steps: both are undone here.
        scale = self.world / max(units, 1.0) * (self.t.grad_accum if self.deepspeed else 1)
        sums: dict[str, float] = defaultdict(float)
        bad = first = None  # forensics get a micro-batch as the model saw it, on the model's device
        for i, m in enumerate(micro):
            m = {k: v.to(self.device) for k, v in m.items()}
            if i == 0:
                first = m
            last = i == len(micro) - 1
            self.accelerator.gradient_state._set_sync_gradients(last)  # DeepSpeed steps at the last one
            with (nullcontext() if last else self.no_sync()):
                with self.autocast():
                    loss_sum, extras = self.objective.loss(self.model, m)
                if bad is None and not torch.isfinite(loss_sum):
                    bad = m  # still run backward: the other ranks are waiting in the gradient all-reduce
                loss = loss_sum * scale
                self.accelerator.backward(self.scaler.scale(loss) if self.scaler else loss)
            sums["loss"] += float(loss_sum.detach())
            for k, v in extras.items():
                sums[k] += float(v)
            sums["tokens"] += float(m["n_real_tokens"])
        keys = sorted(sums)
        reduced = dict(zip(keys, self.sum_ranks([sums[k] for k in keys])))
        if self.any_rank(bad is not None):
            return self.nonfinite(step, bad, "loss")
        if self.objective.skip_update(self, step, reduced["loss"] / max(units, 1.0)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # The norm is always computed (clipping at infinity when train.grad_clip is unset) to be logged.
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.t.grad_clip or math.inf)
        grad_norm = float(norm) if norm is not None else float("nan")
        stepped = self.optimizer_step(grad_norm)
        if stepped is None:
            return self.nonfinite(step, first, "grad_norm")
        stats = {k: v / max(units, 1.0) for k, v in reduced.items() if k != "tokens"}
        clip = self.t.grad_clip
        stats.update(lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                     grad_norm_clipped=grad_norm * min(1.0, clip / (grad_norm + 1e-6)) if clip else grad_norm,
                     tokens=int(reduced["tokens"]))
        stats[self.objective.units_name] = int(units)
        if self.scaler:
            stats.update(loss_scale=self.scaler.get_scale())
        if self.scaler or (self.deepspeed and self.t.precision == "fp16"):
            stats.update(overflow_skipped=not stepped)
        return stats

    def no_sync(self) -> Any:
        """Backward without the gradient reduction: every micro-batch of a step but the last."""
        return fsdp.no_sync(self.model) if self.fsdp else self.accelerator.no_sync(self.model)

    def optimizer_step(self, grad_norm: float) -> bool | None:
        """Step optimizer and schedule. False: an fp16 overflow, skipped by the scaler; None: non-finite."""
        if self.scaler:  # an inf gradient is routine in fp16: the scaler skips the step and lowers the scale
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale
            if not stepped:
                log.info("fp16 overflow: step skipped, loss scale %g -> %g", scale, self.scaler.get_scale())
        elif self.deepspeed:
            # The engine stepped inside backward, unless its fp16 loss scaler met an overflow and skipped.
            stepped = self.model.was_step_applied()
            if not stepped:
                log.info("fp16 overflow: DeepSpeed skipped the step (the schedule waits too)")
        elif not math.isfinite(grad_norm):
            return None
        else:
            self.optimizer.step()
            stepped = True
        if stepped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stepped

    def autocast(self) -> Any:
        if self.deepspeed or self.t.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.t.precision == "bf16" else torch.float16)

    def nonfinite(self, step: int, batch: dict | None, what: str) -> None:
        self.objective.on_nonfinite(self, step, batch, what)
        self.optimizer.zero_grad(set_to_none=True)
        path = None
        if batch is not None:
            path = self.run_path / "nonfinite" / f"step_{step + 1:06d}_rank{self.rank}.pt"
            path.parent.mkdir(exist_ok=True)
            torch.save({"step": step + 1, "what": what, "batch": {k: v.cpu() for k, v in batch.items()}}, path)
        msg = f"non-finite {what} at step {step + 1}; batch saved under {self.run_path / 'nonfinite'}"
        if self.t.nan_policy == "stop" or self.deepspeed:
            raise TrainingDiverged(msg)
        log.warning("%s; skipping the step (train.nan_policy=skip)", msg)
        return None

    # -- cross-process reductions ----------------------------------------------------------------------
    def sum_ranks(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64: token counts stay exact)."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any_rank(self, *flags: bool) -> bool:
        return any(v > 0 for v in self.sum_ranks([float(f) for f in flags]))

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """eval/loss over the validation batches (split across processes) and, for task data, accuracy."""
        batches = self.objective.val_batches()
        if not batches:
            return {}
        self.model.eval()
        total = units = 0.0
        rounds = math.ceil(len(batches) / self.world)  # equal passes per rank (ZeRO-3 gathers per forward)
        for r in range(rounds):
            i = r * self.world + self.rank
            b = {k: v.to(self.device) for k, v in batches[min(i, len(batches) - 1)].items()}
            with self.autocast():
                loss_sum, _ = self.objective.loss(self.model, b)
            if i < len(batches):
                total, units = total + float(loss_sum), units + float(b["units"])
        total, units = self.sum_ranks([total, units])
        ev = {"loss": total / max(units, 1.0)}
        ev.update(self.accuracy())
        ev.update(self.objective.more_metrics(self, ev, "eval"))
        self.model.train()
        if self.tracker:
            self.tracker.log(ev, self.done, axis="eval")
        self.maybe_save_best(ev)
        return {"eval_loss": ev["loss"]}

    def accuracy(self) -> dict[str, float]:
        """The task's own checker on generated answers; examples split across processes, gathered to score."""
        task, examples = self.objective.generation_task
        if not examples or self.deepspeed or self.fsdp:  # sharded weights: generation stays for `ftlab eval`
            return {}
        from accelerate.utils import gather_object

        from ftlab.evaluate import evaluate_examples

        ecfg = OmegaConf.merge(self.cfg.eval, {"shots": self.cfg.data.shots,
                                               "chat_template": self.cfg.data.chat_template})
        mine = examples[self.rank::self.world]
        rows, _ = evaluate_examples(self.accelerator.unwrap_model(self.model), self.tokenizer, task, mine, ecfg,
                                    self.cfg.seed, progress=False)
        rows = gather_object(rows) if self.world > 1 else rows  # every rank gets all rows: same decisions
        by_id = {r["id"]: r for r in rows}
        metrics = task.aggregate([by_id[ex.id] for ex in examples], examples)
        return {k: v for k, v in metrics.items() if k.startswith(("accuracy", "parse_rate")) and isinstance(v, float)}

    def log_generations(self) -> None:
        from ftlab.evaluate import log_generations

        task, examples = self.objective.generation_task
        if examples:
            log_generations(self.accelerator.unwrap_model(self.model), self.tokenizer, task, examples[:8],
                            self.cfg.eval, step=self.done, run=self.run, tracker=self.tracker, seed=self.cfg.seed)

    def maybe_save_best(self, metrics: dict[str, float]) -> None:
        key = (self.t.best_metric or "").removeprefix("eval/")
        if not key or key not in metrics:
            return
        value, lower_better = metrics[key], metric_direction(key) == "lower"
        if self.best is None or (value < self.best["value"] if lower_better else value > self.best["value"]):
            self.best = {"metric": self.t.best_metric, "value": value, "step": self.done}
            self.save_model(self.run_path / "best")
            if self.run:
                self.run.update_summary(best=self.best)

    # -- saving and restoring ------------------------------------------------------------------------
    def save_model(self, path: Path) -> None:
        """HF-loadable export (adapter or full model) from rank 0; every rank joins a ZeRO gather."""
        # ZeRO-3 shards the weights: every rank joins the gather. Under ZeRO-0/1/2 each rank holds them whole,
        # so rank 0 saves straight from its model (a LoRA run writes just the adapter), with no CPU copy anywhere.
        # FSDP2: every rank joins the gather of the full weights to rank 0's CPU.
        state = fsdp.gathered_state_dict(self.model) if self.fsdp else (
            self.accelerator.get_state_dict(self.model) if self.zero3 else None)
        if self.rank == 0:
            model = self.accelerator.unwrap_model(self.model)
            guard_finite(model, self.done, state if self.fsdp else None)
            ck.save_model(model, self.tokenizer, path, state_dict=state)
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> None:
        ckpt_dir = self.run_path / "checkpoints"
        tmp = ck.begin_checkpoint(ckpt_dir, self.done) if self.rank == 0 else ck.temp_dir(ckpt_dir, self.done)
        self.accelerator.wait_for_everyone()
        if self.fsdp:  # sharded weights and optimizer states (DCP): every rank writes its own shard
            fsdp.save_sharded(self.model, self.optimizer, tmp / fsdp.CHECKPOINT_DIR)
        else:
            self.save_model(tmp / "model")
        if self.deepspeed:  # partitioned optimizer states: every rank writes its own shard
            self.model.save_checkpoint(str(tmp / "deepspeed"))
        elif self.rank == 0 and not self.fsdp:  # DDP: every rank holds the same optimizer state
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(ck.rng_state(), tmp / f"rng_rank{self.rank}.pt")
        self.accelerator.wait_for_everyone()
        if self.rank == 0:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.scaler:
                torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
            ck.finish_checkpoint(ckpt_dir, self.done, {"best": self.best, "world_size": self.world,
                                                       "model": model_identity(self.cfg),
                                                       "objective": self.objective.name,
                                                       "sharding": self.t.sharding})
            ck.prune_checkpoints(ckpt_dir, self.t.keep_last)
        self.accelerator.wait_for_everyone()

    def restore(self, candidates: list[Path]) -> tuple[int, Any]:
        """Load the newest usable checkpoint of `candidates` (newest first), falling back past damaged ones."""
        for path in candidates:
            state = ck.read_state(path)
            error = None
            try:
                if state is None:
                    raise ValueError("state.json is unreadable")
                self.load_checkpoint(path)
            except ck.DAMAGE_ERRORS as e:
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if not self.any_rank(error is not None):
                log.info("resumed from %s at step %d", path, state["step"])
                self.resumed_from = path
                return int(state["step"]), state.get("best")
            log.warning("checkpoint %s is damaged (%s); trying the previous one", path, error or "on another rank")
        raise UserError(f"no usable checkpoint among {len(candidates)} under {candidates[0].parent}: all damaged")

    def load_checkpoint(self, path: Path) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if self.fsdp:
            fsdp.load_sharded(self.model, self.optimizer, path / fsdp.CHECKPOINT_DIR)
        elif self.deepspeed:
            loaded, _ = self.model.load_checkpoint(str(path / "deepspeed"))
            if loaded is None:  # DeepSpeed only warns (no `latest` tag, missing files) and loads nothing
                raise FileNotFoundError(f"DeepSpeed loaded no state from {path / 'deepspeed'}")
        else:
            ck.load_trainable_weights(model, path / "model")
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        if self.scaler and (path / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
        rng = path / f"rng_rank{self.rank}.pt"
        ck.set_rng_state(torch.load(rng if rng.is_file() else path / "rng_rank0.pt", weights_only=False))

    def save_outputs(self) -> dict[str, str]:
        """final/: adapter (LoRA) or full model; merged/: LoRA folded into the base, if asked."""
        final = self.run_path / "final"
        self.save_model(final)
        if self.cfg.lora.enabled and self.t.save_merged and self.rank == 0:
            if self.cfg.lora.quantize:  # merging into the 4-bit base would re-quantize the merged weights
                ck.save_merged_from_adapter(self.cfg.model, final, self.run_path / "merged", dtype="bf16")
            else:
                merged = self.accelerator.unwrap_model(self.model).merge_and_unload()
                ck.save_model(merged, self.tokenizer, self.run_path / "merged")
        return {"final_model": str(final)}

    def log_start(self) -> None:
        if not self.run:
            return
        self.objective.log_preflight()
        t = self.t
        backend = "FSDP2" if self.fsdp else str(self.accelerator.distributed_type).split(".")[-1]
        log.info("%d steps (%d per epoch), %d examples, batch %d x accum %d x %d process(es) (%s), precision %s",
                 self.total_steps, self.plan.steps_per_epoch, len(self.plan.lengths), t.batch_size, t.grad_accum,
                 self.world, backend, t.precision)
        self.run.update_summary(total_steps=self.total_steps, world_size=self.world, distributed=backend,
                                resumed_from=str(self.resumed_from) if self.resumed_from else None)


def guard_finite(model: Any, step: int, gathered: dict[str, torch.Tensor] | None = None) -> None:
    """`gathered`: the full weights of a sharded model (FSDP2), whose own parameters are shards."""
    finite = (ck.model_is_finite(model) if gathered is None else
              all(torch.isfinite(v).all() for v in fsdp.trainable_state_dict(model, gathered).values()))
    if not finite:
        raise TrainingDiverged(f"model weights are non-finite at step {step}; refusing to save them")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
