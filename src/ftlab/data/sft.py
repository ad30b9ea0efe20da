"""Turning (prompt, response) pairs into supervised token sequences, and checking them before training.

The label convention matches `ftlab.losses`: `labels` are the next-token ids (already shifted, same
length as `input_ids`) and `response_mask` marks which labels are trained on. Only response tokens
(and the terminator that ends a complete response: the chat template's end-of-turn token, or EOS for
plain text) are supervised; prompt tokens and padding never are.

Generation (`ftlab.generate.hf`) tokenizes prompts with `prompt_ids` and stops on `stop_token_ids`,
the same rules training uses here, so an evaluated model sees prompts exactly as it was trained on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from ftlab.errors import UserError

logger = logging.getLogger(__name__)


def _ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with no BOS/EOS added: templates and callers decide special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- how a sequence starts and how an answer ends --------------------------------------------------
def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS in front of text by default, i.e. its model expects one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return with_special[:1] == [bos] and _ids(tokenizer, "a")[:1] != [bos]


def prompt_ids(tokenizer: Any, text: str, bos: bool | None = None) -> list[int]:
    """Token ids of the text a sequence starts with, as training and generation both tokenize it.

    No special tokens are added: a rendered chat template already holds what the model needs, and a
    template that writes a BOS keeps exactly that one (adding the tokenizer's default BOS too would
    give two). The one exception is a tokenizer that puts a BOS in front of text by default (Llama,
    Gemma, Mistral): text that does not start with it, such as a plain-text prompt, gets it, as the
    model saw in pretraining. `bos` is `adds_bos(tokenizer)` when the caller already computed it.
    """
    ids = _ids(tokenizer, text)
    if (adds_bos(tokenizer) if bos is None else bos) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [int(tokenizer.bos_token_id)] + ids
    return ids


class Conversation(list):
    """A sample's turns [(text before answer k, answer k)], plus `terminator`: the text that ends each
    answer (the chat template's end of turn; None: the tokenizer's EOS token, as for plain text).

    A list subclass so that code handling samples as plain lists of turns keeps working;
    `encode_sft_turns` reads the terminator from here.
    """

    def __init__(self, turns: Iterable[tuple[str, str]] = (), terminator: str | None = None):
        super().__init__(turns)
        self.terminator = terminator


_ANSWER_MARK = "FTLAB-ANSWER-MARK"  # a string no template rewrites, splits or contains
_terminators: dict[tuple, str | None] = {}  # (template, bos, eos) -> terminator: rendered once per template


def chat_terminator(tokenizer: Any) -> str | None:
    """What the chat template writes right after an assistant answer, through its first special token.

    `<|im_end|>` for ChatML, `<end_of_turn>` for Gemma, `<|eot_id|>` for Llama 3: the token a chat
    model emits to end its turn, which is not always `tokenizer.eos_token` (Gemma's is `<eos>`).
    Found by rendering a one-turn conversation and reading what follows the answer. None when there
    is no template, it cannot render such a conversation, or it ends answers without a special token
    (answers then end with the EOS token, as for plain text).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        return None
    key = (template, tokenizer.bos_token, tokenizer.eos_token)
    if key not in _terminators:
        _terminators[key] = _find_terminator(tokenizer)
    return _terminators[key]


def _find_terminator(tokenizer: Any) -> str | None:
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _ANSWER_MARK}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as e:  # noqa: BLE001 - the template's own error (jinja raise_exception): fall back to EOS
        logger.debug("chat template cannot render a one-turn conversation (%s); answers end with EOS", e)
        return None
    at = text.rfind(_ANSWER_MARK)
    if at < 0:
        return None
    after = text[at + len(_ANSWER_MARK):]
    special = set(getattr(tokenizer, "all_special_tokens", []))
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    ends = [after.find(s) + len(s) for s in special if s and s in after]
    # through the earliest special token, with any text the template writes between answer and token
    return after[: min(ends)] if ends else None


def answer_end_ids(tokenizer: Any, terminator: str | None = None) -> list[int]:
    """The supervised tokens after each answer: the terminator's tokens, or the EOS token."""
    if terminator:
        ids = _ids(tokenizer, terminator)
        if ids:
            return ids
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; SFT needs one to teach the model to stop")
    return [int(eos)]


def stop_token_ids(tokenizer: Any) -> set[int]:
    """Tokens that end an answer: EOS and the chat template's end-of-turn token (what SFT supervises)."""
    ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    terminator = chat_terminator(tokenizer)
    if terminator:
        ids.update(_ids(tokenizer, terminator)[-1:])
    return ids


def padding_id(tokenizer: Any, stop_ids: set[int] | None = None) -> int:
    """The id that fills padding positions (they are masked out, so any valid id works): the tokenizer's
    pad token when it has one.

    Without one, the fallback depends on the caller:

    * `stop_ids=None` (SFT batches): the tokenizer's EOS; a UserError when it has none either;
    * `stop_ids` given (generation, `ftlab.generate.hf`: the ids a row stops on): the smallest of them,
      else 0; never an error, since a prompt needs no padding of its own.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if stop_ids is not None:
        return min(stop_ids) if stop_ids else 0
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
    return int(tokenizer.eos_token_id)


def tokenize_prompt_and_output(
    prompt_strs: Sequence[str],
    output_strs: Sequence[str],
    tokenizer: Any,
) -> dict[str, torch.Tensor]:
    """Batch-tokenize prompts and outputs into right-padded, shifted tensors.

    Prompt and output are tokenized separately (no special tokens) and concatenated, so the boundary
    between them is exact even when the joint string would merge tokens across it. With L the longest
    prompt+output length, returns `input_ids` = full[:, :-1], `labels` = full[:, 1:] and
    `response_mask` (True exactly where the label is an output token), each of shape (batch, L - 1).
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"{len(prompt_strs)} prompts but {len(output_strs)} outputs")
    pad = padding_id(tokenizer)
    prompts = [_ids(tokenizer, p) for p in prompt_strs]
    outputs = [_ids(tokenizer, o) for o in output_strs]
    max_len = max(len(p) + len(o) for p, o in zip(prompts, outputs))

    full = torch.full((len(prompts), max_len), pad, dtype=torch.long)
    is_output = torch.zeros((len(prompts), max_len), dtype=torch.bool)
    for row, (p, o) in enumerate(zip(prompts, outputs)):
        full[row, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        is_output[row, len(p) : len(p) + len(o)] = True
    return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": is_output[:, 1:]}


def encode_sft_example(prompt: str, response: str, tokenizer: Any, max_length: int) -> dict[str, Any] | None:
    """Encode one training example: prompt ids + response ids + [EOS], shifted for next-token loss.

    The prompt is tokenized by `prompt_ids`: no special tokens added, since it already contains the
    rendered chat template, except a BOS in front of text without one when the tokenizer adds one by
    default. The EOS after the response is supervised, so the model learns to stop.

    Returns {"input_ids", "labels", "response_mask", "truncated"} with three lists of length n - 1
    (n = number of tokens kept), or None when the example must be dropped.

    Truncation policy (the sequence may hold at most max_length + 1 tokens, i.e. max_length inputs):
      * a too-long example is cut from the right and marked truncated=True. The cut removes the EOS,
        and no EOS is appended in its place: a cut-off response must not teach the model to stop
        mid-answer. The kept response tokens are still supervised.
      * if the prompt alone leaves no room for a single response token, the example is dropped
        (None): it would train on nothing. Prompts are never truncated, since cutting the start of a
        prompt would remove the template and the instruction.
    """
    return encode_sft_turns([(prompt, response)], tokenizer, max_length)


def encode_sft_turns(turns: Sequence[tuple[str, str]], tokenizer: Any, max_length: int,
                     terminator: str | None = None) -> dict[str, Any] | None:
    """Encode a conversation with several supervised answers: `turns` is [(text before answer k, answer k)].

    Each answer is followed by its supervised terminator: `terminator`, else the conversation's own
    (`Conversation.terminator`: what the chat template writes after an assistant turn, e.g.
    `<|im_end|>`), else the EOS token. The text between answers (the template's turn markers and the
    next user message) is not supervised. The first text goes through `prompt_ids` (the BOS rule
    generation uses too). Same output and truncation policy as `encode_sft_example`, which is the
    one-turn case.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not turns:
        raise ValueError("a conversation needs at least one (prompt, response) turn")
    end_ids = answer_end_ids(tokenizer, terminator or getattr(turns, "terminator", None))
    bos = adds_bos(tokenizer)
    full: list[int] = []
    supervised: list[bool] = []
    for k, (before, answer) in enumerate(turns):
        context_ids = prompt_ids(tokenizer, before, bos) if k == 0 else _ids(tokenizer, before)
        answer_ids = _ids(tokenizer, answer) + end_ids
        full += context_ids + answer_ids
        supervised += [False] * len(context_ids) + [True] * len(answer_ids)
    truncated = len(full) > max_length + 1
    if truncated:
        full, supervised = full[: max_length + 1], supervised[: max_length + 1]
    # label j is full[j + 1]; it is trained on when token j + 1 belongs to an answer (or its EOS)
    response_mask = supervised[1:]
    if not any(response_mask):
        return None
    return {
        "input_ids": full[:-1],
        "labels": full[1:],
        "response_mask": response_mask,
        "truncated": truncated,
    }


@dataclass
class PreflightReport:
    """What `preflight` found: counts plus a few decoded examples with the supervised span marked."""

    n: int
    truncated: int
    dropped: int
    supervised_tokens: int
    total_tokens: int
    samples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the run log."""
        return (
            f"{self.n} examples: {self.truncated} truncated, {self.dropped} dropped; "
            f"{self.supervised_tokens} of {self.total_tokens} tokens supervised"
        )


MARK_OPEN, MARK_CLOSE = "«", "»"


def render_supervision(example: dict[str, Any], tokenizer: Any) -> str:
    """Decode an encoded example, wrapping the supervised tokens in «...» so a human can check them.

    The full sequence is input_ids + the last label; token k (k >= 1) is supervised when
    response_mask[k - 1] is true. Runs of same-status tokens are decoded together so multi-token
    characters stay intact. Special tokens are kept visible (an EOS inside «» is the point).
    """
    tokens = list(example["input_ids"]) + list(example["labels"][-1:])
    supervised = [False] + [bool(m) for m in example["response_mask"]]
    parts: list[str] = []
    start = 0
    for k in range(1, len(tokens) + 1):
        if k == len(tokens) or supervised[k] != supervised[start]:
            text = tokenizer.decode(tokens[start:k], skip_special_tokens=False)
            parts.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if supervised[start] else text)
            start = k
    return "".join(parts)


def _check_example(index: int, example: dict[str, Any], end_ids: set[int]) -> None:
    """Raise a one-line UserError if the example cannot train the model properly."""
    mask = example["response_mask"]
    supervised = [j for j, m in enumerate(mask) if m]
    if not supervised:
        raise UserError(f"example #{index} has no supervised token (empty response after the prompt?)")
    last_label = example["labels"][supervised[-1]]
    if not example.get("truncated", False) and last_label not in end_ids:
        ids = ", ".join(map(str, sorted(end_ids)))
        raise UserError(
            f"example #{index}: the last supervised token is id {last_label}, not EOS or the chat template's "
            f"end of turn (id {ids}); the model would never learn to stop - check the chat template / encoding"
        )


def preflight(
    encoded: Sequence[dict[str, Any] | None],
    tokenizer: Any,
    n_show: int = 3,
    max_bad_share: float = 0.05,
) -> PreflightReport:
    """Check encoded examples before spending compute on them; None entries count as dropped.

    Fails fast (one-line UserError) when the dataset is empty or fully dropped, when an example has
    no supervised token, when a complete (non-truncated) example does not end its supervision with
    EOS or the chat template's end-of-turn token, or when truncated + dropped examples exceed `max_bad_share` of the dataset: silently
    training on cut-off answers is a common cause of models that ramble or never stop.
    """
    n = len(encoded)
    if n == 0:
        raise UserError("the SFT dataset is empty")
    kept = [(i, ex) for i, ex in enumerate(encoded) if ex is not None]
    dropped = n - len(kept)
    if not kept:
        raise UserError(f"all {n} examples were dropped: every prompt is longer than max_length")

    end_ids = stop_token_ids(tokenizer)
    for i, ex in kept:
        _check_example(i, ex, end_ids)

    truncated = sum(bool(ex.get("truncated", False)) for _, ex in kept)
    bad_share = (truncated + dropped) / n
    if bad_share > max_bad_share:
        raise UserError(
            f"{truncated + dropped} of {n} examples ({bad_share:.1%}) are too long for max_length "
            f"({truncated} truncated, {dropped} dropped), above max_bad_share={max_bad_share:.1%}; "
            "raise max_length or filter long examples"
        )
    return PreflightReport(
        n=n,
        truncated=truncated,
        dropped=dropped,
        supervised_tokens=sum(sum(bool(m) for m in ex["response_mask"]) for _, ex in kept),
        total_tokens=sum(len(ex["input_ids"]) for _, ex in kept),
        samples=[render_supervision(ex, tokenizer) for _, ex in kept[:n_show]],
    )
