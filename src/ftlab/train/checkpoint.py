"""Checkpoints that survive SIGKILL: written to a temp dir, then renamed; resume skips anything else.

    checkpoints/step_000040/
        model/              save_pretrained: the PEFT adapter (LoRA) or the full model
        optimizer.pt        (DDP / one process: every rank holds the same state)
        deepspeed/          (DeepSpeed: each rank's partition of the optimizer state)
        dcp/                (FSDP2, instead of model/ and optimizer.pt: each rank's shard of the trainable
                            weights and their optimizer state, torch distributed checkpoint; ftlab.train.fsdp)
        scheduler.pt        scaler.pt (fp16)        rng_rank<r>.pt (one per process)
        state.json          {"step": 40, "best": ..., "world_size", "model", "objective", "sharding"}
                            (written last; its presence marks completeness)

Every process writes its own files into the same temp dir; rank 0 renames it when all are done.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_is_finite(model: Any) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def save_model(model: Any, tokenizer: Any, path: Path, state_dict: dict | None = None) -> None:
    """HF-loadable export: adapter for PEFT models, full weights otherwise (`state_dict`: gathered ZeRO weights)."""
    from peft import PeftModel

    extra: dict[str, Any] = {"state_dict": state_dict} if state_dict else {}
    if isinstance(model, PeftModel):
        extra["save_embedding_layers"] = embeddings_adapted(model)
    model.save_pretrained(path, safe_serialization=True, **extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def embeddings_adapted(model: Any) -> bool:
    """Whether an adapter must carry the embedding or LM head weights: only where LoRA targets them, since
    ftlab never resizes a vocabulary. peft's default finds out by asking the Hub for the base's config.json,
    which for the embedded base (a name, not a Hub repo) offline prints two warnings at every save."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    return any(isinstance(m, BaseTunerLayer) for m in layers)


def save_merged_from_adapter(model_cfg: Any, adapter_dir: Path, out: Path, dtype: str = "bf16") -> None:
    """The saved adapter folded into a fresh, unquantized copy of its base (in `dtype`), written to `out`.

    QLoRA needs this: its training base is 4-bit, and merging into it re-quantizes each merged weight, so most
    of the adapter's small update is rounded away. bf16 by default: an fp32 copy of a 14B base needs 56 GB."""
    from omegaconf import OmegaConf

    from ftlab.models.load import adapter_base_path, is_adapter_dir, load_model_and_tokenizer, resolve_model_path

    name = resolve_model_path(model_cfg.name)
    base = {"adapter": None, "dtype": dtype, "name": adapter_base_path(name) if is_adapter_dir(name) else name}
    # loaded for inference, the adapter comes back folded into the base (`attach_adapter`)
    merged, tokenizer = load_model_and_tokenizer(OmegaConf.merge(model_cfg, base), adapter=str(adapter_dir))
    save_model(merged, tokenizer, out)


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def temp_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f".tmp_{step_name(step)}"


def begin_checkpoint(ckpt_dir: Path, step: int) -> Path:
    """An empty temp dir for step `step` (a leftover of a killed save is removed first)."""
    tmp = temp_dir(ckpt_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(ckpt_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write state.json last, flush everything to disk, then rename the temp dir into place."""
    tmp, final = temp_dir(ckpt_dir, step), ckpt_dir / step_name(step)
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def read_state(path: Path) -> dict[str, Any] | None:
    """state.json of a checkpoint, or None when it is unreadable (a damaged checkpoint)."""
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
        return state
    except (OSError, ValueError, KeyError, TypeError):
        return None


# What loading a truncated or corrupted checkpoint file raises (safetensors, torch.load, json, pickle).
DAMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, RuntimeError, ValueError, KeyError,
                                                  pickle.UnpicklingError, zipfile.BadZipFile)
try:
    from safetensors import SafetensorError

    DAMAGE_ERRORS += (SafetensorError,)
except ImportError:  # pragma: no cover - older safetensors raise the errors above
    pass


def _fsync_dir(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temp dirs and ones without state.json are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob(f"{STEP_PREFIX}*")
             if p.name[len(STEP_PREFIX):].isdigit() and (p / "state.json").is_file()]  # not e.g. a user's step_old/
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    for p in complete_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob(f".tmp_{STEP_PREFIX}*"):  # leftovers of a killed save
        shutil.rmtree(p, ignore_errors=True)


def load_trainable_weights(model: Any, model_dir: Path) -> None:
    """Load checkpointed weights into the live (possibly PEFT-wrapped) model."""
    from safetensors.torch import load_file

    adapter = model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no weights (*.safetensors)")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint {model_dir} has unexpected weights: {unexpected[:3]}")
