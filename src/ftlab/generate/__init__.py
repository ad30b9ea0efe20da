"""Text generation behind one interface: `make_engine(...)` then `engine.generate(prompts, cfg)`
(texts) or `engine.generate_full(prompts, cfg)` (`Completion`s: text, token ids, log-probs).

* `HFEngine` (any machine): transformers model, continuous batching with a slot KV cache.
* `VLLMEngine` (CUDA + vllm): vLLM with LoRA adapters via `LoRARequest`.

`make_engine("vllm", ...)` falls back to the HF engine with one warning where vLLM cannot run, so
the same recipe works on a laptop CPU and on a GPU box.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any

from ftlab.errors import UserError
from ftlab.generate.base import (
    Completion,
    CompletionCallback,
    Engine,
    GenerationConfig,
    ResultCallback,
    cut_at_stop,
)
from ftlab.generate.hf import HFEngine

__all__ = ["Completion", "CompletionCallback", "Engine", "GenerationConfig", "HFEngine", "ResultCallback",
           "cut_at_stop", "make_engine", "vllm_available"]

logger = logging.getLogger(__name__)

VLLM_FALLBACK_WARNING = "vLLM needs a CUDA GPU and the vllm package; using the HF engine"


def vllm_available() -> bool:
    """vLLM runs only with the package installed and a CUDA device visible."""
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def make_engine(kind: str, model: Any, tokenizer: Any, model_path: str | None = None,
                adapter_path: str | None = None, hf_kwargs: dict[str, Any] | None = None,
                vllm_kwargs: dict[str, Any] | None = None) -> Engine:
    """An engine of `kind` ('hf' or 'vllm'); 'vllm' degrades to 'hf' with a warning where it cannot run.

    The HF engine uses the already loaded `model`/`tokenizer` (with any adapter already applied by
    the caller); vLLM loads `model_path` itself and applies `adapter_path` per request.
    `hf_kwargs` / `vllm_kwargs` go to the engine actually built (e.g. `refill`, `gpu_memory_utilization`).
    """
    kind = kind.lower()
    if kind not in ("hf", "vllm"):
        raise UserError(f"unknown generation engine {kind!r}; use 'hf' or 'vllm'")
    if kind == "vllm":
        if vllm_available():
            if not model_path:
                raise UserError("the vllm engine needs model_path (a model directory or hub id)")
            from ftlab.generate.vllm_engine import VLLMEngine

            return VLLMEngine(model_path, adapter_path=adapter_path, tokenizer=tokenizer, **(vllm_kwargs or {}))
        logger.warning(VLLM_FALLBACK_WARNING)
    if model is None or tokenizer is None:
        raise UserError("the HF generation engine needs a loaded model and tokenizer")
    return HFEngine(model, tokenizer, **(hf_kwargs or {}))
