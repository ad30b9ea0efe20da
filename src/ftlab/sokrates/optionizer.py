"""Gold proofs -> Thought/Action steps that cite the premises (and derived facts) actually used.

PrOntoQA: the gold chain of thought ("Wren is a jompus. Each jompus is nervous. Wren is nervous. ...",
or LoGiPT's "Use rule2: ... Obtain a new implied fact: Nervous('Wren', True)") is read as a list of
facts, each with the rule sentence that precedes it as a hint. Every fact that is not a premise must
follow in one step (modus ponens, or modus tollens) from a fact already known and a premise rule; the
steps the deciding fact does not depend on are dropped, and the rest numbered (premises 0..P-1,
derived facts P, P+1, ... in step order; each step's thought states the number of the fact it derives,
so a later citation copies it instead of counting steps). A closing CONCLUDE cites the fact that is the
claim (True) or its negation (False). When the gold chain cannot be read that way, or proves the other answer, the
solver's own shortest derivation is used instead and `Proof.source` says "solver".

FOLIO has no gold proofs: its target is one CONCLUDE step citing a smallest set of premises the
label follows from (found with z3; see folio_solver), so the thought still names what was used.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from ftlab.sokrates.folio_solver import FolError, minimal_support, solve_folio
from ftlab.sokrates.logic import (
    Fact,
    Rule,
    Statement,
    closure,
    modus_ponens,
    modus_tollens,
    nouns,
    parse_logipt_fact,
    parse_sentence,
)
from ftlab.sokrates.options import Step, format_steps, make_step
from ftlab.sokrates.problems import Problem, as_problem, index_entry, parse_prontoqa

_LOGIPT_RULE_RE = re.compile(r"(\w+)\(\$x,\s*True\)\s*→\s*(\w+)\(\$x,\s*(True|False)\)")
_STEP_FNS = {"MODUS_PONENS": modus_ponens, "MODUS_TOLLENS": modus_tollens}


@dataclass(frozen=True)
class _Derived:
    option: str
    fact: tuple[str, str, bool]   # key of the fact used
    rule: int                     # premise index of the rule used
    out: Fact


@dataclass
class Proof:
    steps: list[Step]
    source: str                  # "gold" (from the dataset's proof) or "solver"
    verdict: str
    notes: list[str] = field(default_factory=list)   # why the gold chain was not used, if it was not

    def text(self) -> str:
        return format_steps(self.steps)


class OptionizeError(ValueError):
    """No proof can be written (premises unreadable, FOL missing, or the label does not follow)."""


def _chain_items(chain: list[str], concepts: set[str]) -> list[Fact | Rule]:
    """Facts and rule hints of a gold chain, in order; lines that are neither are skipped."""
    items: list[Fact | Rule] = []
    for line in chain:
        if m := _LOGIPT_RULE_RE.search(line):
            items.append(Rule(m.group(1).lower(), m.group(2).lower(), m.group(3) == "False"))
            continue
        if "fact" in line.lower() and (fact := parse_logipt_fact(line)) is not None:
            items.append(fact)
            continue
        for sentence in re.findall(r"[^.]+\.", line):
            try:
                items.append(parse_sentence(sentence, concepts))
            except ValueError:
                pass
    return items


def _one_step(known: dict, facts: dict, target: Fact, rules: list[tuple[int, Rule]], hint: Rule | None):
    """A (fact, rule) pair giving `target` in one step, trying the hinted rule first."""
    def same(a: Rule, b: Rule) -> bool:
        return (a.subject, a.pred, a.negated) == (b.subject, b.pred, b.negated)
    ordered = sorted(rules, key=lambda r: not (hint is not None and same(r[1], hint)))
    for j, rule in ordered:
        for key in known:
            for option, fn in _STEP_FNS.items():
                out = fn(facts[key], rule)
                if out is not None and out.key == target.key:
                    return _Derived(option, key, j, out)
    return None


def _from_gold(premises: list[Statement], claim: Fact, chain: list[str], concepts: set[str]):
    rules = [(i, p) for i, p in enumerate(premises) if isinstance(p, Rule)]
    facts = {p.key: p for p in premises if isinstance(p, Fact)}
    known: dict[tuple, _Derived | None] = {k: None for k in facts}
    hint = None
    for item in _chain_items(chain, concepts):
        if isinstance(item, Rule):
            hint = item
            continue
        if item.key not in known:
            derived = _one_step(known, facts, item, rules, hint)
            if derived is None:
                raise OptionizeError(f"gold sentence {item.text()!r} does not follow in one step")
            known[item.key], facts[item.key] = derived, derived.out
        hint = None
    return _needed(known, _deciding(known, claim))


def _from_solver(premises: list[Statement], claim: Fact):
    derivations = closure(premises)
    facts = {p.key: p for p in premises if isinstance(p, Fact)}
    known: dict[tuple, _Derived | None] = {}
    for key, how in derivations.items():  # insertion order: each fact after the ones it uses
        if how is None:
            known[key] = None
        else:
            out = _STEP_FNS[how.option](facts[how.fact], premises[how.rule])
            known[key], facts[key] = _Derived(how.option, how.fact, how.rule, out), out
    return _needed(known, _deciding(known, claim))


def _deciding(known: dict, claim: Fact) -> tuple:
    for key in (claim.key, claim.negation().key):
        if key in known:
            return key
    raise OptionizeError(f"neither {claim.text()!r} nor its negation follows")


def _needed(known: dict, goal: tuple) -> tuple[list[_Derived], tuple]:
    """The derivations `goal` depends on, dependencies first (none when it is a premise), and the goal."""
    order: list[_Derived] = []

    def visit(key: tuple) -> None:
        how = known[key]
        if how is not None and how not in order:
            visit(how.fact)
            order.append(how)
    visit(goal)
    return order, goal


def _backward_plan(premises: list[Statement], claim: Fact, derived: list[_Derived],
                   compact: bool = False) -> str | None:
    """The search a proof of `derived` (a chain of modus ponens steps from one premise fact) makes back from
    the claim, in the words of `conclusion_index`: the rules that conclude the claimed property, in premise
    order, dead ends (nothing concludes their subject) said as such, then one entry per concept down to the
    entity's fact. Each entry also spells the premise as the forward steps cite it ("each wumpus is a dumpus
    (premise 14)"): a step then finds its rule by the concept it stands at, the first words of that phrase,
    instead of reading the plan backwards. `compact`: each entry is the premise as the grouped prompt words it
    ("grimpus: each wumpus is a grimpus (20)", the index line "grimpus: wumpus (20)" spelled). None when the proof is not such a chain."""
    if not derived or any(d.option != "MODUS_PONENS" for d in derived) or any(
            d.fact != prev.out.key for prev, d in pairwise(derived)):
        return None
    first = next((i for i, p in enumerate(premises) if isinstance(p, Fact) and p.key == derived[0].fact), None)
    if first is None:
        return None
    concluded = {p.pred for p in premises}

    def entry(i: int, spelled: bool = True) -> str:
        if compact:
            return f"{premises[i].pred}: {premises[i].text()} ({i})"
        said = f", {premises[i].text()} (premise {i})" if spelled else ""
        return f"{premises[i].pred}: {index_entry(premises[i], i)}{said}"

    final = derived[-1].rule
    parts = []
    for i, p in enumerate(premises[:final]):
        if isinstance(p, Rule) and p.pred == claim.pred and p.subject not in concluded:
            parts.append(f"{entry(i, spelled=False)}; {p.subject}: nothing.")
    chain = [entry(d.rule) for d in reversed(derived)] + [entry(first)]
    parts.append("; ".join(chain) + ".")
    return "Back from the claim: " + " ".join(parts)


def _render(problem: Problem, premises: list[Statement], claim: Fact,
            plan: tuple[list[_Derived], tuple], backward_plan: bool = False,
            compact: bool = False) -> tuple[list[Step], str]:
    derived, goal_key = plan
    search = _backward_plan(premises, claim, derived, compact) if backward_plan else None
    index: dict[tuple, int] = {}
    for i, p in enumerate(premises):
        if isinstance(p, Fact):
            index.setdefault(p.key, i)
    facts = {p.key: p for p in premises if isinstance(p, Fact)}

    def ref(key: tuple) -> str:
        i = index[key]
        if compact:
            return str(i)
        return f"premise {i}" if i < len(premises) else f"derived fact {i}"

    steps = []
    for d in derived:
        if search:  # one wording, as the plan spelled it
            rule_text = premises[d.rule].text()
        else:
            sentence = problem.premises[d.rule].strip().rstrip(".")
            rule_text = sentence[0].lower() + sentence[1:]
        number = len(premises) + len(steps)  # the fact this step derives
        lead = f"{search} " if search and not steps else ""
        if compact:  # the fact used is the previous line's; the rule as the plan spelled it
            thought = f"{lead}{premises[d.rule].text()} ({d.rule}), so {d.out.text()} ({number})."
        else:
            thought = (f"{lead}Since {facts[d.fact].text()} ({ref(d.fact)}) and {rule_text} (premise {d.rule}), "
                       f"{d.out.text()} (derived fact {number}).")
        steps.append(make_step(thought, d.option, [index[d.fact], d.rule], short=compact))
        index.setdefault(d.out.key, number)
        facts.setdefault(d.out.key, d.out)
    goal = facts[goal_key]
    verdict = "True" if goal.key == claim.key else "False"
    if search or compact:
        # the claim written beside the derived fact before the verdict: with "which is the claim" /
        # "which contradicts" the policy had to choose before writing the claim, and after following its plan
        # to the right fact it chose at chance (39 of 79 such outputs right on the authors' 3-hop rows 101-300)
        how = f"; the claim says {claim.text()}: {'the same' if verdict == 'True' else 'the opposite'}, so the"
    else:
        how = (", which is the claim. The" if verdict == "True"
               else f", which contradicts the claim that {claim.text()}. The")
    steps.append(make_step(f"{goal.text()} ({ref(goal.key)}){how} answer is {verdict}.",
                           "CONCLUDE", [index[goal.key]], short=compact))
    return steps, verdict


def optionize_prontoqa(problem: Problem, backward_plan: bool = False, compact: bool = False) -> Proof:
    """`backward_plan`: the first step's thought starts with the search back from the claim (`_backward_plan`);
    `compact`: the wording of `render_problem(..., compact=True)` (premises as grouped there, bare numbers)."""
    premises, claim = parse_prontoqa(problem)
    notes: list[str] = []
    derived, source = None, "gold"
    if problem.chain:
        try:
            derived = _from_gold(premises, claim, problem.chain, nouns(problem.premises))
        except OptionizeError as e:
            notes.append(str(e))
    else:
        notes.append("no gold chain of thought")
    if derived is not None:
        steps, verdict = _render(problem, premises, claim, derived, backward_plan, compact)
        if verdict == problem.gold:
            return Proof(steps, source, verdict, notes)
        notes.append(f"the gold chain proves {verdict}, the label says {problem.gold}")
    steps, verdict = _render(problem, premises, claim, _from_solver(premises, claim), backward_plan, compact)
    return Proof(steps, "solver", verdict, notes)


def optionize_folio(problem: Problem) -> Proof:
    """One CONCLUDE step citing the premises the gold label follows from (none for Uncertain)."""
    try:
        label = solve_folio(problem)
    except FolError as e:
        raise OptionizeError(f"FOL not usable: {e}") from None
    if label != problem.gold:
        raise OptionizeError(f"z3 says {label}, the label says {problem.gold}")
    if label != "Uncertain" and not problem.fol_aligned:
        raise OptionizeError(f"{len(problem.premises)} premises but {len(problem.premises_fol)} formulas: "
                             "premises cannot be cited by index")
    if label == "Uncertain":
        thought = "Neither the conclusion nor its negation follows from the premises. The answer is Uncertain."
        return Proof([make_step(thought, "CONCLUDE", [])], "solver", label)
    support = minimal_support(problem, label)
    names = [str(i) for i in support]
    cited = (f"premises {', '.join(names[:-1])} and {names[-1]} together" if len(names) > 1
             else f"premise {names[0]}" if names else "no premise")
    says = "imply the conclusion" if label == "True" else "imply that the conclusion is false"
    thought = f"{cited[0].upper()}{cited[1:]} {says if len(names) > 1 else says.replace('imply', 'implies')}. " \
              f"The answer is {label}."
    return Proof([make_step(thought, "CONCLUDE", support)], "solver", label)


def optionize(example: Any, backward_plan: bool = False, compact: bool = False) -> Proof:
    """The optionized proof of a Problem or task Example (PrOntoQA or FOLIO); OptionizeError when none can
    be written, LogicParseError when PrOntoQA premises cannot be read. `backward_plan` (PrOntoQA): the first
    thought starts with the search back from the claim."""
    problem = as_problem(example)
    if problem.task == "folio":
        return optionize_folio(problem)
    return optionize_prontoqa(problem, backward_plan, compact)


def optionized_target(example: Any, backward_plan: bool = False, compact: bool = False) -> str:
    """The supervised response for `render_problem(example, index=backward_plan, compact=compact)`: the steps,
    ending in CONCLUDE."""
    return optionize(example, backward_plan, compact).text()
