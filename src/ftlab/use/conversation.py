"""The conversation behind `ftlab chat`: messages in, an answer streamed out token by token, nothing recomputed.

* Rendering. The prompt for the next answer is the conversation encoded the way SFT encodes it: the chat
  template splits the messages into turns (text before answer k, answer k) (`ftlab.data.sources.chat_turns`),
  the first text goes through `prompt_ids` (the BOS rule), every past answer is followed by the template's
  end-of-turn tokens (`answer_end_ids`), and the pieces are tokenized one by one as `encode_sft_turns` does.
  The ids a model is given are therefore the prefix SFT trained it to continue, token for token (for ChatML
  they are also what `ftlab infer` feeds for the same messages). Without a chat template (or for a run
  trained with `data.chat_template: false`) turns take the plain layout of `Task.render_prompt` and
  `task_turns`: the system prompt, then "question\\nAnswer: " turns separated by blank lines, answers ending
  with EOS.
* KV cache. One `DynamicCache` lives across turns, together with the ids whose keys and values it holds. A
  turn runs only the ids after the longest common prefix of its prompt with those: a follow-up question costs
  its own tokens, while /undo, /retry and a new system prompt crop the cache where the prompt diverges. An
  answer whose text re-tokenizes differently than it was generated diverges there too, so the model always
  sees the SFT encoding of the history. `positions_run` and `last` count the positions run through the model.
* Decoding: greedy (temperature 0) or temperature / top-p sampling (`sampling.top_p_filter`) with one seeded
  generator per session, so /retry draws anew while a session started with the same seed repeats itself. An
  answer ends on EOS or the template's end of turn (the generation config's EOS plus `stop_token_ids`, as the
  generation engine stops) or at max_new_tokens.
* Streaming: `StreamDecoder` hands out text only when it does not end inside a character (a UTF-8 sequence
  spread over byte tokens decodes to U+FFFD until its last byte arrives).
* Ctrl-C. A KeyboardInterrupt while generating ends the answer, which is kept as far as it got
  (`finish_reason="interrupted"`; the caller marks it); with no token yet the question is dropped (a retry
  keeps the previous answer). The interrupt can land inside a forward pass, after some layers appended
  their keys and values: the cache is cropped back to the ids known to be complete, so the next turn is
  exact.
* Context. When the prompt plus max_new_tokens outgrows the context window (`max_position_embeddings`), the
  oldest exchanges are dropped (the system prompt stays) and `notice` says so in one line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import DynamicCache

from ftlab.data.sft import adds_bos, answer_end_ids, chat_terminator
from ftlab.data.sft import prompt_ids as sft_prompt_ids
from ftlab.errors import UserError
from ftlab.generate.base import GenerationConfig
from ftlab.generate.batch import is_plain_dynamic_cache
from ftlab.generate.hf import answer_stop_ids
from ftlab.generate.prefill import model_device
from ftlab.generate.sampling import top_p_filter
from ftlab.losses import accepts_logits_to_keep, cache_kwarg

TextCallback = Callable[[str], None]
Message = dict[str, str]


@dataclass
class ChatSettings:
    """How answers are generated; `system` is the system prompt (None: the template's default, if any)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    system: str | None = None

    def validate(self) -> None:
        """One line naming the bad value (the generation engine's own rules)."""
        GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                         seed=self.seed)


@dataclass
class Reply:
    """One answer: its text, the generated ids (the stop token included when one ended it), why it ended
    ("stop", "length" or "interrupted") and how many of the oldest exchanges were dropped to fit it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    dropped: int = 0


@dataclass
class TurnStats:
    """What the last answer cost: prompt length, ids reused from the cache, positions run to prefill the rest
    of the prompt, and positions run while decoding (one per generated token but the last)."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefill_positions: int = 0
    decode_positions: int = 0


class StreamDecoder:
    """The text of a growing token sequence, handed out piece by piece, never ending inside a character.

    Each push decodes only a short window (the previous piece's tokens and the new ones, so that a tokenizer
    that drops a leading space at the start of a decode still gets it right) and emits what the new tokens
    add, once it does not end in U+FFFD (half a UTF-8 sequence); `flush` emits the rest but such an unfinished
    character (an answer cut by max_new_tokens or Ctrl-C inside one).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0    # ids up to here have been emitted

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if text.endswith("\ufffd"):  # a character still waiting for bytes; at the end, one that never came
            if not final:
                return ""
            text = text.rstrip("\ufffd")
        if len(text) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plain_turns(messages: list[Message]) -> list[tuple[str, str]]:
    """(text before answer k, answer k) in the plain layout of `Task.render_prompt` (first turn) and
    `task_turns` (follow-ups); the last answer is "" (the one to generate)."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns: list[tuple[str, str]] = []
    before = ""
    for m in messages:
        if m["role"] == "user":
            before = ("\n\n".join(system + [f"{m['content']}\nAnswer:"]) + " ") if not turns \
                else f"\n\n{m['content']}\nAnswer: "
        elif m["role"] == "assistant":
            turns.append((before, m["content"]))
    return turns + [(before, "")]


class ChatSession:
    """A conversation with one model: `ask`, `retry`, `undo`, `set_system`, `update`, `save`.

    `chat_template=None` uses the tokenizer's template when it has one; False forces the plain layout.
    `context_window` defaults to the model config's `max_position_embeddings` (None: unlimited).
    """

    def __init__(self, model: Any, tokenizer: Any, settings: ChatSettings | None = None, *,
                 chat_template: bool | None = None, context_window: int | None = None,
                 notice: Callable[[str], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or ChatSettings()
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.chat_template = has_template if chat_template is None else (chat_template and has_template)
        self.context_window = context_window or getattr(model.config, "max_position_embeddings", None)
        self.notice = notice or (lambda line: None)
        self.history: list[Message] = []  # user / assistant messages, alternating; the system prompt is apart
        self.interrupted = False          # the last answer was cut short by Ctrl-C
        self.stop_ids = answer_stop_ids(model, tokenizer)
        self.end_ids = answer_end_ids(tokenizer, self._terminator())
        self.device = model_device(model)
        self.positions_run = 0            # positions run through the model, all turns together
        self.last = TurnStats()
        self._bos = adds_bos(tokenizer)
        self._cache: DynamicCache | None = None
        self._cached: list[int] = []      # the ids whose keys and values the cache holds, in order
        self._cache_arg = cache_kwarg(model)
        self._keep_last = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        self._generator = torch.Generator(device=self.device).manual_seed(self.settings.seed)
        self.check_settings(self.settings)

    # -- the conversation ------------------------------------------------------------------------
    @property
    def messages(self) -> list[Message]:
        """The conversation as chat messages (the system prompt first when one is set)."""
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system is not None else []
        return system + [dict(m) for m in self.history]

    def ask(self, text: str, on_text: TextCallback | None = None) -> Reply:
        """Answer a new user message; the answer streams through `on_text` as it is generated."""
        history, prompt, dropped = self._fit(self.history + [{"role": "user", "content": text}])
        reply = self._generate(prompt, on_text)
        reply.dropped = dropped
        if reply.token_ids:  # (none: interrupted before the first token, and the question is dropped)
            self.history = history + [{"role": "assistant", "content": reply.text}]
            self.interrupted = reply.finish_reason == "interrupted"
        elif dropped:
            self.history = history
        return reply

    def retry(self, on_text: TextCallback | None = None) -> Reply:
        """Generate the last answer again (greedy: the same one; sampling: a new draw)."""
        if not self.history or self.history[-1]["role"] != "assistant":
            raise UserError("nothing to retry yet")
        history, prompt, dropped = self._fit(self.history[:-1])
        reply = self._generate(prompt, on_text)
        reply.dropped = dropped
        if reply.token_ids:  # (none: interrupted before the first token, and the previous answer stays)
            self.history = history + [{"role": "assistant", "content": reply.text}]
            self.interrupted = reply.finish_reason == "interrupted"
        return reply

    def undo(self) -> None:
        """Drop the last exchange (question and answer)."""
        if not self.history:
            raise UserError("nothing to undo")
        del self.history[-2:]
        self.interrupted = False

    def set_system(self, text: str | None) -> None:
        """A new system prompt (None: none, i.e. the template's default); the exchanges are kept."""
        self.settings.system = text or None

    def update(self, key: str, value: str) -> None:
        """/set KEY VALUE: temperature, top_p or max_new_tokens, checked before anything changes."""
        kinds = {"temperature": float, "top_p": float, "max_new_tokens": int}
        if key not in kinds:
            raise UserError(f"cannot set {key!r}; settable: {', '.join(kinds)}")
        try:
            parsed = kinds[key](value)
        except ValueError:
            raise UserError(f"{key} must be {'an integer' if kinds[key] is int else 'a number'}; got {value!r}") \
                from None
        candidate = ChatSettings(**{**self.settings.__dict__, key: parsed})
        self.check_settings(candidate)
        self.settings = candidate

    def check_settings(self, settings: ChatSettings) -> None:
        settings.validate()
        if self.context_window and settings.max_new_tokens >= self.context_window:
            raise UserError(f"max_new_tokens must be below the model's context window of {self.context_window} "
                            f"tokens; got {settings.max_new_tokens}")

    def save(self, path: str | Path) -> int:
        """Append the conversation to `path` as one {"messages": [...]} JSONL row, the format `data.task:
        generic` trains on; returns the number of messages written."""
        if not self.history:
            raise UserError("nothing to save yet")
        path = Path(path).expanduser()
        if path.is_dir():
            raise UserError(f"/save {path}: is a directory")
        line = json.dumps({"messages": self.messages}, ensure_ascii=False) + "\n"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)  # one write of one whole line: a crash cannot leave half a row in front of it
        except OSError as e:
            raise UserError(f"/save {path}: {e.strerror or e}") from None
        return len(self.messages)

    # -- encoding ---------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The ids the model continues to answer `messages` (ending with a user message): SFT's encoding of
        the conversation up to where the next answer starts."""
        try:
            turns = self._turns(messages)
        except UserError:
            if not self.chat_template:
                raise
            # A template that renders earlier turns differently in longer conversations (one that drops past
            # reasoning) has no SFT split into turns: the whole conversation as `ftlab infer` renders it.
            # A template that rejects the messages raises again here, with its own words.
            from ftlab.data.sources import render_chat

            return sft_prompt_ids(self.tokenizer, render_chat(self.tokenizer, messages, "the conversation"), self._bos)
        ids: list[int] = []
        for k, (before, answer) in enumerate(turns):
            ids += sft_prompt_ids(self.tokenizer, before, self._bos) if k == 0 else self._text_ids(before)
            if k < len(turns) - 1:
                ids += self._text_ids(answer) + self.end_ids
        return ids

    def _turns(self, messages: list[Message]) -> list[tuple[str, str]]:
        if not self.chat_template:
            return plain_turns(messages)
        from ftlab.data.sources import chat_turns

        return list(chat_turns(self.tokenizer, messages + [{"role": "assistant", "content": ""}], "the conversation"))

    def _text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _terminator(self) -> str | None:
        return chat_terminator(self.tokenizer) if self.chat_template else None

    def _fit(self, history: list[Message]) -> tuple[list[Message], list[int], int]:
        """(history, prompt ids, exchanges dropped): the oldest exchanges go until prompt + max_new_tokens fit."""
        system = self.messages[:1] if self.settings.system is not None else []
        ids = self.prompt_ids(system + history)
        room = self.context_window - self.settings.max_new_tokens if self.context_window else None
        dropped = 0
        while room is not None and len(ids) > room:
            if len(history) <= 1:
                raise UserError(f"the message makes a {len(ids)}-token prompt; with max_new_tokens="
                                f"{self.settings.max_new_tokens} that does not fit the model's context of "
                                f"{self.context_window} tokens")
            history, dropped = history[2:], dropped + 1
            ids = self.prompt_ids(system + history)
        if dropped:
            self.notice(f"(context full: dropped the oldest {dropped} exchange{'s' * (dropped > 1)} to fit "
                        f"{self.context_window} tokens)")
        return history, ids, dropped

    # -- generation -------------------------------------------------------------------------------
    def _generate(self, prompt: list[int], on_text: TextCallback | None) -> Reply:
        emit = on_text or (lambda piece: None)
        decoder = StreamDecoder(self.tokenizer)
        self.last = TurnStats(prompt_tokens=len(prompt))
        tokens: list[int] = []
        reason = "interrupted"
        try:
            with torch.inference_mode():
                reused = self._reuse_cache(prompt)
                self.last.reused_tokens = reused
                self.last.prefill_positions = len(prompt) - reused
                logits = self._run(prompt[reused:])
                while True:
                    tokens.append(self._pick(logits))
                    if tokens[-1] in self.stop_ids:
                        reason = "stop"
                        break
                    emit(decoder.push(tokens[-1]))
                    if len(tokens) >= self.settings.max_new_tokens:
                        reason = "length"
                        break
                    logits = self._run(tokens[-1:])
                    self.last.decode_positions += 1
        except KeyboardInterrupt:
            self._repair_cache()
        emit(decoder.flush())
        answer = tokens[:-1] if reason == "stop" else tokens
        text = self.tokenizer.decode(answer, skip_special_tokens=True).rstrip("\ufffd")  # as `flush` showed it
        return Reply(text, tokens, reason)

    def _run(self, ids: list[int]) -> torch.Tensor:
        """Run `ids` through the model after the cached ones; the next-token logits of the last."""
        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
        start = len(self._cached)
        out = self.model(input_ids=torch.tensor([ids], device=self.device),
                         position_ids=torch.arange(start, start + len(ids), device=self.device)[None],
                         use_cache=True, **{self._cache_arg: self._cache}, **self._keep_last)
        self._cached.extend(ids)  # only once the forward is complete: see `_repair_cache`
        self.positions_run += len(ids)
        return out.logits[0, -1]

    def _pick(self, logits: torch.Tensor) -> int:
        s = self.settings
        if s.temperature == 0:
            return int(logits.argmax())
        scores = logits.float()[None] / s.temperature
        if s.top_p < 1:
            scores = top_p_filter(scores, s.top_p)
        return int(torch.multinomial(scores.softmax(-1)[0], 1, generator=self._generator))

    def _reuse_cache(self, prompt: list[int]) -> int:
        """Keep the cached prefix the prompt shares (at least its last id is run again, for its logits)."""
        keep = min(common_prefix(self._cached, prompt), len(prompt) - 1)
        if keep < len(self._cached):
            self._crop(keep)
        return len(self._cached)

    def _crop(self, keep: int) -> None:
        """Cut every layer's cache back to `keep` positions; a cache that cannot be cropped (sliding-window or
        linear-attention layers) starts over instead."""
        if self._cache is None or not is_plain_dynamic_cache(self._cache):
            self._cache, self._cached = None, []
            return
        for layer in self._cache.layers:
            extra = layer.get_seq_length() - keep
            if extra > 0:
                layer.crop(-extra)
        self._cached = self._cached[:keep]

    def _repair_cache(self) -> None:
        """After an interrupt: layers a half-finished forward pass already appended to are cut back."""
        with torch.inference_mode():
            self._crop(len(self._cached))
