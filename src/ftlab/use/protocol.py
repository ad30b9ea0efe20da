"""OpenAI request bodies (pydantic) and the response and error JSON `ftlab serve` answers with.

Only what the server implements is accepted with a non-default value: a request asking for log-probs,
penalties, tools or `best_of` is refused in one line instead of being answered as if it had not asked.
Unknown fields are ignored, as OpenAI-compatible servers commonly do (clients send `user`, metadata).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Stop = str | list[str] | None


class APIError(Exception):
    """An HTTP error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        """The content as one string; text parts are joined, other parts (images, audio) refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"messages[{index}].content: only text parts are supported, got {part.type!r}",
                               param=f"messages[{index}].content")
            parts.append(part.text)
        return "".join(parts)


class _Common(BaseModel):
    """Fields shared by both endpoints. OpenAI's defaults: temperature 1, top_p 1, n 1."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop: at most 4 stop strings, got {len(stops)}", param="stop")
        return tuple(s for s in stops if s)

    def refuse_unsupported(self) -> None:
        """One line for settings this server would otherwise silently ignore."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by ftlab serve; leave it at 0", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by ftlab serve", param="logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise APIError(400, "logprobs are not supported by ftlab serve", param="logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported by ftlab serve", param="tools")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("logprobs", "echo", "suffix"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by ftlab serve", param=name)
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of is not supported by ftlab serve", param="best_of")

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# -- responses ------------------------------------------------------------------------------------
Kind = Literal["chat", "text"]


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: Kind, rid: str, model: str, texts: list[str], reasons: list[str],
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A whole (non-streamed) answer: `chat.completion` or `text_completion`."""
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(kind: Kind, rid: str, model: str, created: int, choice: int | None, text: str | None,
               finish_reason: str | None, role: bool = False, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One server-sent event of a stream: a piece of one choice's text (or its end), or the usage at the end."""
    if choice is None:
        choices: list[dict[str, Any]] = []
    elif kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choices = [{"index": choice, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": choice, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                            "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
