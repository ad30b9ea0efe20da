"""Task registry: `get_task("gsm8k")` returns the object that loads, prompts and scores that dataset."""
from __future__ import annotations

from typing import Any

from ftlab.errors import UserError
from ftlab.tasks.base import Example, Task
from ftlab.tasks.folio import FolioTask
from ftlab.tasks.gsm8k import GSM8KTask, parse_gsm8k_response
from ftlab.tasks.prontoqa import ProntoQATask, parse_logipt_conversation
from ftlab.tasks.prontoqa_gen import generate_prontoqa
from ftlab.tasks.socsci210 import SocSci210Task
from ftlab.tasks.sokrates import SokratesTask

TASKS: dict[str, type[Task]] = {
    "folio": FolioTask,
    "gsm8k": GSM8KTask,
    "prontoqa": ProntoQATask,
    "socsci210": SocSci210Task,
    "sokrates": SokratesTask,
}


def get_task(name: str, **options: Any) -> Task:
    """The task called `name`, built with `options` (e.g. get_task("gsm8k", socratic_subquestions=False))."""
    cls = TASKS.get(str(name).strip().lower())
    if cls is None:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    try:
        return cls(**options)
    except TypeError as e:  # an option the task does not take: a user typo, not a bug
        raise UserError(f"task {cls.name!r}: bad options {sorted(options)}: {e}") from None


__all__ = [
    "TASKS", "get_task", "Task", "Example",
    "FolioTask", "GSM8KTask", "ProntoQATask", "SocSci210Task", "SokratesTask",
    "parse_gsm8k_response", "parse_logipt_conversation", "generate_prontoqa",
]
