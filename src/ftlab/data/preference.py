"""Preference pairs for DPO: reading, encoding, and the pair audit that runs before step 1.

Rows (JSONL with `data.task: generic`, or dicts handed to `ftlab.train.dpo.run_dpo(cfg, pairs=...)`):

* `{"prompt": "...", "chosen": "...", "rejected": "..."}`: the prompt becomes a user turn through the chat
  template (when `data.chat_template` and the tokenizer has one), as SFT's generic rows do;
* `{"messages": [...], "chosen": ..., "rejected": ...}` (or `prompt` given as a list of messages, TRL's
  conversational form): the conversation so far, ending with a user turn; chosen and rejected are the
  next assistant turn, each a string, an assistant message, or a list holding one.
* `"partial": true` in either form: chosen and rejected are the next part of an answer that goes on (one
  step of a proof), so no end-of-turn token is added after them.

With `data.task: <task>` the task builds the pairs itself: its target as chosen, `task.rejected_response`
as rejected (e.g. PrOntoQA's proof with the wrong verdict).

Encoding: the prompt is rendered and tokenized ONCE (`prompt_ids`: no special tokens added, a BOS only
where the tokenizer puts one in front of text) and shared by both responses, so chosen and rejected
have exactly the same prompt tokens; each response ends with the template's end-of-turn token (EOS
for plain text; none for `partial` rows), which is supervised; only response tokens carry loss. A pair is
`{"where", "prompt_len", "chosen", "rejected", "truncated", "problem"}` with full token id lists.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from ftlab.data.jsonl import iter_jsonl, json_type
from ftlab.data.sft import (MARK_OPEN, _ids, adds_bos, answer_end_ids, chat_terminator, prompt_ids,
                            render_supervision)
from ftlab.data.sources import check_messages, render_chat
from ftlab.errors import UserError

log = logging.getLogger("ftlab")

ROW_FORMS = "prompt + chosen + rejected, or messages + chosen + rejected"


@dataclass
class TextPair:
    where: str                 # file:line, or where else the pair came from
    prompt: str                # rendered once (chat template applied)
    chosen: str
    rejected: str
    terminator: str | None     # what ends an answer (None: EOS)
    templated: bool = False    # the prompt went through the chat template
    partial: bool = False      # the responses are part of an answer: no end-of-turn token after them


# -- rows -> text pairs ------------------------------------------------------------------------------
def response_text(row: dict, key: str, where: str) -> str:
    """`row[key]` as text: a string, an assistant message, or a list holding one assistant message."""
    if key not in row:
        other = [k for k in ("chosen", "rejected") if k != key and k in row]
        raise UserError(f"{where}: missing field {key!r} (a preference row needs {ROW_FORMS})"
                        + (f"; it has {other[0]!r}" if other else ""))
    value = row[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or not isinstance(value.get("content"), str):
            raise UserError(f"{where}: field {key!r} must be an assistant message {{role: assistant, content: "
                            "string}")
        value = value["content"]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} must be a string or one assistant message; got {json_type(value)}")
    return value


def row_pair(row: dict, where: str, tokenizer: Any, chat_template: bool) -> TextPair:
    """One preference row as a text pair (see the module docstring for the accepted forms)."""
    msgs = row.get("messages", row.get("prompt") if isinstance(row.get("prompt"), list) else None)
    if msgs is None and "prompt" not in row:
        raise UserError(f"{where}: missing field 'prompt' (a preference row needs {ROW_FORMS})")
    chosen, rejected = response_text(row, "chosen", where), response_text(row, "rejected", where)
    partial = row.get("partial", False)
    if not isinstance(partial, bool):
        raise UserError(f"{where}: field 'partial' must be true or false; got {json_type(partial)}")
    if msgs is not None:
        msgs = check_messages(msgs, where)
        if msgs[-1]["role"] == "assistant":
            raise UserError(f"{where}: the prompt messages end with an assistant turn; they must end where the "
                            "answer goes (chosen and rejected are the next assistant turn)")
        return TextPair(where, render_chat(tokenizer, msgs, where), chosen, rejected, chat_terminator(tokenizer),
                        templated=True, partial=partial)
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        raise UserError(f"{where}: field 'prompt' must be a string or a list of messages; got {json_type(prompt)}")
    if chat_template and getattr(tokenizer, "chat_template", None):
        rendered = render_chat(tokenizer, [{"role": "user", "content": prompt}], where)
        return TextPair(where, rendered, chosen, rejected, chat_terminator(tokenizer), templated=True, partial=partial)
    return TextPair(where, prompt, chosen, rejected, None, partial=partial)


def rows_to_pairs(rows: Iterable[tuple[str, dict]], tokenizer: Any, chat_template: bool,
                  limit: int | None = None) -> list[TextPair]:
    pairs = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with {ROW_FORMS}; got {json_type(row)}")
        pairs.append(row_pair(row, where, tokenizer, chat_template))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def generic_pairs(path: str, tokenizer: Any, chat_template: bool, limit: int | None = None) -> list[TextPair]:
    pairs = rows_to_pairs(((f"{path}:{n}", r) for n, r in iter_jsonl(path)), tokenizer, chat_template, limit)
    if not pairs:
        raise UserError(f"{path}: file is empty (no JSON records)")
    return pairs


def task_pairs(task: Any, source: str, split: str, limit: int | None, tokenizer: Any, shots: int,
               chat_template: bool) -> list[TextPair]:
    """Pairs the task builds from its own examples: its target as chosen, `task.rejected_response` as rejected."""
    located = task.load_records(source, split, limit)
    templated = chat_template and bool(getattr(tokenizer, "chat_template", None))
    terminator = chat_terminator(tokenizer) if templated else None
    return [TextPair(where, task.render_prompt(ex, shots=shots, tokenizer=tokenizer, chat_template=chat_template),
                     ex.target, task.rejected_response(ex), terminator, templated)
            for (where, _), ex in zip(located, task.examples_from(located))]


# -- text pairs -> token ids -------------------------------------------------------------------------
def encode_pair(tp: TextPair, tokenizer: Any, max_length: int, bos: bool | None = None) -> dict[str, Any]:
    """Token ids of both sequences, sharing one tokenization of the prompt; `problem` says why the pair
    cannot be trained on (None when it can). Sequences hold at most max_length + 1 tokens (max_length
    inputs); a longer response is cut from the right (its end-of-turn token then goes too), `truncated`."""
    prompt = prompt_ids(tokenizer, tp.prompt, bos)
    end = [] if tp.partial else answer_end_ids(tokenizer, tp.terminator)
    chosen, rejected = prompt + _ids(tokenizer, tp.chosen) + end, prompt + _ids(tokenizer, tp.rejected) + end
    limit = max_length + 1
    problem = None
    if not tp.chosen.strip() or not tp.rejected.strip():
        problem = f"the {'chosen' if not tp.chosen.strip() else 'rejected'} response is empty"
    elif len(prompt) > max_length:
        problem = (f"the prompt has {len(prompt)} tokens, more than data.max_length={max_length} (no room for a "
                   "response)")
    return {"where": tp.where, "prompt_len": len(prompt), "chosen": chosen[:limit], "rejected": rejected[:limit],
            "truncated": max(len(chosen), len(rejected)) > limit, "problem": problem,
            "templated": tp.templated}


def shifted(full: list[int], prompt_len: int) -> dict[str, list]:
    """Inputs, next-token labels and the response mask of one sequence (label j is token j + 1)."""
    return {"input_ids": full[:-1], "labels": full[1:],
            "response_mask": [j + 1 >= prompt_len for j in range(len(full) - 1)]}


# -- the pair audit ------------------------------------------------------------------------------------
@dataclass
class PairReport:
    n: int
    dropped: dict[str, int] = field(default_factory=dict)   # reason -> count
    truncated: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    samples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        drops = ", ".join(f"{v} {k}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"{self.n} preference pairs: {sum(self.dropped.values())} dropped ({drops}), {self.truncated} "
                f"truncated; {self.response_tokens} response tokens supervised, {self.prompt_tokens} prompt tokens")


def template_writes_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not getattr(tokenizer, "chat_template", None):
        return False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render this simply writes no BOS we can see
        return False
    return text.startswith(bos)


def pair_problem(pair: dict[str, Any], bos_id: int | None, tokenizer_bos: bool, template_bos: bool) -> str | None:
    """Why a pair cannot be trained on, or None (see `audit_pairs`)."""
    if pair["problem"]:
        return pair["problem"]
    p, chosen, rejected = pair["prompt_len"], pair["chosen"], pair["rejected"]
    if p == 0:
        return "the prompt has no token (nothing to condition the first response token on)"
    if chosen[:p] != rejected[:p]:
        k = next(i for i, (a, b) in enumerate(zip(chosen[:p], rejected[:p])) if a != b)
        return f"chosen and rejected do not share the same prompt tokens (first difference at token {k})"
    if bos_id is not None:
        lead = next((i for i, t in enumerate(chosen[:p]) if t != bos_id), p)
        if lead > 1:
            return f"the prompt starts with {lead} BOS tokens (the template wrote one and another was added?)"
        if lead == 0 and (tokenizer_bos or (template_bos and pair.get("templated"))):
            return "the prompt does not start with the BOS token its model expects"
    if len(chosen) <= p or len(rejected) <= p:
        return f"the {'chosen' if len(chosen) <= p else 'rejected'} response has no token"
    if chosen == rejected:
        return "chosen and rejected are identical" + (" within data.max_length" if pair["truncated"] else "")
    return None


def audit_pairs(pairs: list[dict[str, Any]], tokenizer: Any, max_bad_share: float,
                n_show: int = 2) -> tuple[list[dict[str, Any]], PairReport]:
    """Check every pair before any compute; returns (pairs to train on, report).

    A pair is bad when a response is empty, the prompt leaves no room for a response in max_length,
    chosen and rejected do not share identical prompt tokens, the prompt does not start with exactly
    one BOS where the tokenizer or the template puts one, or chosen equals rejected. Bad pairs are
    dropped; truncated pairs are kept. When bad + truncated pairs exceed `max_bad_share` of all pairs
    (or none is left), the run stops with one line naming the first bad row and the reason.
    """
    if not pairs:
        raise UserError("the preference data is empty")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    tokenizer_bos, template_bos = adds_bos(tokenizer), template_writes_bos(tokenizer)
    report = PairReport(n=len(pairs))
    kept, first_bad = [], None
    for pair in pairs:
        problem = pair_problem(pair, bos_id, tokenizer_bos, template_bos)
        if problem:
            reason = problem.split(" (")[0]
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            first_bad = first_bad or f"{pair['where']}: {problem}"
            continue
        kept.append(pair)
        report.truncated += pair["truncated"]
        if pair["truncated"] and first_bad is None:
            first_bad = f"{pair['where']}: a response is cut at data.max_length"
        report.prompt_tokens += pair["prompt_len"]
        report.response_tokens += len(pair["chosen"]) + len(pair["rejected"]) - 2 * pair["prompt_len"]
    bad = len(pairs) - len(kept)
    share = (bad + report.truncated) / len(pairs)
    if not kept or share > max_bad_share:
        raise UserError(f"{bad + report.truncated} of {len(pairs)} preference pairs ({share:.1%}) are bad "
                        f"({bad} dropped, {report.truncated} truncated), above data.max_bad_share="
                        f"{max_bad_share:.1%}; first: {first_bad}")
    if first_bad:
        log.warning("pair audit: %d of %d pairs dropped, %d truncated (within data.max_bad_share=%.1f%%); first: %s",
                    bad, len(pairs), report.truncated, 100 * max_bad_share, first_bad)
    report.samples = [render_pair(pair, tokenizer) for pair in kept[:n_show]]
    return kept, report


def render_pair(pair: dict[str, Any], tokenizer: Any) -> str:
    """Both sequences decoded, supervised tokens in «...» (the prompt once: it is shared)."""
    p = pair["prompt_len"]
    chosen = render_supervision(shifted(pair["chosen"], p), tokenizer)
    rejected = render_supervision(shifted(pair["rejected"], p), tokenizer)
    cut = chosen.find(MARK_OPEN)
    return f"{pair['where']}\n{chosen[:cut]}\n  chosen:   {chosen[cut:]}\n  rejected: {rejected[cut:]}"
