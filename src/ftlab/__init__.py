"""ftlab: an LLM fine-tuning research toolkit.

The SFT building blocks (seed 002) are importable from the top level:

    from ftlab import tokenize_prompt_and_output, get_response_log_probs, sft_microbatch_train_step

and the DPO loss: `from ftlab import dpo_loss` (training: `ftlab.train.dpo.run_dpo`, or train.method: dpo), and
GRPO's: `from ftlab import grpo_loss, group_advantages` (training: train.method: grpo).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use (PEP 562): `import ftlab` stays light, so the CLI starts fast and the corpus
# tokenizer's worker processes do not pay for torch and transformers.
_EXPORTS = {
    "tokenize_prompt_and_output": "ftlab.data.sft",
    "compute_entropy": "ftlab.losses",
    "dpo_loss": "ftlab.losses",
    "grpo_loss": "ftlab.train.grpo_loss",
    "group_advantages": "ftlab.train.grpo_loss",
    "get_response_log_probs": "ftlab.losses",
    "masked_mean": "ftlab.losses",
    "masked_normalize": "ftlab.losses",
    "sft_microbatch_train_step": "ftlab.losses",
    "log_generations": "ftlab.evaluate",
    "parse_gsm8k_response": "ftlab.tasks.gsm8k",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ftlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
