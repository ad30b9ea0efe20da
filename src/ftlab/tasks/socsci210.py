"""SocSci210 (SOCRATES replication, instruction format): predict a participant's integer answer.

Each row: `instruction` (the same in every row), `input` = "Demographics: ...\\n\\nScenario: ... Only
return an integer ...", `output` = "Response: <int>", `study_id`, `condition_num`. Scales differ by
question (Likert 1-7, yes/no codes, dollar amounts up to 99,999), so raw-unit errors and a pooled
correlation are dominated by the dollar questions. Values are therefore mapped onto each question's
answer scale, (v - lo) / (hi - lo) (see SCALE_RULE), before the Pearson correlations and the
distribution metric: the Wasserstein-1 distance between predicted and human answers per study x
condition, averaged over those cells, as the SOCRATES paper reports. The raw-unit MAE/RMSE stay, named
`mae_raw`/`rmse_raw` (see data/socsci210/SOURCE.md).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from ftlab.tasks.base import Example, Task
from ftlab.tasks.scoring import as_text, paired, primary_answer, two_rule_metrics

_GOLD_RE = re.compile(r"^\s*Response:\s*(-?\d+)\s*$")
# An integer as people write it ("7", "-2", "12,000", "$1,500"); decimals are read too, then rounded.
_NUM = r"(?:(?<![\w])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUM_RE = re.compile(_NUM)
_STRICT_RE = re.compile(r"Response\s*:\s*\**\s*(" + _NUM + r")", re.IGNORECASE)
EXTRACTION_RULE = (
    "strict: the number after the last 'Response:' (case-insensitive); flexible: the last number "
    "anywhere in the output. '$' and thousands commas are removed and decimals are rounded half up "
    "to an integer. Primary = strict, else flexible (the strict answer when the strict rule finds one, "
    "otherwise the flexible one): accuracy (exact match), MAE, RMSE, Pearson r and Wasserstein use the "
    "primary value and only parsed samples; unparsed samples count against parse_rate."
)
# The answer instruction is the last "Only return ..." sentence; ranges are read only there so that
# numbers in the scenario ("rose from 8 to 9 percent") are never taken for the scale.
_INSTRUCTION_RE = re.compile(r"\bOnly return\b(?!.*\bOnly return\b)(.*)", re.IGNORECASE | re.DOTALL)
# "from 1 to 7", "from 1 (Definitely not) to 5 (Definitely)", "between 0 and 1000"
_RANGE_RE = re.compile(r"\b(?:from|between)\s+(-?\d+)\s*(?:\([^)]*\))?\s*(?:to|and)\s+(-?\d+)", re.IGNORECASE)
# answer codes: "1 for Yes or 2 for No", "1 if you accept it, up to 4 if ..."; not "$1-$10" amounts
_CODE_RE = re.compile(r"(?<![\w$.,-])(-?\d+)\s+(?:for|if)\b", re.IGNORECASE)
SCALE_RULE = (
    "Per question (study_id, condition_num, question text) values are normalised as (v - lo) / (hi - lo). "
    "[lo, hi] is the range the answer instruction states ('from A to B', 'from A (label) to B (label)', "
    "'between A and B'), else the smallest and largest answer code it lists ('1 for Yes or 2 for No'), "
    "else the smallest and largest human answer of that question among the evaluated rows. A stated "
    "scale is widened to cover human answers outside it (the data has some: '1 for the first scenario; "
    "2 for the second' answered 3-12). Predictions are not clipped. Questions whose scale has zero width "
    "(no stated scale, one distinct human answer) are left out of the normalised metrics "
    "(n_questions_unscaled). Wasserstein: per study x condition on the normalised scale, averaged over cells."
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


def stated_scale(question: str) -> tuple[int, int] | None:
    """The answer scale the question's instruction states: a range, else the span of its answer codes."""
    instruction = _INSTRUCTION_RE.search(question)
    if instruction is None:
        return None
    text = instruction.group(1)
    m = _RANGE_RE.search(text)
    if m:
        lo, hi = sorted((int(m.group(1)), int(m.group(2))))
        return lo, hi
    codes = [int(c) for c in _CODE_RE.findall(text)]
    return (min(codes), max(codes)) if len(codes) >= 2 else None


QuestionId = tuple[str, Any, str]


def _question_id(ex: Example) -> QuestionId:
    return ex.meta["study_id"], ex.meta["condition_num"], ex.meta["question_key"]


def question_scales(examples: Sequence[Example]) -> dict[QuestionId, dict[str, Any]]:
    """Per question: {'lo', 'hi', 'source': 'text' | 'answers', 'widened'}; lo == hi means no usable scale."""
    answers: dict[QuestionId, list[int]] = defaultdict(list)
    for ex in examples:
        answers[_question_id(ex)].append(ex.meta["gold_value"])
    scales = {}
    for qid, golds in answers.items():
        stated = stated_scale(qid[2])
        lo, hi = stated if stated else (min(golds), max(golds))
        widened = min(golds) < lo or max(golds) > hi
        scales[qid] = {"lo": min(lo, *golds), "hi": max(hi, *golds),
                       "source": "text" if stated else "answers", "widened": widened}
    return scales


def _normalise(value: float, scale: dict[str, Any]) -> float:
    return (value - scale["lo"]) / (scale["hi"] - scale["lo"])


def _value(score: dict[str, Any]) -> int | None:
    """The parsed prediction of a score row ('value', or the 'extracted' string of a minimal row)."""
    if "value" in score:
        return score["value"]
    extracted = score.get("extracted")
    return None if extracted is None else int(extracted)


def _raw_error_metrics(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """MAE and RMSE in the answers' own units over (pred, gold) pairs of parsed samples; None when none."""
    if not pairs:
        return {"mae_raw": None, "rmse_raw": None}
    errors = [p - g for p, g in pairs]
    return {"mae_raw": sum(abs(e) for e in errors) / len(errors),
            "rmse_raw": math.sqrt(sum(e * e for e in errors) / len(errors))}


def _normalised_metrics(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Pearson r and MAE on the normalised scale over (pred, gold) pairs; None when none."""
    return {
        "pearson_r": pearson_r([p for p, _ in pairs], [g for _, g in pairs]),
        "mae_norm": sum(abs(p - g) for p, g in pairs) / len(pairs) if pairs else None,
    }


def _wasserstein_by_cell(rows: list[tuple[dict, Example]],
                         scales: dict[QuestionId, dict[str, Any]]) -> dict[str, Any]:
    """Mean normalised W1 over study x condition cells, and how many cells were used / had no prediction.

    The human distribution of a cell uses every scaled gold answer in it, the predicted one only the
    parsed predictions (the parse rate reports the rest).
    """
    cells: dict[tuple, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for score, ex in rows:
        scale = scales[_question_id(ex)]
        if scale["hi"] == scale["lo"]:
            continue
        preds, golds = cells[(ex.meta["study_id"], ex.meta["condition_num"])]
        golds.append(_normalise(ex.meta["gold_value"], scale))
        if _value(score) is not None:
            preds.append(_normalise(_value(score), scale))
    distances = [wasserstein_1d(p, g) for p, g in cells.values() if p]
    return {"wasserstein": sum(distances) / len(distances) if distances else None,
            "n_cells": len(distances), "n_cells_unparsed": sum(1 for p, _ in cells.values() if not p)}


def _group_metrics(rows: list[tuple[dict, Example]], scales: dict[QuestionId, dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    raw = [(_value(s), ex.meta["gold_value"]) for s, ex in rows if _value(s) is not None]
    normalised = []
    for s, ex in rows:
        scale = scales[_question_id(ex)]
        if _value(s) is not None and scale["hi"] > scale["lo"]:
            normalised.append((_normalise(_value(s), scale), _normalise(ex.meta["gold_value"], scale)))
    return {
        "n": n,
        "parse_rate": len(raw) / n if n else float("nan"),
        **_raw_error_metrics(raw),
        **_normalised_metrics(normalised),
        **_wasserstein_by_cell(rows, scales),
    }


def _scale_counts(scales: dict[QuestionId, dict[str, Any]]) -> dict[str, int]:
    """How each question's scale was found, so a reader can judge the normalisation."""
    usable = [sc for sc in scales.values() if sc["hi"] > sc["lo"]]
    return {
        "n_questions": len(scales),
        "n_questions_scale_stated": sum(sc["source"] == "text" for sc in usable),
        "n_questions_scale_from_answers": sum(sc["source"] == "answers" for sc in usable),
        "n_questions_scale_widened": sum(sc["widened"] for sc in usable),
        "n_questions_unscaled": len(scales) - len(usable),
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
        value = primary_answer(extract_response_strict(text), extract_response_flexible(text))
        return None if value is None else str(value)

    def score(self, output: str, example: Example) -> dict[str, Any]:
        strict, flexible = extract_response_strict(output), extract_response_flexible(output)
        primary = primary_answer(strict, flexible)
        gold = example.meta["gold_value"]
        return {
            "extracted": None if primary is None else str(primary),
            "extracted_strict": None if strict is None else str(strict),
            "extracted_flexible": None if flexible is None else str(flexible),
            "value": primary,
            "parsed": primary is not None,
            "correct": primary == gold,
            "correct_strict": strict == gold,
            "correct_flexible": flexible == gold,
            "abs_error": None if primary is None else abs(primary - gold),
        }

    def aggregate(self, scores: list[dict[str, Any]], examples: list[Example]) -> dict[str, Any]:
        rows = paired(scores, examples)
        scales = question_scales([ex for _, ex in rows])
        metrics = two_rule_metrics(scores, EXTRACTION_RULE)
        metrics.update(_group_metrics(rows, scales))
        metrics.update(_scale_counts(scales))
        metrics["scale_rule"] = SCALE_RULE
        by_study: dict[str, list[tuple[dict, Example]]] = defaultdict(list)
        for s, ex in rows:
            by_study[ex.meta["study_id"]].append((s, ex))
        metrics["by_study"] = {sid: _group_metrics(by_study[sid], scales) for sid in sorted(by_study)}
        return metrics
