"""Task training data with recorded model responses, and `data.filter_correct` (seed 002).

A task builds its SFT target from the gold answer ("... #### 18", "The answer is True."), so scoring
that target always says correct and filtering on it keeps everything. What a researcher filters is a
set of *model-written* responses (reasoning traces) to the dataset's questions. Such files carry the
task's usual fields (which give the prompt and the gold answer) plus a `response` field:

* when the records have a `response`, it is the supervised target (filtered or not, so a filtered
  run and its unfiltered baseline train on the same kind of text);
* `data.filter_correct: true` keeps the examples whose response the task's checker scores correct
  against the gold (primary rule: strict, else flexible) and logs the kept count and retention rate;
  without responses it refuses, since it could remove nothing. Only the training split is filtered
  (`ftlab.data.sources.load_conversations`).

`ftlab sample` writes such files from a model (`ftlab.data.traces`); `ftlab filter` applies the same
checker ahead of training and writes the kept rows, their retention rate and `checker_rule` beside them.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ftlab.data.jsonl import text_field
from ftlab.errors import UserError

log = logging.getLogger("ftlab")

RESPONSE_FIELD = "response"


def training_examples(task: Any, source: str, split: str | None, limit: int | None,
                      filter_correct: bool = False) -> list:
    """The task's examples of `source`; targets are the records' responses when they have them, and
    with `filter_correct` only the examples whose response is correct remain."""
    located = task.load_records(source, split, limit)
    examples = task.examples_from(located)
    if any(RESPONSE_FIELD in record for _, record in located):
        examples = with_responses(examples, located)
    elif filter_correct:
        raise UserError(f"{source}: data.filter_correct needs model responses to check, in a {RESPONSE_FIELD!r} "
                        f"field; {task.name} targets are built from the gold answers and always score "
                        "correct, so the filter would remove nothing")
    return keep_correct(task, examples, source) if filter_correct else examples


def with_responses(examples: list, located: list[tuple[str, dict]]) -> list:
    """Each example with its record's response as the target; every record must have one (a file that
    mixes traces and gold targets would train on both without saying so)."""
    out = []
    for ex, (where, record) in zip(examples, located):
        if RESPONSE_FIELD not in record:
            raise UserError(f"{where}: missing field {RESPONSE_FIELD!r} (other records have one; "
                            "give every record a response, or none)")
        out.append(dataclasses.replace(ex, target=text_field(record, RESPONSE_FIELD, where)))
    return out


def keep_correct(task: Any, examples: list, source: str) -> list:
    """The examples whose target (a recorded response) the task scores correct; logs the retention rate."""
    kept = [ex for ex in examples if task.score(ex.target, ex)["correct"]]
    log.info("data.filter_correct: %s: kept %d of %d examples (retention %.1f%%) whose response the %s "
             "checker scores correct", source, len(kept), len(examples),
             100 * len(kept) / len(examples) if examples else 0.0, task.name)
    if not kept:
        raise UserError(f"{source}: data.filter_correct kept no example (0 of {len(examples)} responses "
                        "are correct)")
    return kept


def checker_rule(task: Any, scores: list[dict], examples: list) -> dict[str, Any]:
    """What "correct" means for `task`, as its metrics state it: the primary rule (strict, else flexible) and
    the extraction rule's text."""
    metrics = task.aggregate(scores, examples)
    return {"task": task.name, "primary_rule": metrics.get("primary_rule"),
            "extraction_rule": metrics.get("extraction_rule")}
