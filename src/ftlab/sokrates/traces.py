"""Sampled traces as records, where their steps sit in the text and in the tokens.

A trace record (one line of `traces.jsonl`) holds what was generated and what the verifier said:
    {problem, index, sample, text, token_ids, logprobs, finish_reason,
     step_valid, reasons, verdict, answer_correct, fully_valid, errors}
`index` is the problem's position in the loop's problem list (the order records are written in).

`step_spans` finds each step of `parse_steps` in the raw text (pairs splice traces at step boundaries;
the option head reads the hidden state where an Action line ends); `token_ends` maps characters to
tokens; `answer_confidence` is the probability the model gave the tokens of its stated verdict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ftlab.sokrates.options import _ACTION_RE, _THOUGHT_RE, parse_steps
from ftlab.sokrates.verifier import _VERDICT_RE, TraceReport


def trace_record(problem_id: str, index: int, sample: int, completion: Any, report: TraceReport) -> dict[str, Any]:
    return {"problem": problem_id, "index": index, "sample": sample, "text": completion.text,
            "token_ids": list(completion.token_ids),
            "logprobs": [round(x, 6) for x in completion.logprobs] if completion.logprobs is not None else None,
            "finish_reason": completion.finish_reason, **report.to_dict()}


@dataclass
class StepSpan:
    start: int              # first character of the step (its Thought line, or its Action line)
    end: int                # end of its Action line (exclusive, before the newline); of the thought without one
    action_end: int | None  # end of the Action line; None for a thought that has no Action line


def step_spans(text: str) -> list[StepSpan]:
    """One span per step of `parse_steps(text)`, in order, read with the same line rules."""
    spans: list[StepSpan] = []
    open_start, open_end, pos = None, None, 0
    for line in str(text).splitlines(keepends=True):
        body = line.rstrip("\r\n")
        start, end, pos = pos, pos + len(body), pos + len(line)
        if _THOUGHT_RE.match(body):
            if open_start is not None:
                spans.append(StepSpan(open_start, open_end, None))
            open_start, open_end = start, end
        elif _ACTION_RE.match(body):
            spans.append(StepSpan(start if open_start is None else open_start, end, end))
            open_start = None
        elif open_start is not None and body.strip():
            open_end = end
    if open_start is not None:
        spans.append(StepSpan(open_start, open_end, None))
    return spans


def token_ends(tokenizer: Any, ids: list[int]) -> list[int]:
    """Character offset where each token's text ends in `decode(ids)`. Pieces decoded one by one add up to
    the whole for byte-level BPE; where they do not (a character split across tokens), prefixes are decoded."""
    pieces = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    if "".join(pieces) != whole:
        return [len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    ends, total = [], 0
    for p in pieces:
        total += len(p)
        ends.append(total)
    return ends


def token_at(ends: list[int], char: int) -> int | None:
    """The index of the token whose text covers character `char - 1` (the token that ends at or after it)."""
    for k, e in enumerate(ends):
        if e >= char:
            return k
    return None


def answer_confidence(record: dict[str, Any], tokenizer: Any) -> float | None:
    """exp(sum of the log-probs of the tokens spelling the stated verdict word), None without a verdict
    (or without log-probs): the model's own probability for the answer it gave."""
    if record.get("verdict") is None or not record.get("logprobs"):
        return None
    text, ids = record["text"], record["token_ids"]
    found = list(_VERDICT_RE.finditer(text))
    if not found:
        return None
    lo, hi = found[-1].span(1)
    ends = token_ends(tokenizer, ids)
    first, last = token_at(ends, lo + 1), token_at(ends, hi)
    if first is None or last is None:
        return None
    return math.exp(sum(record["logprobs"][first:last + 1]))


def actions(text: str) -> list[tuple[str, tuple[int, ...]] | None]:
    """Per step, (option, args) when its Action parsed, else None."""
    return [(s.action.option, s.action.args) if s.action else None for s in parse_steps(text)]
