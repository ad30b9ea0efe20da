"""Shared scoring helpers: every task extracts answers with a strict and a flexible rule.

`strict` only accepts an explicit final-answer form ("The answer is X", "#### N", ...), so it measures
whether the model follows the requested format; `flexible` takes the last answer-looking token, so it
measures whether the model knows the answer. Reporting both keeps format failures visible instead of
silently mixing them into accuracy.
"""
from __future__ import annotations

from typing import Any, Sequence

PRIMARY_RULE = "flexible"


def as_text(output: Any) -> str:
    """Model outputs are normally strings; None or other junk is scored as an empty (unparsed) answer."""
    return output if isinstance(output, str) else ""


def two_rule_score(strict: str | None, flexible: str | None, gold: str) -> dict[str, Any]:
    """Per-example score from both extractions; `extracted`/`correct` follow the primary (flexible) rule."""
    return {
        "extracted": flexible,
        "extracted_strict": strict,
        "correct": flexible is not None and flexible == gold,
        "correct_strict": strict is not None and strict == gold,
    }


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def two_rule_metrics(scores: Sequence[dict[str, Any]], extraction_rule: str) -> dict[str, Any]:
    """Accuracy and parse rate under both rules, plus the rule description (always in the metrics).

    Rows only need 'extracted' and 'correct' (the base contract); missing strict fields count as unparsed.
    """
    return {
        "n": len(scores),
        "accuracy": _rate([bool(s["correct"]) for s in scores]),
        "accuracy_strict": _rate([bool(s.get("correct_strict")) for s in scores]),
        "accuracy_flexible": _rate([bool(s["correct"]) for s in scores]),
        "parse_rate": _rate([s.get("extracted") is not None for s in scores]),
        "parse_rate_strict": _rate([s.get("extracted_strict") is not None for s in scores]),
        "primary_rule": PRIMARY_RULE,
        "extraction_rule": extraction_rule,
    }


def paired(scores: Sequence[dict[str, Any]], examples: Sequence[Any]) -> list[tuple[dict[str, Any], Any]]:
    """(score, example) pairs; matched by 'id' when the lists differ in length (e.g. a partial run)."""
    if len(scores) == len(examples):
        return list(zip(scores, examples))
    by_id = {ex.id: ex for ex in examples}
    if all(s.get("id") in by_id for s in scores):
        return [(s, by_id[s["id"]]) for s in scores]
    raise ValueError(f"{len(scores)} scores for {len(examples)} examples and no matching 'id' fields")
