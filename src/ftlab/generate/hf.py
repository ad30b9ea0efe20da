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
prompts is computed once (`_Prefiller`). Their K/V go into a preallocated buffer of `batch_size`
row slots (`_SlotCache`); each step writes only the new column and the model attends over a view
of the buffer. A row that finishes (EOS, max_new_tokens, stop string) is evicted by moving the
last row into its slot, and the freed slot is refilled with the next waiting prompt (continuous
batching), so the batch stays full. Greedy decoding picks the argmax like
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
layers) take a fallback path: length-sorted batches through `model.generate`.

Device: the engine works on the model's device (`next(model.parameters()).device`): prompt ids,
masks, positions and the slot cache are created there, and only the chosen token ids and their
log-probs come back to the host, once per step (the Python bookkeeping needs them).

Sampling: every (prompt, sample) row has its own `torch.Generator` on the model's device, seeded
from `cfg.seed`, the prompt's tokens and the sample index (`_row_seed`), and draws its token with
its own generator. A prompt's samples therefore do not depend on the batch size, the admission
order or the other prompts in the call. (On a GPU, matmuls over different numbers of rows may round
differently, which can still flip a near-tie; on a CPU the logits of a row do not depend on them.)

Each chosen token also gets its log-probability under the raw model distribution (log-softmax of
the logits, before temperature and top-p; see `Completion`), so RL-style callers need no second pass.

Prompts are tokenized as SFT training tokenizes them (`ftlab.data.sft.prompt_ids`: no special tokens
added to a rendered chat template) and rows stop on EOS and on the chat template's end-of-turn
token (`ftlab.data.sft.stop_token_ids`), the token SFT teaches the model to end an answer with.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from ftlab.data.sft import adds_bos, padding_id, prompt_ids, stop_token_ids
from ftlab.errors import UserError
from ftlab.generate.base import (
    Completion,
    CompletionCallback,
    GenerationConfig,
    ResultCallback,
    cut_at_stop,
)
from ftlab.losses import accepts_logits_to_keep, cache_kwarg

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# KV cache: preallocated row slots, one shared column window
# --------------------------------------------------------------------------------------------
@dataclass
class _Window:
    """Which part of the buffers is live; shared by all layers so one update moves them all.

    Rows `0..rows-1` are occupied; columns `start..end-1` hold cached tokens (per-row padding
    columns are masked out by the attention mask).
    """

    rows: int = 0
    start: int = 0
    end: int = 0


class _SlotLayer(DynamicLayer):
    """One layer's K/V in `[slots, kv_heads, columns, head_dim]` buffers.

    `update` writes the new token's K/V into column `end` and returns views of the live window, so
    a decoding step copies one column instead of the whole cache (which `DynamicLayer` does with
    `torch.cat`).
    """

    def __init__(self, window: _Window, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.window = window
        self.key_buf, self.value_buf = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._refresh_views(0)

    def _refresh_views(self, new_tokens: int) -> None:
        w = self.window
        self.keys = self.key_buf[: w.rows, :, w.start : w.end + new_tokens]
        self.values = self.value_buf[: w.rows, :, w.start : w.end + new_tokens]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        w, q = self.window, key_states.shape[-2]
        self.key_buf[: w.rows, :, w.end : w.end + q] = key_states
        self.value_buf[: w.rows, :, w.end : w.end + q] = value_states
        self._refresh_views(q)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.window.end - self.window.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class _SlotCache(Cache):
    """A `Cache` made of `_SlotLayer`s; the engine moves `window.end` after each forward."""

    def __init__(self, layers: list[_SlotLayer]):
        super().__init__(layers=layers)


def _is_plain_dynamic_cache(cache: Cache) -> bool:
    """Our slot cache reproduces full attention only; anything fancier takes the fallback path."""
    return len(cache.layers) > 0 and all(type(layer) is DynamicLayer for layer in cache.layers)


# --------------------------------------------------------------------------------------------
# Per-sequence bookkeeping
# --------------------------------------------------------------------------------------------
@dataclass
class _Row:
    """One sequence being decoded: sample `sample` of prompt `request`."""

    request: int
    sample: int
    first_col: int                      # buffer column of its first real (non-pad) token
    generator: torch.Generator | None   # per-row RNG: samples do not depend on batching
    holes: int = 0                      # pad columns after first_col (between a shared prefix and the text)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # raw model log-prob of each token in `tokens`
    finish_reason: str = ""             # "stop" or "length" once the row is done


class _Batch:
    """The running rows and their cache: admit (prefill), step (decode one token), evict."""

    def __init__(self, model: Any, slots: int, columns: int, device: torch.device):
        self.model, self.slots, self.columns, self.device = model, slots, columns, device
        self.cache_arg = cache_kwarg(model)
        self.window = _Window()
        self.rows: list[_Row] = []
        self.cache: _SlotCache | None = None
        self.mask = torch.zeros(slots, columns, dtype=torch.long, device=device)
        self.next_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)

    # -- admission -----------------------------------------------------------------------------
    def admit(self, new_rows: list[_Row], sources: list[int], cache: DynamicCache, mask: torch.Tensor,
              first_tokens: torch.Tensor) -> None:
        """Copy prefilled K/V (row `sources[i]` of the group) into free slots; their next input is `first_tokens`."""
        width = mask.shape[1]
        if self.cache is None:
            self._allocate(cache)
        if not self.rows:
            self.window.start = self.window.end = width
        self._make_room_left(width)
        w, lo, hi = self.window, self.window.end - width, self.window.end
        src = torch.tensor(sources, dtype=torch.long, device=self.device)
        slots = slice(w.rows, w.rows + len(new_rows))
        for layer, prefilled in zip(self.cache.layers, cache.layers):
            layer.key_buf[slots, :, lo:hi] = prefilled.keys.index_select(0, src)
            layer.value_buf[slots, :, lo:hi] = prefilled.values.index_select(0, src)
        self.mask[slots] = 0
        self.mask[slots, lo:hi] = mask.index_select(0, src)
        self.next_tokens[slots] = first_tokens
        self.positions[slots] = mask.sum(-1).index_select(0, src)  # position of the first new token
        firsts, reals = mask.argmax(-1).tolist(), mask.sum(-1).tolist()  # one device->host copy each
        for row, s in zip(new_rows, sources):
            row.first_col = lo + firsts[s]
            row.holes = width - firsts[s] - reals[s]
        self.rows.extend(new_rows)
        w.rows = len(self.rows)
        w.start = min(w.start, lo)

    def _allocate(self, cache: DynamicCache) -> None:
        layers = []
        for prefilled in cache.layers:
            _, heads, _, dim = prefilled.keys.shape
            shape = (self.slots, heads, self.columns, dim)
            layers.append(_SlotLayer(self.window, prefilled.keys.new_zeros(shape), prefilled.keys.new_zeros(shape)))
        self.cache = _SlotCache(layers)

    def _make_room_left(self, width: int) -> None:
        """Ensure `width` columns exist left of `end` (a newcomer's prompt ends where the others are)."""
        if self.window.end < width:
            self._shift(width - self.window.end)

    # -- decode --------------------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        """Feed every row its next token; return the logits `[rows, vocab]` for the token after it."""
        self._trim_left()
        if self.window.end >= self.columns:
            self._compact()
        w, n = self.window, self.window.rows
        self.mask[:n, w.end] = 1
        padded = any(r.first_col != w.start or r.holes for r in self.rows)
        out = self.model(
            input_ids=self.next_tokens[:n, None],
            attention_mask=self.mask[:n, w.start : w.end + 1] if padded else None,
            position_ids=self.positions[:n, None],
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        w.end += 1
        self.positions[:n] += 1
        return out.logits[:, -1, :]

    def _trim_left(self) -> None:
        """Drop columns that no live row uses any more (less attention work, free a view only)."""
        if self.rows:
            self.window.start = min(r.first_col for r in self.rows)

    def _compact(self) -> None:
        """The window reached the buffer's end: move it back to column 0 (rare, amortized)."""
        self._shift(-self.window.start)
        if self.window.end >= self.columns:
            raise RuntimeError("generation buffer too small; this is a bug in ftlab.generate")

    def _shift(self, delta: int) -> None:
        """Move the live window by `delta` columns (clone first: source and target may overlap)."""
        w = self.window
        lo, hi = w.start, w.end
        for layer in self.cache.layers:
            for buf in (layer.key_buf, layer.value_buf):
                buf[: w.rows, :, lo + delta : hi + delta] = buf[: w.rows, :, lo:hi].clone()
        self.mask[: w.rows, lo + delta : hi + delta] = self.mask[: w.rows, lo:hi].clone()
        if delta > 0:
            self.mask[: w.rows, lo : lo + delta] = 0
        w.start, w.end = lo + delta, hi + delta
        for r in self.rows:
            r.first_col += delta

    def evict(self, done: list[int]) -> None:
        """Remove finished rows by moving the last live row into each freed slot (copies one row, not the batch)."""
        for i in sorted(done, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self._move_row(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
            self.window.rows = len(self.rows)

    def _move_row(self, src: int, dst: int) -> None:
        lo, hi = self.window.start, self.window.end
        for layer in self.cache.layers:
            layer.key_buf[dst, :, lo:hi] = layer.key_buf[src, :, lo:hi]
            layer.value_buf[dst, :, lo:hi] = layer.value_buf[src, :, lo:hi]
        self.mask[dst] = self.mask[src]
        self.next_tokens[dst] = self.next_tokens[src]
        self.positions[dst] = self.positions[src]


# --------------------------------------------------------------------------------------------
# Prefill: similar-length chunks, shared prefix computed once
# --------------------------------------------------------------------------------------------
def shared_prefix_length(encoded: list[list[int]]) -> int:
    """Tokens every prompt starts with (e.g. a chat template's system prompt), leaving each prompt >= 1 token."""
    if len(encoded) < 2:
        return 0
    shortest = min(len(e) for e in encoded)
    first = encoded[0]
    n = 0
    while n < shortest - 1 and all(e[n] == first[n] for e in encoded):
        n += 1
    return n


class _Prefiller:
    """Turns prompts into K/V + first-token logits with as little wasted compute as possible.

    Pad tokens cost as much as real ones, so a group is split into chunks whose lengths differ by
    at most `max_pad_fraction`. A prefix shared by all prompts (chat templates start with the same
    system prompt) is computed once and its K/V are copied in front of every chunk; the chunk's
    own pads then sit between prefix and text, which the attention mask hides.
    """

    def __init__(self, model: Any, pad_id: int, encoded: list[list[int]], share_prefix: bool,
                 max_pad_fraction: float = 0.1, max_chunk_tokens: int = 4096, min_prefix: int = 4,
                 device: torch.device | None = None):
        self.model, self.pad_id = model, pad_id
        self.device = device if device is not None else _model_device(model)
        self.cache_arg = cache_kwarg(model)
        self.max_pad_fraction, self.max_chunk_tokens = max_pad_fraction, max_chunk_tokens
        n = shared_prefix_length(encoded) if share_prefix else 0
        self.prefix = encoded[0][:n] if n >= min_prefix else []
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.positions = 0  # token positions run through the model (pads included): the prefill cost
        # Only the last position's logits are needed (saves a [tokens x vocab] matmul), as in generate.
        self.last_logits_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}

    def chunks(self, prompts: list[list[int]]) -> list[list[int]]:
        """Split prompt indices into consecutive chunks with little padding (few chunks when sorted)."""
        out: list[list[int]] = []
        for i, p in enumerate(prompts):
            if out:
                chunk = out[-1]
                width = max(len(p), *(len(prompts[j]) for j in chunk))
                real = sum(len(prompts[j]) for j in chunk) + len(p)
                padded = width * (len(chunk) + 1)
                if padded - real <= self.max_pad_fraction * padded and padded <= self.max_chunk_tokens:
                    chunk.append(i)
                    continue
            out.append([i])
        return out

    def run(self, prompts: list[list[int]]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Prefill one chunk: cache `[g, heads, width, dim]`, mask `[g, width]`, next-token logits `[g, vocab]`."""
        p = len(self.prefix)
        texts = [ids[p:] for ids in prompts]
        width = max(len(t) for t in texts)
        ids = torch.tensor([[self.pad_id] * (width - len(t)) + t for t in texts], dtype=torch.long,
                           device=self.device)
        text_mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in texts], dtype=torch.long,
                                 device=self.device)
        positions = (p + text_mask.cumsum(-1) - 1).masked_fill(text_mask == 0, 0)
        mask = torch.cat([text_mask.new_ones(len(texts), p), text_mask], dim=1)
        cache = self._cache_with_prefix(len(texts))
        self.positions += ids.numel()
        out = self.model(
            input_ids=ids,
            attention_mask=None if bool(mask.all()) else mask,  # generate drops an all-ones mask too
            position_ids=positions,
            use_cache=True,
            **{self.cache_arg: cache},
            **self.last_logits_only,
        )
        return cache, mask, out.logits[:, -1, :]

    def _cache_with_prefix(self, rows: int) -> DynamicCache:
        cache = DynamicCache(config=self.model.config)
        if not self.prefix:
            return cache
        if self._prefix_kv is None:
            prefix_cache = DynamicCache(config=self.model.config)
            self.model(input_ids=torch.tensor([self.prefix], device=self.device),
                       position_ids=torch.arange(len(self.prefix), device=self.device)[None],
                       use_cache=True, **{self.cache_arg: prefix_cache}, **self.last_logits_only)
            self._prefix_kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
            self.positions += len(self.prefix)
        for i, (k, v) in enumerate(self._prefix_kv):
            cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)
        return cache


# --------------------------------------------------------------------------------------------
# Token selection
# --------------------------------------------------------------------------------------------
# (logits [rows, vocab], prompt index of each row, tokens each row generated so far) -> the scores to pick
# from (e.g. -inf where a token is not allowed). It must not change `logits` in place: log-probs stay raw.
LogitsHook = Callable[[torch.Tensor, list[int], list[list[int]]], torch.Tensor]


def _pick_tokens(logits: torch.Tensor, rows: list[_Row], cfg: GenerationConfig,
                 hook: LogitsHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row, and its raw log-probability (see `_chosen_logprobs`).

    Greedy argmax (as `generate(do_sample=False)`), or temperature/top-p sampling, each row drawing
    with its own generator (on the logits' device) so its draws do not depend on the other rows.
    A `hook` (constrained decoding) changes what is picked from, never the reported log-probs."""
    scores = logits if hook is None else hook(logits, [r.request for r in rows], [r.tokens for r in rows])
    if cfg.greedy:
        tokens = scores.argmax(dim=-1)
    else:
        scores = scores.float() / cfg.temperature
        if cfg.top_p < 1.0:
            scores = _top_p_filter(scores, cfg.top_p)
        probs = scores.softmax(dim=-1)
        tokens = torch.cat([torch.multinomial(probs[i], 1, generator=r.generator) for i, r in enumerate(rows)])
    return tokens, _chosen_logprobs(logits, tokens)


def _chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row, in fp32, from the raw logits (before temperature / top-p):
    the number a teacher-forced forward pass gives, independent of how the token was picked."""
    logits = logits.float()
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering, same rule as transformers' TopPLogitsWarper (keeps at least one token)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def _row_seed(seed: int, prompt: list[int], repeat: int, sample: int) -> int:
    """A seed per (prompt tokens, sample): a prompt's samples do not depend on batch size, order or the
    other prompts of the call (the same example gets the same samples in any subset of a dataset).
    `repeat` counts earlier copies of the same prompt in the call, so that copies differ."""
    key = repr((seed, repeat, sample, prompt)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


_Deliver = Callable[[int, list[_Row]], None]


@dataclass
class _Run:
    """State of one `generate` call shared by the loop's helpers."""

    cfg: GenerationConfig
    deliver: _Deliver
    rows_per_prompt: int                 # greedy samples are identical: decode one row, copy it n times
    device: torch.device
    repeats: list[int]                   # per prompt: earlier copies of the same prompt (for `_row_seed`)
    done: dict[int, list[_Row | None]] = field(default_factory=dict)  # finished samples per prompt


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------
class HFEngine:
    """Generation with a transformers causal LM: length-sorted, continuous batching, KV-cache slots.

    `refill=False` turns continuous batching off (a new group is admitted only when the batch is
    empty; finished rows are still evicted). `stop_check_every` trades a few wasted tokens per
    stopped row for not decoding every row's text at every step. `logits_processor` (a `LogitsHook`,
    settable between calls) reshapes every row's next-token scores, e.g. to constrain its syntax.
    """

    def __init__(self, model: Any, tokenizer: Any, *, refill: bool = True, share_prefix: bool = True,
                 stop_check_every: int = 4, logits_processor: LogitsHook | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.refill = refill
        self.share_prefix = share_prefix
        self.stop_check_every = max(1, stop_check_every)
        self.logits_processor = logits_processor
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = padding_id(tokenizer, self.eos_ids)
        self.stats: dict[str, float] = {}
        self._plain_cache: bool | None = None
        self._adds_bos = adds_bos(tokenizer)

    # -- public API ----------------------------------------------------------------------------
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

        def deliver(index: int, rows: list[_Row]) -> None:
            completions = [self._completion(r, cfg) for r in rows]  # greedy n > 1: one row, n copies
            results[index] = completions
            self.stats["new_tokens"] += sum(len(r.tokens) for r in {id(r): r for r in rows}.values())
            bar.update(1)
            bar.set_postfix(tok_s=f"{self.stats['new_tokens'] / max(time.perf_counter() - start, 1e-9):.1f}")
            if on_result is not None:
                on_result(index, completions)

        with torch.inference_mode():
            if prompts:
                run = _Run(cfg, deliver, rows_per_prompt=1 if cfg.greedy else cfg.n,
                           device=_model_device(self.model), repeats=_repeats(encoded))
                if self._supports_slot_cache():
                    self._decode(encoded, run)
                else:
                    self._generate_fallback(encoded, run)
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
                self._plain_cache = _is_plain_dynamic_cache(DynamicCache(config=self.model.config))
            except Exception:  # exotic configs: be safe
                self._plain_cache = False
        return self._plain_cache

    # -- the decoding loop ---------------------------------------------------------------------
    def _decode(self, encoded: list[list[int]], run: _Run) -> None:
        """Continuous batching over length-sorted prompts (see the module docstring)."""
        cfg = run.cfg
        slots = max(cfg.batch_size, run.rows_per_prompt)
        live = max(len(e) for e in encoded) + cfg.max_new_tokens  # the widest window one row can need
        # Slack columns let the window slide; moving it back costs one cache copy every live/4 steps.
        batch = _Batch(self.model, slots, columns=live + max(32, live // 4), device=run.device)
        prefiller = _Prefiller(self.model, self.pad_id, encoded, self.share_prefix, device=run.device)
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
                tokens, logprobs = _pick_tokens(batch.step(), batch.rows, cfg, self.logits_processor)
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

    def _admit(self, batch: _Batch, prefiller: _Prefiller, group: list[int], encoded: list[list[int]],
               run: _Run) -> tuple[torch.Tensor, torch.Tensor]:
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
                        seed = _row_seed(run.cfg.seed, encoded[request], run.repeats[request], s)
                        rng = torch.Generator(device=run.device).manual_seed(seed)
                    new_rows.append(_Row(request=request, sample=s, first_col=0, generator=rng))
                    sources.append(g)
            row_logits = last_logits.index_select(0, torch.tensor(sources, device=last_logits.device))
            first_tokens, logprobs = _pick_tokens(row_logits, new_rows, run.cfg, self.logits_processor)
            batch.admit(new_rows, sources, cache, mask, first_tokens)
            firsts.append(first_tokens)
            firsts_logprobs.append(logprobs)
        self.stats["prefill_tokens"] = prefiller.positions
        return torch.cat(firsts), torch.cat(firsts_logprobs)

    def _record(self, batch: _Batch, first: int, tokens: list[int], logprobs: list[float], run: _Run) -> None:
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
    def _finish_row(row: _Row, run: _Run) -> None:
        """File a finished row under its prompt; deliver the prompt once all its samples are done."""
        samples = run.done.setdefault(row.request, [None] * run.rows_per_prompt)
        samples[row.sample] = row
        if all(s is not None for s in samples):
            del run.done[row.request]
            copies = run.cfg.n // run.rows_per_prompt  # greedy n > 1: copies of the one decoded row
            run.deliver(row.request, [s for s in samples for _ in range(copies)])

    def _finish_reason(self, row: _Row, token: int, cfg: GenerationConfig) -> str:
        """'stop' (stop token or stop string), 'length' (max_new_tokens), or '' (not done)."""
        if token in self.eos_ids:
            return "stop"
        if len(row.tokens) >= cfg.max_new_tokens:
            return "length"
        if cfg.stop and len(row.tokens) % self.stop_check_every == 0:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            return "stop" if cut_at_stop(text, cfg.stop)[1] else ""  # the text is cut when it is delivered
        return ""

    def _completion(self, row: _Row, cfg: GenerationConfig) -> Completion:
        """The delivered form of a finished row: its text cut before the first stop string."""
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        text, cut = cut_at_stop(text, cfg.stop) if cfg.stop else (text, False)
        # a stop string can show up after the last periodic check, in a row that then ran to the limit
        return Completion(text=text, token_ids=list(row.tokens), logprobs=list(row.logprobs),
                          finish_reason="stop" if cut else row.finish_reason)

    # -- fallback: library generate on length-sorted batches ------------------------------------
    def _generate_fallback(self, encoded: list[list[int]], run: _Run) -> None:
        """For caches the slot cache cannot mimic: `model.generate` on length-sorted batches.

        Sampling is seeded per batch here (the library draws for all rows from one generator), so
        unlike the main path, samples depend on the batch composition. Log-probs come from one
        teacher-forced forward per finished row (`_score`)."""
        cfg, device = run.cfg, run.device
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        per_batch = max(1, cfg.batch_size // (1 if cfg.greedy else cfg.n))
        for b in range(0, len(order), per_batch):
            group = order[b : b + per_batch]
            width = max(len(encoded[i]) for i in group)
            ids = torch.tensor([[self.pad_id] * (width - len(encoded[i])) + encoded[i] for i in group], device=device)
            starts = torch.tensor([width - len(encoded[i]) for i in group], device=device)
            mask = torch.arange(width, device=device)[None, :] >= starts[:, None]
            kwargs: dict[str, Any] = {"do_sample": False}
            if not cfg.greedy:
                kwargs = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p,
                          "num_return_sequences": cfg.n}
            if cfg.stop:
                kwargs.update(stop_strings=cfg.stop, tokenizer=self.tokenizer)
            if self.logits_processor is not None:  # rows are group x samples, in that order
                from transformers import LogitsProcessorList

                requests = [i for i in group for _ in range(1 if cfg.greedy else cfg.n)]
                kwargs["logits_processor"] = LogitsProcessorList([_HookProcessor(self.logits_processor, requests,
                                                                                 width)])
            # seed sampling without touching the caller's RNG (the CPU's, and the model's GPU if any)
            gpus = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else []
            with torch.random.fork_rng(devices=gpus):
                torch.manual_seed(cfg.seed + b)
                out = self.model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=cfg.max_new_tokens,
                                          pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None,
                                          **kwargs)
            new = out[:, width:].tolist()
            n_out = 1 if cfg.greedy else cfg.n
            for k, request in enumerate(group):
                rows = []
                for j in range(n_out):
                    tokens = _until_eos(new[k * n_out + j], self.eos_ids)
                    ran_out = len(tokens) >= cfg.max_new_tokens and tokens[-1] not in self.eos_ids
                    rows.append(_Row(request=request, sample=j, first_col=0, generator=None, tokens=tokens,
                                     logprobs=self._score(encoded[request], tokens, device),
                                     finish_reason="length" if ran_out else "stop"))
                run.deliver(request, rows * (cfg.n if n_out == 1 else 1))

    def _score(self, prompt: list[int], tokens: list[int], device: torch.device) -> list[float]:
        """Raw log-probs of `tokens` after `prompt`, from one teacher-forced forward pass."""
        if not tokens:
            return []
        ids = torch.tensor([prompt + tokens], device=device)
        keep = {"logits_to_keep": len(tokens) + 1} if accepts_logits_to_keep(self.model) else {}
        logits = self.model(input_ids=ids, **keep).logits[0, -len(tokens) - 1 : -1]
        return _chosen_logprobs(logits, ids[0, len(prompt):]).tolist()


class _HookProcessor:
    """A `LogitsHook` as a transformers logits processor, for the fallback path through `model.generate`."""

    def __init__(self, hook: LogitsHook, requests: list[int], width: int):
        self.hook, self.requests, self.width = hook, requests, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.hook(scores, self.requests, input_ids[:, self.width:].tolist())


def _texts_callback(on_result: ResultCallback | None) -> CompletionCallback | None:
    """Adapt a texts callback (`generate`'s) to the engine's `Completion` callback."""
    if on_result is None:
        return None
    return lambda index, completions: on_result(index, [c.text for c in completions])


def _repeats(encoded: list[list[int]]) -> list[int]:
    """Per prompt, how many identical prompts come before it in the call."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for ids in encoded:
        key = tuple(ids)
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out


def _model_device(model: Any) -> torch.device:
    """Where the engine puts its tensors: the device of the model's (first) parameters."""
    return next(model.parameters()).device


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Cut `generate`'s padded output after the first EOS (kept, as in the main path)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
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
