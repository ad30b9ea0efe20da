"""GSM8K (grade-school math word problems), main and socratic formats.

Upstream quirks handled here (see data/gsm8k/SOURCE.md): the gold answer follows the last `####` and
may contain thousands separators ("1,080"); solutions carry `<<expr=result>>` calculator annotations
that we strip from SFT targets; socratic solutions prefix every step with `sub-question ** `.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from ftlab.tasks.base import Example, Task
from ftlab.tasks.scoring import as_text, primary_answer, two_rule_metrics, two_rule_score

# A number as people write it: optional sign and "$", thousands groups "1,080", optional decimals.
# The minus only counts when it does not follow a word character, so "3-5" reads as 3 and 5, not -5.
_NUMBER = r"(?:(?<![\w])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w])-)?\$?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# Explicit final-answer forms (strict rule).
_STRICT_RES = [
    re.compile(r"####\s*(" + _NUMBER + r")"),
    re.compile(r"answer\s*(?:is|:)\s*:?\s*\**\s*(" + _NUMBER + r")", re.IGNORECASE),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
]
_ANNOTATION_RE = re.compile(r"<<.*?>>")

EXTRACTION_RULE = (
    "strict: the number in the last explicit final-answer form ('#### N', 'The answer is N', "
    "'answer: N' or '\\boxed{N}'); flexible: the last number anywhere in the output. Numbers are "
    "normalized before comparison: '$' and thousands commas removed, trailing zeros of decimals "
    "dropped ('3.50' -> '3.5', '5.0' -> '5'), a sentence-final period ignored. Primary (accuracy) = strict, "
    "else flexible: the strict answer when the strict rule finds one, otherwise the flexible one."
)


def normalize_number(text: str) -> str | None:
    """'$1,080.50' -> '1080.5', '5.0' -> '5', '-3' -> '-3'; None when `text` is not a number."""
    cleaned = text.strip().replace("$", "").replace(",", "").replace("\u2212", "-").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))  # also turns "-0" into "0"
    return format(value.normalize(), "f")


def parse_gsm8k_response(text: str) -> str | None:
    """The last number in `text` as a normalized string ("1,080" -> "1080"); None when there is none."""
    matches = _NUMBER_RE.findall(as_text(text).replace("\u2212", "-"))
    return normalize_number(matches[-1]) if matches else None


def parse_gsm8k_strict(text: str) -> str | None:
    """The number in the last explicit final-answer form ('#### N', 'The answer is N', ...), else None."""
    text = as_text(text).replace("\u2212", "-")
    best: tuple[int, str] | None = None
    for pattern in _STRICT_RES:
        for m in pattern.finditer(text):
            if best is None or m.start() > best[0]:
                best = (m.start(), m.group(1))
    return normalize_number(best[1]) if best else None


def gold_answer(answer: str) -> str:
    """The gold number after the last `####` of an upstream solution, commas removed."""
    if "####" not in answer:
        raise ValueError("answer has no '#### <number>' final line")
    gold = normalize_number(answer.rsplit("####", 1)[1])
    if gold is None:
        raise ValueError(f"final answer {answer.rsplit('####', 1)[1].strip()!r} is not a number")
    return gold


def strip_annotations(text: str) -> str:
    """Remove `<<48/2=24>>` calculator annotations (upstream README: drop everything from << to >>)."""
    return _ANNOTATION_RE.sub("", text)


def solution_steps(answer: str) -> list[tuple[str | None, str]]:
    """(sub-question or None, step) for every solution line before `####`, annotations removed."""
    body = answer.rsplit("####", 1)[0]
    steps = []
    for line in body.splitlines():
        line = strip_annotations(line).strip()
        if not line:
            continue
        if " ** " in line:  # socratic: "How many eggs does Janet sell? ** Janet sells 9 eggs."
            sub_q, step = line.split(" ** ", 1)
            steps.append((sub_q.strip(), step.strip()))
        else:
            steps.append((None, line))
    return steps


class GSM8KTask(Task):
    """GSM8K: free-form numeric answer; the SFT target ends with '#### N'.

    `socratic_subquestions`: for socratic rows, keep the 'sub-question ** step' lines in the target
    (True, the upstream format) or train on the steps alone (False).
    """

    name = "gsm8k"
    required_fields = ("question", "answer")
    shot_examples = (
        (
            "A baker makes 12 muffins in each batch. She bakes 3 batches and sells 30 muffins. "
            "How many muffins are left?",
            "She bakes 12 * 3 = 36 muffins.\nAfter selling 30, she has 36 - 30 = 6 muffins left.\n#### 6",
        ),
        (
            "Tom buys 4 notebooks at $2.50 each and pays with a $20 bill. How much change does he get?",
            "The notebooks cost 4 * 2.50 = $10.\nHis change is 20 - 10 = $10.\n#### 10",
        ),
        (
            "A train travels 60 miles per hour for 2 hours and then 45 miles per hour for 4 hours. "
            "How many miles does it travel in total?",
            "First it travels 60 * 2 = 120 miles.\nThen it travels 45 * 4 = 180 miles.\n"
            "In total it travels 120 + 180 = 300 miles.\n#### 300",
        ),
    )

    def __init__(self, socratic_subquestions: bool = True):
        self.socratic_subquestions = socratic_subquestions

    def to_example(self, record: dict, index: int) -> Example:
        question, answer = record["question"], record["answer"]
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ValueError("'question' and 'answer' must be strings")
        gold = gold_answer(answer)
        steps = solution_steps(answer)
        socratic = any(sub_q is not None for sub_q, _ in steps)
        lines = [
            f"{sub_q} ** {step}" if sub_q is not None and self.socratic_subquestions else step
            for sub_q, step in steps
        ]
        target = "\n".join(lines + [f"#### {gold}"])
        return Example(
            id=str(record.get("id", f"gsm8k-{index}")),
            question=question.strip(),
            target=target,
            gold=gold,
            meta={"format": "socratic" if socratic else "main", "num_steps": len(steps)},
        )

    def instruction(self, question: str) -> str:
        return (f"{question}\nSolve the problem step by step, then give the final answer on the last line "
                f"in the form \"#### <number>\".")

    def extract_answer(self, text: str) -> str | None:
        return primary_answer(parse_gsm8k_strict(text), parse_gsm8k_response(text))

    def score(self, output: str, example: Example) -> dict[str, Any]:
        return two_rule_score(parse_gsm8k_strict(output), parse_gsm8k_response(output), example.gold)

    def aggregate(self, scores: list[dict[str, Any]], examples: list[Example]) -> dict[str, Any]:
        return two_rule_metrics(scores, EXTRACTION_RULE)
