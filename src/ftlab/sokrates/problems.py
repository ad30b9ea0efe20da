"""Problems with numbered premises, and the prompt both SFT targets and evaluation use.

A `Problem` comes from any record the tasks read: PrOntoQA in the authors' layout (question, query,
chain_of_thought, answer), LoGiPT conversations and ftlab's generator output (all through
`ProntoQATask`), or FOLIO rows (through `FolioTask`, keeping the FOL annotations).

The prompt (`render_problem`) numbers the premises from 0, states the claim and the step format:

    Brimpuses are not luminous (premise 0).
    ...
    Stella is a zumpus (premise 24).
    Claim: Stella is not floral.

    Is the claim true or false? ...

The number follows its sentence, as a step's thought cites it ("... and brimpuses are not luminous
(premise 0), ..."): a model that has just written the sentence finds the number by matching what it wrote
and copying the next token. With "Premise 0: ..." first it had to find the sentence and recall what came
*before* it; measured after the tiny recipe's SFT on 100 generated 3-hop problems, step validity rose from
2.5% to 14.8% with this layout (docs/BENCHMARKS.md, "SOKRATES OaK loop").

`render_problem(example, index=True)` (the task option `backward_plan`) adds the premises grouped by what they
conclude (`conclusion_index`), so a proof planned back from the claim looks each premise up by a line's first
word instead of a sentence's last.

`render_problem(example, index=True, compact=True)` (the task option `compact`) states the premises by that
index alone (each premise once: "brimpus: numpus (1)." is "each numpus is a brimpus") with shorter instructions:
the same lookups at well under half the tokens, which is what lets the quickstart train and evaluate on a laptop
CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftlab.sokrates.logic import (
    Fact,
    LogicParseError,
    Rule,
    Statement,
    nouns,
    parse_premises,
    parse_sentence,
    split_sentences,
)
from ftlab.tasks.base import Example

_CLAIM_SPLIT = "\n\nTrue or false: "


@dataclass
class Problem:
    id: str
    task: str                      # "prontoqa" | "folio"
    premises: list[str]            # natural-language premises, indexed from 0 as in the prompt
    claim: str                     # the statement to judge
    gold: str                      # "True" / "False" (FOLIO also "Uncertain")
    chain: list[str] = field(default_factory=list)   # PrOntoQA gold chain of thought (may be empty)
    premises_fol: list[str] | None = None             # FOLIO: one formula per premise, same order
    conclusion_fol: str | None = None
    # Upstream misalignment (12 FOLIO rows): premise i of the prompt is not formula i. The formulas
    # still decide the label, but no step can cite premises by index.
    fol_aligned: bool = False
    story: str | None = None       # FOLIO: rows sharing a premise set
    note: str | None = None        # why the FOL cannot be used at all (FOLIO), if so


def problem_from_example(example: Example, task: str | None = None) -> Problem:
    """A Problem from a ProntoQATask or FolioTask example (the task is told by its meta fields)."""
    meta = example.meta
    if task == "folio" or (task is None and "premises" in meta):
        return _folio_problem(example)
    context, sep, _ = example.question.rpartition(_CLAIM_SPLIT)
    if not sep:
        raise ValueError("not a PrOntoQA example (no 'True or false:' line)")
    return Problem(id=example.id, task="prontoqa", premises=split_sentences(context),
                   claim=meta.get("statement") or example.question[len(context) + len(sep):],
                   gold=example.gold, chain=[str(s) for s in meta.get("chain_of_thought") or []])


def _folio_problem(example: Example) -> Problem:
    meta = example.meta
    premises, fol, conclusion_fol = list(meta["premises"]), meta.get("premises-FOL"), meta.get("conclusion-FOL")
    note, aligned = None, False
    if not isinstance(fol, list) or not all(isinstance(f, str) for f in fol):
        fol, note = None, "no premises-FOL list"
    else:
        while fol and not fol[-1].strip():  # a trailing empty formula (story 153) pairs with nothing
            fol = fol[:-1]
        if len(fol) == len(premises):
            aligned = True  # an empty premise with an empty formula (story 129) is dropped from both
            pairs = [(p, f) for p, f in zip(premises, fol) if p.strip() or f.strip()]
            premises, fol = [p for p, _ in pairs], [f for _, f in pairs]
        if not isinstance(conclusion_fol, str):
            note = "no conclusion-FOL (FOLIO v0.0 train has none)"
    if not aligned:
        premises = [p for p in premises if p.strip()]
    return Problem(id=example.id, task="folio", premises=premises, claim=meta["conclusion"], gold=example.gold,
                   premises_fol=fol, conclusion_fol=conclusion_fol, fol_aligned=aligned,
                   story=str(meta["story_id"]) if meta.get("story_id") is not None else None, note=note)


def as_problem(obj: Any) -> Problem:
    return obj if isinstance(obj, Problem) else problem_from_example(obj)


def parse_prontoqa(problem: Problem) -> tuple[list[Statement], Fact]:
    """Premises as facts/rules and the claim as a fact; LogicParseError when one cannot be read."""
    premises = parse_premises(" ".join(problem.premises))
    claim = parse_sentence(problem.claim, nouns(problem.premises))
    if not isinstance(claim, Fact):
        raise LogicParseError(f"the claim {problem.claim!r} is a rule, not a fact")
    return premises, claim


def instructions(problem: Problem) -> str:
    n = len(problem.premises)
    if problem.task == "folio":
        return ("Is the claim True, False or Uncertain? Answer in steps: each step is a line \"Thought: ...\" "
                "and a line \"Action: <Option type=\"...\" args=\"[...]\" />\". Finish with "
                "<Option type=\"CONCLUDE\" args=\"[...]\" /> citing the premises the answer follows from (none "
                "for Uncertain); its thought ends \"The answer is True.\", \"The answer is False.\" or "
                "\"The answer is Uncertain.\"")
    return ("Is the claim true or false? Prove it in steps: each step is a line \"Thought: ...\" and a line "
            "\"Action: <Option type=\"...\" args=\"[...]\" />\". Options: MODUS_PONENS args [fact, rule]; "
            "MODUS_TOLLENS args [fact, rule]; CONCLUDE args [the fact that is the claim or its negation]. "
            f"Premises are numbered 0 to {n - 1}; the fact each step derives gets the next number, from {n} on. "
            "Finish with CONCLUDE, whose thought ends \"The answer is True.\" or \"The answer is False.\"")


def conclusion_index(premises: list[Statement]) -> list[str]:
    """The premises grouped by what they conclude, one line per predicate, in order of first appearance:

        temperate: brimpus (8, not), shumpus (14).
        numpus: yumpus (15), Sam (20).

    A proof planned back from the claim then finds each premise by the *first* word of a line (the
    predicate it needs), where the premises themselves put that word last."""
    lines: dict[str, list[str]] = {}
    for i, p in enumerate(premises):
        lines.setdefault(p.pred, []).append(index_entry(p, i))
    return [f"{pred}: {', '.join(entries)}." for pred, entries in lines.items()]


def index_entry(premise: Statement, i: int) -> str:
    """'brimpus (8, not)': the subject of rule i (a fact: its entity), its number, and 'not' when it concludes
    the negation."""
    who = premise.subject if isinstance(premise, Rule) else premise.entity
    return f"{who} ({i}{', not' if premise.negated else ''})"


def compact_instructions(n: int) -> str:
    return ("True or false? Prove it in steps, each a line \"Thought: ...\" then a line \"Action: MODUS_PONENS "
            f"[fact, rule]\"; derived facts are numbered from {n} on. End with \"Action: CONCLUDE [fact]\" after a "
            "thought ending \"The answer is True.\" or \"The answer is False.\"")


def render_problem(example: Any, index: bool = False, compact: bool = False) -> str:
    """The prompt: numbered premises, the claim, the step format. `example`: a Problem or a task Example.
    `index` (PrOntoQA) adds the premises grouped by what they conclude (`conclusion_index`); with `compact` that
    list alone states them (with shorter instructions)."""
    problem = as_problem(example)
    if index and compact and problem.task == "prontoqa":
        lines = ["Premises by what they conclude: \"x: y (n)\" is premise n, each y is x (or the entity y is x); "
                 "\"not\": is not x.", *conclusion_index(parse_prontoqa(problem)[0]), "",
                 "Claim: " + " ".join(problem.claim.split())]
        return "\n".join(lines) + "\n\n" + compact_instructions(len(problem.premises))
    lines = [f"{p.strip().rstrip('.')} (premise {i})." for i, p in enumerate(problem.premises)]
    if index and problem.task == "prontoqa":
        lines += ["", "Premises by what they conclude (number, and 'not' when they conclude its negation):",
                  *conclusion_index(parse_prontoqa(problem)[0]), ""]
    lines.append("Claim: " + " ".join(problem.claim.split()))
    return "\n".join(lines) + "\n\n" + instructions(problem)
