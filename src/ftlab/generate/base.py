"""The engine-independent half of generation: the config, the `Engine` protocol, stop-string cutting.

Evaluation, data filtering and self-improvement loops call `engine.generate(prompts, cfg)` and never
care whether the HF engine or vLLM runs underneath; both share these definitions so their outputs
are post-processed identically.
"""
from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

from ftlab.errors import UserError

ResultCallback = Callable[[int, list[str]], None]


@dataclass
class Completion:
    """One completion: its text (what `generate` returns) and the tokens behind it.

    `token_ids` are the new tokens as decoded, the stop token (EOS / end of turn) included when one
    was generated. Unlike `text` they are not cut at a stop string: a stop string may end inside a
    token, and stop strings are checked every few tokens, so a few tokens may follow one.
    `logprobs[i]` is the log-probability of `token_ids[i]` under the model's raw next-token
    distribution: the log-softmax of the logits before temperature and top-p. It is what a
    teacher-forced forward pass over prompt + completion gives, whatever the sampling settings (the
    quantity RL objectives and sequence scores need); None where an engine cannot provide it.
    `finish_reason`: "stop" (a stop token or stop string) or "length" (max_new_tokens reached).
    """

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str


CompletionCallback = Callable[[int, list[Completion]], None]


_DIGITS_RE = re.compile(r"\d+")


@dataclass
class GenerationConfig:
    """How to generate. `temperature == 0` means greedy decoding (top_p is then ignored)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1                      # completions per prompt
    stop: list[str] = field(default_factory=list)  # cut the output at the first of these (excluded)
    batch_size: int = 64            # row slots decoded at the same time (more rows per step: more tokens per weight read)
    seed: int = 0
    max_prompt_tokens: int | None = None  # longer prompts lose their beginning (left truncation)
    # a row stops once one of its lines (digits ignored, blank lines not counted) has occurred this many times: a
    # loop ("Step 7: The claim is false.") that would otherwise run to max_new_tokens; 0 = never (HF engine only)
    stop_line_repeats: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fail with one readable line instead of a tensor error deep inside the decoding loop."""
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise UserError(f"n (samples per prompt) must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise UserError(f"max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens}")
        if self.stop_line_repeats < 0 or self.stop_line_repeats == 1:
            raise UserError(f"stop_line_repeats must be 0 (off) or >= 2, got {self.stop_line_repeats}")
        if isinstance(self.stop, str):  # a bare string would be split into characters
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@runtime_checkable
class Engine(Protocol):
    """Anything that turns prompts into completions.

    `generate` returns, per prompt and in the order given, `cfg.n` completions: the decoded new text
    only, cut before the first stop string. `generate_full` returns `Completion`s instead (text,
    token ids, log-probs). `on_result(index, completions)` is called as soon as a prompt is finished
    (finishing order, not input order) so callers can stream results to disk. Sampling is seeded per (prompt,
    sample) row by `sampling.request_seeds`, in both engines.
    """

    stats: dict

    def generate(
        self,
        prompts: list[str],
        cfg: GenerationConfig,
        on_result: ResultCallback | None = None,
        progress: bool = True,
    ) -> list[list[str]]: ...

    def generate_full(
        self,
        prompts: list[str],
        cfg: GenerationConfig,
        on_result: CompletionCallback | None = None,
        progress: bool = True,
    ) -> list[list[Completion]]: ...

    def close(self) -> None:
        """Give back what the engine holds (vLLM: its workers, weights and KV cache), so that a training stage
        that follows in the same process has the memory. The engine is unusable afterwards."""


def repeats_a_line(text: str, times: int) -> bool:
    """Whether some complete, non-blank line of `text`, with its digits ignored, occurs `times` times or more: the
    mark of a decoding loop. Numbers are ignored so that numbered loops ("Step 6: ...", "Step 7: ...") count as one
    line; the line still being written is not counted."""
    counts: dict[str, int] = {}
    for line in text.split("\n")[:-1]:
        key = _DIGITS_RE.sub("#", line.strip())
        if key:
            counts[key] = counts.get(key, 0) + 1
            if counts[key] >= times:
                return True
    return False


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text before the earliest stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
