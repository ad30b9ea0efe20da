"""`ftlab loop RECIPE`: SOKRATES's OaK loop (experience -> model -> policy), resumable stage by stage.

    iter_0/sft      SFT on optionized traces (data.task: sokrates), unless loop.sft is false
    iter_0/eval     the starting policy on the held-out problems
    iter_k/traces   loop.samples traces per problem at loop.temperature, every step verified (traces.jsonl)
    iter_k/pairs    chosen = fully valid, rejected = wrong verdict or an invalid step; prefix pairs (pairs.jsonl)
    iter_k/head     optional: the option head on the traces' Action lines, calibrated on held-out problems
    iter_k/dpo      DPO from the previous policy on those pairs (the reference is the previous policy)
    iter_k/eval     held-out: answer accuracy, step validity, fully valid proofs, pass@k, answer calibration

With `loop.optimizer: grpo` an iteration is instead

    iter_k/grpo     GRPO from the previous policy on the training problems: each step samples G traces per
                    problem (under the Action-line constraint with loop.constrained) and rewards them with the
                    verdict the verifier reads (verified_answer) and its share of valid steps (step_validity), weights 1 and 1
                    unless grpo.rewards or loop.grpo_overrides say otherwise; the recipe's grpo.* settings with
                    loop.grpo_overrides on top (`oak_stages.grpo_stage_config`)
    iter_k/eval     as above

Every stage is a directory written whole (`stages.LoopDir`); re-running the same recipe skips finished
stages, another recipe's loop directory is refused. `metrics.jsonl` (one row per iteration), `summary.json`
and `metrics.png` are rebuilt from the stage outputs after every iteration.

Several processes (torchrun): problems are split across ranks for sampling, evaluation and the head's
features, and gathered on rank 0 (sampling seeds are per prompt and sample, so the split does not change the
traces); SFT and DPO run through the one training loop, data-parallel.
"""
from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ftlab.data.jsonl import write_jsonl
from ftlab.errors import UserError
from ftlab.loops.oak_stages import (
    Ctx,
    as_policy,
    dpo_stage,
    eval_stage,
    grpo_stage,
    grpo_stage_config,
    head_stage,
    pairs_stage,
    sft_stage,
    stage_config,
    traces_stage,
)
from ftlab.loops.stages import LoopDir
from ftlab.runs.rundir import write_json

log = logging.getLogger("ftlab")


# -- the loop ------------------------------------------------------------------------------------------
def process_state(cfg: DictConfig) -> Any:
    """The loop's process group, formed before any stage (the stages' accelerators reuse it): so
    train.dist_timeout is its time-out here. Without cpu=True no gloo group forms on a CPU."""
    from accelerate import PartialState

    timeout = {"timeout": timedelta(seconds=cfg.train.dist_timeout)} if cfg.train.dist_timeout else {}
    return PartialState(cpu=not torch.cuda.is_available(), **timeout)


def run_loop(cfg: DictConfig) -> Path:
    state = process_state(cfg)
    rank, world = state.process_index, state.num_processes
    task = check_recipe(cfg, world)
    lp, d = cfg.loop, cfg.data
    train_problems = task.load(lp.problems or d.train, split=d.train_split, limit=lp.max_problems)
    heldout = task.load(lp.heldout or d.val, split=d.val_split, limit=lp.heldout_limit)
    ldir = LoopDir.open(lp.dir or Path(cfg.output_dir) / "loop" / cfg.name, cfg, rank, state.wait_for_everyone)
    ctx = Ctx(cfg, task, ldir, rank, world)
    handler = _log_file(ldir.path / "loop.log") if rank == 0 else None
    try:
        write_summary(ctx, "running")
        policy: dict[str, Any] = {}  # overrides of cfg.model; {} = the recipe's model
        if lp.sft:
            policy = as_policy(ctx, ldir.run(0, "sft", lambda tmp: sft_stage(ctx, tmp), keep_partial=True))
        ldir.run(0, "eval", lambda tmp: eval_stage(ctx, policy, heldout, tmp))
        write_metrics(ctx)
        for k in range(1, lp.iterations + 1):
            if lp.optimizer == "grpo":
                policy = as_policy(ctx, ldir.run(k, "grpo", lambda tmp: grpo_stage(ctx, policy, k, tmp),
                                                 keep_partial=True), policy)
            else:
                policy = dpo_iteration(ctx, ldir, policy, train_problems, k)
            ldir.run(k, "eval", lambda tmp: eval_stage(ctx, policy, heldout, tmp))
            write_metrics(ctx)
    except BaseException as e:
        write_summary(ctx, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                      error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if handler:
            logging.getLogger("ftlab").removeHandler(handler)
            handler.close()
    write_summary(ctx, "complete")
    return ldir.path


def dpo_iteration(ctx: Ctx, ldir: LoopDir, policy: dict[str, Any], problems: list, k: int) -> dict[str, Any]:
    """traces -> pairs -> [head] -> DPO; returns the new policy."""
    traces = ldir.run(k, "traces", lambda tmp: traces_stage(ctx, policy, problems, k, tmp))
    ldir.run(k, "pairs", lambda tmp: pairs_stage(ctx, problems, k, traces["templated"], tmp))
    if ctx.loop.option_head:
        ldir.run(k, "head", lambda tmp: head_stage(ctx, policy, problems, k, tmp))
    return as_policy(ctx, ldir.run(k, "dpo", lambda tmp: dpo_stage(ctx, policy, k, tmp), keep_partial=True), policy)


def check_recipe(cfg: DictConfig, world: int = 1) -> Any:
    """Everything a user can get wrong, as one line, before anything is written."""
    from ftlab.tasks import get_task

    lp, d = cfg.loop, cfg.data
    if d.task != "sokrates":
        raise UserError(f"ftlab loop trains on option traces: set data.task: sokrates (got {d.task!r})")
    if lp.engine == "vllm" and lp.constrained:
        raise UserError("loop.constrained needs loop.engine: hf (the constraint is a logits hook of ftlab's HF "
                        "engine); set one of them differently")
    if lp.sft and not d.train:
        raise UserError("loop.sft: data.train is not set (the problems to SFT on)")
    if not (lp.problems or d.train):
        raise UserError("loop.problems (or data.train) is not set: the problems to sample traces on")
    if not (lp.heldout or d.val):
        raise UserError("loop.heldout (or data.val) is not set: the held-out problems to evaluate on")
    for k in lp.pass_k if lp.eval_samples else []:
        if k > lp.eval_samples:
            raise UserError(f"loop.pass_k: pass@{k} needs loop.eval_samples >= {k}; got {lp.eval_samples}")
    stage_config(cfg, "loop.sft_overrides", {})
    stage_config(cfg, "loop.dpo_overrides", {"train.method": "dpo"})
    if lp.optimizer == "grpo":
        check_grpo_stage(cfg, world)
        if lp.option_head:
            log.warning("loop.option_head is left out with loop.optimizer=grpo (the head trains on the DPO "
                        "iteration's sampled traces)")
    return get_task(d.task, **d.task_options)


def check_grpo_stage(cfg: DictConfig, world: int) -> None:
    """What the GRPO stages would refuse, before the SFT stage runs: settings, batch, reward functions."""
    from ftlab.train.grpo import check_batch
    from ftlab.train.grpo import check_recipe as check_grpo
    from ftlab.train.rewards import resolve_rewards

    where = "loop.optimizer=grpo: "
    stage = grpo_stage_config(cfg, {}, 1, None)
    if stage.grpo.engine == "vllm" and cfg.loop.constrained:
        raise UserError(f"{where}grpo.engine=vllm with loop.constrained: the Action-line constraint is a logits hook "
                        "of ftlab's HF engine; set one of them differently")
    try:
        check_grpo(stage)
        check_batch(stage, world)
        resolve_rewards(list(stage.grpo.rewards), stage.data.task)
    except UserError as e:
        raise UserError(f"{where}{e}") from None

# -- metrics ---------------------------------------------------------------------------------------
def metric_rows(ctx: Ctx) -> list[dict[str, Any]]:
    """One row per evaluated iteration, from the stage outputs (so a resumed loop writes the same rows)."""
    rows = []
    for k in range(ctx.loop.iterations + 1):
        ev = ctx.ldir.result(k, "eval")
        if ev is None:
            break
        row: dict[str, Any] = {"iteration": k, **ev["metrics"]}
        if (tr := ctx.ldir.result(k, "traces")) is not None:
            row.update({f"sampled_{key}": v for key, v in tr["summary"].items()})
        if (pr := ctx.ldir.result(k, "pairs")) is not None:
            row.update({key: v for key, v in pr["stats"].items() if key.startswith("pairs")})
        if (hd := ctx.ldir.result(k, "head")) is not None:
            row.update({f"head_{key}": v for key, v in hd["head"].items()})
        if (dp := ctx.ldir.result(k, "dpo")) is not None:
            row["dpo_final_loss"] = (dp.get("summary") or {}).get("final_loss")
        if (gr := ctx.ldir.result(k, "grpo")) is not None:
            row.update({f"grpo_{key}": gr.get(key) for key in ("steps", "reward_first", "reward_last")})
            row.update({f"grpo_{name}_last": v for name, v in (gr.get("rewards_last") or {}).items()})
        rows.append(row)
    return rows


def write_metrics(ctx: Ctx) -> None:
    from ftlab.sokrates.metrics import plot_iterations

    if ctx.rank:
        return
    rows = metric_rows(ctx)
    tmp = ctx.ldir.path / "metrics.jsonl.tmp"
    write_jsonl(tmp, rows)
    tmp.replace(ctx.ldir.path / "metrics.jsonl")
    if rows:
        plot_iterations(rows, ctx.ldir.path / "metrics.png")
    write_summary(ctx, "running")


def write_summary(ctx: Ctx, status: str, **extra: Any) -> None:
    if ctx.rank:
        return
    rows = metric_rows(ctx)
    write_json(ctx.ldir.path / "summary.json", {
        "status": status, "loop_dir": str(ctx.ldir.path), "iterations": ctx.loop.iterations,
        "iterations_evaluated": len(rows) - 1, "recipe_hash": json.loads((ctx.ldir.path / "recipe.json").read_text())["hash"],
        "last": rows[-1] if rows else None, **extra})


def _log_file(path: Path) -> logging.Handler:
    """loop.log beside the stages (kept while the SFT/DPO runs attach and detach their own run.log)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("ftlab")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler
