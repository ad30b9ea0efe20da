"""vLLM backend: the same `Engine` interface, for CUDA machines with vllm installed.

vLLM does its own continuous batching and paged attention on the GPU, which is far faster than
anything in `hf.py` there. LoRA adapters are served without merging via `LoRARequest`, so an
evaluation of a fine-tuned adapter needs no merged checkpoint on disk.
"""
from __future__ import annotations

import time
from typing import Any

from ftlab.generate.base import GenerationConfig, ResultCallback, cut_at_stop


class VLLMEngine:
    """Generation through `vllm.LLM`; `model_path` is a HF model directory or hub id."""

    def __init__(self, model_path: str, adapter_path: str | None = None, tokenizer: Any = None,
                 max_lora_rank: int = 64, **llm_kwargs: Any):
        from vllm import LLM  # imported here: vllm is an optional GPU-only dependency

        self.model_path = model_path
        self.adapter_path = adapter_path
        self.tokenizer = tokenizer
        if adapter_path:
            llm_kwargs.setdefault("enable_lora", True)
            llm_kwargs.setdefault("max_lora_rank", max_lora_rank)
        self.llm = LLM(model=model_path, **llm_kwargs)
        self.stats: dict[str, float] = {}

    def _lora_request(self) -> Any:
        if not self.adapter_path:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest("ftlab-adapter", 1, self.adapter_path)

    def _sampling_params(self, cfg: GenerationConfig) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p if cfg.temperature > 0 else 1.0,
            max_tokens=cfg.max_new_tokens,
            stop=list(cfg.stop) or None,
            seed=cfg.seed,
            truncate_prompt_tokens=cfg.max_prompt_tokens,
        )

    def generate(self, prompts: list[str], cfg: GenerationConfig, on_result: ResultCallback | None = None,
                 progress: bool = True) -> list[list[str]]:
        """vLLM schedules all prompts at once; `on_result` is called per prompt after the run, in input order."""
        cfg.validate()
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, self._sampling_params(cfg), use_tqdm=progress,
                                    lora_request=self._lora_request())
        results: list[list[str]] = []
        new_tokens = 0
        for index, out in enumerate(outputs):
            # vLLM already removes the stop string; cutting again is a no-op kept for identical semantics.
            texts = [cut_at_stop(c.text, cfg.stop)[0] for c in out.outputs]
            new_tokens += sum(len(c.token_ids) for c in out.outputs)
            results.append(texts)
            if on_result is not None:
                on_result(index, texts)
        self.stats = {"prompts": len(prompts), "truncated_prompts": 0, "new_tokens": new_tokens,
                      "seconds": time.perf_counter() - start}
        return results
