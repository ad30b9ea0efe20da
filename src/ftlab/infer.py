"""`ftlab infer`: JSONL of prompts (or chat messages) in, JSONL of completions out.

Rows are appended as each prompt finishes, so a crash loses nothing already written; re-running the
same command skips the input rows whose `index` is already in the output file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ftlab.data.jsonl import append_jsonl, iter_jsonl
from ftlab.errors import UserError

log = logging.getLogger("ftlab")


def read_prompts(path: str, tokenizer: Any, chat_template: bool) -> list[tuple[int, str]]:
    items = []
    for lineno, r in iter_jsonl(path):
        if "messages" in r:
            prompt = tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
        elif "prompt" in r:
            prompt = r["prompt"]
            if chat_template and getattr(tokenizer, "chat_template", None):
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
        else:
            raise UserError(f"{path}:{lineno}: missing field 'prompt' (or 'messages')")
        items.append((len(items), prompt))
    if not items:
        raise UserError(f"{path}: file is empty (no JSON records)")
    return items


def done_indices(path: Path) -> set[int]:
    """Indices already written; a torn last line (crash mid-write) is dropped and rewritten later."""
    if not path.is_file():
        return set()
    done, good = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            done.add(int(row["index"]))
            good.append(line)
        except (json.JSONDecodeError, KeyError, ValueError):
            continue
    path.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return done


def run_infer(cfg: DictConfig, input_path: str, output_path: str) -> int:
    from ftlab.evaluate import generation_config
    from ftlab.generate import make_engine
    from ftlab.models.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    items = read_prompts(input_path, tokenizer, cfg.eval.chat_template)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_indices(out)
    todo = [(i, p) for i, p in items if i not in done]
    if done:
        log.info("%s: %d rows already written, %d to go", out, len(done), len(todo))
    if not todo:
        return 0
    engine = make_engine(cfg.eval.engine, model, tokenizer, model_path=cfg.model.name, adapter_path=cfg.model.adapter)

    def write(j: int, outputs: list[str]) -> None:
        index, prompt = todo[j]
        append_jsonl(out, {"index": index, "prompt": prompt, "output": outputs[0],
                           **({"samples": outputs} if len(outputs) > 1 else {})})

    engine.generate([p for _, p in todo], generation_config(cfg.eval, cfg.seed), on_result=write)
    log.info("wrote %d rows to %s", len(todo), out)
    return len(todo)
