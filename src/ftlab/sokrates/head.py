"""The option head: a linear layer on the policy's last hidden state where an Action line ends, predicting
whether the verifier will call that step valid (the seed's "option head"; trained here, not used to decode).

Features: for every step that has an Action line, the final-layer hidden state at the last token of that
line (the position that has read the whole proposed step). Labels: the verifier's step_valid. The head is
logistic regression on standardized features (full-batch Adam, L2), trained on the traces of most
problems and calibrated on the held-out rest (a problem's traces never straddle the split).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from ftlab.sokrates.traces import step_spans, token_at, token_ends


def problem_hash(problem_id: str) -> float:
    """A number in [0, 1) fixed by the problem id (the same across runs and ranks)."""
    return int.from_bytes(hashlib.blake2b(str(problem_id).encode(), digest_size=4).digest(), "little") / 2**32


def held_out(problem_id: str, share: float) -> bool:
    """Whether a problem's steps calibrate the head (about `share` of the problems) rather than train it."""
    return problem_hash(problem_id) < share


def action_positions(record: dict[str, Any], tokenizer: Any) -> list[tuple[int, int]]:
    """(step index, token index) of every step whose Action line ends inside the generated tokens."""
    ends = token_ends(tokenizer, record["token_ids"])
    out = []
    for k, span in enumerate(step_spans(record["text"])):
        if span.action_end is not None and k < len(record["step_valid"]):
            t = token_at(ends, span.action_end)
            if t is not None:
                out.append((k, t))
    return out


@torch.no_grad()
def collect_features(model: Any, tokenizer: Any, prompt_ids: dict[str, list[int]],
                     records: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(hidden states [N, H], labels [N], problem id of each row) over the records' Action lines.

    The samples of one problem share its prompt (about two thirds of each sequence): the prompt runs once and
    its keys and values are repeated for the samples' continuations, run together as one batch."""
    from ftlab.losses import accepts_logits_to_keep, cache_kwarg

    device = next(model.parameters()).device
    only_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}  # the logits are not used
    cache_arg = cache_kwarg(model)  # `cache` or, in older transformers, `past_key_values`
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    by_problem: dict[str, list[tuple[dict[str, Any], list[tuple[int, int]]]]] = {}
    for r in records:
        if positions := action_positions(r, tokenizer):
            by_problem.setdefault(r["problem"], []).append((r, positions))
    feats, labels, owners = [], [], []
    for problem, items in by_problem.items():
        prompt = torch.tensor([prompt_ids[problem]], device=device)
        cache = getattr(model(input_ids=prompt, use_cache=True, **only_last), cache_arg)
        cache.batch_repeat_interleave(len(items))
        seqs = [list(r["token_ids"]) for r, _ in items]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * (prompt.shape[1] + len(s)) + [0] * (width - len(s)) for s in seqs], device=device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **{cache_arg: cache},
                       **only_last).hidden_states[-1].float()
        for row, (r, positions) in enumerate(items):
            for step, t in positions:
                feats.append(hidden[row, t].cpu())
                labels.append(float(r["step_valid"][step]))
                owners.append(problem)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0), []
    return torch.stack(feats), torch.tensor(labels), owners


def train_head(x: torch.Tensor, y: torch.Tensor, epochs: int = 200, lr: float = 0.05, weight_decay: float = 1e-3,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Logistic regression on standardized features; returns the head's tensors (CPU, float32)."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
    z = (x - mean) / std
    w = (torch.randn(x.shape[1], generator=gen) * 0.01).requires_grad_()
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        opt.step()
    return {"weight": w.detach(), "bias": b.detach(), "mean": mean, "std": std}


def predict(head: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """P(step valid) for each row of hidden states."""
    return torch.sigmoid(((x - head["mean"]) / head["std"]) @ head["weight"] + head["bias"])
