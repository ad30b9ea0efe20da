"""Step-by-step verification of option traces, and the independent solvers.

`verify_trace(problem, text)` parses the trace (options.parse_steps) and checks every step:

* the Action is well formed and its option is in the vocabulary (else the parse error is the reason);
* every cited index exists: premises 0..P-1, or a fact derived by an earlier step (P, P+1, ...);
* the option applies to what is cited (MODUS_PONENS / MODUS_TOLLENS: [a fact, a premise rule]);
* the thought's conclusion (the last "<entity> is [not] [a] X" it states) is what the option derives;
* CONCLUDE (last step) cites the fact that is the claim or its negation, and its thought's verdict
  ("The answer is X.") is the one that fact gives.

A step that cites the fact of an invalid step is invalid too: what it builds on was not shown.
FOLIO traces are checked with z3 (folio_solver.check_conclude); only CONCLUDE is in their vocabulary.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ftlab.sokrates.folio_solver import FolError, check_conclude, solve_folio
from ftlab.sokrates.logic import (
    Fact,
    LogicParseError,
    Rule,
    mentioned_facts,
    modus_ponens,
    modus_tollens,
    solve,
)
from ftlab.sokrates.options import Step, parse_steps
from ftlab.sokrates.problems import Problem, as_problem, parse_prontoqa

_VERDICT_RE = re.compile(r"answer\s+is\s*:?\s*\**\s*(true|false|uncertain|unknown)\b", re.I)
_APPLY = {"MODUS_PONENS": modus_ponens, "MODUS_TOLLENS": modus_tollens}


@dataclass
class TraceReport:
    step_valid: list[bool]
    reasons: list[str | None]        # per step: why it is invalid (None when valid)
    verdict: str | None              # the CONCLUDE step's "The answer is X", None without one
    answer_correct: bool             # verdict == gold label
    fully_valid: bool                # every step valid, ends in CONCLUDE, answer correct
    errors: list[str] = field(default_factory=list)  # trace-level problems (no steps, no CONCLUDE, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stated_verdict(thought: str) -> str | None:
    found = _VERDICT_RE.findall(thought)
    if not found:
        return None
    word = found[-1].capitalize()
    return "Uncertain" if word == "Unknown" else word


class _ProntoChecker:
    """Checks one PrOntoQA step at a time, keeping the facts derived so far (None for invalid steps)."""

    def __init__(self, premises: list, claim: Fact):
        self.premises, self.claim = premises, claim
        self.derived: list[Fact | None] = []
        self.entities = {p.entity for p in premises if isinstance(p, Fact)} | {claim.entity}

    def span(self) -> str:
        p, d = len(self.premises), len(self.derived)
        return f"premises 0-{p - 1}" + (f", derived facts {p}-{p + d - 1}" if d else ", no derived facts yet")

    def fact(self, i: int) -> Fact:
        if not 0 <= i < len(self.premises) + len(self.derived):
            raise ValueError(f"index {i} does not exist ({self.span()})")
        if i >= len(self.premises):
            fact = self.derived[i - len(self.premises)]
            if fact is None:
                raise ValueError(f"derived fact {i} comes from an invalid step")
            return fact
        if not isinstance(self.premises[i], Fact):
            raise ValueError(f"premise {i} is a rule, not a fact")
        return self.premises[i]

    def rule(self, j: int) -> Rule:
        if not 0 <= j < len(self.premises) + len(self.derived):
            raise ValueError(f"index {j} does not exist ({self.span()})")
        if j >= len(self.premises) or not isinstance(self.premises[j], Rule):
            raise ValueError(f"{'premise' if j < len(self.premises) else 'derived fact'} {j} is a fact, not a rule")
        return self.premises[j]

    def infer(self, step: Step) -> Fact:
        option, (i, j) = step.action.option, step.action.args
        fact, rule = self.fact(i), self.rule(j)  # in this order: the first bad index is the reason
        out = _APPLY[option](fact, rule)
        if out is None:
            raise ValueError(f"{option} does not apply to {fact.text()!r} (index {i}) and premise {j}")
        stated = mentioned_facts(step.thought, self.entities)
        if not stated:
            raise ValueError(f"the thought states no conclusion (expected {out.text()!r})")
        if stated[-1].key != out.key:
            raise ValueError(f"the thought concludes {stated[-1].text()!r}, but {option} {list(step.action.args)} "
                             f"gives {out.text()!r}")
        return out

    def conclude(self, step: Step, verdict: str | None) -> None:
        if verdict is None:
            raise ValueError("the CONCLUDE thought gives no verdict ('The answer is True.' / 'The answer is False.')")
        if len(step.action.args) != 1:
            raise ValueError(f"CONCLUDE takes the one fact that settles the claim, got {len(step.action.args)} args")
        k = step.action.args[0]
        fact = self.fact(k)
        shows = "True" if fact.key == self.claim.key else "False" if fact.key == self.claim.negation().key else None
        if shows is None:
            raise ValueError(f"fact {k} ({fact.text()!r}) is neither the claim nor its negation")
        if verdict != shows:
            raise ValueError(f"fact {k} shows the claim is {shows}, the thought says {verdict}")


def _verify_prontoqa(problem: Problem, steps: list[Step], report: TraceReport) -> None:
    premises, claim = parse_prontoqa(problem)
    checker = _ProntoChecker(premises, claim)
    concluded = False
    for step in steps:
        is_conclude = (step.action.option == "CONCLUDE" if step.action
                       else "CONCLUDE" in (step.action_text or ""))
        reason = step.error
        if reason is None and concluded:
            reason = "step after CONCLUDE"
        out = None
        if reason is None:
            try:
                if is_conclude:
                    report.verdict = stated_verdict(step.thought)
                    checker.conclude(step, report.verdict)
                else:
                    out = checker.infer(step)
            except ValueError as e:
                reason = str(e)
        if is_conclude:
            concluded = True
            report.verdict = report.verdict or stated_verdict(step.thought)
        else:
            checker.derived.append(out)  # the index is taken even when the step is invalid
        report.step_valid.append(reason is None)
        report.reasons.append(reason)
    if not concluded:
        report.errors.append("no CONCLUDE step")


def verify_folio_steps(problem: Problem, steps: list[Step], report: TraceReport) -> None:
    """FOLIO: only CONCLUDE is checkable; its cited premises and verdict are checked with z3."""
    concluded = False
    for step in steps:
        reason = step.error
        if reason is None and concluded:
            reason = "step after CONCLUDE"
        if reason is None and step.action.option != "CONCLUDE":
            reason = f"{step.action.option} is not checkable on FOLIO (no formula for a derived fact); use CONCLUDE"
        if reason is None:
            concluded = True
            report.verdict = stated_verdict(step.thought)
            try:
                if report.verdict is None:
                    raise ValueError("the CONCLUDE thought gives no verdict ('The answer is True/False/Uncertain.')")
                check_conclude(problem, step.action.args, report.verdict)
            except (ValueError, FolError) as e:
                reason = str(e)
        report.step_valid.append(reason is None)
        report.reasons.append(reason)
    if not concluded:
        report.errors.append("no CONCLUDE step")


def verify_trace(problem: Any, text: str) -> TraceReport:
    """Check every step of a model trace against the problem's premises (see the module docstring).
    Never raises on the trace's text; LogicParseError / FolError when the *problem* cannot be read."""
    problem = as_problem(problem)
    steps = parse_steps(text)
    report = TraceReport([], [], None, False, False)
    if not steps:
        report.errors.append("no Thought/Action steps")
    if problem.task == "folio":
        verify_folio_steps(problem, steps, report)
    else:
        _verify_prontoqa(problem, steps, report)
    report.answer_correct = report.verdict is not None and report.verdict == problem.gold
    report.fully_valid = bool(steps) and all(report.step_valid) and not report.errors and report.answer_correct
    return report


def solve_problem(problem: Any) -> str:
    """The label the problem's own solver gives, never looking at a gold proof: 'True' / 'False' /
    'Unknown' (FOLIO: 'Uncertain') / 'Inconsistent'. LogicParseError / FolError when unreadable."""
    problem = as_problem(problem)
    if problem.task == "folio":
        return solve_folio(problem)
    premises, claim = parse_prontoqa(problem)
    return solve(premises, claim)


__all__ = ["LogicParseError", "TraceReport", "solve_problem", "stated_verdict", "verify_trace"]
