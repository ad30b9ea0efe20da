"""Setting up a training run before the loop starts: the accelerator (one process, DDP, DeepSpeed; the global
batch and the process-group time-out), the model as the recipe says (full, LoRA, QLoRA), and the checks that
refuse, in one line and before a run directory exists, what would fail or silently run as something else
(launches, half-precision weights, checkpoints of another model or method)."""
from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ftlab.errors import UserError
from ftlab.train import checkpoint as ck
from ftlab.train import fsdp

log = logging.getLogger("ftlab")


def make_accelerator(cfg: DictConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    # accelerate keeps one global state per process; a second run in one process (the quickstart,
    # notebooks, tests) may use another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    t = cfg.train
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # Autocast and the fp16 scaler are the loop's own (see `autocast`), except under DeepSpeed, which
    # casts the model itself and must know the precision from accelerate.
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[t.precision] if deepspeed else "no"
    check_launch(deepspeed)
    apply_global_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    # Only takes effect where this call forms the process group (not when an earlier run in this process did).
    group = [InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout))] if t.dist_timeout else []
    accelerator = Accelerator(mixed_precision=precision, cpu=not (torch.cuda.is_available() or deepspeed),
                              gradient_accumulation_steps=t.grad_accum if deepspeed else 1, kwargs_handlers=group)
    if fsdp.enabled(cfg):
        fsdp.check_recipe(cfg, deepspeed)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # Without a dataloader in prepare(), "auto" batch sizes cannot be resolved: say them. The engine
        # accumulates exactly grad_accum micro-batches (the plan gives every rank that many), and ftlab's
        # train.grad_clip is the only clipping (a second one in the DeepSpeed config would also apply).
        ds["train_micro_batch_size_per_gpu"] = t.batch_size
        ds["gradient_accumulation_steps"] = t.grad_accum
        ds["gradient_clipping"] = float(t.grad_clip or 0.0)
        if t.nan_policy == "skip":
            raise UserError("train.nan_policy=skip is not possible under DeepSpeed (its engine steps inside "
                            "backward, before the loop can skip); use train.nan_policy=stop")
    return accelerator


def global_batch_accum(cfg: DictConfig, world: int) -> int:
    """The accumulation that makes train.global_batch examples (pairs, windows, GRPO completions) per optimizer
    step: global_batch / (batch_size x world). One line naming values that would divide where it does not."""
    t, gb = cfg.train, cfg.train.global_batch
    per_micro = t.batch_size * world
    if cfg.train.method == "grpo" and gb % cfg.grpo.num_generations:
        raise UserError(f"train.global_batch={gb} completions per step is not a multiple of grpo.num_generations="
                        f"{cfg.grpo.num_generations} (each prompt's group must be whole)")
    if gb % per_micro == 0:
        return gb // per_micro
    below, above = gb // per_micro * per_micro, (gb // per_micro + 1) * per_micro
    would = " or ".join(str(v) for v in (below, above) if v > 0)
    sizes = [b for b in range(1, gb // world + 1) if gb % (b * world) == 0] if gb % world == 0 else []
    other = (f"; or train.batch_size in {{{', '.join(map(str, sizes))}}}" if sizes else
             f"; no train.batch_size divides it over {world} processes")
    raise UserError(f"train.global_batch={gb} is not a multiple of train.batch_size x processes = {t.batch_size} x "
                    f"{world} = {per_micro}: global batches that would are {would}{other}")


def apply_global_batch(cfg: DictConfig, world: int) -> None:
    """Set train.grad_accum from train.global_batch for this world size (nothing when it is null): the same rule
    at `ftlab launch` and in every process, so a recipe means the same batch under any launcher."""
    if cfg.train.global_batch is None:
        return
    accum = global_batch_accum(cfg, world)
    if accum != cfg.train.grad_accum:
        log.info("train.global_batch=%d over %d process(es) x batch %d: train.grad_accum=%d",
                 cfg.train.global_batch, world, cfg.train.batch_size, accum)
    cfg.train.grad_accum = accum


def check_distributed_type(distributed_type: str) -> None:
    """Refuse an accelerate distributed type the loop does not drive (also asked by `ftlab launch` of a profile)."""
    if distributed_type == "FSDP":
        # accelerate's FSDP plugin (FSDP1 or 2) turns on for GPU launches only (on CPU it quietly runs plain DDP),
        # and the loop applies FSDP2 itself (ftlab.train.fsdp): refuse, and say where FSDP2 is.
        raise UserError("accelerate's FSDP launches are not supported by ftlab's training loop, which shards with "
                        "FSDP2 itself: ftlab launch RECIPE --profile fsdp2 (torchrun with train.sharding=fsdp2)")


def check_launch(deepspeed: bool) -> None:
    """Launches that would silently run as something else: refuse them with one line."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        check_distributed_type("FSDP")
    if deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Measured: on CPU, accelerate forms no process group under DeepSpeed; each process sees a world of one.
        raise UserError("DeepSpeed with several processes needs CUDA GPUs (on CPU accelerate forms no process "
                        "group); on CPU use one DeepSpeed process, or torchrun for data parallelism")


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def prepare_model(cfg: DictConfig, local_rank: int = 0) -> tuple[Any, Any]:
    """Load the model as the recipe says: full, LoRA, or QLoRA (4-bit NF4 base on this process's GPU)."""
    from ftlab.models.adapters import (apply_lora, enable_gradient_checkpointing, quantization_config,
                                       trainable_summary)
    from ftlab.models.load import EMBEDDED, check_context_window, load_model_and_tokenizer

    if cfg.lora.quantize and not cfg.lora.enabled:
        raise UserError("lora.quantize is set but lora.enabled is false (QLoRA = quantized base + LoRA)")
    quant = quantization_config(cfg.lora)  # fails early with one line where QLoRA cannot run
    # A quantized model is placed at load time (bitsandbytes cannot be moved afterwards): one whole
    # copy per process on its own GPU, never device_map="auto", which would shard it across the GPUs
    # that the other DDP ranks are using.
    placement = {"quantization_config": quant, "device_map": {"": local_rank}} if quant else {}
    model, tokenizer = load_model_and_tokenizer(cfg.model, trainable_adapter=True, **placement)
    check_context_window(model, cfg.data.max_length)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, cfg.train.gradient_checkpointing)
        if cfg.model.name in EMBEDDED and not cfg.model.scratch:  # name the embedded base, not this cache path
            for peft_cfg in model.peft_config.values():
                peft_cfg.base_model_name_or_path = cfg.model.name
    elif cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    log.info("trainable parameters: %s", trainable_summary(model))
    return model, tokenizer


def check_trainable_dtype(cfg: DictConfig, model: Any, deepspeed: bool) -> None:
    """Refuse trainable weights in half precision outside DeepSpeed (which keeps fp32 master weights and
    scales fp16 losses itself): with fp16 autocast the gradient scaler raises at step 1 ("Attempting to
    unscale FP16 gradients"), and AdamW on bf16 weights rounds small updates away without a word."""
    half = {p.dtype for p in model.parameters() if p.requires_grad} & {torch.float16, torch.bfloat16}
    if deepspeed or not half:
        return
    if cfg.train.precision == "fp16" and torch.float16 in half:
        raise UserError(f"train.precision=fp16 with trainable fp16 weights (model.dtype={cfg.model.dtype}): the "
                        "gradient scaler cannot unscale fp16 gradients; use model.dtype=fp32 (autocast computes "
                        "in fp16)")
    dtype = "fp16" if torch.float16 in half else "bf16"
    raise UserError(f"trainable weights in {dtype} (model.dtype={cfg.model.dtype}): AdamW would update them without "
                    f"fp32 master weights and lose small updates; use model.dtype=fp32 with train.precision={dtype} "
                    "(autocast), LoRA (adapters train in fp32) or DeepSpeed (fp32 master weights)")


def model_identity(cfg: DictConfig) -> str:
    """What a checkpoint must have been trained from to be resumed by this recipe."""
    if cfg.model.scratch:
        return "scratch:" + json.dumps(OmegaConf.to_container(cfg.model.scratch), sort_keys=True)
    return cfg.model.name + (f"+{cfg.model.adapter}" if cfg.model.adapter else "")


def resolve_resume(cfg: DictConfig) -> list[Path]:
    """Complete checkpoints to resume from, newest first (the loop falls back along this list).

    `latest` means the newest run of this kind that has a complete checkpoint: a failed attempt at
    resuming creates a newer run without one, and must not hide the real checkpoint.
    """
    if cfg.train.resume == "latest":
        runs = sorted((p for p in (Path(cfg.output_dir) / cfg.kind).glob("*_*") if p.is_dir()), reverse=True)
        for run in runs:
            found = ck.complete_checkpoints(run / "checkpoints")
            if found:
                return found[::-1]
        raise UserError(f"train.resume=latest: no run under {Path(cfg.output_dir) / cfg.kind} has a complete "
                        "checkpoint")
    path = Path(cfg.train.resume)
    if (path / "state.json").is_file():
        return [path]
    found = ck.complete_checkpoints(path / "checkpoints")
    if not found:
        raise UserError(f"train.resume: no complete checkpoint under {cfg.train.resume!r}")
    return found[::-1]


def check_resumable(cfg: DictConfig, candidates: list[Path], objective: str, total_steps: int) -> None:
    """Refuse, before anything is written, a checkpoint of another model or method, or past the end."""
    want = model_identity(cfg)
    for path in candidates:
        state = ck.read_state(path)
        if state is None:  # damaged: the loop falls back past it when loading
            continue
        if state.get("model") not in (None, want):
            raise UserError(f"checkpoint {path} was trained from {state['model']!r}, this recipe trains {want!r}")
        if state.get("objective") not in (None, objective):
            raise UserError(f"checkpoint {path} is a {state['objective']} run, this recipe trains {objective}")
        if state.get("sharding", "none") != cfg.train.sharding:  # DCP shards vs. whole weights: neither reads the other
            raise UserError(f"checkpoint {path} was written with train.sharding={state.get('sharding', 'none')}, this "
                            f"run has train.sharding={cfg.train.sharding}; resume it with the same sharding")
        if int(state["step"]) > total_steps:
            raise UserError(f"train.max_steps={total_steps} is below the checkpoint's step {state['step']} "
                            f"({path}); raise train.max_steps or resume from an earlier checkpoint")
