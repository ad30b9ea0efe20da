"""The running batch of `HFEngine` (`ftlab.generate.hf`): a preallocated slot KV cache and its rows.

`SlotCache` holds every layer's K/V in `[slots, kv_heads, columns, head_dim]` buffers with one column
window shared by all layers (`Window`); a decoding step writes one column instead of concatenating the
whole cache. `Batch` admits prefilled prompts into free slots, runs a decoding step over all rows, and
evicts finished rows by moving the last row into the freed slot. `Row` is one sequence being decoded,
`Run` the state of one `generate` call. Internal to `ftlab.generate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from ftlab.generate.base import GenerationConfig
from ftlab.losses import cache_kwarg


# --------------------------------------------------------------------------------------------
# KV cache: preallocated row slots, one shared column window
# --------------------------------------------------------------------------------------------
@dataclass
class Window:
    """Which part of the buffers is live; shared by all layers so one update moves them all.

    Rows `0..rows-1` are occupied; columns `start..end-1` hold cached tokens (per-row padding
    columns are masked out by the attention mask).
    """

    rows: int = 0
    start: int = 0
    end: int = 0


class SlotLayer(DynamicLayer):
    """One layer's K/V in `[slots, kv_heads, columns, head_dim]` buffers.

    `update` writes the new token's K/V into column `end` and returns views of the live window, so
    a decoding step copies one column instead of the whole cache (which `DynamicLayer` does with
    `torch.cat`).
    """

    def __init__(self, window: Window, keys: torch.Tensor, values: torch.Tensor):
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


class SlotCache(Cache):
    """A `Cache` made of `SlotLayer`s; the engine moves `window.end` after each forward."""

    def __init__(self, layers: list[SlotLayer]):
        super().__init__(layers=layers)


def is_plain_dynamic_cache(cache: Cache) -> bool:
    """Our slot cache reproduces full attention only; anything fancier takes the fallback path."""
    return len(cache.layers) > 0 and all(type(layer) is DynamicLayer for layer in cache.layers)


# --------------------------------------------------------------------------------------------
# Per-sequence bookkeeping
# --------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One sequence being decoded: sample `sample` of prompt `request`."""

    request: int
    sample: int
    first_col: int                      # buffer column of its first real (non-pad) token
    generator: torch.Generator | None   # per-row RNG: samples do not depend on batching
    holes: int = 0                      # pad columns after first_col (between a shared prefix and the text)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # raw model log-prob of each token in `tokens`
    finish_reason: str = ""             # "stop" or "length" once the row is done


Deliver = Callable[[int, list[Row]], None]


@dataclass
class Run:
    """State of one `generate` call, shared by the decoding loop's helpers and the fallback path."""

    cfg: GenerationConfig
    deliver: Deliver
    rows_per_prompt: int                 # greedy samples are identical: decode one row, copy it n times
    device: torch.device
    repeats: list[int]                   # per prompt: earlier copies of the same prompt (for `row_seed`)
    done: dict[int, list[Row | None]] = field(default_factory=dict)  # finished samples per prompt


# --------------------------------------------------------------------------------------------
# The batch: admit (prefilled rows into free slots), step, evict
# --------------------------------------------------------------------------------------------
class Batch:
    """The running rows and their cache: admit (prefill), step (decode one token), evict."""

    def __init__(self, model: Any, slots: int, columns: int, device: torch.device):
        self.model, self.slots, self.columns, self.device = model, slots, columns, device
        self.cache_arg = cache_kwarg(model)
        self.window = Window()
        self.rows: list[Row] = []
        self.cache: SlotCache | None = None
        self.mask = torch.zeros(slots, columns, dtype=torch.long, device=device)
        self.next_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)

    # -- admission -----------------------------------------------------------------------------
    def admit(self, new_rows: list[Row], sources: list[int], cache: DynamicCache, mask: torch.Tensor,
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
            layers.append(SlotLayer(self.window, prefilled.keys.new_zeros(shape), prefilled.keys.new_zeros(shape)))
        self.cache = SlotCache(layers)

    def grow(self, columns: int) -> None:
        """Widen the buffers to `columns` (rows keep their columns). `HFEngine` sizes a batch for its
        whole call; a server admits prompts and token limits it could not know beforehand."""
        if columns <= self.columns:
            return
        extra = columns - self.columns
        self.mask = torch.nn.functional.pad(self.mask, (0, extra))
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.key_buf = torch.nn.functional.pad(layer.key_buf, (0, 0, 0, extra))
                layer.value_buf = torch.nn.functional.pad(layer.value_buf, (0, 0, 0, extra))
                layer._refresh_views(0)
        self.columns = columns

    def _make_room_left(self, width: int) -> None:
        """Ensure `width` columns exist left of `end` (a newcomer's prompt ends where the others are)."""
        if self.window.end < width:
            self._shift(width - self.window.end)

    # -- decode --------------------------------------------------------------------------------
    def step(self, **forward_kwargs: Any) -> torch.Tensor:
        """Feed every row its next token; return the logits `[rows, vocab]` for the token after it.

        `forward_kwargs` go to the model's forward as they are (the server passes peft's per-row
        `adapter_names`, one per row in `self.rows` order)."""
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
            **forward_kwargs,
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
