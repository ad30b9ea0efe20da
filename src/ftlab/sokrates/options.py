"""The option vocabulary and the trace syntax: "Thought: ..." lines, each followed by one Action line.

    Thought: Since Wren is a jompus (premise 0) and each jompus is nervous (premise 8), Wren is nervous.
    Action: <Option type="MODUS_PONENS" args="[0, 8]" />

The short form `Action: MODUS_PONENS [0, 8]` (`format_action(..., short=True)`, the quickstart's compact layout)
is the same option in 12 tokens instead of 23; both parse to the same Action.

Indices: premises are 0..P-1 in prompt order; every step except CONCLUDE derives one fact, which gets the
next index P, P+1, ... in step order (an invalid step still takes its index, so the numbering a trace
uses never shifts under it; citing that index is then an error).

Parsing never raises on model text: a malformed Action (unknown option, args that are not a list of
integers, a missing closing "/>") becomes a step with `error` set, which the verifier reports as an
invalid step with that reason.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class OptionSpec:
    name: str
    min_args: int
    max_args: int | None  # None: any number
    doc: str


VOCABULARY: dict[str, OptionSpec] = {spec.name: spec for spec in (
    OptionSpec("MODUS_PONENS", 2, 2, "args [fact, rule]: 'Wren is a jompus' and 'each jompus is [not] nervous' "
                                     "give 'Wren is [not] nervous'"),
    OptionSpec("MODUS_TOLLENS", 2, 2, "args [fact, rule]: 'Wren is not nervous' and 'each jompus is nervous' "
                                      "(or 'Wren is nervous' and 'each jompus is not nervous') give "
                                      "'Wren is not a jompus'"),
    OptionSpec("CONCLUDE", 0, None, "args: what settles the claim (PrOntoQA: the one fact that is the claim or "
                                    "its negation; FOLIO: the premises it follows from, none for Uncertain); "
                                    "the thought ends 'The answer is X.'"),
)}

_TAG_RE = re.compile(r'^<Option\s+type="(?P<type>[^"]*)"\s+args="(?P<args>[^"]*)"\s*(?P<close>/>)?(?P<rest>.*)$',
                     re.DOTALL)
_SHORT_RE = re.compile(r"^(?P<type>[A-Z][A-Z_]*)\s+(?P<args>\[[^\]]*\])(?P<close>)(?P<rest>.*)$", re.DOTALL)
_ARGS_RE = re.compile(r"^\[\s*(?:-?\d+\s*(?:,\s*-?\d+\s*)*)?\]$")
_THOUGHT_RE = re.compile(r"^\s*\**thought\**\s*:\**\s*", re.I)
_ACTION_RE = re.compile(r"^\s*\**action\**\s*:\**\s*", re.I)


class ActionError(ValueError):
    """Why an Action line is not a well-formed option of the vocabulary."""


@dataclass(frozen=True)
class Action:
    option: str
    args: tuple[int, ...]

    def text(self) -> str:
        return format_action(self.option, self.args)


def format_action(option: str, args: list[int] | tuple[int, ...], short: bool = False) -> str:
    listed = "[" + ", ".join(str(a) for a in args) + "]"
    return f"{option} {listed}" if short else f'<Option type="{option}" args="{listed}" />'


def parse_action(text: str) -> Action:
    """'<Option type="MODUS_PONENS" args="[0, 8]" />' (or 'MODUS_PONENS [0, 8]') -> Action; ActionError with the
    reason otherwise."""
    s = text.strip()
    m = _TAG_RE.match(s) or _SHORT_RE.match(s)
    if m is None:
        if not s.startswith("<Option"):
            raise ActionError(f"the action is not an <Option .../> tag: {s[:60]!r}")
        raise ActionError(f'the tag needs type="..." then args="[...]": {s[:60]!r}')
    if m.group("close") is None:
        raise ActionError("missing closing '/>'")
    if m.group("rest").strip():
        raise ActionError(f"text after the closing '/>': {m.group('rest').strip()[:40]!r}")
    option = m.group("type").strip()
    spec = VOCABULARY.get(option)
    if spec is None:
        raise ActionError(f"unknown option {option!r} (known: {', '.join(VOCABULARY)})")
    raw = m.group("args").strip()
    if not _ARGS_RE.match(raw):
        raise ActionError(f"args {raw!r} is not a list of integers")
    args = tuple(int(a) for a in re.findall(r"-?\d+", raw))
    if len(args) < spec.min_args or (spec.max_args is not None and len(args) > spec.max_args):
        want = str(spec.min_args) if spec.max_args == spec.min_args else f"at least {spec.min_args}"
        raise ActionError(f"{option} takes {want} args, got {len(args)}")
    return Action(option, args)


@dataclass
class Step:
    thought: str
    action_text: str | None       # the text after "Action:", None when the line is missing
    action: Action | None = None  # None when the line is missing or malformed (see `error`)
    error: str | None = None

    def text(self) -> str:
        return f"Thought: {self.thought}\nAction: {self.action_text if self.action_text is not None else ''}"


def make_step(thought: str, option: str, args: list[int] | tuple[int, ...], short: bool = False) -> Step:
    action = Action(option, tuple(args))
    return Step(thought, format_action(option, action.args, short), action)


def format_steps(steps: list[Step]) -> str:
    return "\n".join(step.text() for step in steps)


def parse_steps(text: str) -> list[Step]:
    """The Thought/Action steps of a trace, in order. A thought may span lines; an Action line without a
    thought gets an empty one; a thought without an Action line is a step with an error."""
    steps: list[Step] = []
    thought: list[str] | None = None
    for line in str(text).splitlines():
        if _THOUGHT_RE.match(line):
            if thought is not None:
                steps.append(Step(" ".join(thought).strip(), None, error="the thought has no Action line"))
            thought = [_THOUGHT_RE.sub("", line, count=1)]
        elif _ACTION_RE.match(line):
            action_text = _ACTION_RE.sub("", line, count=1).strip()
            step = Step(" ".join(thought or []).strip(), action_text)
            try:
                step.action = parse_action(action_text)
            except ActionError as e:
                step.error = str(e)
            steps.append(step)
            thought = None
        elif thought is not None and line.strip():
            thought.append(line.strip())
    if thought is not None:
        steps.append(Step(" ".join(thought).strip(), None, error="the thought has no Action line"))
    return steps
