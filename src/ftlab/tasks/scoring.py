"""Shared scoring helpers: every task extracts answers with a strict and a flexible rule.

`strict` only accepts an explicit final-answer form ("The answer is X", "#### N", ...), so it measures
whether the model follows the requested format; `flexible` takes the last answer-looking token, so it
measures whether the model knows the answer. Reporting both keeps format failures visible instead of
silently mixing them into accuracy.

The primary answer of a row (`extracted`, `correct`, `accuracy`) is the strict one when the strict rule
found an answer, else the flexible one: an explicit "The answer is True." must win over a later stray
"false" in an afterthought, while outputs that never use the requested form still get read. Every
accuracy comes with a percentile-bootstrap 95% interval over rows (`bootstrap_ci`).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

PRIMARY_RULE = "strict, else flexible"
# Which extraction each reported metric uses (written into metrics.json next to the rule text).
METRIC_RULES = {
    "accuracy": PRIMARY_RULE, "parse_rate": PRIMARY_RULE,
    "accuracy_strict": "strict", "parse_rate_strict": "strict",
    "accuracy_flexible": "flexible", "parse_rate_flexible": "flexible",
}
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def as_text(output: Any) -> str:
    """Model outputs are normally strings; None or other junk is scored as an empty (unparsed) answer."""
    return output if isinstance(output, str) else ""


def primary_answer(strict: Any, flexible: Any) -> Any:
    """The row's primary answer: the strict extraction when there is one, else the flexible one."""
    return strict if strict is not None else flexible


def two_rule_score(strict: str | None, flexible: str | None, gold: str) -> dict[str, Any]:
    """Per-example score from both extractions; `extracted`/`correct` follow the primary rule."""
    primary = primary_answer(strict, flexible)
    return {
        "extracted": primary,
        "extracted_strict": strict,
        "extracted_flexible": flexible,
        "correct": primary is not None and primary == gold,
        "correct_strict": strict is not None and strict == gold,
        "correct_flexible": flexible is not None and flexible == gold,
    }


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def bootstrap_ci(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> list[float] | None:
    """Percentile-bootstrap interval of the mean of `values` (rows resampled with replacement); None if empty.

    A resample's mean depends only on how often each distinct value is drawn, so we draw those counts
    from a multinomial instead of indexing rows: the same distribution, but memory and time scale with
    the number of distinct values (2 for 0/1 correctness, 3 for paired differences), not with n.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None
    distinct, counts = np.unique(x, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(x.size, counts / x.size, size=resamples)
    means = draws @ distinct / x.size
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return [float(lo), float(hi)]


def majority_class(golds: Sequence[str]) -> tuple[str | None, float]:
    """(most frequent gold label, its share): the accuracy of always answering that label.

    Ties go to the alphabetically first label so the report is reproducible; empty input -> (None, nan).
    """
    counts = Counter(golds)
    if not counts:
        return None, float("nan")
    label = max(sorted(counts), key=lambda k: counts[k])
    return label, counts[label] / len(golds)


def two_rule_metrics(scores: Sequence[dict[str, Any]], extraction_rule: str) -> dict[str, Any]:
    """Accuracy and parse rate under the primary, strict and flexible rules, each accuracy with a
    bootstrap 95% interval, plus the rule description (always in the metrics).

    Rows only need 'extracted' and 'correct' (the base contract); missing strict/flexible fields count as
    unparsed and wrong.
    """
    metrics: dict[str, Any] = {"n": len(scores)}
    for suffix, correct_key, extracted_key in (("", "correct", "extracted"),
                                               ("_strict", "correct_strict", "extracted_strict"),
                                               ("_flexible", "correct_flexible", "extracted_flexible")):
        hits = [bool(s.get(correct_key)) for s in scores]
        metrics[f"accuracy{suffix}"] = _rate(hits)
        metrics[f"accuracy{suffix}_ci95"] = bootstrap_ci(hits)
        metrics[f"parse_rate{suffix}"] = _rate([s.get(extracted_key) is not None for s in scores])
    metrics.update({"primary_rule": PRIMARY_RULE, "metric_rules": dict(METRIC_RULES),
                    "extraction_rule": extraction_rule})
    return metrics


def majority_metrics(scores: Sequence[dict[str, Any]], examples: Sequence[Any]) -> dict[str, Any]:
    """Majority-class baseline of a classification task, from the gold labels of the evaluated rows."""
    label, rate = majority_class([ex.gold for _, ex in paired(scores, examples)])
    return {"majority_class": label, "majority_class_rate": rate}


def paired(scores: Sequence[dict[str, Any]], examples: Sequence[Any]) -> list[tuple[dict[str, Any], Any]]:
    """(score, example) pairs; matched by 'id' when the lists differ in length (e.g. a partial run)."""
    if len(scores) == len(examples):
        return list(zip(scores, examples))
    by_id = {ex.id: ex for ex in examples}
    if all(s.get("id") in by_id for s in scores):
        return [(s, by_id[s["id"]]) for s in scores]
    raise ValueError(f"{len(scores)} scores for {len(examples)} examples and no matching 'id' fields")
