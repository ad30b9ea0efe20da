"""FSDP2 (torch `fully_shard`) for the one training loop: `train.sharding=fsdp2`, several processes from torchrun
(`ftlab launch RECIPE --profile fsdp2 --gpus N`).

Why ftlab calls `fully_shard` itself rather than through accelerate's FSDP2 plugin: accelerate turns FSDP on for
GPU launches only (on CPU it quietly runs plain DDP), so its path could not be tested on the CPU machines the
tests run on; torch's own FSDP2 runs on CPU with gloo and on GPUs with NCCL alike, one code path for both.
accelerate still forms the process group and places the device; the model is never given to `prepare`.

How the model is sharded (as torchtitan and torchtune do it): each transformer layer (the classes the model
names in `_no_split_modules`) is one FSDP unit, gathered just before its forward and freed after it; then the
root, which holds the rest (embeddings, final norm, head: a tied head shares its unit with the embeddings).
Under PEFT the adapters are added first and the whole PEFT model is sharded, so LoRA weights are sharded with
their layer and stay the only trainable parameters. With train.precision=bf16 the weights are gathered in bf16
and gradients reduced in fp32 (the fp32 weights, the optimizer's master copy, stay sharded); the loop's
autocast still decides which operations run in fp32.

What the loop's exactness needs, kept here:

* accumulation: `no_sync` holds the gradients of every micro-batch but the last on each process (the FSDP2
  equivalent of DDP's `no_sync`), and the last backward reduce-scatters their sum, averaged over processes
  like DDP's all-reduce, so the loop's scaling by loss units is the same;
* the gradient norm: accelerate's `clip_grad_norm_` (DTensor-aware, like torch's) reduces it over the shards;
* checkpoints: torch distributed checkpoint (DCP), every process writing its own shard of the trainable
  weights and their optimizer state into `dcp/` of the loop's temp checkpoint directory (renamed when complete);
  DCP reshards on load, so a run may resume on another number of processes;
* exports (final/, best/): the full state dict gathered to rank 0's CPU, written with `save_pretrained` - a
  plain HF model, or for LoRA a PEFT adapter of only the LoRA weights.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ftlab.errors import UserError

log = logging.getLogger("ftlab")
CHECKPOINT_DIR = "dcp"  # inside checkpoints/step_N/: model and optimizer shards, written by every process


def enabled(cfg: DictConfig) -> bool:
    return cfg.train.sharding == "fsdp2"


def check_recipe(cfg: DictConfig, deepspeed: bool) -> None:
    """Refuse, in one line, what FSDP2 in this loop does not do (rather than run it as something else)."""
    t = cfg.train
    refusals = [
        (deepspeed, "train.sharding=fsdp2 under a DeepSpeed launch: choose one (--profile fsdp2 or zero3)"),
        (t.method != "sft", (f"train.method={t.method}: FSDP2 is wired for sft (dpo's reference, grpo's and "
                             "pretraining's extra passes are not sharded); use --profile ddp or zero2")),
        (bool(cfg.lora.quantize), ("QLoRA's 4-bit weights cannot be sharded by FSDP2 here; use lora.quantize=null "
                                   "or --profile zero2")),
        (t.precision == "fp16", ("train.precision=fp16 under FSDP2: the loop's gradient scaler does not reduce "
                                 "over shards; use bf16")),
        (cfg.optim.name != "adamw", (f"optim.name={cfg.optim.name}: 8-bit optimizers cannot step sharded (DTensor) "
                                     "weights; use optim.name=adamw")),
        (bool(t.log_generations_every), ("train.log_generations_every under FSDP2: generating on rank 0 alone "
                                         "would leave the other shards waiting; evaluate with ftlab eval afterwards")),
        (bool(t.save_merged), ("train.save_merged under FSDP2: merge the saved adapter afterwards "
                               "(ftlab export RUN --merge)")),
    ]
    for refused, why in refusals:
        if refused:
            raise UserError(why)


# -- sharding --------------------------------------------------------------------------------------------
def shard(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """Shard `model` in place over all processes: one FSDP unit per transformer layer, then the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        # One process without a launcher (accelerate forms no group for a world of one): a group of one, so the
        # same sharded code path runs, e.g. as the one-process side of a comparison.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
              else MixedPrecisionPolicy())
    layers = transformer_layers(model)
    if not layers:  # still correct, but every forward gathers the whole model at once
        log.warning("FSDP2: %s names no transformer layer class (_no_split_modules); the whole model is one unit",
                    type(model).__name__)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root's weights are needed again at the start of backward: FSDP2 keeps them gathered after forward.
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks transformers says must not be split (`_no_split_modules`), in model order."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    names = set(getattr(inner, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@contextmanager
def no_sync(model: Any) -> Iterator[None]:
    """Backward without reduce-scatter: gradients accumulate on each process until a backward outside it."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# -- exports and checkpoints ------------------------------------------------------------------------------
def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0's CPU, {} on the other ranks; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a gathered state dict that are trained (LoRA: the adapter weights alone)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank writes its shard of the trainable weights and their optimizer state (frozen base weights are
    the recipe's own and are not copied into each checkpoint)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded_state(model, optimizer), checkpoint_id=str(path))


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load `save_sharded`'s files into the sharded model and optimizer (resharded if the world size changed).
    A missing or damaged file raises RuntimeError on every rank, which the loop's fallback understands."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not path.is_dir():  # every rank sees the same shared directory: all fail alike
        raise FileNotFoundError(f"{path}: no sharded checkpoint (written by train.sharding=fsdp2)")
    state = sharded_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as e:  # a BaseException: say it as the damage the loop falls back past
        raise RuntimeError(f"{path}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True))


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optim": optim}
