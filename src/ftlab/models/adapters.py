"""LoRA / QLoRA through peft, and the order that keeps gradient checkpointing working.

Seeds 000 and 001 both hit "element 0 of tensors does not require grad" with LoRA + gradient
checkpointing: the fix is non-reentrant checkpointing enabled *after* the adapters are applied
(and input grads enabled so the frozen embedding output carries a grad_fn).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from ftlab.errors import UserError

log = logging.getLogger("ftlab")


def quantization_config(lora_cfg: Any) -> Any:
    """bitsandbytes 4-bit NF4 config for QLoRA; a clear error where it cannot run."""
    if not lora_cfg.quantize:
        return None
    if not torch.cuda.is_available():
        raise UserError("lora.quantize=nf4 (QLoRA) needs a CUDA GPU and bitsandbytes; "
                        "on CPU use plain LoRA (lora.quantize=null)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("QLoRA needs bitsandbytes: pip install 'ftlab[gpu]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def module_names(model: Any) -> set[str]:
    """Leaf names of the model's Linear-like modules (what target_modules can match)."""
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or
            type(m).__name__.startswith("Linear")}


def apply_lora(model: Any, lora_cfg: Any, gradient_checkpointing: bool = False) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = list(lora_cfg.target_modules)
    available = module_names(model)
    missing = [t for t in targets if t not in available and t != "all-linear"]
    if missing:
        raise UserError(f"lora.target_modules: {missing[0]!r} is not a module of this model; "
                        f"available: {', '.join(sorted(available))}")
    if lora_cfg.quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets if targets != ["all-linear"] else "all-linear",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if gradient_checkpointing:  # after the adapters, non-reentrant: see module docstring
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: Any) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.config.use_cache = False


def trainable_summary(model: Any) -> str:
    """'174.6M / 8.4B (2.09%)' style count of trainable parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{human(trainable)} / {human(total)} ({100 * trainable / max(total, 1):.2f}%)"


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))
