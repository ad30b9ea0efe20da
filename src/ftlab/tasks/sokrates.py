"""SOKRATES option traces as a task: numbered-premise prompts, optionized proofs as targets, the step verifier
as the checker.

`data.task: sokrates` (with `task_options: {source: prontoqa}` or `{source: folio}`) reads whatever the
source task reads (files, hub ids, PrOntoQA's `generate:N`), and turns each example into

    question = render_problem(example)      (numbered premises, the claim, the step format)
    target   = optionized_target(example)   (every Thought/Action step, ending in CONCLUDE)

so SFT supervises the whole trace, not the verdict alone (the seed's first SFT trained on CONCLUDE-only
text). `backward_plan: true` (PrOntoQA) renders with the conclusion index and starts each proof with its
search back from the claim (`render_problem(..., index=True)`, `optionized_target(..., backward_plan=True)`);
`compact: true` with it shows each premise once, grouped by what it concludes, with shorter steps (the quickstart's
layout: about half the tokens).
Scoring reads the answer with the source task's rules and runs `verify_trace` for the steps. Problems that have no
optionized proof (unreadable premises, FOLIO formulas that do not give the label) are left out of the
data with one warning that counts them and names the first; they are never silently dropped.
"""
from __future__ import annotations

import logging
from typing import Any

from ftlab.errors import UserError
from ftlab.tasks.base import Example, Task

log = logging.getLogger("ftlab")
SOURCES = ("prontoqa", "folio")


class SokratesTask(Task):
    name = "sokrates"

    def __init__(self, source: str = "prontoqa", backward_plan: bool = False, compact: bool = False,
                 **source_options: Any):
        from ftlab.tasks import get_task

        if source not in SOURCES:
            raise UserError(f"sokrates: source={source!r} is not one of {', '.join(SOURCES)}")
        if backward_plan not in (True, False):
            raise UserError(f"sokrates: backward_plan={backward_plan!r} must be true or false")
        if backward_plan and source != "prontoqa":
            raise UserError("sokrates: backward_plan applies to PrOntoQA problems only (source: prontoqa)")
        if compact not in (True, False):
            raise UserError(f"sokrates: compact={compact!r} must be true or false")
        if compact and not backward_plan:
            raise UserError("sokrates: compact is a layout of the backward plan; set backward_plan: true with it")
        self.source, self.backward_plan, self.compact = source, backward_plan, compact
        self.base = get_task(source, **source_options)
        self.required_fields = self.base.required_fields

    def load_records(self, source: str, split: str | None = None, limit: int | None = None) -> list[tuple[str, dict]]:
        return self.base.load_records(source, split, limit)

    def to_example(self, record: dict, index: int) -> Example:
        from ftlab.sokrates import (
            optionized_target,
            problem_from_example,
            render_problem,
        )

        ex = self.base.to_example(record, index)
        problem = problem_from_example(ex, self.source)
        # OptionizeError / LogicParseError: no proof, see examples_from
        target = optionized_target(problem, self.backward_plan, self.compact)
        return Example(id=ex.id, question=render_problem(problem, index=self.backward_plan, compact=self.compact), target=target,
                       gold=problem.gold,
                       meta={**{k: v for k, v in ex.meta.items() if isinstance(v, (int, str, float))},
                             "problem": problem})

    def examples_from(self, located: list[tuple[str, dict]]) -> list[Example]:
        examples, skipped = [], []
        for i, (where, record) in enumerate(located):
            try:
                examples.append(self.to_example(record, i))
            except (KeyError, ValueError, TypeError) as e:
                skipped.append(f"{where}: {e}")
        if skipped:
            log.warning("sokrates: %d of %d problems have no optionized proof and are left out (first: %s)",
                        len(skipped), len(located), skipped[0])
        if not examples:
            raise UserError(f"sokrates: none of the {len(located)} problems has an optionized proof "
                            f"(first: {skipped[0]})")
        return examples

    def instruction(self, question: str) -> str:
        return question  # render_problem already states the format

    # Answers are read as the source task reads them (strict "answer is X", else the last label word: both rules
    # reported); the steps are checked by the verifier when the example carries its problem.
    def extract_answer(self, text: str) -> str | None:
        return self.base.extract_answer(text)

    def score(self, output: str, example: Example) -> dict[str, Any]:
        from ftlab.sokrates import verify_trace

        out = self.base.score(output, example)
        problem = example.meta.get("problem")
        if problem is not None:
            report = verify_trace(problem, "" if output is None else str(output))
            out.update(fully_valid=report.fully_valid, steps=len(report.step_valid), steps_valid=sum(report.step_valid))
        return out

    def aggregate(self, scores: list[dict[str, Any]], examples: list[Example]) -> dict[str, Any]:
        metrics = self.base.aggregate(scores, examples)
        steps = sum(s.get("steps", 0) for s in scores)
        metrics["step_validity"] = sum(s.get("steps_valid", 0) for s in scores) / steps if steps else 0.0
        metrics["fully_valid"] = sum(bool(s.get("fully_valid")) for s in scores) / len(scores) if scores else 0.0
        return metrics
