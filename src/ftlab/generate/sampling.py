"""Token selection for `HFEngine` (`ftlab.generate.hf`): greedy or sampled, per-row seeds, raw log-probs.

Each (prompt, sample) row samples with its own `torch.Generator`, seeded by `row_seed` from the call's
seed, the prompt's tokens and the sample index, so a prompt's samples do not depend on the batch.
Internal to `ftlab.generate`, except `LogitsHook`, the type of `HFEngine.logits_processor`.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch

from ftlab.generate.base import GenerationConfig
from ftlab.generate.batch import Row

# (logits [rows, vocab], prompt index of each row, tokens each row generated so far) -> the scores to pick
# from (e.g. -inf where a token is not allowed). It must not change `logits` in place: log-probs stay raw.
LogitsHook = Callable[[torch.Tensor, list[int], list[list[int]]], torch.Tensor]


def pick_tokens(logits: torch.Tensor, rows: list[Row], cfg: GenerationConfig,
                hook: LogitsHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row, and its raw log-probability (see `chosen_logprobs`).

    Greedy argmax (as `generate(do_sample=False)`), or temperature/top-p sampling, each row drawing
    with its own generator (on the logits' device) so its draws do not depend on the other rows.
    A `hook` (constrained decoding) changes what is picked from, never the reported log-probs."""
    scores = logits if hook is None else hook(logits, [r.request for r in rows], [r.tokens for r in rows])
    if cfg.greedy:
        tokens = scores.argmax(dim=-1)
    else:
        scores = scores.float() / cfg.temperature
        if cfg.top_p < 1.0:
            scores = top_p_filter(scores, cfg.top_p)
        probs = scores.softmax(dim=-1)
        tokens = torch.cat([torch.multinomial(probs[i], 1, generator=r.generator) for i, r in enumerate(rows)])
    return tokens, chosen_logprobs(logits, tokens)


def chosen_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row, in fp32, from the raw logits (before temperature / top-p):
    the number a teacher-forced forward pass gives, independent of how the token was picked."""
    logits = logits.float()
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering, same rule as transformers' TopPLogitsWarper (keeps at least one token)."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def row_seed(seed: int, prompt: list[int], repeat: int, sample: int) -> int:
    """A seed per (prompt tokens, sample): a prompt's samples do not depend on batch size, order or the
    other prompts of the call (the same example gets the same samples in any subset of a dataset).
    `repeat` counts earlier copies of the same prompt in the call, so that copies differ."""
    key = repr((seed, repeat, sample, prompt)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)


def repeat_counts(prompts: list[list[int]]) -> list[int]:
    """Per prompt, how many identical prompts come before it in the call (`row_seed`'s `repeat`)."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for ids in prompts:
        key = tuple(ids)
        out.append(seen.get(key, 0))
        seen[key] = out[-1] + 1
    return out


def request_seeds(seed: int, prompts: list[list[int]], n: int) -> list[list[int]]:
    """`row_seed` of every (prompt, sample) of a call: the one seeding rule of both engines."""
    return [[row_seed(seed, ids, repeat, j) for j in range(n)] for ids, repeat in zip(prompts, repeat_counts(prompts))]
