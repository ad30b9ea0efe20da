"""The task interface: one object per dataset owns loading, prompting, answer extraction and scoring.

The same task object serves evaluation, SFT data preparation/filtering and verification in
self-improvement loops, so there is exactly one answer checker per dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from ftlab.data.jsonl import read_jsonl
from ftlab.errors import UserError


@dataclass
class Example:
    """One normalized record of a dataset."""

    id: str
    question: str            # the task body shown to the model (without shots or template)
    target: str              # supervised response text for SFT (reasoning + final answer), no EOS
    gold: str                # normalized gold answer, comparable with extract_answer()
    meta: dict[str, Any] = field(default_factory=dict)  # task-specific fields (hops, study_id, FOL, ...)
    # More (user message, target) pairs on the same context, asked after this one in the same training
    # conversation (e.g. other claims about one PrOntoQA world); evaluation asks only `question`.
    followups: list[tuple[str, str]] = field(default_factory=list)


class Task:
    """Base class. Subclasses set `name`, `required_fields` and implement the four hooks below."""

    name: str = ""
    required_fields: tuple[str, ...] = ()
    system_prompt: str | None = None
    # Short worked examples for one-/few-shot prompting: list of (question, target) pairs.
    shot_examples: Sequence[tuple[str, str]] = ()

    # -- hooks ---------------------------------------------------------------------------------
    def to_example(self, record: dict, index: int) -> Example:
        raise NotImplementedError

    def instruction(self, question: str) -> str:
        """The user message for one question (the task's prompt format)."""
        return question

    def extract_answer(self, text: str) -> str | None:
        raise NotImplementedError

    def score(self, output: str, example: Example) -> dict[str, Any]:
        """Score one model output: at least {'extracted', 'correct'}; None extracted = unparsed."""
        pred = self.extract_answer(output)
        return {"extracted": pred, "correct": pred is not None and pred == example.gold}

    def aggregate(self, scores: list[dict[str, Any]], examples: list[Example]) -> dict[str, Any]:
        """Dataset-level metrics from per-example scores."""
        n = len(scores)
        return {
            "n": n,
            "accuracy": sum(bool(s["correct"]) for s in scores) / n if n else float("nan"),
            "parse_rate": sum(s["extracted"] is not None for s in scores) / n if n else float("nan"),
        }

    def rejected_response(self, example: Example) -> str:
        """A wrong response to `example`, for preference pairs the task builds itself (chosen: its target)."""
        raise UserError(f"task {self.name!r} cannot build preference pairs itself; for DPO give preference JSONL "
                        "rows (prompt, chosen, rejected) with data.task: generic")

    # -- shared machinery -------------------------------------------------------------------
    def load(self, source: str, split: str | None = None, limit: int | None = None) -> list[Example]:
        """Load from a local JSONL file, or a Hugging Face dataset (`hf:org/name[:config[:split]]`, see
        `parse_hub_spec`)."""
        return self.examples_from(self.load_records(source, split, limit))

    def load_records(self, source: str, split: str | None = None, limit: int | None = None) -> list[tuple[str, dict]]:
        """(location, raw record) pairs in file order; callers that need fields the Example drops (a
        model `response` to filter on) read them here, then build the examples with `examples_from`."""
        if os.path.exists(source) or source.endswith(".jsonl"):
            records = read_jsonl(source, required=self.required_fields, limit=limit)
            where = source
        else:
            records = load_hub_records(source, split, limit)
            where = str(parse_hub_spec(source, split))
        return [(f"{where}: record {i + 1}", r) for i, r in enumerate(records)]

    def examples_from(self, located: list[tuple[str, dict]]) -> list[Example]:
        """`to_example` on every record; one that cannot be read is a one-line error naming its location."""
        examples = []
        for i, (where, record) in enumerate(located):
            try:
                examples.append(self.to_example(record, i))
            except (KeyError, ValueError, TypeError) as e:
                raise UserError(f"{where}: cannot read as {self.name}: {e}") from None
        return examples

    def messages(self, example: Example, shots: int = 0) -> list[dict[str, str]]:
        """Chat messages: optional system prompt, `shots` worked examples as turns, then the question."""
        msgs: list[dict[str, str]] = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        if shots > len(self.shot_examples):
            raise UserError(f"task {self.name!r} has {len(self.shot_examples)} shot examples; {shots} requested")
        for q, a in list(self.shot_examples)[:shots]:
            msgs += [{"role": "user", "content": self.instruction(q)}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": self.instruction(example.question)})
        return msgs

    def render_prompt(self, example: Example, shots: int = 0, tokenizer: Any = None,
                      chat_template: bool = True) -> str:
        """Prompt text ready for generation; the model's chat template when asked and available."""
        msgs = self.messages(example, shots)
        if chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        # Plain-text format: turns separated by blank lines, answer follows "Answer:".
        parts = [m["content"] for m in msgs if m["role"] == "system"]
        for m in msgs:
            if m["role"] == "user":
                parts.append(f"{m['content']}\nAnswer:")
            elif m["role"] == "assistant":
                parts[-1] += f" {m['content']}"
        return "\n\n".join(parts) + " "


@dataclass(frozen=True)
class HubSpec:
    """A Hugging Face dataset as `datasets.load_dataset(repo, config, split=split)` takes it."""

    repo: str                # "org/name", or a local directory laid out as a hub dataset repository
    config: str | None       # the dataset's configuration ("main", "socratic"), None for the default one
    split: str

    def __str__(self) -> str:
        return f"hf:{self.repo}:{self.config or ''}:{self.split}"


def parse_hub_spec(source: str, split: str | None = None) -> HubSpec:
    """`hf:org/name[:config[:split]]` (the `hf:` prefix is optional): a split named in the source wins over
    `split` (the recipe's split key), which defaults to "test". `hf:openai/gsm8k:socratic:train`,
    `hf:openai/gsm8k:socratic` + split "train" and `hf:openai/gsm8k::train` (default config) all parse."""
    parts = source.removeprefix("hf:").split(":")
    if len(parts) > 3 or not parts[0].strip() or any(p != p.strip() for p in parts):
        raise UserError(f"{source!r}: a hub dataset is 'hf:org/name', 'hf:org/name:config' or "
                        "'hf:org/name:config:split' (config may be empty: 'hf:org/name::split')")
    repo, config, named_split = parts[0], (parts[1] if len(parts) > 1 else ""), (parts[2] if len(parts) > 2 else "")
    return HubSpec(repo, config or None, named_split or split or "test")


def load_hub_records(source: str, split: str | None, limit: int | None) -> list[dict]:
    """The rows of a hub dataset (`parse_hub_spec`) through the real `datasets.load_dataset`; offline, one line
    at once. A local directory in the layout of a hub dataset repository (data files + a README whose `configs`
    name them) loads the same way without the network."""
    spec = parse_hub_spec(source, split)
    if not os.path.isdir(spec.repo):
        from ftlab.hub import require_hub

        require_hub(spec.repo, hint="pass a local JSONL file instead")
    import datasets

    try:
        ds = datasets.load_dataset(spec.repo, spec.config, split=spec.split)
    except (ValueError, FileNotFoundError) as e:  # no such dataset, config or split (datasets names those there are)
        raise UserError(f"{spec}: {' '.join(str(e).split())}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise UserError(f"{spec}: dataset is empty")
    return [dict(r) for r in ds]
