"""Training data as conversations of text turns, from a task or from generic JSONL.

A sample is a list of turns [(text before answer 1, answer 1), (text between, answer 2), ...]; the
answers are supervised, the rest is not (`ftlab.data.sft.encode_sft_turns`). Most samples have one
turn: (prompt, response).

* `data.task: <task name>`: the task object loads the file and renders prompt and target, so
  training prompts are exactly the prompts evaluation uses. An example's `followups` (more questions
  on the same context) become later turns of the same conversation.
* `data.task: generic`: JSONL rows with `prompt` + `response`, or chat `messages` ending with an
  assistant turn (every assistant turn is supervised).
"""
from __future__ import annotations

from typing import Any

from ftlab.data.jsonl import iter_jsonl
from ftlab.errors import UserError

GENERIC = "generic"


Turns = list[tuple[str, str]]


def chat_turns(tokenizer: Any, msgs: list[dict], where: str) -> Turns:
    """Split a templated conversation into turns: the text before each assistant answer, and the answer.

    Rendered through the tokenizer's chat template; the text between two answers is what the
    template puts after an answer's EOS and before the next answer (turn markers, the next user
    message). Templates that rewrite earlier turns (e.g. drop past reasoning) cannot be split so.
    """
    turns: Turns = []
    done = ""  # the conversation so far, through the last answer and its EOS
    for k, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
        if not prompt.startswith(done):
            raise UserError(f"{where}: the chat template renders earlier turns differently in longer "
                            "conversations; train on one assistant turn per example")
        turns.append((prompt[len(done):], m["content"]))
        done = prompt + m["content"] + (tokenizer.eos_token or "")
    return turns


def generic_conversations(path: str, tokenizer: Any, chat_template: bool, limit: int | None = None) -> list[Turns]:
    samples = []
    for lineno, r in iter_jsonl(path):
        if "messages" in r:
            msgs = r["messages"]
            if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
                raise UserError(f"{path}:{lineno}: 'messages' must be a list ending with an assistant turn")
            samples.append(chat_turns(tokenizer, msgs, f"{path}:{lineno}"))
        elif "prompt" in r and "response" in r:
            prompt = r["prompt"]
            if chat_template and getattr(tokenizer, "chat_template", None):
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
            samples.append([(prompt, r["response"])])
        else:
            field = "response" if "prompt" in r else "prompt"
            raise UserError(f"{path}:{lineno}: missing field {field!r} (need prompt+response, or messages)")
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise UserError(f"{path}: file is empty (no JSON records)")
    return samples


def task_conversations(task: Any, examples: list, tokenizer: Any, shots: int, chat_template: bool) -> list[Turns]:
    return [task_turns(task, ex, tokenizer, shots, chat_template) for ex in examples]


def task_turns(task: Any, ex: Any, tokenizer: Any, shots: int, chat_template: bool) -> Turns:
    """The example's prompt and target, then its follow-up questions as later turns."""
    if ex.followups and chat_template and getattr(tokenizer, "chat_template", None):
        msgs = task.messages(ex, shots) + [{"role": "assistant", "content": ex.target}]
        for question, target in ex.followups:
            msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": target}]
        return chat_turns(tokenizer, msgs, f"{task.name} example {ex.id}")
    prompt = task.render_prompt(ex, shots=shots, tokenizer=tokenizer, chat_template=chat_template)
    # plain text: the same layout as `Task.render_prompt` (blank line between turns, "Answer:")
    return [(prompt, ex.target)] + [(f"\n\n{q}\nAnswer: ", t) for q, t in ex.followups]


def load_conversations(data_cfg: Any, source: str, split: str, tokenizer: Any, limit: int | None) -> list[Turns]:
    """Training conversations (usually one (prompt, response) turn) of one split as the recipe's data section describes."""
    if data_cfg.task == GENERIC:
        return generic_conversations(source, tokenizer, data_cfg.chat_template, limit)
    from ftlab.tasks import get_task

    task = get_task(data_cfg.task, **data_cfg.task_options)
    examples = task.load(source, split=split, limit=limit)
    if data_cfg.filter_correct:
        examples = [ex for ex in examples if task.score(ex.target, ex)["correct"]]
        if not examples:
            raise UserError(f"{source}: data.filter_correct kept no example")
    return task_conversations(task, examples, tokenizer, data_cfg.shots, data_cfg.chat_template)
