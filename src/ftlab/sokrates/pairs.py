"""Preference pairs from verified traces (the OaK loop's "prefer" stage).

Per problem, the traces the verifier calls fully valid (right verdict, every step valid, ends in CONCLUDE)
are *chosen*; the others (wrong or no verdict, or an invalid step) are *rejected*.

* outcome pairs: each rejected trace against a chosen one (chosen ones taken in turn);
* prefix pairs: a rejected trace whose first invalid step is step j >= 1, against the same trace with its
  steps from j on replaced by those of a chosen trace that took the same actions (option and args) for
  steps 0..j-1 - so the derived facts, and their indices, are the same - provided the spliced trace
  verifies as fully valid. Both sides then share the text up to step j exactly, their log-probs there
  cancel in the DPO margin, and the pair teaches the one step where they part.
* step pairs (Step-DPO, Lai et al. 2024): a rejected trace's first invalid step j >= 0 against step j of a
  chosen trace that took the same actions for steps 0..j-1, both after the rejected trace's own steps 0..j-1
  and cut after step j. Unless step j is the conclusion itself, neither side reaches a verdict, so the pair
  moves the probability of that one step, not of concluding (whole-trace pairs push down every token of the
  rejected trace, its CONCLUDE step included). `partial` rows: no end-of-turn token follows either side.
  A premature conclusion (the rejected step concludes where the chosen trace goes on) makes no step pair:
  such pairs only ever say "do not conclude here", and with six of them against one the other way the
  tiny recipe's policy learnt not to conclude at all (docs/BENCHMARKS.md).

At most `max_per_problem` pairs of each kind per problem (None: all); identical pairs once. Pairs are
rows for `run_dpo(cfg, pairs=...)`: {prompt, chosen, rejected} plus where they came from.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from itertools import islice
from typing import Any, Callable

from ftlab.sokrates.traces import actions, step_spans
from ftlab.sokrates.verifier import verify_trace


def first_invalid(record: dict[str, Any]) -> int | None:
    return next((k for k, v in enumerate(record["step_valid"]) if not v), None)


def splice(rejected: str, chosen: str, j: int) -> str | None:
    """`rejected`'s first j steps, then `chosen`'s steps from j on (None when either lacks them)."""
    r, c = step_spans(rejected), step_spans(chosen)
    if j < 1 or len(r) < j or len(c) <= j:
        return None
    return rejected[:r[j - 1].end] + "\n" + chosen[c[j].start:]


def prefix_partner(record: dict[str, Any], chosen: list[dict[str, Any]], problem: Any) -> tuple[str, int] | None:
    """(spliced chosen text, shared steps) for a rejected trace, or None."""
    j = first_invalid(record)
    if j is None or j < 1:
        return None
    mine = actions(record["text"])[:j]
    if None in mine:
        return None
    for c in chosen:
        theirs = actions(c["text"])
        if len(theirs) > j and theirs[:j] == mine:
            text = splice(record["text"], c["text"], j)
            if text is not None and verify_trace(problem, text).fully_valid:
                return text, j
    return None


def step_partner(record: dict[str, Any], chosen: list[dict[str, Any]], problem: Any) -> tuple[str, str, int] | None:
    """(chosen text, rejected text, step j) cut after the rejected trace's first invalid step j, or None."""
    j = first_invalid(record)
    if j is None:
        return None
    mine = actions(record["text"])
    if None in mine[:j]:
        return None
    concludes = mine[j] is not None and mine[j][0] == "CONCLUDE"
    text, spans = record["text"], step_spans(record["text"])
    before = text[:spans[j - 1].end] + "\n" if j else ""
    rejected = before + text[spans[j].start:spans[j].end]
    for c in chosen:
        theirs = step_spans(c["text"])
        their_actions = actions(c["text"])
        if len(theirs) > j and their_actions[:j] == mine[:j]:
            if concludes and (their_actions[j] is None or their_actions[j][0] != "CONCLUDE"):
                continue  # a premature conclusion against a step that goes on: see the module docstring
            candidate = before + c["text"][theirs[j].start:theirs[j].end]
            report = verify_trace(problem, candidate)
            if candidate != rejected and len(report.step_valid) == j + 1 and all(report.step_valid):
                return candidate, rejected, j
    return None


def with_partners(rejected: list[dict[str, Any]], partner: Callable[[dict], Any]) -> Iterator[tuple[dict, Any]]:
    """(rejected trace, its partner) for each rejected trace that has one, in order."""
    for r in rejected:
        found = partner(r)
        if found:
            yield r, found


def build_pairs(traces: list[dict[str, Any]], problems: dict[str, Any], prompt_of: Callable[[str], str],
                max_per_problem: int | None = 4, prefix_pairs: bool = True, outcome_pairs: bool = True,
                step_pairs: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """(pair rows, stats). `traces` in any order; problems keyed by id; `prompt_of(problem id)` is the prompt
    text the DPO rows carry (what the traces were sampled from)."""
    by_problem: dict[str, list[dict]] = {}
    for t in sorted(traces, key=lambda t: (t["index"], t["sample"])):
        by_problem.setdefault(t["problem"], []).append(t)
    rows: list[dict] = []
    stats: Counter = Counter()
    for pid, group in by_problem.items():
        seen_text: set[str] = set()
        unique = [t for t in group if not (t["text"] in seen_text or seen_text.add(t["text"]))]
        chosen = [t for t in unique if t["fully_valid"]]
        rejected = [t for t in unique if not t["fully_valid"]]
        stats["problems"] += 1
        stats["problems_with_chosen"] += bool(chosen)
        stats["problems_with_rejected"] += bool(rejected)
        stats["problems_with_both"] += bool(chosen and rejected)
        made: set[tuple[str, str]] = set()

        def add(kind: str, chosen_text: str, r: dict, rejected_text: str | None = None, **extra: Any) -> None:
            rejected_text = r["text"] if rejected_text is None else rejected_text
            if (chosen_text, rejected_text) in made:
                return
            made.add((chosen_text, rejected_text))
            rows.append({"prompt": prompt_of(pid), "chosen": chosen_text, "rejected": rejected_text, "kind": kind,
                         "problem": pid, "rejected_sample": r["sample"], **extra})
            stats[f"pairs_{kind}"] += 1

        if chosen and outcome_pairs:
            for i, r in enumerate(rejected[:max_per_problem]):
                c = chosen[i % len(chosen)]
                add("outcome", c["text"], r, chosen_sample=c["sample"])
        problem = problems[pid]
        if chosen and prefix_pairs:
            found = with_partners(rejected, lambda r: prefix_partner(r, chosen, problem))
            for r, (text, j) in islice(found, max_per_problem):
                add("prefix", text, r, shared_steps=j)
        if chosen and step_pairs:
            found = with_partners(rejected, lambda r: step_partner(r, chosen, problem))
            for r, (good, bad, j) in islice(found, max_per_problem):
                add("step", good, r, bad, shared_steps=j, partial=True)
    stats["pairs"] = len(rows)
    return rows, dict(stats)
