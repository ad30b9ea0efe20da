"""Batching encoded SFT examples: padding, packing without cross-example attention, length grouping.

Examples are the dicts made by `ftlab.data.sft.encode_sft_example` (lists `input_ids`, `labels`,
`response_mask`; extra keys are ignored).

Packing relies on how transformers (checked on 5.23, `masking_utils.find_packed_sequence_indices`)
treats `position_ids` when no attention mask is given: wherever the position does not increase by
exactly 1, a new sequence starts, and the causal mask is made block-diagonal so tokens only attend
inside their own example (sdpa and eager masks; flash-attention derives varlen `cu_seqlens` from the
same position_ids). The detection only runs when `attention_mask is None` AND there is no KV cache,
and models create an empty cache by default (`config.use_cache=True`), so the forward pass MUST
pass `use_cache=False` - `ftlab.losses.get_response_log_probs` does. Without it, packed examples
silently attend to each other (verified in tests/test_sft_data.py).
"""
from __future__ import annotations

import bisect
import random
from typing import Any, Sequence

import torch

from ftlab.errors import UserError

Example = dict[str, Any]


def pad_collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one: input_ids, labels, response_mask, attention_mask.

    Padded labels hold `pad_id` (a valid id, so gathering log-probs works) and are excluded by
    response_mask=False; attention_mask is 1 on real tokens.
    """
    if not batch:
        raise ValueError("pad_collate got an empty batch")
    width = max(len(ex["input_ids"]) for ex in batch)
    out = {
        "input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(batch), width), pad_id, dtype=torch.long),
        "response_mask": torch.zeros((len(batch), width), dtype=torch.bool),
        "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
    }
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        out["input_ids"][row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        out["labels"][row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        out["response_mask"][row, :n] = torch.tensor(ex["response_mask"], dtype=torch.bool)
        out["attention_mask"][row, :n] = 1
    return out


def pack_examples(encoded: Sequence[Example | None], max_tokens: int) -> list[list[int]]:
    """Bin examples into rows of at most `max_tokens` tokens; returns lists of example indices.

    Best-fit decreasing: longest examples first, each into the fullest row that still has room,
    which wastes little space and is deterministic (ties keep dataset order). None entries (dropped
    examples) are skipped. Shuffle the returned rows per epoch; within a row the order is irrelevant
    because packed examples cannot see each other.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    items = [(len(ex["input_ids"]), i) for i, ex in enumerate(encoded) if ex is not None]
    too_long = [(n, i) for n, i in items if n > max_tokens]
    if too_long:
        n, i = too_long[0]
        raise UserError(f"example #{i} has {n} tokens, more than pack max_tokens={max_tokens}; raise it")
    items.sort(key=lambda item: (-item[0], item[1]))

    rows: list[list[int]] = []
    by_free: list[tuple[int, int]] = []  # sorted (tokens still free, row index)
    for n, i in items:
        k = bisect.bisect_left(by_free, (n, -1))  # the row with the least room that still fits
        if k < len(by_free):
            free, r = by_free.pop(k)
        else:
            free, r = max_tokens, len(rows)
            rows.append([])
        rows[r].append(i)
        bisect.insort(by_free, (free - n, r))
    return rows


def packed_collate(rows: Sequence[Sequence[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples into ONE sequence; position_ids restart at 0 per example.

    Returns input_ids, labels, response_mask and position_ids of shape (n_rows, T) and deliberately
    NO attention_mask (see module docstring: transformers only isolates packed examples when the
    mask is None; forward with use_cache=False). Each example keeps its own shifted labels, so no
    label crosses an example boundary. Shorter rows are right-padded with a filler "example" whose
    positions also restart at 0, so it is isolated too and never supervised.
    """
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("packed_collate needs at least one row and no empty rows")
    width = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
    keys = ("input_ids", "labels", "response_mask", "position_ids")
    columns: dict[str, list[list[Any]]] = {k: [] for k in keys}
    for row in rows:
        ids: list[int] = []
        labels: list[int] = []
        mask: list[bool] = []
        positions: list[int] = []
        for ex in row:
            n = len(ex["input_ids"])
            ids += list(ex["input_ids"])
            labels += list(ex["labels"])
            mask += [bool(m) for m in ex["response_mask"]]
            positions += list(range(n))
        fill = width - len(ids)
        columns["input_ids"].append(ids + [pad_id] * fill)
        columns["labels"].append(labels + [pad_id] * fill)
        columns["response_mask"].append(mask + [False] * fill)
        columns["position_ids"].append(positions + list(range(fill)))
    return {
        k: torch.tensor(v, dtype=torch.bool if k == "response_mask" else torch.long) for k, v in columns.items()
    }


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    mega_chunk: int = 50,
) -> list[list[int]]:
    """Batches of example indices with similar lengths, to cut padding; deterministic given seed.

    Indices are (optionally) shuffled, cut into mega-chunks of `mega_chunk * batch_size`, sorted by
    length (longest first) inside each chunk and split into batches; then the batch order is
    shuffled. Sorting only within chunks keeps randomness across the epoch while neighbours in a
    batch still have similar lengths. With shuffle=False the order is reproducible without a seed
    effect: chunks in dataset order, batches in chunk order. Every index appears exactly once; the
    last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    chunk_size = mega_chunk * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk_size):
        chunk = sorted(order[start : start + chunk_size], key=lambda i: -lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches
