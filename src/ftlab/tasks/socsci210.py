"""SocSci210 (SOCRATES replication, instruction format): predict a participant's integer answer.

Each row: `instruction` (the same in every row), `input` = "Demographics: ...\\n\\nScenario: ... Only
return an integer ...", `output` = "Response: <int>", `study_id`, `condition_num`. Scales differ by
question (Likert 1-7, yes/no codes, dollar amounts up to 99,999), so a raw MAE is dominated by the
dollar questions; the distribution-level metric is the per-question Wasserstein-1 distance between
predicted and human answers, averaged over questions (see data/socsci210/SOURCE.md).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from ftlab.tasks.base import Example, Task
from ftlab.tasks.scoring import as_text, paired

_GOLD_RE = re.compile(r"^\s*Response:\s*(-?\d+)\s*$")
# An integer as people write it ("7", "-2", "12,000", "$1,500"); decimals are read too, then rounded.
_NUM = r"(?:(?<![\w])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUM_RE = re.compile(_NUM)
_STRICT_RE = re.compile(r"Response\s*:\s*\**\s*(" + _NUM + r")", re.IGNORECASE)
EXTRACTION_RULE = (
    "strict: the number after the last 'Response:' (case-insensitive); flexible: the last number "
    "anywhere in the output. '$' and thousands commas are removed and decimals are rounded half up "
    "to an integer. Primary = flexible: accuracy (exact match), MAE, RMSE, Pearson r and Wasserstein "
    "use the flexible value and only parsed samples; unparsed samples count against parse_rate."
)


def _to_int(text: str) -> int:
    value = float(text.replace("$", "").replace(",", ""))
    return int(math.floor(value + 0.5))


def extract_response_strict(text: str) -> int | None:
    matches = _STRICT_RE.findall(as_text(text))
    return _to_int(matches[-1]) if matches else None


def extract_response_flexible(text: str) -> int | None:
    matches = _NUM_RE.findall(as_text(text))
    return _to_int(matches[-1]) if matches else None


def question_key(input_text: str) -> str:
    """The scenario/question part of `input`: everything after the 'Demographics: ...' paragraph."""
    text = input_text.strip()
    if text.startswith("Demographics:") and "\n\n" in text:
        text = text.split("\n\n", 1)[1]
    return text.strip()


def wasserstein_1d(u: Sequence[float], v: Sequence[float]) -> float:
    """W1 between two empirical distributions: the integral of |CDF_u(x) - CDF_v(x)| dx."""
    u_sorted, v_sorted = np.sort(np.asarray(u, dtype=float)), np.sort(np.asarray(v, dtype=float))
    if u_sorted.size == 0 or v_sorted.size == 0:
        raise ValueError("wasserstein_1d needs two non-empty samples")
    points = np.sort(np.concatenate([u_sorted, v_sorted]))
    widths = np.diff(points)  # the CDFs are constant between consecutive sample points
    cdf_u = np.searchsorted(u_sorted, points[:-1], side="right") / u_sorted.size
    cdf_v = np.searchsorted(v_sorted, points[:-1], side="right") / v_sorted.size
    return float(np.sum(np.abs(cdf_u - cdf_v) * widths))


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None when undefined (fewer than 2 points or a constant side)."""
    if len(x) < 2:
        return None
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx, dy = xa - xa.mean(), ya - ya.mean()
    denom = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    return float(np.sum(dx * dy)) / denom if denom > 0 else None


def _value(score: dict[str, Any]) -> int | None:
    """The parsed prediction of a score row ('value', or the 'extracted' string of a minimal row)."""
    if "value" in score:
        return score["value"]
    extracted = score.get("extracted")
    return None if extracted is None else int(extracted)


def _error_metrics(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """MAE, RMSE and Pearson r over (pred, gold) pairs of parsed samples; None when there are none."""
    if not pairs:
        return {"mae": None, "rmse": None, "pearson_r": None}
    errors = [p - g for p, g in pairs]
    return {
        "mae": sum(abs(e) for e in errors) / len(errors),
        "rmse": math.sqrt(sum(e * e for e in errors) / len(errors)),
        "pearson_r": pearson_r([p for p, _ in pairs], [g for _, g in pairs]),
    }


def _wasserstein_by_question(rows: list[tuple[dict, Example]]) -> tuple[float | None, int, int]:
    """(mean W1 over questions, questions used, questions skipped because no prediction parsed).

    A question = (study_id, condition_num, question text); the human distribution uses every gold
    answer of the group, the predicted one only the parsed predictions.
    """
    groups: dict[tuple, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for score, ex in rows:
        preds, golds = groups[(ex.meta["study_id"], ex.meta["condition_num"], ex.meta["question_key"])]
        golds.append(ex.meta["gold_value"])
        if _value(score) is not None:
            preds.append(_value(score))
    distances = [wasserstein_1d(p, g) for p, g in groups.values() if p]
    skipped = sum(1 for p, _ in groups.values() if not p)
    return (sum(distances) / len(distances) if distances else None), len(distances), skipped


def _group_metrics(rows: list[tuple[dict, Example]]) -> dict[str, Any]:
    n = len(rows)
    parsed = [(_value(s), ex.meta["gold_value"]) for s, ex in rows if _value(s) is not None]
    w1, n_questions, skipped = _wasserstein_by_question(rows)
    return {
        "n": n,
        "parse_rate": len(parsed) / n if n else float("nan"),
        **_error_metrics(parsed),
        "wasserstein": w1,
        "n_questions": n_questions,
        "n_questions_unparsed": skipped,
    }


class SocSci210Task(Task):
    """SocSci210: integer response prediction; target 'Response: <int>', gold = the integer as a string."""

    name = "socsci210"
    required_fields = ("input", "output", "study_id", "condition_num")

    def to_example(self, record: dict, index: int) -> Example:
        input_text, output = record["input"], record["output"]
        if not isinstance(input_text, str) or not isinstance(output, str):
            raise ValueError("'input' and 'output' must be strings")
        m = _GOLD_RE.match(output)
        if not m:
            raise ValueError(f"output {output!r} is not 'Response: <integer>'")
        gold = int(m.group(1))
        instruction = record.get("instruction")
        question = f"{instruction.strip()}\n\n{input_text.strip()}" if isinstance(instruction, str) and \
            instruction.strip() else input_text.strip()
        return Example(
            id=str(record.get("id", f"socsci210-{index}")),
            question=question,
            target=f"Response: {gold}",
            gold=str(gold),
            meta={
                "study_id": str(record["study_id"]),
                "condition_num": record["condition_num"],
                "question_key": question_key(input_text),
                "gold_value": gold,
            },
        )

    def extract_answer(self, text: str) -> str | None:
        value = extract_response_flexible(text)
        return None if value is None else str(value)

    def score(self, output: str, example: Example) -> dict[str, Any]:
        strict, flexible = extract_response_strict(output), extract_response_flexible(output)
        gold = example.meta["gold_value"]
        return {
            "extracted": None if flexible is None else str(flexible),
            "extracted_strict": None if strict is None else str(strict),
            "value": flexible,
            "parsed": flexible is not None,
            "correct": flexible == gold,
            "correct_strict": strict == gold,
            "abs_error": None if flexible is None else abs(flexible - gold),
        }

    def aggregate(self, scores: list[dict[str, Any]], examples: list[Example]) -> dict[str, Any]:
        rows = paired(scores, examples)
        n = len(rows)
        metrics = _group_metrics(rows)
        metrics.update({
            "accuracy": sum(bool(s["correct"]) for s in scores) / n if n else float("nan"),
            "accuracy_strict": sum(bool(s.get("correct_strict")) for s in scores) / n if n else float("nan"),
            "parse_rate_strict": sum(s.get("extracted_strict") is not None for s in scores) / n if n else float("nan"),
            "primary_rule": "flexible",
            "extraction_rule": EXTRACTION_RULE,
        })
        metrics["accuracy_flexible"] = metrics["accuracy"]
        by_study: dict[str, list[tuple[dict, Example]]] = defaultdict(list)
        for s, ex in rows:
            by_study[ex.meta["study_id"]].append((s, ex))
        metrics["by_study"] = {sid: _group_metrics(by_study[sid]) for sid in sorted(by_study)}
        return metrics
