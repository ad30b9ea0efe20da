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

from ftlab.data.jsonl import iter_jsonl, json_type, text_field
from ftlab.errors import UserError

GENERIC = "generic"


Turns = list[tuple[str, str]]


def chat_turns(tokenizer: Any, msgs: list[dict], where: str) -> Turns:
    """Split a templated conversation into turns: the text before each assistant answer, and the answer.

    Rendered through the tokenizer's chat template; each answer ends with the template's end-of-turn
    text (`chat_terminator`, e.g. `<|im_end|>`), and the text between two answers is what the template
    puts after that and before the next answer (turn markers, the next user message). Templates that
    rewrite earlier turns (e.g. drop past reasoning) cannot be split so.
    """
    # imported here: sft imports torch, and the CLI's parser reaches this module
    from ftlab.data.sft import Conversation, chat_terminator

    terminator = chat_terminator(tokenizer)
    turns = Conversation(terminator=terminator)
    done = ""  # the conversation so far, through the last answer and its terminator
    for k, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        prompt = render_chat(tokenizer, msgs[:k], where)
        if not prompt.startswith(done):
            raise UserError(f"{where}: the chat template renders earlier turns differently in longer "
                            "conversations; train on one assistant turn per example")
        turns.append((prompt[len(done):], m["content"]))
        done = prompt + m["content"] + (terminator or tokenizer.eos_token or "")
    return turns


def check_messages(msgs: Any, where: str) -> list[dict]:
    """`msgs` as chat messages: a non-empty list of {role, content} objects with string values.

    Anything else (a list of strings, a turn without content, content that is a number) is a one-line
    error naming the file:line and the field, not a KeyError deep inside a chat template.
    """
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: field 'messages' must be a non-empty array of {{role, content}} objects; "
                        f"got {json_type(msgs) if msgs != [] else 'an empty array'}")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UserError(f"{where}: field 'messages[{k}]' must be an object with 'role' and 'content'; "
                            f"got {json_type(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise UserError(f"{where}: field 'messages[{k}]' has no {key!r}")
            if not isinstance(m[key], str):
                raise UserError(f"{where}: field 'messages[{k}].{key}' must be a string; got {json_type(m[key])}")
    return msgs


def render_chat(tokenizer: Any, msgs: list[dict], where: str) -> str:
    """The chat template applied to `msgs`, ready for the next assistant turn; a template that rejects
    the conversation (roles out of order, no template at all) is a one-line error naming file:line."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where}: 'messages' need a tokenizer with a chat template; this one has none "
                        "(write 'prompt' rows instead)")
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:  # templates raise on conversations they do not support
        raise UserError(f"{where}: the chat template rejects these messages: {e}") from None


def prompt_text(record: dict, where: str, tokenizer: Any, chat_template: bool) -> str:
    """A generic row's prompt as a model continues it: chat `messages` rendered with the template and the
    generation prompt, or a `prompt` text (put in a user turn when the template is used). The one rule of
    `ftlab infer` and GRPO's generic prompts, so both prompt a model as SFT trained it."""
    if "messages" in record:
        return render_chat(tokenizer, check_messages(record["messages"], where), where)
    if "prompt" in record:
        text = text_field(record, "prompt", where)
        if chat_template and getattr(tokenizer, "chat_template", None):
            text = render_chat(tokenizer, [{"role": "user", "content": text}], where)
        return text
    raise UserError(f"{where}: missing field 'prompt' (or chat 'messages')")


def generic_conversations(path: str, tokenizer: Any, chat_template: bool, limit: int | None = None) -> list[Turns]:
    samples = []
    for lineno, r in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" in r:
            msgs = check_messages(r["messages"], where)
            if msgs[-1]["role"] != "assistant":
                raise UserError(f"{where}: 'messages' must be a list ending with an assistant turn (the answer "
                                "to train on)")
            samples.append(chat_turns(tokenizer, msgs, where))
        elif "prompt" in r and "response" in r:
            prompt, response = text_field(r, "prompt", where), text_field(r, "response", where)
            if chat_template and getattr(tokenizer, "chat_template", None):
                prompt = render_chat(tokenizer, [{"role": "user", "content": prompt}], where)
            samples.append([(prompt, response)])
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
        if data_cfg.filter_correct:  # generic rows have no gold answer and no checker to score them with
            raise UserError("data.filter_correct needs a task to check answers: use data.task: <task> with the "
                            "model responses in a 'response' field (see ftlab.data.responses)")
        samples = generic_conversations(source, tokenizer, data_cfg.chat_template, limit)
        return with_terminators(samples, tokenizer, data_cfg.chat_template)
    from ftlab.data.responses import training_examples
    from ftlab.tasks import get_task

    task = get_task(data_cfg.task, **data_cfg.task_options)
    # The filter selects training data; validation keeps every example, so val loss stays comparable
    # between a filtered run and its unfiltered baseline.
    filter_correct = data_cfg.filter_correct and source == data_cfg.train
    examples = training_examples(task, source, split, limit, filter_correct)
    samples = task_conversations(task, examples, tokenizer, data_cfg.shots, data_cfg.chat_template)
    return with_terminators(samples, tokenizer, data_cfg.chat_template)


def with_terminators(samples: list[Turns], tokenizer: Any, chat_template: bool) -> list[Turns]:
    """Samples rendered through the chat template end each answer with the template's end of turn
    (a model then learns to stop as the template says); plain-text samples end with EOS."""
    # imported here: sft imports torch, and the CLI's parser reaches this module
    from ftlab.data.sft import Conversation, chat_terminator

    terminator = chat_terminator(tokenizer) if chat_template else None
    return [s if isinstance(s, Conversation) else Conversation(s, terminator) for s in samples]
