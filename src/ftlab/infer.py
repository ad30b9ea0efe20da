"""`ftlab infer`: JSONL of prompts (or chat messages) in, JSONL of completions out.

Rows are appended as each prompt finishes, so a crash loses nothing already written; re-running the
same command skips the input rows already in the output file. A row counts as done only for the same
prompt (compared as rendered) and the same model and generation settings (a hash in each row's
`settings`, spelled out in `<output>.settings.json`): an output written for another input, model or
settings is refused with one line instead of being silently taken as done.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from ftlab.data.jsonl import append_jsonl, iter_jsonl
from ftlab.data.sources import prompt_text
from ftlab.errors import UserError

log = logging.getLogger("ftlab")


class Prompt(NamedTuple):
    index: int       # position among the input's records: the row's `index` in the output
    line: int        # line of the input file, for messages
    text: str        # the prompt as rendered for the model (chat template applied)


def read_prompts(path: str, tokenizer: Any, chat_template: bool) -> list[Prompt]:
    items = []
    for lineno, r in iter_jsonl(path):
        items.append(Prompt(len(items), lineno, prompt_text(r, f"{path}:{lineno}", tokenizer, chat_template)))
    if not items:
        raise UserError(f"{path}: file is empty (no JSON records)")
    return items


def generation_settings(cfg: DictConfig) -> dict[str, Any]:
    """Everything besides the prompt that decides an output: the model and how it generates."""
    m, e = cfg.model, cfg.eval
    model = {k: OmegaConf.to_container(m, resolve=True)[k]  # type: ignore[index]
             for k in ("name", "scratch", "tokenizer", "adapter", "revision", "dtype")}
    return {"model": model, "engine": e.engine, "precision": e.precision, "max_new_tokens": e.max_new_tokens,
            "temperature": e.temperature, "top_p": e.top_p, "n": e.n, "stop": list(e.stop), "seed": cfg.seed}


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def done_rows(out: Path, writer: str = "ftlab infer") -> list[tuple[int, dict]]:
    """(line, row) of the rows already written (by `writer`: `ftlab sample` resumes the same way). A torn last
    line (killed mid-write: no final newline) is dropped from the file, to be generated again; any other
    unreadable line is an error naming it."""
    if not out.is_file():
        return []
    data = out.read_bytes()
    lines = data.split(b"\n")
    torn = len(lines) if not data.endswith(b"\n") else 0  # the line number of an unfinished last line
    rows, good = [], []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict) or not isinstance(row.get("index"), int) or "prompt" not in row:
                raise ValueError("not an output row")
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if lineno == torn:
                break
            raise UserError(f"{out}:{lineno}: not a row {writer} wrote (JSON with 'index' and 'prompt'); "
                            f"pass another --output, or delete {out} to start over") from None
        rows.append((lineno, row))
        good.append(raw + b"\n")
    if torn:  # rewrite without the torn line, ending in a newline so that appends start a new line
        out.write_bytes(b"".join(good))
    return rows


def check_resume(out: Path, rows: list[tuple[int, dict]], items: list[Prompt], input_path: str,
                 settings: dict[str, Any]) -> set[int]:
    """Indices already done; refuses (one line) rows written for another input, model or settings."""
    fix = f"pass another --output, or delete {out} to start over"
    wanted = settings_hash(settings)
    for lineno, row in rows:
        if "settings" not in row:
            raise UserError(f"{out}:{lineno}: written without a record of its model and generation settings "
                            f"(an older ftlab), so it cannot be resumed safely; {fix}")
        if row["settings"] != wanted:
            raise UserError(f"{out}:{lineno}: written with another model or generation settings "
                            f"({settings_diff(out, settings)}); {fix}")
        i = row["index"]
        if not 0 <= i < len(items):
            raise UserError(f"{out}:{lineno}: row index {i}, but {input_path} has {len(items)} prompts "
                            f"(another --input?); {fix}")
        if row["prompt"] != items[i].text:
            raise UserError(f"{out}:{lineno}: row index {i} holds another prompt than {input_path}:{items[i].line} "
                            f"(another --input?); {fix}")
    return {row["index"] for _, row in rows}


def settings_diff(out: Path, settings: dict[str, Any]) -> str:
    """'max_new_tokens 3 -> 5' from the settings the output was written with, when they are on record."""
    try:
        before = json.loads(settings_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no record of which"
    if not isinstance(before, dict):
        return "no record of which"
    changed = [f"{k} {before.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(before) | set(settings))
               if before.get(k) != settings.get(k)]
    return ", ".join(changed) or "no record of which"


def write_settings(out: Path, settings: dict[str, Any]) -> None:
    tmp = settings_path(out).with_name(settings_path(out).name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, settings_path(out))


def run_infer(cfg: DictConfig, input_path: str, output_path: str) -> int:
    from ftlab.evaluate import autocast_for, generation_config, load_for_generation

    out = Path(output_path)
    if out.exists() and not out.is_file():
        raise UserError(f"--output {out} is not a file")
    if out.exists() and Path(input_path).exists() and out.samefile(input_path):
        raise UserError(f"--output {out} is the --input file; write the outputs elsewhere")
    settings = generation_settings(cfg)
    torch.manual_seed(cfg.seed)  # a model.scratch model is the same random model on every (resumed) run
    model, tokenizer, engine = load_for_generation(cfg.model, cfg.eval.engine)
    items = read_prompts(input_path, tokenizer, cfg.eval.chat_template)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = check_resume(out, done_rows(out), items, input_path, settings)
    todo = [p for p in items if p.index not in done]
    if done:
        log.info("%s: %d rows already written, %d to go", out, len(done), len(todo))
    if not todo:
        return 0
    write_settings(out, settings)
    key = settings_hash(settings)

    def write(j: int, outputs: list[str]) -> None:
        p = todo[j]
        append_jsonl(out, {"index": p.index, "prompt": p.text, "output": outputs[0],
                           **({"samples": outputs} if len(outputs) > 1 else {}), "settings": key})

    with autocast_for(model, cfg.eval.precision):  # the recipe's eval precision, as `ftlab eval` uses it
        engine.generate([p.text for p in todo], generation_config(cfg.eval, cfg.seed), on_result=write)
    log.info("wrote %d rows to %s", len(todo), out)
    return len(todo)
