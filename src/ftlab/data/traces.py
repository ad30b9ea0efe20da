"""Traces, then filter (seed 002): sample a model's answers to a task's questions, keep the correct ones.

`ftlab sample RECIPE --out traces.jsonl --samples N` generates N responses per question of the recipe's
task data (data.train, or with `--from eval` the eval source) with the recipe's model and eval.* sampling
settings. One row per (question, sample), in the shape training reads:

* the source record's own fields (GSM8K: `question`, `answer`), which give the task its gold answer, so
  the file trains with `data.task: <task>` and `data.filter_correct` (`ftlab.data.responses`);
* `prompt` + `response`, so it trains with `data.task: generic` on the prompt the task renders: with the
  chat template, `prompt` is the user message; without it, the whole plain-text prompt;
* `id` (the task's example id), `index` (the question's position among those sampled), `sample` (0..N-1) and
  `settings` (a hash of what generated it, spelled out in `<out>.settings.json`).

Rows are appended as each question finishes; re-running the command resumes after the questions already
complete (a question counts when all N samples are there), and refuses a file written for another model,
source or settings, as `ftlab infer` does. Samples are seeded per (prompt, sample) (`ftlab.generate`), so
a resumed file holds the samples an uninterrupted run would have written.

A verb of its own rather than `ftlab infer --samples`: infer answers a file of bare prompts and knows no gold
answer; sample reads the task's data, so each row carries the fields its checker needs.

`ftlab filter RECIPE --input traces.jsonl --out kept.jsonl` keeps the rows whose `response` the task's
checker scores correct (its primary rule, as evaluation scores) and writes `kept.stats.json` beside the
output: sizes, retention rate, questions with a kept answer, and the rule used.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.data.jsonl import iter_jsonl, json_type, write_jsonl
from ftlab.data.sources import GENERIC
from ftlab.errors import UserError
from ftlab.tasks.base import Example, Task

log = logging.getLogger("ftlab")

WRITER = "ftlab sample"


@dataclass(frozen=True)
class TraceSource:
    """Which questions to sample on, and how their prompts are rendered."""

    task: str
    source: str
    split: str
    offset: int
    limit: int | None
    shots: int
    chat_template: bool


def trace_source(cfg: DictConfig, which: str) -> TraceSource:
    """The training data (`train`: data.*, rendered as SFT renders it) or the eval source (`eval`: eval.*)."""
    if which == "train":
        d = cfg.data
        if not d.train:
            raise UserError("data.train is not set (the task data to sample traces for)")
        return TraceSource(d.task, d.train, d.train_split, 0, d.limit, d.shots, d.chat_template)
    from ftlab.evaluate import eval_source

    task, source = eval_source(cfg)
    e = cfg.eval
    return TraceSource(task, source, e.split, e.offset, e.limit, e.shots, e.chat_template)


def checked_task(cfg: DictConfig, name: str) -> Task:
    """The task whose checker decides what is correct; `generic` has none (no gold answer to compare with)."""
    from ftlab.evaluate import eval_task

    if str(name).strip().lower() == GENERIC:
        raise UserError("task 'generic' has no answer checker: set data.task (or eval.task) to the task the "
                        "traces answer, e.g. data.task=gsm8k")
    return eval_task(cfg, name)


def training_prompt(task: Task, ex: Example, shots: int, tokenizer: Any, chat_template: bool) -> str:
    """The `prompt` field that generic training renders into the prompt the traces were sampled from:
    the user message when the chat template is applied, else the whole plain-text prompt."""
    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        return task.render_prompt(ex, shots=shots, tokenizer=tokenizer, chat_template=False)
    msgs = task.messages(ex, shots)
    if len(msgs) != 1:  # shot answers would be supervised as assistant turns in a generic row
        raise UserError(f"task {task.name!r}: with the chat template a trace's prompt must be one user message, "
                        f"but this prompt has {len(msgs)} messages (shots or a system prompt); sample with "
                        "shots=0 or chat_template=false")
    return msgs[0]["content"]


# -- sample ---------------------------------------------------------------------------------------
def sampling_settings(cfg: DictConfig, src: TraceSource) -> dict[str, Any]:
    """Everything besides the model's randomness that decides the rows: model, generation and source."""
    from ftlab.infer import generation_settings

    options = OmegaConf.to_container(cfg.data.task_options) if src.task == cfg.data.task else {}
    return {**generation_settings(cfg), "task": src.task, "task_options": options, "source": src.source,
            "split": src.split, "offset": src.offset, "limit": src.limit, "shots": src.shots,
            "chat_template": src.chat_template}


def with_samples(cfg: DictConfig, samples: int | None) -> DictConfig:
    """`cfg` with eval.n = samples; several samples of greedy decoding would be copies of one answer."""
    n = cfg.eval.n if samples is None else samples
    if n < 1:
        raise UserError(f"--samples must be >= 1, got {n}")
    if n > 1 and cfg.eval.temperature == 0:
        raise UserError(f"--samples {n} with eval.temperature=0 (greedy) would write {n} identical responses per "
                        "question; set eval.temperature (e.g. eval.temperature=0.8)")
    return OmegaConf.merge(cfg, {"eval": {"n": n}})  # type: ignore[return-value]


def source_examples(task: Task, src: TraceSource) -> tuple[list[dict], list[Example]]:
    """The source's records offset..offset+limit and their examples, one per record."""
    end = None if src.limit is None else src.offset + src.limit
    located = task.load_records(src.source, src.split, end)[src.offset:]
    if not located:
        raise UserError(f"{src.source}: offset {src.offset} skips every record")
    examples = task.examples_from(located)
    if len(examples) != len(located):  # a trace row must carry the record its example came from
        raise UserError(f"task {task.name!r} leaves out {len(located) - len(examples)} of {len(located)} records "
                        f"of {src.source}; traces need one example per record")
    return [r for _, r in located], examples


def complete_questions(out: Path, prompts: list[str], n: int, settings: dict[str, Any]) -> set[int]:
    """Indices (into `prompts`) whose n samples are all in `out`. Rows of a question left incomplete by a
    crash are dropped from the file so that it is sampled again; rows written for another source, model
    or settings are refused."""
    from ftlab.infer import done_rows, settings_diff, settings_hash

    fix = f"pass another --out, or delete {out} to start over"
    wanted = settings_hash(settings)
    samples: dict[int, set[int]] = defaultdict(set)
    rows = done_rows(out, WRITER)
    for lineno, row in rows:
        if row.get("settings") != wanted:
            raise UserError(f"{out}:{lineno}: written with another model, source or sampling settings "
                            f"({settings_diff(out, settings)}); {fix}")
        i, j = row["index"], row.get("sample")
        if not 0 <= i < len(prompts) or row["prompt"] != prompts[i]:
            raise UserError(f"{out}:{lineno}: row index {i} holds another prompt than the source's record {i + 1}; "
                            f"{fix}")
        if not isinstance(j, int) or not 0 <= j < n:
            raise UserError(f"{out}:{lineno}: 'sample' must be a number from 0 to {n - 1}; {fix}")
        samples[i].add(j)
    complete = {i for i, js in samples.items() if len(js) == n}
    if len(complete) < len(samples):
        write_jsonl(out, [row for _, row in rows if row["index"] in complete])
    return complete


def append_rows(path: Path, rows: list[dict]) -> None:
    """All samples of one question in one write, flushed (see `complete_questions` for a torn write)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()


def run_sample(cfg: DictConfig, out_path: str, samples: int | None = None, which: str = "train") -> int:
    """Write N traces per question of the recipe's data to `out_path` (resumable); returns rows written."""
    import torch

    from ftlab.evaluate import autocast_for, generation_config, load_for_generation
    from ftlab.infer import settings_hash, write_settings

    out = Path(out_path)
    src = trace_source(cfg, which)
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} is not a file")
    if out.exists() and Path(src.source).exists() and out.samefile(src.source):
        raise UserError(f"--out {out} is the source file; write the traces elsewhere")
    task = checked_task(cfg, src.task)
    cfg = with_samples(cfg, samples)
    records, examples = source_examples(task, src)
    settings = sampling_settings(cfg, src)
    torch.manual_seed(cfg.seed)  # a model.scratch model is the same random model on every (resumed) run
    model, tokenizer, engine = load_for_generation(cfg.model, cfg.eval.engine)
    rendered = [task.render_prompt(ex, shots=src.shots, tokenizer=tokenizer, chat_template=src.chat_template)
                for ex in examples]
    prompts = [training_prompt(task, ex, src.shots, tokenizer, src.chat_template) for ex in examples]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = complete_questions(out, prompts, cfg.eval.n, settings)
    todo = [i for i in range(len(examples)) if i not in done]
    if done:
        log.info("%s: %d questions already sampled, %d to go", out, len(done), len(todo))
    if not todo:
        return 0
    write_settings(out, settings)
    key = settings_hash(settings)

    def write(j: int, responses: list[str]) -> None:
        i = todo[j]
        append_rows(out, [{**records[i], "id": examples[i].id, "index": i, "sample": s, "prompt": prompts[i],
                           "response": text, "settings": key} for s, text in enumerate(responses)])

    with autocast_for(model, cfg.eval.precision):
        engine.generate([rendered[i] for i in todo], generation_config(cfg.eval, cfg.seed), on_result=write,
                        progress=sys.stderr.isatty())
    log.info("wrote %d traces (%d questions x %d samples) to %s", len(todo) * cfg.eval.n, len(todo), cfg.eval.n, out)
    return len(todo) * cfg.eval.n


# -- filter ---------------------------------------------------------------------------------------
@dataclass
class ScoredTrace:
    row: dict
    example: Example
    score: dict[str, Any]


def read_traces(task: Task, path: Path) -> list[ScoredTrace]:
    """Every row of a traces file scored by the task's checker; a row of the wrong shape names its file:line."""
    traces = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if "response" not in row:
            raise UserError(f"{where}: missing field 'response' (a traces row has the {task.name} fields and the "
                            "model's 'response', as `ftlab sample` writes them)")
        if not isinstance(row["response"], str):
            raise UserError(f"{where}: field 'response' must be a string; got {json_type(row['response'])}")
        missing = [k for k in task.required_fields if k not in row]
        if missing:
            raise UserError(f"{where}: missing field {missing[0]!r} (the {task.name} fields that give the gold "
                            f"answer: {', '.join(task.required_fields)})")
        try:
            ex = task.to_example(row, len(traces))
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{where}: cannot read as {task.name}: {e}") from None
        traces.append(ScoredTrace(row, ex, task.score(row["response"], ex)))
    if not traces:
        raise UserError(f"{path}: file is empty (no JSON records)")
    return traces


def stats_path(out: Path) -> Path:
    """kept.jsonl -> kept.stats.json, beside it."""
    return out.with_name(out.name.removesuffix(".jsonl") + ".stats.json")


def filter_stats(task: Task, traces: list[ScoredTrace], kept: list[ScoredTrace], inp: Path,
                 out: Path) -> dict[str, Any]:
    from ftlab.data.responses import checker_rule
    from ftlab.infer import settings_path

    questions = {t.example.id for t in traces}
    sampled_with = None
    if settings_path(inp).is_file():
        try:
            sampled_with = json.loads(settings_path(inp).read_text(encoding="utf-8"))
        except ValueError:
            log.warning("%s: not JSON; the stats leave out how the traces were sampled", settings_path(inp))
    return {"input": str(inp), "output": str(out), "original": len(traces), "kept": len(kept),
            "retention": len(kept) / len(traces), "questions": len(questions),
            "questions_with_kept": len({t.example.id for t in kept}),
            "rule": checker_rule(task, [t.score for t in traces], [t.example for t in traces]),
            "sampled_with": sampled_with}


def run_filter(cfg: DictConfig, input_path: str, out_path: str) -> dict[str, Any]:
    """Keep the traces the task's checker scores correct; writes the kept rows and their stats (atomically,
    and nothing at all on an error)."""
    from ftlab.runs.rundir import write_json

    inp, out = Path(input_path), Path(out_path)
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} is not a file")
    if out.exists() and inp.exists() and out.samefile(inp):
        raise UserError(f"--out {out} is the --input file; write the kept rows elsewhere")
    name = cfg.data.task if cfg.data.task != GENERIC else (cfg.eval.task or GENERIC)
    task = checked_task(cfg, name)
    traces = read_traces(task, inp)
    kept = [t for t in traces if t.score["correct"]]
    stats = filter_stats(task, traces, kept, inp, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, [t.row for t in kept])
    write_json(stats_path(out), stats)
    if not kept:
        log.warning("%s: no trace is correct; %s is empty", inp, out)
    return stats


def format_stats(stats: dict[str, Any], out: Path) -> str:
    rule = stats["rule"]
    return (f"kept {stats['kept']} of {stats['original']} traces (retention {stats['retention']:.1%}); "
            f"{stats['questions_with_kept']} of {stats['questions']} questions keep at least one\n"
            f"rule: the {rule['task']} checker, {rule['primary_rule']}: {rule['extraction_rule']}\n"
            f"{out}\n{stats_path(out)}")


# -- command line ---------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> int:
    from ftlab.config import load_recipe

    run_sample(load_recipe(args.recipe, args.overrides), args.out, args.samples, args.source)
    print(args.out)
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from ftlab.config import load_recipe

    stats = run_filter(load_recipe(args.recipe, args.overrides), args.input, args.out)
    print(format_stats(stats, Path(args.out)))
    return 0


def add_traces_verbs(sub: argparse._SubParsersAction) -> None:
    """sample, filter: model traces of a task's data, then the correct ones."""
    sp = sub.add_parser("sample", help="N model responses per question of the recipe's task data (resumable)",
                        description="sample traces in the shape training reads: the task's fields + prompt + "
                                    "response, one row per (question, sample)")
    sp.add_argument("recipe", help="recipe YAML file")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.temperature=0.8")
    sp.add_argument("--out", required=True, help="JSONL to write (re-running resumes after its last question)")
    sp.add_argument("--samples", type=int, default=None, help="responses per question (default: eval.n)")
    sp.add_argument("--from", dest="source", choices=["train", "eval"], default="train",
                    help="questions of data.train (default) or of the eval source")
    sp.set_defaults(fn=cmd_sample)
    fl = sub.add_parser("filter", help="keep the traces the task's checker scores correct (+ stats)",
                        description="keep the traces whose response the task's checker scores correct; writes "
                                    "OUT and OUT's .stats.json (sizes, retention rate, rule)")
    fl.add_argument("recipe", help="recipe YAML file (data.task, or eval.task, names the checker)")
    fl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.task=gsm8k")
    fl.add_argument("--input", required=True, help="traces JSONL (as `ftlab sample` writes it)")
    fl.add_argument("--out", required=True, help="JSONL of the kept rows")
    fl.set_defaults(fn=cmd_filter)
