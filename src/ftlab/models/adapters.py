"""LoRA / QLoRA through peft, and the order that keeps gradient checkpointing working.

Seeds 000 and 001 both hit "element 0 of tensors does not require grad" with LoRA + gradient
checkpointing: the fix is non-reentrant checkpointing enabled *after* the adapters are applied
(and input grads enabled so the frozen embedding output carries a grad_fn).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

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
        with peft_wrapping():
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets if targets != ["all-linear"] else "all-linear",
                        layers_to_transform=adapted_layers(model, lora_cfg.last_layers),
                        task_type="CAUSAL_LM")
    with peft_wrapping():
        model = get_peft_model(model, config)
    if gradient_checkpointing:  # after the adapters, non-reentrant: see module docstring
        enable_gradient_checkpointing(model)
    return model


def adapted_layers(model: Any, last_layers: int | None) -> list[int] | None:
    """Indices of the last `last_layers` transformer layers (None: every layer gets adapters)."""
    if last_layers is None:
        return None
    total = model.config.num_hidden_layers
    if last_layers > total:
        raise UserError(f"lora.last_layers={last_layers} but the model has {total} layers")
    return list(range(total - last_layers, total))


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Silence two known FutureWarnings while peft wraps a model, and nothing else.

    peft 0.21's `PeftModel.__init__` reads `model.is_gradient_checkpointing`, which transformers 5 renamed
    `is_activation_checkpointing` and keeps as an alias that warns on every read: one FutureWarning on
    every LoRA run and every adapter load, about code that is not ours. (Its QLoRA preparation calls
    the renamed `gradient_checkpointing_enable` likewise.) The aliases still do the right thing, so only
    those messages are filtered, only here.
    """
    with warnings.catch_warnings():
        for old in ("is_gradient_checkpointing", "gradient_checkpointing_enable"):
            warnings.filterwarnings("ignore", message=f"`{old}` is deprecated", category=FutureWarning)
        yield


def enable_gradient_checkpointing(model: Any) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 name; the old one warns FutureWarning
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
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
