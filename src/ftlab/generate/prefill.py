"""Prefill for `HFEngine` (`ftlab.generate.hf`): prompts -> K/V cache and first-token logits.

Prompts come length-sorted; `Prefiller.chunks` groups prompts of similar length so chunks pad little,
and the prefix every prompt shares (a chat template's system prompt, `shared_prefix_length`) is
computed once and its K/V copied in front of every chunk. Internal to `ftlab.generate`.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from ftlab.losses import accepts_logits_to_keep, cache_kwarg


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


class Prefiller:
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
        self.device = device if device is not None else model_device(model)
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

    def run(self, prompts: list[list[int]], **forward_kwargs: Any) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Prefill one chunk: cache `[g, heads, width, dim]`, mask `[g, width]`, next-token logits `[g, vocab]`.

        `forward_kwargs` go to the model's forward (the server: peft's `adapter_names`, one per prompt);
        a shared prefix is computed without them, so callers that pass them build with `share_prefix=False`."""
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
            **forward_kwargs,
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


def model_device(model: Any) -> torch.device:
    """Where the engine puts its tensors: the device of the model's (first) parameters."""
    return next(model.parameters()).device
