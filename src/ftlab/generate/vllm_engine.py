"""vLLM backend: the same `Engine` interface, for CUDA machines with vllm installed.

vLLM does its own continuous batching and paged attention on the GPU, which is far faster than
anything in `hf.py` there. LoRA adapters are served without merging via `LoRARequest`, so an
evaluation of a fine-tuned adapter needs no merged checkpoint on disk; one engine can serve several
adapters in turn (`set_adapter`), each under its own LoRA id.

With a tokenizer, prompts go to vLLM as token ids made by `ftlab.data.sft.prompt_ids`, the rule SFT
training uses (vLLM would otherwise add a BOS in front of a chat template that already starts with
one), and rows also stop on the chat template's end-of-turn token (`stop_token_ids`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ftlab.data.sft import adds_bos, prompt_ids, stop_token_ids
from ftlab.errors import UserError
from ftlab.generate.base import (
    Completion,
    CompletionCallback,
    GenerationConfig,
    ResultCallback,
    cut_at_stop,
)
from ftlab.generate.sampling import request_seeds

logger = logging.getLogger(__name__)


class VLLMEngine:
    """Generation through `vllm.LLM`; `model_path` is a HF model directory or hub id.

    LoRA is enabled when `adapter_path` is given or `enable_lora=True` is passed (to switch adapters
    later, or to start from the base model).
    """

    def __init__(self, model_path: str, adapter_path: str | None = None, tokenizer: Any = None,
                 max_lora_rank: int = 64, **llm_kwargs: Any):
        from vllm import LLM  # imported here: vllm is an optional GPU-only dependency

        self.model_path = model_path
        self.adapter_path = adapter_path
        self.tokenizer = tokenizer
        self.lora = bool(adapter_path or llm_kwargs.get("enable_lora"))
        if self.lora:
            llm_kwargs.setdefault("enable_lora", True)
            llm_kwargs.setdefault("max_lora_rank", max_lora_rank)
        self.llm = LLM(model=model_path, **llm_kwargs)
        self.stats: dict[str, float] = {}
        self._lora_ids: dict[str, int] = {}  # adapter path -> its LoRA id in this engine

    def set_adapter(self, adapter_path: str | None) -> None:
        """Generate with another LoRA adapter from now on (None: the base model)."""
        if adapter_path and not self.lora:
            raise UserError("this vLLM engine was built without LoRA; pass adapter_path or enable_lora=True")
        self.adapter_path = adapter_path

    def _lora_request(self) -> Any:
        if not self.adapter_path:
            return None
        from vllm.lora.request import LoRARequest

        local = Path(self.adapter_path).expanduser()
        path = str(local.resolve()) if local.exists() else self.adapter_path
        # vLLM caches a loaded adapter under its id: a second adapter sent with the first one's id
        # would silently generate with the first one's weights. One id (and name) per adapter path.
        lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)
        return LoRARequest(f"ftlab-adapter-{lora_id}", lora_id, path)

    def close(self) -> None:
        """Shut vLLM down: its engine core (workers, weights, KV cache) and its model-parallel groups. The
        torch process group stays: under torchrun it is the one ftlab's training stages use next."""
        from ftlab.models.load import release_memory

        llm, self.llm = self.llm, None
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)  # vLLM's V1 engine; older ones free on collection
        if core is not None:
            core.shutdown()
        del llm, core
        from vllm.distributed.parallel_state import destroy_model_parallel

        destroy_model_parallel()
        release_memory()

    def _sampling_params(self, cfg: GenerationConfig, logprobs: bool, truncate_in_vllm: bool, seed: int) -> Any:
        from vllm import SamplingParams

        extra: dict[str, Any] = {}
        if self.tokenizer is not None:
            extra["stop_token_ids"] = sorted(stop_token_ids(self.tokenizer))
        if truncate_in_vllm:
            extra["truncate_prompt_tokens"] = cfg.max_prompt_tokens
        return SamplingParams(
            n=1,
            temperature=cfg.temperature,
            top_p=cfg.top_p if cfg.temperature > 0 else 1.0,
            max_tokens=cfg.max_new_tokens,
            stop=list(cfg.stop) or None,
            seed=seed,
            logprobs=0 if logprobs else None,  # 0: the chosen token's log-prob only
            **extra,
        )

    def _inputs(self, prompts: list[str], cfg: GenerationConfig) -> tuple[list[Any], int]:
        """Token-id prompts tokenized as SFT tokenizes them, left-truncated to max_prompt_tokens
        (text prompts where there is no tokenizer); and how many were truncated."""
        if self.tokenizer is None:
            return list(prompts), 0
        bos = adds_bos(self.tokenizer)
        encoded = [prompt_ids(self.tokenizer, p, bos) for p in prompts]
        limit = cfg.max_prompt_tokens
        truncated = sum(len(ids) > limit for ids in encoded) if limit else 0
        if truncated:
            logger.warning("%d of %d prompts longer than %d tokens were truncated from the left",
                           truncated, len(prompts), limit)
        return [{"prompt_token_ids": ids[-limit:] if limit else ids} for ids in encoded], truncated

    def generate_full(self, prompts: list[str], cfg: GenerationConfig, on_result: CompletionCallback | None = None,
                      progress: bool = True) -> list[list[Completion]]:
        """`Completion`s with vLLM's log-probs of the chosen tokens (raw model log-softmax in vLLM's
        default `logprobs_mode`); `on_result` is called per prompt after the run, in input order."""
        return self._generate(prompts, cfg, on_result, progress, logprobs=True)

    def generate(self, prompts: list[str], cfg: GenerationConfig, on_result: ResultCallback | None = None,
                 progress: bool = True) -> list[list[str]]:
        """vLLM schedules all prompts at once; `on_result` is called per prompt after the run, in input order."""
        texts_cb = None if on_result is None else (lambda i, cs: on_result(i, [c.text for c in cs]))
        results = self._generate(prompts, cfg, texts_cb, progress, logprobs=False)
        return [[c.text for c in cs] for cs in results]

    def _generate(self, prompts: list[str], cfg: GenerationConfig, on_result: CompletionCallback | None,
                  progress: bool, logprobs: bool) -> list[list[Completion]]:
        cfg.validate()
        if cfg.stop_line_repeats:
            raise UserError("stop_line_repeats is applied by the HF engine only (eval.engine: hf)")
        start = time.perf_counter()
        inputs, truncated = self._inputs(prompts, cfg)
        requests, params = [], []
        for inp, seeds in zip(inputs, request_seeds(cfg.seed, [_seed_key(inp) for inp in inputs], cfg.n)):
            requests += [inp] * cfg.n
            params += [self._sampling_params(cfg, logprobs, self.tokenizer is None, seed) for seed in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=progress, lora_request=self._lora_request())
        results: list[list[Completion]] = []
        new_tokens = 0
        for index in range(len(inputs)):
            rows = [out.outputs[0] for out in outputs[index * cfg.n:(index + 1) * cfg.n]]
            completions = [_completion(c, cfg, logprobs) for c in rows]
            new_tokens += sum(len(c.token_ids) for c in rows)
            results.append(completions)
            if on_result is not None:
                on_result(index, completions)
        self.stats = {"prompts": len(prompts), "truncated_prompts": truncated, "new_tokens": new_tokens,
                      "seconds": time.perf_counter() - start}
        return results


def _seed_key(request: Any) -> list[int]:
    """What a row's seed is computed from: the prompt's token ids (the HF engine's rule), or the bytes of a text
    prompt where vLLM tokenizes. Each (prompt, sample) is its own request with its own seed: with n samples in one
    request vLLM derives them from that request's seed, so sample j of every prompt shared one random stream."""
    return list(request["prompt_token_ids"]) if isinstance(request, dict) else list(request.encode())


def _completion(out: Any, cfg: GenerationConfig, logprobs: bool) -> Completion:
    # vLLM already removes the stop string; cutting again is a no-op kept for identical semantics.
    token_ids = list(out.token_ids)
    chosen = None
    if logprobs and out.logprobs is not None:  # per position: {token id: Logprob} holding the chosen token
        chosen = [step[t].logprob for t, step in zip(token_ids, out.logprobs)]
    return Completion(text=cut_at_stop(out.text, cfg.stop)[0], token_ids=token_ids, logprobs=chosen,
                      finish_reason="length" if out.finish_reason == "length" else "stop")
