"""The fallback path of `HFEngine` (`ftlab.generate.hf`): `model.generate` on length-sorted batches.

Taken for models whose cache the slot cache cannot mimic (sliding-window or linear-attention layers:
`batch.is_plain_dynamic_cache`). Greedy tokens are `model.generate`'s; log-probs come from one
teacher-forced forward pass per finished row (`score`). Sampling is seeded differently from the slot
path: see `generate_fallback`. Internal to `ftlab.generate`.
"""
from __future__ import annotations

from typing import Any

import torch

from ftlab.errors import UserError
from ftlab.generate.batch import Row, Run
from ftlab.generate.sampling import LogitsHook, chosen_logprobs
from ftlab.losses import accepts_logits_to_keep


def generate_fallback(model: Any, tokenizer: Any, encoded: list[list[int]], run: Run, *, pad_id: int,
                      eos_ids: set[int], logits_processor: LogitsHook | None) -> None:
    """`model.generate` on length-sorted batches (`batch_size // n` prompts of n samples each, or
    `batch_size` prompts greedy); delivers each prompt's completions through `run.deliver`.

    Seeding differs from the slot path. There, every (prompt, sample) row draws from its own generator
    seeded by `row_seed(cfg.seed, prompt tokens, repeat, sample)`, so a prompt's samples depend on nothing
    else in the call. Here `model.generate` draws the tokens of all rows of a batch from torch's global
    RNG, seeded once per batch with `cfg.seed + b`, where b is the position of the batch's first prompt in
    the length-sorted order (inside `torch.random.fork_rng`, so the caller's CPU and GPU RNG states are
    left as they were). A prompt's samples therefore depend on the batch size, on which prompts share its
    batch and its row among them (rows draw in turn at every step), and so on every other prompt of the
    call (they decide the sorting); the same prompts with the same seed and batch size give the same
    samples. Greedy decoding draws nothing and is unaffected.
    """
    cfg, device = run.cfg, run.device
    if cfg.stop_line_repeats:
        raise UserError("stop_line_repeats needs the slot engine; this model is generated with model.generate")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    per_batch = max(1, cfg.batch_size // (1 if cfg.greedy else cfg.n))
    for b in range(0, len(order), per_batch):
        group = order[b : b + per_batch]
        width = max(len(encoded[i]) for i in group)
        ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in group], device=device)
        starts = torch.tensor([width - len(encoded[i]) for i in group], device=device)
        mask = torch.arange(width, device=device)[None, :] >= starts[:, None]
        kwargs: dict[str, Any] = {"do_sample": False}
        if not cfg.greedy:
            kwargs = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p,
                      "num_return_sequences": cfg.n}
        if cfg.stop:
            kwargs.update(stop_strings=cfg.stop, tokenizer=tokenizer)
        if logits_processor is not None:  # rows are group x samples, in that order
            from transformers import LogitsProcessorList

            requests = [i for i in group for _ in range(1 if cfg.greedy else cfg.n)]
            kwargs["logits_processor"] = LogitsProcessorList([HookProcessor(logits_processor, requests, width)])
        # seed sampling without touching the caller's RNG (the CPU's, and the model's GPU if any)
        gpus = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):
            torch.manual_seed(cfg.seed + b)
            out = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=pad_id, eos_token_id=sorted(eos_ids) or None, **kwargs)
        new = out[:, width:].tolist()
        n_out = 1 if cfg.greedy else cfg.n
        for k, request in enumerate(group):
            rows = []
            for j in range(n_out):
                tokens = until_eos(new[k * n_out + j], eos_ids)
                ran_out = len(tokens) >= cfg.max_new_tokens and tokens[-1] not in eos_ids
                rows.append(Row(request=request, sample=j, first_col=0, generator=None, tokens=tokens,
                                logprobs=score(model, encoded[request], tokens, device),
                                finish_reason="length" if ran_out else "stop"))
            run.deliver(request, rows * (cfg.n if n_out == 1 else 1))


def score(model: Any, prompt: list[int], tokens: list[int], device: torch.device) -> list[float]:
    """Raw log-probs of `tokens` after `prompt`, from one teacher-forced forward pass."""
    if not tokens:
        return []
    ids = torch.tensor([prompt + tokens], device=device)
    keep = {"logits_to_keep": len(tokens) + 1} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, **keep).logits[0, -len(tokens) - 1 : -1]
    return chosen_logprobs(logits, ids[0, len(prompt):]).tolist()


class HookProcessor:
    """A `LogitsHook` as a transformers logits processor, for the fallback path through `model.generate`."""

    def __init__(self, hook: LogitsHook, requests: list[int], width: int):
        self.hook, self.requests, self.width = hook, requests, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.hook(scores, self.requests, input_ids[:, self.width:].tolist())


def until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Cut `generate`'s padded output after the first EOS (kept, as in the main path)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens
