"""Training data as (prompt, response) text pairs, from a task or from generic JSONL.

* `data.task: <task name>`: the task object loads the file and renders prompt and target, so
  training prompts are exactly the prompts evaluation uses.
* `data.task: generic`: JSONL rows with `prompt` + `response`, or chat `messages` whose last turn
  is the assistant's answer (only that turn is supervised).
"""
from __future__ import annotations

from typing import Any

from ftlab.data.jsonl import iter_jsonl
from ftlab.errors import UserError

GENERIC = "generic"


def generic_pairs(path: str, tokenizer: Any, chat_template: bool, limit: int | None = None) -> list[tuple[str, str]]:
    pairs = []
    for lineno, r in iter_jsonl(path):
        if "messages" in r:
            msgs = r["messages"]
            if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
                raise UserError(f"{path}:{lineno}: 'messages' must be a list ending with an assistant turn")
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            pairs.append((prompt, msgs[-1]["content"]))
        elif "prompt" in r and "response" in r:
            prompt = r["prompt"]
            if chat_template and getattr(tokenizer, "chat_template", None):
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
            pairs.append((prompt, r["response"]))
        else:
            field = "response" if "prompt" in r else "prompt"
            raise UserError(f"{path}:{lineno}: missing field {field!r} (need prompt+response, or messages)")
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise UserError(f"{path}: file is empty (no JSON records)")
    return pairs


def task_pairs(task: Any, examples: list, tokenizer: Any, shots: int, chat_template: bool) -> list[tuple[str, str]]:
    return [(task.render_prompt(ex, shots=shots, tokenizer=tokenizer, chat_template=chat_template), ex.target)
            for ex in examples]


def load_pairs(data_cfg: Any, source: str, split: str, tokenizer: Any, limit: int | None) -> list[tuple[str, str]]:
    """(prompt, response) pairs of one split as the recipe's data section describes."""
    if data_cfg.task == GENERIC:
        return generic_pairs(source, tokenizer, data_cfg.chat_template, limit)
    from ftlab.tasks import get_task

    task = get_task(data_cfg.task, **data_cfg.task_options)
    examples = task.load(source, split=split, limit=limit)
    if data_cfg.filter_correct:
        examples = [ex for ex in examples if task.score(ex.target, ex)["correct"]]
        if not examples:
            raise UserError(f"{source}: data.filter_correct kept no example")
    return task_pairs(task, examples, tokenizer, data_cfg.shots, data_cfg.chat_template)
