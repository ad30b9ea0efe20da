"""Where a non-finite loss came from: non-finite tensors, forward hooks, and `ftlab replay RUN --step N`.

The seed's NaN hunt (notes of 2024-05-09) took a dozen rounds of guessing: bad token ids? bf16? autocast?
It ended with "the embedding weights themselves were NaN before the step's lookup". These tools answer that
in one go:

* `nonfinite_tensors(model)`: which parameters and which gradients hold a NaN/inf, in the model's parameter
  order (embeddings first, LM head last); the pretraining objective writes it with the bad batch
  (`<run>/nonfinite/step_N_rankR.json`);
* `ForwardWatch(model)`: forward hooks on every module; the first module (in execution order) whose output
  is not finite, and whether its inputs and its own weights were finite (finite inputs and weights: the
  value was born there; non-finite weights: it was corrupted earlier);
* `replay(run, step)`: rebuilds step N's windows from the run's seed (they are a function of (seed, step)),
  restores the newest checkpoint before N (or the initial weights: a scratch model is rebuilt from the seed),
  trains up to N and runs step N with autograd anomaly detection (the backward op that first produced a NaN)
  and the forward hooks. The replay is a run of its own under <run>/replay/, resumed like any run, so it
  sees exactly the data and weights the original saw; it writes replay.json there.

`nonfinite_tensors` and `ForwardWatch` live in `train/pretrain.py`, whose objective uses them at every
non-finite step and at the replayed step; this module holds `replay`, which imports what it needs from there,
so the dependency goes one way (forensics -> pretrain).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ftlab.errors import UserError

log = logging.getLogger("ftlab")


def replay(run_dir: str, step: int, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Rerun step `step` (1-based) of a pretraining run from the newest checkpoint before it; see the module doc."""
    from ftlab.config import load_recipe
    from ftlab.runs.rundir import write_json
    from ftlab.runs.trackers import read_metrics
    from ftlab.train import checkpoint as ck
    from ftlab.train.loop import TrainingDiverged, train
    from ftlab.train.pretrain import build_objective, nonfinite_tensors

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run}: not a run directory (no config.yaml)")
    if step < 1:
        raise UserError(f"--step must be >= 1 (steps are counted from 1, as logged); got {step}")
    original = load_recipe(run / "config.yaml")
    if original.train.method != "pretrain":
        raise UserError(f"{run} is a {original.train.method} run; ftlab replay rebuilds pretraining batches")
    before = [p for p in ck.complete_checkpoints(run / "checkpoints") if int(p.name[len(ck.STEP_PREFIX):]) < step]
    start = before[-1] if before else None
    # A step's windows are global (batch x processes x accumulation): replayed by one process, a run of several
    # takes all their windows in each micro-batch, so the step holds the same windows in the same order.
    world = int(json.loads((run / "summary.json").read_text()).get("world_size") or 1) \
        if (run / "summary.json").is_file() else 1
    here = int(os.environ.get("WORLD_SIZE", "1"))
    if world % here:
        raise UserError(f"{run} ran on {world} processes; replay it on 1 process or on a divisor of {world}")
    fixed = [f"train.batch_size={original.train.batch_size * world // here}"] if world != here else []
    fixed += [f"output_dir={run / 'replay'}", f"name=step_{step}", f"train.max_steps={step}", "train.save_every=null",
             "train.save_final=false", "train.eval_every=null", "train.best_metric=null", "train.max_minutes=null",
             "track.wandb=false", "track.tensorboard=false", f"train.resume={start if start else 'null'}"]
    cfg = load_recipe(run / "config.yaml", fixed + list(overrides))
    built: dict[str, Any] = {}

    def build(cfg: Any, tokenizer: Any, rank: int = 0, world: int = 1) -> Any:
        built["objective"] = build_objective(cfg, tokenizer, rank, world, replay_step=step)
        return built["objective"]

    log.info("replaying step %d of %s from %s", step, run, start or "the initial weights")
    error: BaseException | None = None
    try:
        train(cfg, build, keep_model=True)
    except (RuntimeError, TrainingDiverged) as e:  # anomaly detection raises RuntimeError in backward
        obj = built.get("objective")
        if obj is None or obj.watch is None:  # not at the replayed step: a real failure
            raise
        error = e
    finally:
        torch.autograd.set_detect_anomaly(False)
    obj = built["objective"]
    if obj.watch is not None:
        obj.watch.remove()
    loop = obj.loop
    docs, offsets = obj.sampler.windows(step - 1, obj.plan.per_step)
    logged = {r["train_step"]: r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r} \
        if (run / "metrics.jsonl").is_file() else {}
    replayed = {r["train_step"]: r for r in read_metrics(loop.run_path / "metrics.jsonl") if "train/loss" in r} \
        if (loop.run_path / "metrics.jsonl").is_file() else {}
    model = loop.accelerator.unwrap_model(loop.model)
    report = {
        "run": str(run), "step": step, "seed": cfg.seed, "started_from": str(start) if start else "initial weights",
        "replay_run": str(loop.run_path),
        "outcome": "finite" if error is None and step in replayed else "non-finite",
        "loss": replayed.get(step, {}).get("train/loss"), "logged_loss": logged.get(step, {}).get("train/loss"),
        "grad_norm": replayed.get(step, {}).get("train/grad_norm"),
        "logged_grad_norm": logged.get(step, {}).get("train/grad_norm"),
        "first_nonfinite_output": obj.watch.first if obj.watch else None,
        "anomaly": " ".join(str(error).split())[:2000] if error else None,
        **nonfinite_tensors(model),
        "windows": [obj.sampler.show(int(d), int(o), obj.tokenizer) for d, o in zip(docs.tolist(), offsets.tolist())],
    }
    if loop.rank == 0:
        write_json(loop.run_path / "replay.json", report)
    return report
