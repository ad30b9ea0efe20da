"""FOLIO v0.0: does a conclusion follow from natural-language premises? True / False / Uncertain.

Upstream quirks (data/folio/SOURCE.md): train labels say `Unknown` where validation says `Uncertain`
(normalized to "Uncertain"); only validation has `conclusion-FOL`, only train has `story_id` /
`example_id` / `source`; and `len(premises) != len(premises-FOL)` in 12 rows, so the FOL lists are kept
as-is in `meta` and `premise_fol_pairs` refuses to pair them when the counts differ.
"""
from __future__ import annotations

import re
from typing import Any

from ftlab.tasks.base import Example, Task
from ftlab.tasks.scoring import (
    as_text,
    majority_metrics,
    paired,
    primary_answer,
    two_rule_metrics,
    two_rule_score,
)

LABELS = ("True", "False", "Uncertain")
_LABEL_ALIASES = {"true": "True", "false": "False", "uncertain": "Uncertain", "unknown": "Uncertain"}
_WORDS = r"(true|false|uncertain|unknown)"
_STRICT_RE = re.compile(r"answer\s+is\s*:?\s*\**\s*" + _WORDS + r"\b", re.IGNORECASE)
_WORD_RE = re.compile(r"\b" + _WORDS + r"\b", re.IGNORECASE)
EXTRACTION_RULE = (
    "strict: the last 'answer is True/False/Uncertain' (case-insensitive, optional ':' or '**'); "
    "flexible: the last standalone word true/false/uncertain/unknown anywhere in the output. "
    "'Unknown' counts as 'Uncertain'. Primary (accuracy) = strict, else flexible: the strict answer when the "
    "strict rule finds one, otherwise the flexible one."
)


def normalize_folio_label(value: Any) -> str:
    """'Unknown' and 'Uncertain' -> 'Uncertain'; 'true' -> 'True'; anything else is an error."""
    label = _LABEL_ALIASES.get(str(value).strip().rstrip(".").lower())
    if label is None:
        raise ValueError(f"label {value!r} is not one of True, False, Uncertain/Unknown")
    return label


def extract_folio_strict(text: str) -> str | None:
    matches = _STRICT_RE.findall(as_text(text))
    return _LABEL_ALIASES[matches[-1].lower()] if matches else None


def extract_folio_flexible(text: str) -> str | None:
    matches = _WORD_RE.findall(as_text(text))
    return _LABEL_ALIASES[matches[-1].lower()] if matches else None


def premise_fol_pairs(example: Example) -> list[tuple[str, str]] | None:
    """(premise, FOL) pairs, or None when the counts differ (upstream misalignment: never zip blindly)."""
    premises, fol = example.meta.get("premises", []), example.meta.get("premises-FOL")
    if not isinstance(fol, list) or len(fol) != len(premises):
        return None
    return list(zip(premises, fol))


def _premise_list(value: Any) -> list[str]:
    """Premise strings, stripped but not filtered (story 129 has an empty premise whose FOL is also
    empty, so dropping it would misalign `premises-FOL`); newer FOLIO releases use one string."""
    if isinstance(value, str):
        value = value.splitlines()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError("'premises' must be a list of strings")
    premises = [p.strip() for p in value]
    if not any(premises):
        raise ValueError("'premises' is empty")
    return premises


class FolioTask(Task):
    """FOLIO: premises + conclusion -> True / False / Uncertain; target 'The answer is X.' (no gold proof)."""

    name = "folio"
    required_fields = ("premises", "conclusion", "label")
    shot_examples = (
        (
            "Premises:\n1. All birds in the aviary can fly.\n2. Pip is a bird in the aviary.\n"
            "Conclusion: Pip can fly.",
            "Pip is a bird in the aviary, and all birds in the aviary can fly, so Pip can fly. The answer is True.",
        ),
        (
            "Premises:\n1. No reptiles have fur.\n2. Every lizard is a reptile.\n3. Gecko Gus is a lizard.\n"
            "Conclusion: Gecko Gus has fur.",
            "Gus is a lizard, so Gus is a reptile, and no reptiles have fur. So Gus has no fur. The answer is False.",
        ),
        (
            "Premises:\n1. Some students in the club play chess.\n2. Mia is a student in the club.\n"
            "Conclusion: Mia plays chess.",
            "Only some club students play chess, and nothing says whether Mia is one of them. "
            "The answer is Uncertain.",
        ),
    )

    def to_example(self, record: dict, index: int) -> Example:
        premises = _premise_list(record["premises"])
        conclusion = record["conclusion"]
        if not isinstance(conclusion, str) or not conclusion.strip():
            raise ValueError("'conclusion' must be a non-empty string")
        label = normalize_folio_label(record["label"])
        numbered = "\n".join(f"{i}. {p}" for i, p in enumerate([p for p in premises if p], start=1))
        example_id = record.get("example_id", record.get("id"))
        return Example(
            id=f"folio-{example_id}" if example_id is not None else f"folio-{index}",
            question=f"Premises:\n{numbered}\nConclusion: {conclusion.strip()}",
            target=f"The answer is {label}.",
            gold=label,
            meta={
                "premises": premises,
                "conclusion": conclusion.strip(),
                "premises-FOL": record.get("premises-FOL"),
                "conclusion-FOL": record.get("conclusion-FOL"),
                "fol_aligned": isinstance(record.get("premises-FOL"), list)
                and len(record["premises-FOL"]) == len(premises),
                "story_id": record.get("story_id"),
                "example_id": record.get("example_id"),
                "source": record.get("source"),
                "raw_label": record["label"],
            },
        )

    def instruction(self, question: str) -> str:
        return (f"{question}\nBased only on the premises, is the conclusion True, False, or Uncertain? "
                f"Reason step by step, then end with \"The answer is True.\", \"The answer is False.\" "
                f"or \"The answer is Uncertain.\"")

    def extract_answer(self, text: str) -> str | None:
        return primary_answer(extract_folio_strict(text), extract_folio_flexible(text))

    def score(self, output: str, example: Example) -> dict[str, Any]:
        return two_rule_score(extract_folio_strict(output), extract_folio_flexible(output), example.gold)

    def aggregate(self, scores: list[dict[str, Any]], examples: list[Example]) -> dict[str, Any]:
        metrics = two_rule_metrics(scores, EXTRACTION_RULE)
        # Per-label accuracy: the three classes are unbalanced and models often over-predict one.
        by_label = {}
        for label in LABELS:
            hits = [bool(s["correct"]) for s, ex in paired(scores, examples) if ex.gold == label]
            if hits:
                by_label[label] = sum(hits) / len(hits)
        metrics["accuracy_by_label"] = by_label
        metrics.update(majority_metrics(scores, examples))
        return metrics
