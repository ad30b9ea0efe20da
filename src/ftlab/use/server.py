"""`ftlab serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over continuous batching.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as server-sent
events ending in `data: [DONE]`), `GET /v1/models`, and `GET /stats` (the scheduler's counters: rows live,
the most rows one decoding step has run, requests completed; JSON).

The HTTP side only validates, tokenizes and waits: a request becomes one `scheduler.Job` per prompt, and
the scheduler thread (`ftlab.use.scheduler`), which alone touches the model, decodes it together with
whatever else is running and sends back its text piece by piece (`Event`s, passed into the event loop with
`call_soon_threadsafe`). A client that disconnects cancels its jobs and their slots are freed at the next
step.

Prompts are tokenized as `ftlab infer` tokenizes them: chat messages rendered by the tokenizer's chat
template with the generation prompt (`data.sources.render_chat`), then `data.sft.prompt_ids`; a
`/v1/completions` prompt is taken as raw text (or token ids). So a temperature-0 answer is the one
`ftlab infer` and `HFEngine.generate` give. A prompt longer than the context window is refused (400, with
the token counts), never truncated.

Models: MODEL (a model name or directory, an adapter directory or a training run, as `ftlab chat` takes it)
is served under its label; each `--adapter [NAME=]DIR` (an adapter directory or a LoRA training run) is
loaded unmerged on top of it as a peft adapter and served as NAME (default: the directory's name). Rows of
different adapters share one decoding step through peft's per-row `adapter_names`.
"""
from __future__ import annotations

import asyncio
import copy
import errno
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ftlab.errors import UserError, first_line
from ftlab.use.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Kind,
    chunk_body,
    completion_body,
    new_id,
    usage,
)

if TYPE_CHECKING:  # the scheduler imports torch: loaded only once the port is ours (a busy port fails at once)
    from ftlab.use.scheduler import Event, Job, Scheduler

log = logging.getLogger("ftlab")

DEFAULT_MAX_TOKENS = 1024  # chat requests without max_tokens, when the model's context window is unknown


@dataclass
class ServedModel:
    """One model name clients can ask for: the base or one adapter on it."""

    name: str
    adapter: str          # peft adapter name, or BASE
    tokenizer: Any        # an adapter's own tokenizer (its chat template) when it saved one
    path: str
    parent: str | None    # the base model's name, for adapters
    created: int


# -- loading ------------------------------------------------------------------------------------
def parse_adapter_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=DIR` or `DIR` -> (NAME or None, DIR). An existing path containing '=' is a DIR."""
    if "=" in spec and not Path(spec).expanduser().exists():
        name, path = spec.split("=", 1)
        if not name.strip() or not path.strip():
            raise UserError(f"--adapter {spec}: expected NAME=DIR or DIR")
        return name.strip(), path.strip()
    return None, spec


def load_served_models(model: str, adapters: list[str]) -> tuple[Any, dict[str, ServedModel]]:
    """(the model to decode with, the served models by name). With adapters the model is a peft model
    holding all of them unmerged; without, a plain model (an adapter in MODEL itself comes folded in)."""
    from ftlab.models.load import load_tokenizer
    from ftlab.use.scheduler import BASE
    from ftlab.use.source import load_source, resolve_source

    base = resolve_source(model)
    specs = check_adapters(adapters, base.label)  # before the base model loads: mistakes cost no wait
    weights, tokenizer = load_source(base)
    now = int(time.time())
    served = {base.label: ServedModel(base.label, BASE, tokenizer, base.name, None, now)}
    for i, (_, name, path) in enumerate(specs):
        own = load_tokenizer(path) if (Path(path) / "tokenizer_config.json").is_file() else tokenizer
        served[name] = ServedModel(name, f"adapter{i}", own, path, base.label, now)
    if specs:
        weights = attach_adapters(weights, [(f"adapter{i}", path, spec) for i, (spec, _, path) in enumerate(specs)])
    return weights, served


def check_adapters(adapters: list[str], base_name: str) -> list[tuple[str, str, str]]:
    """(spec, served name, adapter directory) per `--adapter`: LoRA adapter directories (a training run stands
    for its final/) under names that differ from each other and from the base model's."""
    from ftlab.models.load import check_adapter_files, is_adapter_dir, read_json
    from ftlab.use.source import resolve_source

    out, taken = [], {base_name}
    for spec in adapters:
        name, path = parse_adapter_spec(spec)
        if not Path(path).expanduser().is_dir():
            raise UserError(f"--adapter {spec}: {path} is not a directory")
        src = resolve_source(str(Path(path).expanduser()))
        if not is_adapter_dir(src.name):
            raise UserError(f"--adapter {spec}: {src.name} is not an adapter directory (no adapter_config.json, "
                            "or it holds a full model)")
        check_adapter_files(src.name)
        kind = read_json(Path(src.name) / "adapter_config.json").get("peft_type")
        if kind != "LORA":
            raise UserError(f"--adapter {spec}: a {kind} adapter; ftlab serve batches LoRA adapters only")
        name = name or src.label
        if name in taken:
            raise UserError(f"--adapter {spec}: the model name {name!r} is already taken; "
                            f"name it: --adapter NAME={path}")
        taken.add(name)
        out.append((spec, name, src.name))
    return out


def attach_adapters(model: Any, adapters: list[tuple[str, str, str]]) -> Any:
    """`model` as a peft model holding every (peft name, directory, spec) adapter, unmerged, in eval mode."""
    from peft import PeftModel

    from ftlab.models.adapters import peft_wrapping

    peft_model = None
    for name, path, spec in adapters:
        try:
            with peft_wrapping():
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
                else:
                    peft_model.load_adapter(path, adapter_name=name)
        except (ValueError, RuntimeError, KeyError, OSError) as e:  # shapes or modules of another base model
            raise UserError(f"--adapter {spec}: cannot be applied to this base model: {first_line(e)}") from None
    peft_model.eval()
    return peft_model


# -- the HTTP side ------------------------------------------------------------------------------
class Service:
    """Validation, tokenization and waiting for the scheduler; one per server."""

    def __init__(self, scheduler: Scheduler, models: dict[str, ServedModel], context: int | None, vocab: int):
        self.scheduler, self.models, self.context, self.vocab = scheduler, models, context, vocab

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise APIError(404, f"The model {name!r} does not exist; this server has: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[name]

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card(m) for m in self.models.values()]}

    @staticmethod
    def model_card(m: ServedModel) -> dict[str, Any]:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "ftlab", "root": m.path,
                "parent": m.parent}

    # -- requests -> jobs --------------------------------------------------------------------------
    def chat_prompt(self, body: ChatRequest, served: ServedModel) -> list[int]:
        from ftlab.data.sft import prompt_ids
        from ftlab.data.sources import render_chat

        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        try:
            text = render_chat(served.tokenizer, messages, "messages")
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        return prompt_ids(served.tokenizer, text)

    def completion_prompts(self, body: CompletionRequest, served: ServedModel) -> list[list[int]]:
        from ftlab.data.sft import prompt_ids

        p = body.prompt
        if isinstance(p, str):
            prompts = [prompt_ids(served.tokenizer, p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [prompt_ids(served.tokenizer, x) for x in p]  # type: ignore[arg-type]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[list-item]
        else:
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        vocab = self.vocab  # the embedding's rows: any id below it is a token the model can read
        for i, ids in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if not ids:
                raise APIError(400, f"{where} has no tokens; a model cannot continue an empty prompt", param="prompt")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"{where}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
        return prompts

    def token_limit(self, prompt: list[int], requested: int | None, what: str) -> int:
        """max_tokens for one prompt; a prompt that leaves no room in the context window is a 400."""
        if self.context is None:
            return requested or DEFAULT_MAX_TOKENS
        if requested is None:
            if len(prompt) >= self.context:
                raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                               f"{what} resulted in {len(prompt)} tokens. Please reduce the length of the {what}.",
                               param=what, code="context_length_exceeded")
            return self.context - len(prompt)
        if len(prompt) + requested > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                           f"requested {len(prompt) + requested} tokens ({len(prompt)} in the {what}, {requested} in "
                           f"the completion). Please reduce the length of the {what} or completion.",
                           param=what, code="context_length_exceeded")
        return requested

    def jobs(self, body: ChatRequest | CompletionRequest, served: ServedModel, prompts: list[list[int]],
             what: str, emit: Callable[[Event], None]) -> list[Job]:
        from ftlab.generate.sampling import repeat_counts
        from ftlab.use.scheduler import Job, Sampling

        body.refuse_unsupported()
        slots = self.scheduler.slots
        if body.n > slots:
            raise APIError(400, f"n must be at most {slots} (the server's --batch-size), got {body.n}", param="n")
        stop = body.stop_strings()
        jobs = []
        for p, (ids, repeat) in enumerate(zip(prompts, repeat_counts(prompts))):
            sampling = Sampling(max_tokens=self.token_limit(ids, body.token_limit, what), temperature=body.temperature,
                                top_p=body.top_p, stop=stop, seed=body.seed)
            jobs.append(Job(prompt=ids, sampling=sampling, emit=emit, n=body.n, adapter=served.adapter,
                            first_choice=p * body.n, repeat=repeat, stream=body.stream))
        return jobs

    # -- answering ---------------------------------------------------------------------------------
    async def answer(self, kind: Kind, body: ChatRequest | CompletionRequest, request: Request) -> Any:
        served = self.model(body.model)
        if kind == "chat":
            prompts, what = [self.chat_prompt(body, served)], "messages"  # type: ignore[arg-type]
        else:
            prompts, what = self.completion_prompts(body, served), "prompt"  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        jobs = self.jobs(body, served, prompts, what, into_loop(loop, events))
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            stream = self.stream(kind, body, jobs, events, prompt_tokens)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await self.collect(kind, body, jobs, events, prompt_tokens, request))

    async def collect(self, kind: Kind, body: Any, jobs: list[Job], events: asyncio.Queue[Event],
                      prompt_tokens: int, request: Request) -> dict[str, Any]:
        """Wait for every choice; a client that hangs up meanwhile cancels its jobs."""
        total = len(jobs) * body.n
        texts, reasons, completion_tokens = [""] * total, [""] * total, 0
        try:
            for job in jobs:
                self.scheduler.submit(job)
            left = total
            while left:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return {}
                    continue
                if ev.error:
                    raise APIError(500, ev.error, type="server_error")
                texts[ev.choice] += ev.text
                if ev.finish_reason:
                    reasons[ev.choice], left = ev.finish_reason, left - 1
                    completion_tokens += ev.completion_tokens
        finally:
            cancel(jobs)
        return completion_body(kind, new_id(kind), body.model, texts, reasons, prompt_tokens, completion_tokens)

    async def stream(self, kind: Kind, body: Any, jobs: list[Job], events: asyncio.Queue[Event],
                     prompt_tokens: int) -> AsyncIterator[str]:
        """Server-sent events: OpenAI chunks as text arrives, the usage if asked for, then `[DONE]`.

        Jobs are submitted here, not before: a client gone before the stream starts never runs them, and
        one that leaves mid-stream ends this generator (Starlette cancels it), whose `finally` cancels them."""
        rid, created, total = new_id(kind), int(time.time()), len(jobs) * body.n
        completion_tokens = 0
        try:
            for job in jobs:
                self.scheduler.submit(job)
            if kind == "chat":
                for choice in range(total):
                    yield sse(chunk_body(kind, rid, body.model, created, choice, "", None, role=True))
            left = total
            while left:
                ev = await events.get()
                if ev.error:
                    yield sse(APIError(500, ev.error, type="server_error").body())
                    break
                if ev.finish_reason:
                    left -= 1
                    completion_tokens += ev.completion_tokens
                yield sse(chunk_body(kind, rid, body.model, created, ev.choice, ev.text or None, ev.finish_reason))
            if body.include_usage:
                yield sse(chunk_body(kind, rid, body.model, created, None, None, None,
                                     usage_=usage(prompt_tokens, completion_tokens)))
            yield "data: [DONE]\n\n"
        finally:
            cancel(jobs)


def into_loop(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """A job's `emit`: called in the scheduler thread, it queues the event in the request's event loop."""
    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody waits for it
            pass
    return emit


def cancel(jobs: list[Job]) -> None:
    """Tell the scheduler to drop these jobs' rows (a no-op for jobs already finished)."""
    for job in jobs:
        job.cancelled = True


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(service: Service) -> FastAPI:
    """The FastAPI application; every error, the framework's included, answers in OpenAI's error shape."""
    app = FastAPI(title="ftlab serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(e.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code in (404, 405):
            message += "; this server answers POST /v1/chat/completions, POST /v1/completions, GET /v1/models"
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, message, type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crashed(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}", type="server_error").body(), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await service.answer("chat", body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await service.answer("text", body, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.list_models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return service.model_card(service.model(name))

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {**service.scheduler.snapshot(), "models": list(service.models)}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic's first complaint as one OpenAI error: malformed JSON, a missing field, a value out of range."""
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON: {reason}".rstrip(": "))
    if not loc:
        return APIError(400, "The request body must be a JSON object")
    param = loc[0] + "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc[1:])
    return APIError(400, f"{param}: {first.get('msg', 'invalid value')}", param=loc[0])


# -- running ------------------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a busy port fails at once, in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: not blocked by TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {host}:{port} is already in use (another server?); "
                            "pick another --port") from None
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def run_server(model: str, adapters: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
               batch_size: int = 16) -> None:
    """Serve `model` (and `adapters` on it) until interrupted; logs one line with the URL and the models."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    sock = listen(host, port)  # first: torch and the model take seconds to load
    scheduler = None
    try:
        import uvicorn

        from ftlab.data.sft import stop_token_ids
        from ftlab.models.load import context_window
        from ftlab.use.scheduler import Scheduler

        weights, served = load_served_models(model, list(adapters or []))
        base = next(iter(served.values()))
        stop_ids = set().union(*(stop_token_ids(m.tokenizer) for m in served.values()))
        # the scheduler decodes with its own copy: a fast tokenizer is not meant to be shared between threads
        scheduler = Scheduler(weights, copy.deepcopy(base.tokenizer), batch_size, adapters=len(served) > 1,
                              stop_ids=stop_ids)
        app = create_app(Service(scheduler, served, context_window(weights.config),
                                 weights.get_input_embeddings().num_embeddings))
        scheduler.start()
        shown = f"[{host}]" if ":" in host else host
        log.info("ftlab serve: http://%s:%d/v1 serving %s (%d rows per decoding step)", shown,
                 sock.getsockname()[1], ", ".join(served), batch_size)
        config = uvicorn.Config(app, log_config=None, access_log=False, log_level="warning",
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if scheduler is not None:
            scheduler.stop()
        sock.close()
