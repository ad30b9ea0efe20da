"""Checkpoints that survive SIGKILL: written to a temp dir, then renamed; resume skips anything else.

    checkpoints/step_000040/
        model/          save_pretrained: the PEFT adapter (LoRA) or the full model
        optimizer.pt    scheduler.pt    rng.pt
        state.json      {"step": 40, "best": ...}   (written last; its presence marks completeness)
"""
from __future__ import annotations

import json
import os
import random
import shutil
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


def save_model(model: Any, tokenizer: Any, path: Path) -> None:
    """HF-loadable export: adapter for PEFT models, full weights otherwise."""
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_checkpoint(ckpt_dir: Path, step: int, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
                    extra: dict[str, Any]) -> Path:
    final = ckpt_dir / f"{STEP_PREFIX}{step:06d}"
    tmp = ckpt_dir / f".tmp_{STEP_PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tokenizer, tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _fsync_dir(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temp dirs and ones without state.json are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob(f"{STEP_PREFIX}*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    for p in complete_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob(f".tmp_{STEP_PREFIX}*"):  # leftovers of a killed save
        shutil.rmtree(p, ignore_errors=True)


def find_resume_checkpoint(path: str | os.PathLike) -> Path | None:
    """`path` is a checkpoint dir or a run dir (its newest complete checkpoint)."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    ckpts = complete_checkpoints(p / "checkpoints")
    return ckpts[-1] if ckpts else None


def load_trainable_weights(model: Any, model_dir: Path) -> None:
    """Load checkpointed weights into the live (possibly PEFT-wrapped) model."""
    from safetensors.torch import load_file

    adapter = model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint {model_dir} has unexpected weights: {unexpected[:3]}")
