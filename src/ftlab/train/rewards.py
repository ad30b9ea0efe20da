"""GRPO rewards: plain Python callables named in the recipe, and the built-in ones.

    grpo:
      rewards:
        - {fn: correctness}                          # a built-in, by its short name
        - {fn: "my_rewards:brevity", weight: 0.1}    # module:function, imported from the Python path
        - {fn: "rewards/mine.py:brevity"}            # file.py:function, loaded from that file

A reward function is called once per generation round with keyword arguments, all lists with one entry
per completion (TRL's convention, so TRL reward functions run unchanged):

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], examples=[...], task=<Task or None>,
       **fields)

`prompts` are the rendered prompt texts, `completions` the decoded new text, `completion_ids` the new token
ids (the end-of-turn token included when the model stopped), `fields` the dataset's fields of each
completion's row (task data: the example's id, question, target, gold and its meta fields; generic JSONL:
every field of the row), `examples` the task's `Example` objects (None for generic rows) and `task` the task
object. It returns one float per completion, or None where the reward does not apply (left out of that
reward's statistics; a completion that no reward scores gets advantage 0). Accept `**kwargs` to ignore the rest.

The weighted sum of the rewards is each completion's reward. A function that raises, or returns the wrong
number of values or a non-number, stops the run with one line naming it.

Built-ins (`BUILTINS`): `correctness` (1 when the task's own checker, `task.score`, says correct, else 0),
`format` (1 when the task's strict answer rule reads an answer, e.g. PrOntoQA's "The answer is True."), and for
PrOntoQA problems the SOKRATES verifier's `step_validity` (share of Thought/Action steps the verifier accepts,
0 without steps), `verified_answer` (1 when the verdict the verifier reads, "The answer is X." in the concluding
thought, is the gold label) and `fully_valid` (1 when every step is valid, the trace ends in CONCLUDE and the
verdict is right). The verifier checks option traces: with `data.task: sokrates` the prompts ask for them.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ftlab.errors import UserError, first_line

RewardFn = Callable[..., list]
VERIFIER_TASKS = ("prontoqa", "sokrates")


# -- built-ins -------------------------------------------------------------------------------------------
def correctness(completions: list[str], examples: list, task: Any = None, **_: Any) -> list[float]:
    """1.0 where the task's own checker scores the completion correct, else 0.0."""
    return [float(bool(task.score(c, ex)["correct"])) for c, ex in zip(completions, examples)]


def format_reward(completions: list[str], examples: list, task: Any = None, **_: Any) -> list[float]:
    """1.0 where the task's strict rule reads an answer (the requested final-answer form), else 0.0; tasks with
    one rule: where it reads any answer."""
    out = []
    for c, ex in zip(completions, examples):
        score = task.score(c, ex)
        out.append(float(score.get("extracted_strict", score.get("extracted")) is not None))
    return out


def _problem(example: Any) -> Any:
    from ftlab.sokrates import problem_from_example

    problem = example.meta.get("problem")  # sokrates examples carry theirs
    if problem is None:
        problem = example.meta["_problem"] = example.meta.get("_problem") or problem_from_example(example, "prontoqa")
    return problem


def step_validity(completions: list[str], examples: list, **_: Any) -> list[float]:
    """Share of the trace's Thought/Action steps the SOKRATES verifier accepts (0.0 when it has none)."""
    from ftlab.sokrates import verify_trace

    out = []
    for c, ex in zip(completions, examples):
        report = verify_trace(_problem(ex), c)
        out.append(sum(report.step_valid) / len(report.step_valid) if report.step_valid else 0.0)
    return out


def verified_answer(completions: list[str], examples: list, **_: Any) -> list[float]:
    """1.0 when the trace's verdict, as the SOKRATES verifier reads it (the concluding thought's "The answer is X."),
    is the gold label, else 0.0: the OaK loop's answer_accuracy. Stricter than `correctness`, whose flexible rule
    also takes a right word anywhere in the text."""
    from ftlab.sokrates import verify_trace

    return [float(verify_trace(_problem(ex), c).answer_correct) for c, ex in zip(completions, examples)]


def fully_valid(completions: list[str], examples: list, **_: Any) -> list[float]:
    """1.0 when every step is valid, the trace ends in CONCLUDE and its verdict is the gold label, else 0.0."""
    from ftlab.sokrates import verify_trace

    return [float(verify_trace(_problem(ex), c).fully_valid) for c, ex in zip(completions, examples)]


BUILTINS: dict[str, RewardFn] = {"correctness": correctness, "format": format_reward,
                                 "step_validity": step_validity, "verified_answer": verified_answer,
                                 "fully_valid": fully_valid}
NEEDS_TASK = ("correctness", "format", "step_validity", "verified_answer", "fully_valid")
VERIFIER_REWARDS = ("step_validity", "verified_answer", "fully_valid")


# -- resolving the recipe's rewards -------------------------------------------------------------------------
@dataclass
class Reward:
    name: str        # as logged: rewards/<name>/mean
    spec: str        # as the recipe wrote it
    fn: RewardFn
    weight: float


def resolve_reward(spec: str, key: str) -> RewardFn:
    """The callable a `fn` value names: a built-in, `module:function` or `path/file.py:function`."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"{key}={spec!r}: expected a built-in ({', '.join(BUILTINS)}), 'module:function' or "
                        "'file.py:function'")
    try:
        module = _load_file(where) if where.endswith(".py") else importlib.import_module(where)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import is reported in one line
        raise UserError(f"{key}={spec!r}: cannot import {where!r} ({type(e).__name__}: {first_line(e)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{key}={spec!r}: {where!r} has no function {name!r}")
    return fn


def _load_file(path: str) -> Any:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"reward file {path!r} not found")
    spec = importlib.util.spec_from_file_location(f"ftlab_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def resolve_rewards(entries: list[Any], task_name: str | None) -> list[Reward]:
    """The recipe's `grpo.rewards` as callables (default: the task's correctness); one line for anything wrong."""
    if not entries:
        if task_name is None:
            raise UserError("grpo.rewards is empty and data.task is generic (no checker to score completions): "
                            "name reward functions, e.g. grpo.rewards=[{fn: 'my_module:my_reward'}]")
        entries = [{"fn": "correctness", "weight": 1.0, "name": None}]
    rewards: list[Reward] = []
    for i, entry in enumerate(entries):
        key = f"grpo.rewards[{i}].fn"
        spec = str(entry["fn"] or "")
        if not spec:
            raise UserError(f"{key} is empty: name a built-in ({', '.join(BUILTINS)}) or 'module:function'")
        if spec in NEEDS_TASK and task_name is None:
            raise UserError(f"{key}={spec!r} needs a task's checker, but data.task is generic")
        if spec in VERIFIER_REWARDS and task_name not in VERIFIER_TASKS:
            raise UserError(f"{key}={spec!r} runs the SOKRATES verifier on PrOntoQA problems: data.task must be one "
                            f"of {', '.join(VERIFIER_TASKS)}, got {task_name!r}")
        weight = float(entry["weight"])
        if not math.isfinite(weight):
            raise UserError(f"grpo.rewards[{i}].weight must be a finite number; got {weight}")
        name = entry["name"] or (spec if spec in BUILTINS else spec.rpartition(":")[2])
        if name in {r.name for r in rewards}:
            name = f"{name}_{i}"
        rewards.append(Reward(name=name, spec=spec, fn=resolve_reward(spec, key), weight=weight))
    return rewards


# -- calling them ----------------------------------------------------------------------------------------
def score_completions(rewards: list[Reward], kwargs: dict[str, Any], n: int) -> list[list[float]]:
    """Each reward's values for the `n` completions described by `kwargs` (NaN for None), reward by reward."""
    table = []
    for r in rewards:
        try:
            out = r.fn(**kwargs)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - a failing reward stops the run in one line naming it
            raise UserError(f"reward {r.name!r} ({r.spec}) raised {type(e).__name__}: {first_line(e)}") from None
        try:
            values = list(out)
        except TypeError:
            raise UserError(f"reward {r.name!r} ({r.spec}) returned {type(out).__name__}, not a list of "
                            f"{n} floats") from None
        if len(values) != n:
            raise UserError(f"reward {r.name!r} ({r.spec}) returned {len(values)} values for {n} completions "
                            "(one float or None per completion)")
        table.append([_as_float(v, r) for v in values])
    return table


def _as_float(value: Any, reward: Reward) -> float:
    if value is None:
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UserError(f"reward {reward.name!r} ({reward.spec}) returned {value!r}, not a number or None") from None
    return out
