"""Batched generation with a plain transformers model, faster than `model.generate` on a batch.

Calling `model.generate` on batches of prompts wastes work in three ways:

* prompts in file order are padded to the longest prompt of their batch, and a pad token costs as
  much as a real one in the prefill; chat templates also make every prompt start with the same
  system prompt, which is recomputed for every prompt;
* a batch keeps running until its LONGEST sequence is done: rows that hit EOS keep computing;
* the default `DynamicCache` concatenates every layer's whole K/V cache with the new token at
  every step (`torch.cat`), i.e. copies the entire cache once per generated token.

`HFEngine` runs its own decoding loop instead. Prompts are sorted by length (longest first) and
prefilled in chunks of similar length with the usual left padding; the prefix shared by all
prompts is computed once (`prefill.Prefiller`). Their K/V go into a preallocated buffer of
`batch_size` row slots (`batch.SlotCache`); each step writes only the new column and the model
attends over a view of the buffer. A row that finishes (EOS, max_new_tokens, stop string) is
evicted by moving the last row into its slot, and the freed slot is refilled with the next waiting
prompt (continuous batching), so the batch stays full. Greedy decoding picks the argmax like
`model.generate(do_sample=False)`, with the same position ids and attention masking, so the tokens
are the same (checked in the tests and in `benchmarks/bench_generate.py`).

What this buys depends on the workload. On a CPU a decoding step is bound by streaming the fp32
weights through the matmuls, once per step however many rows share it, so the engine decodes 64 rows
at a time by default (`GenerationConfig.batch_size`): about 365 ms for a step of 64 rows against 125 ms for
16 on this 2-core VM. A plain `generate` gains less from a bigger batch, since it pads every batch to
its longest prompt and runs every row until the longest is done; the engine keeps its slots full.
Each row's matmul result does not depend on how many rows share the call, so the tokens stay those
of `model.generate` at any batch size (checked in the benchmark). See docs/BENCHMARKS.md.

Models whose cache is not a plain full-attention `DynamicCache` (sliding-window or linear-attention
layers) take a fallback path: length-sorted batches through `model.generate` (`fallback.py`), whose
sampling is seeded per batch rather than per row (see `fallback.generate_fallback`).

Device: the engine works on the model's device (`next(model.parameters()).device`): prompt ids,
masks, positions and the slot cache are created there, and only the chosen token ids and their
log-probs come back to the host, once per step (the Python bookkeeping needs them).

Sampling: every (prompt, sample) row has its own `torch.Generator` on the model's device, seeded
from `cfg.seed`, the prompt's tokens and the sample index (`sampling.row_seed`), and draws its token with
its own generator. A prompt's samples therefore do not depend on the batch size, the admission
order or the other prompts in the call. (On a GPU, matmuls over different numbers of rows may round
differently, which can still flip a near-tie; on a CPU the logits of a row do not depend on them.)

Each chosen token also gets its log-probability under the raw model distribution (log-softmax of
the logits, before temperature and top-p; see `Completion`), so RL-style callers need no second pass.

Prompts are tokenized as SFT training tokenizes them (`ftlab.data.sft.prompt_ids`: no special tokens
added to a rendered chat template) and rows stop on EOS and on the chat template's end-of-turn
token (`ftlab.data.sft.stop_token_ids`), the token SFT teaches the model to end an answer with.

The pieces, in `ftlab.generate`: `batch.py` (the slot KV cache, the rows and the running batch),
`prefill.py` (length-similar chunks, the shared prefix), `sampling.py` (token choice, per-row seeds,
log-probs), `fallback.py` (the `model.generate` path); this module holds the engine and its loop.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from transformers import DynamicCache

from ftlab.data.sft import adds_bos, padding_id, prompt_ids, stop_token_ids
from ftlab.errors import UserError
from ftlab.generate.base import (
    Completion,
    CompletionCallback,
    GenerationConfig,
    ResultCallback,
    cut_at_stop,
    repeats_a_line,
)
from ftlab.generate.batch import Batch, Row, Run, is_plain_dynamic_cache
from ftlab.generate.fallback import generate_fallback
from ftlab.generate.prefill import Prefiller, model_device
from ftlab.generate.sampling import LogitsHook, pick_tokens, repeat_counts, row_seed

logger = logging.getLogger(__name__)
_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextmanager
def grouped_kv_attention(enabled: bool) -> Iterator[None]:
    """Let SDPA read grouped K/V heads in place (`enable_gqa`) while decoding on a CPU.

    transformers' SDPA path copies every key and value head once per query head that shares it
    (`repeat_kv`) whenever an attention mask is given on a CPU, i.e. at every decoding step of a padded batch.
    SmolLM2-135M has 9 query heads on 3 K/V heads, so each step copied the whole KV cache three times over.
    Measured on the quickstart's ~650-token prompts (benchmarks/bench_grouped_kv.py, 20 rows, 256 new tokens):
    decoding 57.2 s copied against 48.9 s in place, the same tokens; the matmuls are the rest. transformers
    honours TRANSFORMERS_SDPA_FORCE_GQA=1 for this (read at every call); it is set only around the decoding
    loop, since on a GPU a mask with `enable_gqa` leaves the fast kernels."""
    if not enabled:
        yield
        return
    before = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_FORCE_GQA, None)
        else:
            os.environ[_FORCE_GQA] = before


class HFEngine:
    """Generation with a transformers causal LM: length-sorted, continuous batching, KV-cache slots.

    `refill=False` turns continuous batching off (a new group is admitted only when the batch is
    empty; finished rows are still evicted). `stop_check_every` trades a few wasted tokens per
    stopped row for not decoding every row's text at every step. `logits_processor` (a `LogitsHook`,
    settable between calls) reshapes every row's next-token scores, e.g. to constrain its syntax.
    """

    def __init__(self, model: Any, tokenizer: Any, *, refill: bool = True, share_prefix: bool = True,
                 stop_check_every: int = 4, logits_processor: LogitsHook | None = None, grouped_kv: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.refill = refill
        self.share_prefix = share_prefix
        self.stop_check_every = max(1, stop_check_every)
        self.logits_processor = logits_processor
        self.grouped_kv = grouped_kv
        self.eos_ids = answer_stop_ids(model, tokenizer)
        self.pad_id = padding_id(tokenizer, self.eos_ids)
        self.stats: dict[str, float] = {}
        self._plain_cache: bool | None = None
        self._adds_bos = adds_bos(tokenizer)

    # -- public API ----------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the engine's reference to the model (the caller frees the model itself)."""
        self.model = None

    def generate(self, prompts: list[str], cfg: GenerationConfig, on_result: ResultCallback | None = None,
                 progress: bool = True) -> list[list[str]]:
        """Per prompt (input order), `cfg.n` completions of new text cut before the first stop string."""
        results = self.generate_full(prompts, cfg, on_result=_texts_callback(on_result), progress=progress)
        return [[c.text for c in per_prompt] for per_prompt in results]

    def generate_tokens(self, prompts: list[str], cfg: GenerationConfig, on_result: ResultCallback | None = None,
                        progress: bool = True) -> list[list[list[int]]]:
        """Like `generate` but returns the new token ids (EOS included when generated; not stop-cut).

        Token ids are what the identity checks against `model.generate` compare.
        """
        results = self.generate_full(prompts, cfg, on_result=_texts_callback(on_result), progress=progress)
        return [[c.token_ids for c in per_prompt] for per_prompt in results]

    def generate_full(self, prompts: list[str], cfg: GenerationConfig, on_result: CompletionCallback | None = None,
                      progress: bool = True) -> list[list[Completion]]:
        """Per prompt (input order), `cfg.n` `Completion`s: text, token ids, raw log-probs, finish reason."""
        cfg.validate()
        start = time.perf_counter()
        self.stats = {"prompts": len(prompts), "truncated_prompts": 0, "new_tokens": 0, "seconds": 0.0,
                      "prefill_tokens": 0, "decode_steps": 0, "prefill_seconds": 0.0, "decode_seconds": 0.0}
        encoded = self._encode(prompts, cfg)
        results: list[list[Completion] | None] = [None] * len(prompts)
        bar = _progress_bar(len(prompts), progress)

        def deliver(index: int, rows: list[Row]) -> None:
            completions = [self._completion(r, cfg) for r in rows]  # greedy n > 1: one row, n copies
            results[index] = completions
            self.stats["new_tokens"] += sum(len(r.tokens) for r in {id(r): r for r in rows}.values())
            bar.update(1)
            bar.set_postfix(tok_s=f"{self.stats['new_tokens'] / max(time.perf_counter() - start, 1e-9):.1f}")
            if on_result is not None:
                on_result(index, completions)

        with torch.inference_mode():
            if prompts:
                run = Run(cfg, deliver, rows_per_prompt=1 if cfg.greedy else cfg.n,
                          device=model_device(self.model), repeats=repeat_counts(encoded))
                if self._supports_slot_cache():
                    with grouped_kv_attention(self.grouped_kv and run.device.type == "cpu"):
                        self._decode(encoded, run)
                else:  # `model.generate` on length-sorted batches; it seeds sampling per batch, not per row
                    generate_fallback(self.model, self.tokenizer, encoded, run, pad_id=self.pad_id,
                                      eos_ids=self.eos_ids, logits_processor=self.logits_processor)
        bar.close()
        self.stats["seconds"] = time.perf_counter() - start
        return results  # type: ignore[return-value]

    # -- preparing prompts ---------------------------------------------------------------------
    def _encode(self, prompts: list[str], cfg: GenerationConfig) -> list[list[int]]:
        """Token ids per prompt, as SFT tokenizes a prompt (`prompt_ids`: no BOS added to a chat
        template that writes one); too long ones lose their beginning (the question is usually at the end)."""
        limit = self._prompt_limit(cfg)
        encoded = [prompt_ids(self.tokenizer, p, self._adds_bos) for p in prompts]
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:
            raise UserError(f"prompt #{empty[0]} has no tokens; a model cannot continue an empty prompt")
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > limit]
        for i in too_long:
            encoded[i] = encoded[i][-limit:]
        if too_long:
            self.stats["truncated_prompts"] = len(too_long)
            logger.warning("%d of %d prompts longer than %d tokens were truncated from the left (first: #%d)",
                           len(too_long), len(prompts), limit, too_long[0])
        return encoded

    def _prompt_limit(self, cfg: GenerationConfig) -> int:
        """Room for the prompt: max_prompt_tokens, and the model context minus the new tokens."""
        limit = cfg.max_prompt_tokens or 1 << 60
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context:
            limit = min(limit, context - cfg.max_new_tokens if context > cfg.max_new_tokens else context)
        return max(1, limit)

    def _supports_slot_cache(self) -> bool:
        if self._plain_cache is None:
            try:
                self._plain_cache = is_plain_dynamic_cache(DynamicCache(config=self.model.config))
            except Exception:  # exotic configs: be safe
                self._plain_cache = False
        return self._plain_cache

    # -- the decoding loop ---------------------------------------------------------------------
    def _decode(self, encoded: list[list[int]], run: Run) -> None:
        """Continuous batching over length-sorted prompts (see the module docstring)."""
        cfg = run.cfg
        slots = max(cfg.batch_size, run.rows_per_prompt)
        live = max(len(e) for e in encoded) + cfg.max_new_tokens  # the widest window one row can need
        # Slack columns let the window slide; moving it back costs one cache copy every live/4 steps.
        batch = Batch(self.model, slots, columns=live + max(32, live // 4), device=run.device)
        prefiller = Prefiller(self.model, self.pad_id, encoded, self.share_prefix, device=run.device)
        self.stats["shared_prefix_tokens"] = len(prefiller.prefix)
        waiting = deque(self._admission_order(encoded))

        while waiting or batch.rows:
            free = slots - len(batch.rows)
            tick = time.perf_counter()
            if waiting and free >= run.rows_per_prompt and (self.refill or not batch.rows):
                group = [waiting.popleft() for _ in range(min(free // run.rows_per_prompt, len(waiting)))]
                first_new = len(batch.rows)
                tokens, logprobs = self._admit(batch, prefiller, group, encoded, run)
                phase = "prefill_seconds"
            else:
                first_new = 0
                tokens, logprobs = pick_tokens(batch.step(), batch.rows, cfg, self.logits_processor)
                batch.next_tokens[: len(tokens)] = tokens
                self.stats["decode_steps"] += 1
                phase = "decode_seconds"
            self._record(batch, first_new, tokens.tolist(), logprobs.tolist(), run)
            self.stats[phase] += time.perf_counter() - tick

    @staticmethod
    def _admission_order(encoded: list[list[int]]) -> list[int]:
        """Longest prompts first: chunks of similar length pad little, and a newcomer then usually
        fits left of the running rows' window without moving it."""
        return sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))

    def _admit(self, batch: Batch, prefiller: Prefiller, group: list[int], encoded: list[list[int]],
               run: Run) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill `group` in low-padding chunks, give each prompt `rows_per_prompt` rows.

        A prompt is prefilled once, however many samples it has: its K/V are copied into each of its
        rows (`sources`), which then sample their first tokens from the same last-position logits.
        Returns the newcomers' first tokens and their log-probs."""
        firsts, firsts_logprobs = [], []
        prompts = [encoded[i] for i in group]
        for chunk in prefiller.chunks(prompts):
            cache, mask, last_logits = prefiller.run([prompts[c] for c in chunk])
            new_rows, sources = [], []
            for g, c in enumerate(chunk):
                request = group[c]
                for s in range(run.rows_per_prompt):
                    rng = None
                    if not run.cfg.greedy:
                        seed = row_seed(run.cfg.seed, encoded[request], run.repeats[request], s)
                        rng = torch.Generator(device=run.device).manual_seed(seed)
                    new_rows.append(Row(request=request, sample=s, first_col=0, generator=rng))
                    sources.append(g)
            row_logits = last_logits.index_select(0, torch.tensor(sources, device=last_logits.device))
            first_tokens, logprobs = pick_tokens(row_logits, new_rows, run.cfg, self.logits_processor)
            batch.admit(new_rows, sources, cache, mask, first_tokens)
            firsts.append(first_tokens)
            firsts_logprobs.append(logprobs)
        self.stats["prefill_tokens"] = prefiller.positions
        return torch.cat(firsts), torch.cat(firsts_logprobs)

    def _record(self, batch: Batch, first: int, tokens: list[int], logprobs: list[float], run: Run) -> None:
        """Append the chosen tokens to rows `first..`; finish rows on EOS / length / stop string; evict them."""
        finished = []
        for i, (token, logprob) in enumerate(zip(tokens, logprobs), start=first):
            row = batch.rows[i]
            row.tokens.append(token)
            row.logprobs.append(logprob)
            row.finish_reason = self._finish_reason(row, token, run.cfg)
            if row.finish_reason:
                finished.append(i)
        for i in finished:
            self._finish_row(batch.rows[i], run)
        if finished:
            batch.evict(finished)

    @staticmethod
    def _finish_row(row: Row, run: Run) -> None:
        """File a finished row under its prompt; deliver the prompt once all its samples are done."""
        samples = run.done.setdefault(row.request, [None] * run.rows_per_prompt)
        samples[row.sample] = row
        if all(s is not None for s in samples):
            del run.done[row.request]
            copies = run.cfg.n // run.rows_per_prompt  # greedy n > 1: copies of the one decoded row
            run.deliver(row.request, [s for s in samples for _ in range(copies)])

    def _finish_reason(self, row: Row, token: int, cfg: GenerationConfig) -> str:
        """'stop' (stop token or stop string), 'length' (max_new_tokens), or '' (not done)."""
        if token in self.eos_ids:
            return "stop"
        if len(row.tokens) >= cfg.max_new_tokens:
            return "length"
        if (cfg.stop or cfg.stop_line_repeats) and len(row.tokens) % self.stop_check_every == 0:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            if cfg.stop and cut_at_stop(text, cfg.stop)[1]:
                return "stop"  # the text is cut when it is delivered
            if cfg.stop_line_repeats and repeats_a_line(text, cfg.stop_line_repeats):
                return "stop"  # a loop: the text is delivered as it stands
        return ""

    def _completion(self, row: Row, cfg: GenerationConfig) -> Completion:
        """The delivered form of a finished row: its text cut before the first stop string."""
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        text, cut = cut_at_stop(text, cfg.stop) if cfg.stop else (text, False)
        # a stop string can show up after the last periodic check, in a row that then ran to the limit
        return Completion(text=text, token_ids=list(row.tokens), logprobs=list(row.logprobs),
                          finish_reason="stop" if cut else row.finish_reason)


def _texts_callback(on_result: ResultCallback | None) -> CompletionCallback | None:
    """Adapt a texts callback (`generate`'s) to the engine's `Completion` callback."""
    if on_result is None:
        return None
    return lambda index, completions: on_result(index, [c.text for c in completions])


def answer_stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids a row stops on: those `generate` stops on (the model's generation config, else the
    tokenizer's EOS), plus the chat template's end-of-turn token, which SFT trains the model to end
    answers with (`stop_token_ids`; usually in the generation config already, e.g. SmolLM2's `<|im_end|>`)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = set() if eos is None else {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}
    return ids | stop_token_ids(tokenizer)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="prompt", desc="generate", dynamic_ncols=True)
