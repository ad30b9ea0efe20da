"""The decoding loop behind `ftlab serve`: continuous batching over requests that arrive while it runs.

`HFEngine` (`ftlab.generate.hf`) batches a list of prompts known up front. A server learns of its prompts
one HTTP request at a time, so one thread, the scheduler, owns the model and a `generate.batch.Batch` (the
slot KV cache) and loops:

* take the requests that arrived (`submit`, from the HTTP threads) off a queue; when nothing runs and
  nothing waits it blocks on that queue, so an idle server uses no CPU;
* if requests wait and their rows fit into free slots, prefill them (`generate.prefill.Prefiller`, in
  chunks of similar length) and admit them into the running batch: a new request joins the rows already
  being decoded instead of waiting for them to finish;
* otherwise run one decoding step over every live row, whatever request it belongs to;
* hand each row's new text to its request (`Job.emit`, for streaming) and finish rows on a stop token
  (EOS or the chat template's end of turn: the engine's `answer_stop_ids` rule), a stop string or `max_tokens`;
  finished and cancelled rows (a client that went away) are evicted, freeing their slots at once.

Each request keeps its own sampling settings: rows are grouped by (temperature, top_p) and each group
goes through `sampling.pick_tokens`, each row drawing with its own generator seeded like the engine's
(`row_seed`), so a request with a `seed` samples the same tokens as `ftlab infer` with that seed, and
greedy rows take the argmax as `HFEngine` does. Greedy requests with `n > 1` decode one row (the copies
would be identical) and report it `n` times.

LoRA adapters: with adapters the model is a peft model holding all of them unmerged, and every forward
gets peft's per-row `adapter_names` ("__base__" for the base model), so rows of different adapters share
one step. No shared prompt prefix is precomputed here (`share_prefix=False`): its K/V would differ per
adapter, and prompts arrive one by one anyway.

The slot cache starts narrow and is widened (`Batch.grow`) when a prompt or a row's text needs more columns,
so memory follows what is being decoded rather than the context window; a batch that empties after being
widened a lot is rebuilt at its initial width.
"""
from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from ftlab.data.sft import padding_id
from ftlab.errors import UserError
from ftlab.generate.base import GenerationConfig, cut_at_stop
from ftlab.generate.batch import Batch, Row, is_plain_dynamic_cache
from ftlab.generate.hf import answer_stop_ids
from ftlab.generate.prefill import Prefiller, model_device
from ftlab.generate.sampling import pick_tokens, row_seed

log = logging.getLogger("ftlab")

BASE = "__base__"   # peft's name for "no adapter" in a mixed-adapter batch
INITIAL_COLUMNS = 256
_ids = itertools.count(1)


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings (temperature 0 = greedy)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Event:
    """What the scheduler tells a request about one of its choices: new text, and at the end why it ended.

    `error` is set (and nothing else) when the loop failed; the request is then over."""

    choice: int
    text: str = ""
    finish_reason: str | None = None   # "stop" or "length" on the choice's last event
    completion_tokens: int = 0         # tokens generated, on the last event
    error: str | None = None


@dataclass
class Job:
    """One prompt of a request, decoded into `n` choices numbered from `first_choice`.

    `emit` is called from the scheduler thread; the server passes it on to its event loop. Setting
    `cancelled` (from any thread) makes the scheduler drop the job's rows at its next iteration."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    n: int = 1
    adapter: str = BASE            # peft adapter name of the model asked for
    first_choice: int = 0
    repeat: int = 0                # earlier copies of the same prompt in its request (`row_seed`)
    stream: bool = False           # emit text as it is decoded, not only at the end
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    rows_done: int = 0             # the scheduler's count of finished rows

    @property
    def rows(self) -> int:
        """Slots the job takes: one row per choice, one in all when greedy (the choices are copies)."""
        return 1 if self.sampling.greedy else self.n


@dataclass
class ServedRow(Row):
    """A `Row` of a server job: the choices it answers for and how much of its text went out already."""

    job: Job | None = None
    choices: list[int] = field(default_factory=list)
    sent: int = 0


class Scheduler:
    """Owns the model and the running batch; `submit` jobs from any thread, `start`/`stop` the loop."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, *, adapters: bool = False,
                 stop_ids: set[int] | None = None):
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        check_slot_cache(model)
        self.model, self.tokenizer, self.slots = model, tokenizer, batch_size
        self.adapters = adapters
        self.eos_ids = answer_stop_ids(model, tokenizer) | (stop_ids or set())
        self.device = model_device(model)
        self.prefiller = Prefiller(model, padding_id(tokenizer, self.eos_ids), [], share_prefix=False,
                                   device=self.device)
        self.batch = self._new_batch()
        self.inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()
        self.admitting: list[Job] = []
        self.stats = {"active_rows": 0, "waiting_requests": 0, "max_rows_in_step": 0, "decode_steps": 0,
                      "rows_decoded": 0, "prefill_tokens": 0, "completion_tokens": 0, "completed_requests": 0,
                      "cancelled_requests": 0, "failed_requests": 0, "max_models_in_step": 1,
                      "batch_size": batch_size}
        self._configs: dict[tuple[float, float], GenerationConfig] = {}
        self._thread = threading.Thread(target=self._loop, name="ftlab-scheduler", daemon=True)

    # -- outside the loop (HTTP threads) -----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the step under way and end the loop (waiting requests are not answered)."""
        if self._thread.is_alive():
            self.inbox.put(None)
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if job.rows > self.slots:  # the server refuses these first; a job that never fits would wait forever
            raise ValueError(f"a job of {job.rows} rows cannot fit {self.slots} slots")
        self.inbox.put(job)

    def snapshot(self) -> dict[str, int]:
        """The counters, as `/stats` reports them."""
        return dict(self.stats)

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():  # thread-local: set in the thread that runs the model
            while self._take_arrivals(block=not self.batch.rows and not self.waiting):
                try:
                    self._iterate()
                except Exception as e:  # a bug or out of memory: fail what runs, keep serving
                    log.exception("generation failed")
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")
                self.stats["active_rows"] = len(self.batch.rows)
                self.stats["waiting_requests"] = len(self.waiting)

    def _take_arrivals(self, block: bool) -> bool:
        """Move submitted jobs to `waiting`, blocking for the first one when idle; False on `stop`."""
        try:
            job = self.inbox.get() if block else self.inbox.get_nowait()
            while True:
                if job is None:
                    return False
                self.waiting.append(job)
                job = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _iterate(self) -> None:
        """Admit what fits (a prefill), else decode one step over all rows."""
        self._drop_cancelled()
        if not self.batch.rows and self.batch.columns > 4 * INITIAL_COLUMNS:
            self.batch = self._new_batch()  # give back the memory one long request made it take
        group, free = [], self.slots - len(self.batch.rows)
        while self.waiting and self.waiting[0].rows <= free:  # first come, first served: no overtaking
            group.append(self.waiting.popleft())
            free -= group[-1].rows
        if group:
            self.admitting = group  # if the prefill fails, `_fail_all` must answer these too
            self._admit(group)
            self.admitting = []
        elif self.batch.rows:
            self._step()

    def _new_batch(self) -> Batch:
        return Batch(self.model, self.slots, columns=INITIAL_COLUMNS, device=self.device)

    def _forward_kwargs(self, jobs: list[Job]) -> dict[str, Any]:
        return {"adapter_names": [j.adapter for j in jobs]} if self.adapters else {}

    def _admit(self, group: list[Job]) -> None:
        """Prefill the group's prompts (longest first, chunks of similar length) into free slots."""
        group.sort(key=lambda j: -len(j.prompt))
        prompts = [j.prompt for j in group]
        for chunk in self.prefiller.chunks(prompts):
            jobs = [group[c] for c in chunk]
            self._make_room(max(len(j.prompt) for j in jobs))
            before = self.prefiller.positions
            cache, mask, last_logits = self.prefiller.run([j.prompt for j in jobs], **self._forward_kwargs(jobs))
            self.stats["prefill_tokens"] += self.prefiller.positions - before
            rows, sources = [], []
            for g, job in enumerate(jobs):
                for s in range(job.rows):
                    rows.append(self._new_row(job, s))
                    sources.append(g)
            logits = last_logits.index_select(0, torch.tensor(sources, device=last_logits.device))
            tokens = self._pick(logits, rows)
            first = len(self.batch.rows)
            self.batch.admit(rows, sources, cache, mask, tokens)
            self._record(first, tokens.tolist())

    def _new_row(self, job: Job, sample: int) -> ServedRow:
        rng = None
        if not job.sampling.greedy:  # the engine's seeding rule; a request without a seed gets a fresh one
            seed = (row_seed(job.sampling.seed, job.prompt, job.repeat, sample) if job.sampling.seed is not None
                    else random.getrandbits(63))
            rng = torch.Generator(device=self.device).manual_seed(seed)
        choices = list(range(job.first_choice, job.first_choice + job.n)) if job.sampling.greedy \
            else [job.first_choice + sample]
        return ServedRow(request=job.id, sample=sample, first_col=0, generator=rng, job=job, choices=choices)

    def _step(self) -> None:
        rows = self.batch.rows
        self._make_room(1)
        logits = self.batch.step(**self._forward_kwargs([r.job for r in rows]))
        tokens = self._pick(logits, rows)
        self.batch.next_tokens[: len(tokens)] = tokens
        self.stats["decode_steps"] += 1
        self.stats["rows_decoded"] += len(rows)
        self.stats["max_rows_in_step"] = max(self.stats["max_rows_in_step"], len(rows))
        if self.adapters:  # rows of different adapters sharing this step (peft mixed batch)
            models = len({r.job.adapter for r in rows})
            self.stats["max_models_in_step"] = max(self.stats["max_models_in_step"], models)
        self._record(0, tokens.tolist())

    def _make_room(self, width: int) -> None:
        """Widen the cache so the live window and `width` more columns fit with slack (see module docstring):
        `Batch` moves its window back when it reaches the end, which needs the whole window to fit."""
        b = self.batch
        span = b.window.end - min((r.first_col for r in b.rows), default=b.window.end)
        need = max(span, width) + 2
        if need > b.columns:
            b.grow(max(2 * b.columns, need + need // 2))

    # -- token choice ------------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor, rows: list[ServedRow]) -> torch.Tensor:
        """The next token of every row, each by its request's settings (`pick_tokens` per settings group)."""
        groups: dict[tuple[float, float], list[int]] = {}
        for i, r in enumerate(rows):
            s = r.job.sampling
            groups.setdefault((s.temperature, s.top_p if not s.greedy else 1.0), []).append(i)
        if len(groups) == 1:
            (key,) = groups
            return pick_tokens(logits, rows, self._config(key))[0]
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for key, members in groups.items():
            index = torch.tensor(members, device=logits.device)
            tokens[index] = pick_tokens(logits.index_select(0, index), [rows[i] for i in members],
                                        self._config(key))[0]
        return tokens

    def _config(self, key: tuple[float, float]) -> GenerationConfig:
        if key not in self._configs:
            self._configs[key] = GenerationConfig(temperature=key[0], top_p=key[1])
        return self._configs[key]

    # -- results -----------------------------------------------------------------------------------
    def _record(self, first: int, tokens: list[int]) -> None:
        """Append each row's token, pass its new text on, finish and evict rows that are done."""
        finished = []
        for i, token in enumerate(tokens, start=first):
            row = self.batch.rows[i]
            row.tokens.append(token)
            if self._advance(row, token):
                finished.append(i)
        if finished:
            self.batch.evict(finished)

    def _advance(self, row: ServedRow, token: int) -> bool:
        """Emit what the row may show of its text now; True when the row is finished."""
        job, s = row.job, row.job.sampling
        reason = "stop" if token in self.eos_ids else ""
        text, held = "", 0
        if s.stop or job.stream or reason or len(row.tokens) >= s.max_tokens:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            if s.stop:
                cut, found = cut_at_stop(text, list(s.stop))
                if found:
                    text, reason = cut, "stop"
                else:
                    held = stop_prefix_length(text, s.stop)  # might be the start of a stop string
        if not reason and len(row.tokens) >= s.max_tokens:
            reason = "length"
        if reason:
            self._emit(row, text[row.sent:], reason)
            self.stats["completion_tokens"] += len(row.tokens) * len(row.choices)
            job.rows_done += 1
            self.stats["completed_requests"] += job.rows_done == job.rows
            return True
        if job.stream:
            shown = len(text) - held
            while shown > row.sent and text[shown - 1] == "\ufffd":  # an incomplete UTF-8 character so far
                shown -= 1
            if shown > row.sent:
                self._emit(row, text[row.sent:shown], None)
                row.sent = shown
        return False

    @staticmethod
    def _emit(row: ServedRow, text: str, reason: str | None) -> None:
        for choice in row.choices:
            row.job.emit(Event(choice=choice, text=text, finish_reason=reason,
                               completion_tokens=len(row.tokens) if reason else 0))

    def _drop_cancelled(self) -> None:
        """Evict the rows of requests whose client went away; forget such requests still waiting."""
        gone = [i for i, r in enumerate(self.batch.rows) if r.job.cancelled]
        if gone:
            self.stats["cancelled_requests"] += len({self.batch.rows[i].job.id for i in gone})
            self.batch.evict(gone)
        if any(j.cancelled for j in self.waiting):
            self.stats["cancelled_requests"] += sum(j.cancelled for j in self.waiting)
            self.waiting = deque(j for j in self.waiting if not j.cancelled)

    def _fail_all(self, message: str) -> None:
        jobs = {j.id: j for j in [*(r.job for r in self.batch.rows), *self.admitting, *self.waiting]}
        for job in jobs.values():
            job.emit(Event(choice=job.first_choice, error=message))
        self.stats["failed_requests"] += len(jobs)
        self.waiting.clear()
        self.admitting = []
        self.batch = self._new_batch()


def stop_prefix_length(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins a stop string: held back from a stream, since the
    next tokens may complete the stop string, which must not be shown."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def check_slot_cache(model: Any) -> None:
    """The server decodes with `HFEngine`'s slot cache, which reproduces full attention only."""
    try:
        plain = is_plain_dynamic_cache(DynamicCache(config=model.config))
    except Exception:  # exotic configs
        plain = False
    if not plain:
        raise UserError(f"ftlab serve needs a model with full attention in every layer; "
                        f"{type(model).__name__} uses sliding-window or linear-attention layers")

