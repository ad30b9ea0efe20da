"""FOLIO's FOL annotations -> z3: entailment labels, smallest premise sets, CONCLUDE checks.

The annotations ("∀x (Drinks(x) → Dependent(x))") are parsed by a small recursive-descent parser:
precedence ¬ (and quantifiers) > ∧ > ∨ > ⊕ > → (right-associative) > ↔. Seen in the data and
accepted: '^' for ∧, '⟷' for ↔, a trailing '.', a space before an argument list, names with '-', '.',
'’', '+' and digits ("c++", "y42.3billion"), an argument of several words ("captain america"). A quantifier binds the formula right after it ("∀x (...)");
when that leaves its variable free further right ("∀x A(x) → B(x)") the formula is read again with the
quantifier reaching to the end. Free lower-case names are constants; predicates are keyed by name and
arity, over one uninterpreted sort.

Label: True when premises ∧ ¬conclusion is unsat, False when premises ∧ conclusion is unsat,
Uncertain when both are sat; "Inconsistent" when both are unsat, "SolverUnknown" on a z3 timeout.
No unique-names assumption is made (FOL semantics: two names may denote one thing).

z3-solver is an optional dependency (`pip install ftlab[sokrates]`); without it FOLIO checks stop
with one line.

FOLIO's target proof (`optionizer.optionize_folio`) and the check of a trace's steps
(`verifier.verify_folio_steps`) are built on this module, which imports neither of them.
"""
from __future__ import annotations

import functools
import re
from typing import Any

from ftlab.errors import UserError

TIMEOUT_MS = 10_000
_SYMBOLS = {"(": "(", ")": ")", ",": ",", "¬": "not", "∧": "and", "^": "and", "∨": "or", "⊕": "xor",
            "→": "imp", "↔": "iff", "⟷": "iff", "∀": "forall", "∃": "exists"}
_TOKEN_RE = re.compile(r"\s*(?:(?P<sym>[(),¬∧^∨⊕→↔⟷∀∃])|(?P<name>[^\s(),¬∧^∨⊕→↔⟷∀∃]+))")


class FolError(ValueError):
    """An annotation the parser cannot read (or a row without usable FOL)."""


def _tokens(text: str) -> list[tuple[str, str]]:
    s = text.strip().rstrip(".").strip()
    out, pos = [], 0
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if m is None or m.end() == pos:
            break
        pos = m.end()
        out.append(("sym", _SYMBOLS[m.group("sym")]) if m.group("sym") else ("name", m.group("name")))
    if not out:
        raise FolError("empty formula")
    return out


class _Parser:
    def __init__(self, text: str, wide: bool):
        self.text, self.toks, self.i, self.wide = text, _tokens(text), 0, wide
        self.bound: list[str] = []
        self.quantified: set[str] = set()
        self.constants: set[str] = set()

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise FolError(f"expected {value or 'more'} at token {self.i + 1} of {self.text.strip()!r}")
        self.i += 1
        return tok

    def parse(self) -> tuple:
        f = self.iff()
        if self.peek() is not None:
            raise FolError(f"unexpected {self.peek()[1]!r} at token {self.i + 1} of {self.text.strip()!r}")
        return f

    def iff(self) -> tuple:
        f = self.imp()
        while self.peek() == ("sym", "iff"):
            self.take()
            f = ("iff", f, self.imp())
        return f

    def imp(self) -> tuple:
        f = self.binary("xor")
        if self.peek() == ("sym", "imp"):
            self.take()
            return ("imp", f, self.imp())
        return f

    def binary(self, op: str) -> tuple:
        lower = {"xor": "or", "or": "and", "and": None}[op]
        f = self.binary(lower) if lower else self.unary()
        while self.peek() == ("sym", op):
            self.take()
            f = (op, f, self.binary(lower) if lower else self.unary())
        return f

    def unary(self) -> tuple:
        tok = self.peek()
        if tok == ("sym", "not"):
            self.take()
            return ("not", self.unary())
        if tok in (("sym", "forall"), ("sym", "exists")):
            self.take()
            kind, var = tok[1], self.take()
            if var[0] != "name":
                raise FolError(f"a quantifier needs a variable in {self.text.strip()!r}")
            self.bound.append(var[1])
            self.quantified.add(var[1])
            body = self.iff() if self.wide else self.unary()
            self.bound.pop()
            return (kind, var[1], body)
        if tok == ("sym", "("):
            self.take()
            f = self.iff()
            self.take(")")
            return f
        return self.atom()

    def atom(self) -> tuple:
        kind, name = self.take()
        if kind != "name":
            raise FolError(f"unexpected {name!r} at token {self.i} of {self.text.strip()!r}")
        args = self.arguments() if self.peek() == ("sym", "(") else []
        return ("atom", name, tuple(args))

    def arguments(self) -> list[tuple]:
        self.take("(")
        args = [self.term()]
        while self.peek() == ("sym", ","):
            self.take()
            args.append(self.term())
        self.take(")")
        return args

    def term(self) -> tuple:
        kind, name = self.take()
        if kind != "name":
            raise FolError(f"expected a name at token {self.i} of {self.text.strip()!r}")
        while self.peek() is not None and self.peek()[0] == "name":  # "captain america" (story 181): one name
            name += "_" + self.take()[1]
        if self.peek() == ("sym", "("):
            return ("fn", name, tuple(self.arguments()))
        if name in self.bound:
            return ("var", name)
        self.constants.add(name)
        return ("const", name)


@functools.lru_cache(maxsize=4096)
def parse_fol(text: str) -> tuple:
    """One annotation -> a formula tree (nested tuples); FolError when it cannot be read."""
    if not isinstance(text, str) or not text.strip():
        raise FolError("empty formula")
    tight = _Parser(text, wide=False)
    tree = tight.parse()
    if tight.constants & tight.quantified:  # "∀x A(x) → B(x)": x left free by the tight reading
        wide = _Parser(text, wide=True)
        tree = wide.parse()
        if wide.constants & wide.quantified:
            raise FolError(f"variable(s) {sorted(wide.constants & wide.quantified)} used outside their "
                           f"quantifier in {text.strip()!r}")
    return tree


# -- z3 ------------------------------------------------------------------------------------------
def require_z3():
    try:
        import z3
    except ImportError:
        raise UserError("FOLIO checks need the z3 solver: pip install 'ftlab[sokrates]' (or pip install "
                        "z3-solver)") from None
    return z3


class _Encoder:
    """Formula trees -> z3 terms, sharing one sort and one symbol table per problem."""

    def __init__(self):
        self.z3 = require_z3()
        self.obj = self.z3.DeclareSort("Obj")
        self.symbols: dict[tuple, Any] = {}

    def symbol(self, kind: str, name: str, arity: int):
        key = (kind, name, arity)
        if key not in self.symbols:
            z3 = self.z3
            if kind == "const":
                self.symbols[key] = z3.Const(f"c:{name}", self.obj)
            else:
                rng = z3.BoolSort() if kind == "pred" else self.obj
                self.symbols[key] = z3.Function(f"{kind}:{name}/{arity}", *([self.obj] * arity), rng)
        return self.symbols[key]

    def term(self, t: tuple, env: dict):
        if t[0] == "var":
            return env[t[1]]
        if t[0] == "const":
            return self.symbol("const", t[1], 0)
        return self.symbol("fn", t[1], len(t[2]))(*[self.term(a, env) for a in t[2]])

    def formula(self, f: tuple, env: dict | None = None):
        z3, env, op = self.z3, env or {}, f[0]
        if op == "atom":
            pred = self.symbol("pred", f[1], len(f[2]))
            return pred(*[self.term(a, env) for a in f[2]]) if f[2] else pred()
        if op == "not":
            return z3.Not(self.formula(f[1], env))
        if op in ("forall", "exists"):
            var = z3.Const(f"v:{f[1]}:{len(env)}", self.obj)
            body = self.formula(f[2], {**env, f[1]: var})
            return z3.ForAll([var], body) if op == "forall" else z3.Exists([var], body)
        a, b = self.formula(f[1], env), self.formula(f[2], env)
        return {"and": z3.And, "or": z3.Or, "xor": z3.Xor, "imp": z3.Implies, "iff": lambda x, y: x == y}[op](a, b)


def _encode(problem) -> tuple[Any, list, Any]:
    """(encoder, premise terms, conclusion term); FolError when the row's FOL cannot be used."""
    if problem.note:
        raise FolError(problem.note)
    enc = _Encoder()
    premises = [enc.formula(parse_fol(f)) for f in problem.premises_fol]
    return enc, premises, enc.formula(parse_fol(problem.conclusion_fol))


def premises_status(problem) -> str:
    """'consistent' / 'inconsistent' / 'unknown' for the premise formulas alone (FOLIO train has no
    conclusion-FOL, but its premises can still be checked); FolError when one cannot be read."""
    if problem.premises_fol is None:
        raise FolError("no premises-FOL list")
    enc = _Encoder()
    premises = [enc.formula(parse_fol(f)) for f in problem.premises_fol]
    return {"sat": "consistent", "unsat": "inconsistent"}.get(_sat(enc.z3, premises), "unknown")


def _sat(z3, formulas: list) -> str:
    s = z3.Solver()
    s.set("timeout", TIMEOUT_MS)
    s.add(*formulas)
    return str(s.check())  # "sat" / "unsat" / "unknown"


def _label(z3, premises: list, conclusion) -> str:
    with_neg, with_pos = _sat(z3, premises + [z3.Not(conclusion)]), _sat(z3, premises + [conclusion])
    if with_neg == "unsat" and with_pos == "unsat":
        return "Inconsistent"
    if with_neg == "unsat":
        return "True"
    if with_pos == "unsat":
        return "False"
    return "Uncertain" if with_neg == with_pos == "sat" else "SolverUnknown"


def solve_folio(problem) -> str:
    enc, premises, conclusion = _encode(problem)
    return _label(enc.z3, premises, conclusion)


def minimal_support(problem, verdict: str) -> list[int]:
    """A smallest-by-deletion set of premise indices the verdict (True/False) follows from."""
    enc, premises, conclusion = _encode(problem)
    z3 = enc.z3
    goal = z3.Not(conclusion) if verdict == "True" else conclusion
    keep = list(range(len(premises)))
    for i in list(keep):  # drop each premise the entailment does not need
        trial = [k for k in keep if k != i]
        if _sat(z3, [premises[k] for k in trial] + [goal]) == "unsat":
            keep = trial
    return keep


def check_conclude(problem, args: tuple[int, ...], verdict: str) -> None:
    """ValueError with the reason when CONCLUDE(args) with this verdict is not right."""
    enc, premises, conclusion = _encode(problem)
    z3 = enc.z3
    if args and not problem.fol_aligned:
        raise ValueError(f"this row has {len(problem.premises)} premises but {len(premises)} formulas, so "
                         "cited premises cannot be checked")
    for a in args:
        if not 0 <= a < len(premises):
            raise ValueError(f"index {a} does not exist (premises 0-{len(premises) - 1})")
    if verdict == "Uncertain":
        label = _label(z3, premises, conclusion)
        if label != "Uncertain":
            raise ValueError(f"the premises settle the conclusion ({label}), the thought says Uncertain")
        return
    cited = [premises[a] for a in args]
    if _sat(z3, cited) == "unsat":
        raise ValueError(f"premises {list(args)} contradict each other")
    goal = z3.Not(conclusion) if verdict == "True" else conclusion
    if _sat(z3, cited + [goal]) != "unsat":
        what = "imply the conclusion" if verdict == "True" else "refute the conclusion"
        raise ValueError(f"premises {list(args)} do not {what}")
