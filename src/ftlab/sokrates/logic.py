"""The small logic of PrOntoQA: facts about one entity, universal rules, negation.

Every PrOntoQA sentence is one of three shapes (measured on all six files of ../shared/data/prontoqa:
35,455 "Every/Each X is ...", 35,389 "Xs are ...", 23,500 "Name is ..." sentences, nothing else):

    Wren is a jompus.          Fact("Wren", "jompus")                 jompus(Wren)
    Wren is not nervous.       Fact("Wren", "nervous", negated=True)   ¬nervous(Wren)
    Each jompus is nervous.    Rule("jompus", "nervous")               ∀x jompus(x) → nervous(x)
    Jompuses are not sour.     Rule("jompus", "sour", negated=True)    ∀x jompus(x) → ¬sour(x)

Concepts ("jompus") and properties ("nervous") are both unary predicates; `kind` only decides how a
fact is said ("is a jompus" / "is nervous"). LoGiPT writes the same facts as `Sour('Alex', False)`;
`parse_logipt_fact` reads those.

The solver (`closure`) is forward chaining with modus ponens and modus tollens to a fixpoint. It is
written independently of the optionizer: it never looks at a gold chain of thought.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

CONCEPT, PROPERTY = "concept", "property"


class LogicParseError(ValueError):
    """A sentence outside the PrOntoQA shapes."""


@dataclass(frozen=True)
class Fact:
    entity: str
    pred: str
    negated: bool = False
    kind: str = PROPERTY

    def negation(self) -> Fact:
        return Fact(self.entity, self.pred, not self.negated, self.kind)

    @property
    def key(self) -> tuple[str, str, bool]:
        """Identity for logic (kind is only wording): ('Wren', 'nervous', False)."""
        return (self.entity, self.pred, self.negated)

    def text(self) -> str:
        """'Wren is a jompus' / 'Wren is not nervous' (no final period)."""
        neg = "not " if self.negated else ""
        obj = f"{_article(self.pred)} {self.pred}" if self.kind == CONCEPT else self.pred
        return f"{self.entity} is {neg}{obj}"


@dataclass(frozen=True)
class Rule:
    subject: str
    pred: str
    negated: bool = False
    kind: str = PROPERTY  # of `pred`

    def apply(self, entity: str) -> Fact:
        return Fact(entity, self.pred, self.negated, self.kind)

    def text(self) -> str:
        """'each jompus is a wumpus' / 'each jompus is not nervous' (one wording for both of PrOntoQA's)."""
        return Fact("each " + self.subject, self.pred, self.negated, self.kind).text()


Statement = Fact | Rule

_EVERY_RE = re.compile(r"^(?:every|each)\s+([a-z]+)\s+is\s+(not\s+)?(an?\s+)?([a-z]+)$", re.I)
_PLURAL_RE = re.compile(r"^([a-z]+)\s+are\s+(not\s+)?([a-z]+)$", re.I)
_FACT_RE = re.compile(r"^([A-Z][a-z]+)\s+is\s+(not\s+)?(an?\s+)?([a-z]+)$")
_LOGIPT_RE = re.compile(r"([A-Za-z]+)\(\s*'([^']+)'\s*,\s*(True|False)\s*\)")
_SENTENCE_RE = re.compile(r"[^.]+\.")


def _article(noun: str) -> str:
    return "an" if noun[:1] in "aeiou" else "a"


def singular(word: str) -> str:
    """'Jompuses' -> 'jompus', 'cats' -> 'cat', 'butterflies' -> 'butterfly' (PrOntoQA's plurals)."""
    w = word.lower()
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ses", "xes", "shes", "ches")):
        return w[:-2]
    return w[:-1] if w.endswith("s") and not w.endswith(("ss", "us")) else w


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_RE.findall(text) if s.strip(" .")]


def nouns(sentences: list[str]) -> set[str]:
    """Words used as nouns: after 'a/an', and subjects of rules. Plural objects ('Xs are Ys.') are
    concepts when their singular is one of these or looks like a PrOntoQA noun ('-uses')."""
    found = set()
    for s in sentences:
        s = s.strip().rstrip(".")
        if m := _EVERY_RE.match(s):
            found.add(m.group(1).lower())
            if m.group(3):
                found.add(m.group(4).lower())
        elif m := _PLURAL_RE.match(s):
            found.add(singular(m.group(1)))
        elif (m := _FACT_RE.match(s)) and m.group(3):
            found.add(m.group(4).lower())
    return found


def parse_sentence(sentence: str, concepts: set[str] = frozenset()) -> Statement:
    """One PrOntoQA sentence -> Fact or Rule; LogicParseError for anything else."""
    s = " ".join(sentence.strip().rstrip(".").split())
    if m := _EVERY_RE.match(s):
        kind = CONCEPT if m.group(3) else PROPERTY
        return Rule(m.group(1).lower(), m.group(4).lower(), bool(m.group(2)), kind)
    if m := _PLURAL_RE.match(s):
        obj = m.group(3).lower()
        is_concept = singular(obj) in concepts or obj.endswith("uses")
        return Rule(singular(m.group(1)), singular(obj) if is_concept else obj, bool(m.group(2)),
                    CONCEPT if is_concept else PROPERTY)
    if m := _FACT_RE.match(s):
        pred = m.group(4).lower()
        kind = CONCEPT if m.group(3) or pred in concepts else PROPERTY
        return Fact(m.group(1), pred, bool(m.group(2)), kind)
    raise LogicParseError(f"cannot read {sentence.strip()!r} as a fact ('Wren is [not] [a] X.') or a rule "
                          "('Every/Each X is [not] [a] Y.', 'Xs are [not] Ys.')")


def parse_premises(context: str) -> list[Statement]:
    """The context's sentences in order, as facts and rules; LogicParseError names the first bad one."""
    sentences = split_sentences(context)
    if not sentences:
        raise LogicParseError("the context has no sentences")
    concepts = nouns(sentences)
    return [parse_sentence(s, concepts) for s in sentences]


def parse_logipt_fact(text: str) -> Fact | None:
    """"Sour('Alex', False)" -> Fact('Alex', 'sour', negated=True); None when there is none."""
    m = _LOGIPT_RE.search(text)
    return Fact(m.group(2), m.group(1).lower(), m.group(3) == "False") if m else None


def mentioned_facts(text: str, entities: set[str]) -> list[Fact]:
    """Every 'Wren is [not] [a] X' in free text, about a known entity, in order of appearance."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(entities))) + r")\s+is\s+(not\s+)?(an?\s+)?([a-z]+)\b")
    return [Fact(m.group(1), m.group(4).lower(), bool(m.group(2)), CONCEPT if m.group(3) else PROPERTY)
            for m in pattern.finditer(text)] if entities else []


# -- independent solver ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Derivation:
    """How `closure` first obtained a fact: option name and the indices it used (see optionizer)."""

    option: str
    fact: tuple[str, str, bool]
    rule: int


def modus_ponens(fact: Fact, rule: Rule) -> Fact | None:
    """jompus(Wren), ∀x jompus(x) → [¬]nervous(x)  ⊢  [¬]nervous(Wren)."""
    return rule.apply(fact.entity) if not fact.negated and fact.pred == rule.subject else None


def modus_tollens(fact: Fact, rule: Rule) -> Fact | None:
    """[¬]nervous(Wren), ∀x jompus(x) → [not ¬]nervous(x)  ⊢  ¬jompus(Wren) (the fact contradicts the rule)."""
    if fact.pred == rule.pred and fact.negated != rule.negated:
        return Fact(fact.entity, rule.subject, True, CONCEPT)
    return None


def closure(premises: list[Statement]) -> dict[tuple[str, str, bool], Derivation | None]:
    """Every fact that follows, mapped to how it was first derived (None: a premise). Breadth-first, so
    each derivation is a shortest one."""
    rules = [(i, p) for i, p in enumerate(premises) if isinstance(p, Rule)]
    known: dict[tuple[str, str, bool], Derivation | None] = {}
    facts: dict[tuple[str, str, bool], Fact] = {}
    frontier = []
    for p in premises:
        if isinstance(p, Fact) and p.key not in known:
            known[p.key], facts[p.key] = None, p
            frontier.append(p)
    while frontier:
        new = []
        for fact in frontier:
            for i, rule in rules:
                for option, step in (("MODUS_PONENS", modus_ponens), ("MODUS_TOLLENS", modus_tollens)):
                    derived = step(fact, rule)
                    if derived is not None and derived.key not in known:
                        known[derived.key], facts[derived.key] = Derivation(option, fact.key, i), derived
                        new.append(derived)
        frontier = new
    return known


def solve(premises: list[Statement], claim: Fact) -> str:
    """'True' (the claim follows), 'False' (its negation follows), 'Unknown', or 'Inconsistent'."""
    known = closure(premises)
    pos, neg = claim.key in known, claim.negation().key in known
    return "Inconsistent" if pos and neg else "True" if pos else "False" if neg else "Unknown"
