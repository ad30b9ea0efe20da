"""Evaluation: model (+ adapter) x task x split x shots -> predictions.jsonl + metrics.json.

The task object renders every prompt and scores every output, so an accuracy always comes with the
exact prompt format and extraction rule that produced it (both are written into metrics.json).
"""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from ftlab.data.jsonl import append_jsonl
from ftlab.errors import UserError
from ftlab.runs.rundir import RunDir, write_json

log = logging.getLogger("ftlab")


def generation_config(ecfg: Any, seed: int = 0) -> Any:
    from ftlab.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature, top_p=ecfg.top_p,
                            n=ecfg.n, stop=list(ecfg.stop), batch_size=ecfg.batch_size, seed=seed)


def evaluate_examples(model: Any, tokenizer: Any, task: Any, examples: list, ecfg: Any, seed: int = 0,
                      engine: Any = None, on_row: Callable[[dict], None] | None = None,
                      progress: bool = True) -> tuple[list[dict], dict]:
    """Generate for every example and score it; returns (rows in example order, metrics)."""
    from ftlab.generate import HFEngine

    engine = engine or HFEngine(model, tokenizer)
    prompts = [task.render_prompt(ex, shots=ecfg.shots, tokenizer=tokenizer, chat_template=ecfg.chat_template)
               for ex in examples]
    started = time.time()
    rows: list[dict | None] = [None] * len(examples)

    def finished(i: int, outputs: list[str]) -> None:
        ex = examples[i]
        scores = [task.score(o, ex) for o in outputs]
        row = {"id": ex.id, "prompt": prompts[i], "output": outputs[0], "gold": ex.gold, **scores[0],
               **({"samples": outputs, "sample_scores": scores} if len(outputs) > 1 else {}),
               **{k: v for k, v in ex.meta.items() if isinstance(v, (int, str, float))}}
        rows[i] = row
        if on_row:
            on_row(row)

    with autocast_for(model, getattr(ecfg, "precision", "fp32")):
        engine.generate(prompts, generation_config(ecfg, seed), on_result=finished, progress=progress)
    done = [r for r in rows if r is not None]
    metrics = task.aggregate(done, examples)
    metrics.update({"seconds": round(time.time() - started, 2), "shots": ecfg.shots,
                    "chat_template": ecfg.chat_template, "max_new_tokens": ecfg.max_new_tokens,
                    "decoding": "greedy" if ecfg.temperature == 0 else f"sample t={ecfg.temperature} p={ecfg.top_p}",
                    "truncated_prompts": getattr(engine, "stats", {}).get("truncated_prompts", 0)})
    return done, metrics


def autocast_for(model: Any, precision: str) -> Any:
    """bf16/fp16 autocast on the model's device (bf16 is ~1.8x faster on this CPU), or nothing."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def eval_source(cfg: DictConfig) -> tuple[str, str]:
    task = cfg.eval.task or cfg.data.task
    source = cfg.eval.source or cfg.data.val
    if not source:
        raise UserError("eval.source is not set (a JSONL path or a datasets id)")
    return task, source


def run_name(model: str, adapter: str | None, task: str, split_or_file: str, shots: int) -> str:
    def short(s: str) -> str:
        s = s.rstrip("/")
        parts = Path(s).parts
        return "-".join(parts[-2:]) if len(parts) > 1 and parts[-1] in ("final", "best", "merged") else Path(s).name
    name = short(model) + (f"+{short(adapter)}" if adapter else "")
    split = Path(split_or_file).stem
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", f"{name}_{task}_{split}_{shots}shot")


def eval_examples(task: Any, source: str, ecfg: DictConfig) -> list:
    """Rows offset..offset+limit of the source: `offset` keeps the rows used to choose settings out of a score."""
    end = None if ecfg.limit is None else ecfg.offset + ecfg.limit
    examples = task.load(source, split=ecfg.split, limit=end)[ecfg.offset:]
    if not examples:
        raise UserError(f"{source}: eval.offset={ecfg.offset} skips every example")
    return examples


def run_eval(cfg: DictConfig, model_name: str | None = None, adapter: str | None = None) -> tuple[RunDir, dict]:
    """Evaluate one model as the recipe's eval section says; writes a run directory under runs/eval."""
    from ftlab.models.load import load_model_and_tokenizer
    from ftlab.tasks import get_task

    task_name, source = eval_source(cfg)
    task = get_task(task_name)
    examples = eval_examples(task, source, cfg.eval)
    from ftlab.generate import make_engine
    mcfg = OmegaConf.merge(cfg.model, {"name": model_name or cfg.model.name,
                                       "adapter": adapter if model_name else (adapter or cfg.model.adapter)})
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(mcfg)
    engine = make_engine(cfg.eval.engine, model, tokenizer, model_path=mcfg.name, adapter_path=mcfg.adapter)
    name = run_name(mcfg.name, mcfg.adapter, task_name, source if os.path.exists(source) else cfg.eval.split,
                    cfg.eval.shots)
    run = RunDir.create(cfg.output_dir, "eval", name, cfg, cfg.seed)
    pred_path = run.path / "predictions.jsonl"
    try:
        rows, metrics = evaluate_examples(model, tokenizer, task, examples, cfg.eval, cfg.seed, engine,
                                          on_row=lambda r: append_jsonl(pred_path, r))
    except BaseException as e:
        run.finish("interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=repr(e))
        raise
    # predictions.jsonl was streamed in completion order; rewrite it in dataset order.
    from ftlab.data.jsonl import write_jsonl

    write_jsonl(pred_path, rows)
    metrics.update({"model": mcfg.name, "adapter": mcfg.adapter, "task": task_name, "source": source,
                    "split": cfg.eval.split})
    write_json(run.path / "metrics.json", metrics)
    run.finish("complete", metrics=headline(metrics))
    log.info("%s: %s -> %s", name, format_metrics(metrics), run.path)
    return run, metrics


def headline(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_metrics(metrics: dict) -> str:
    keys = [k for k in ("accuracy", "accuracy_strict", "accuracy_flexible", "parse_rate", "mae", "pearson_r")
            if k in metrics]
    return ", ".join(f"{k}={metrics[k]:.3f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                     for k in keys + ["n"])


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """'base' model or an adapter/model directory; 'model+adapter' selects both explicitly."""
    if "+" in spec:
        model, adapter = spec.split("+", 1)
        return model, adapter
    return spec, None


def run_compare(cfg: DictConfig, specs: list[str]) -> list[dict]:
    """Evaluate several models on identical prompts and print one table."""
    results = []
    for spec in specs:
        model, adapter = parse_model_spec(spec)
        run, metrics = run_eval(cfg, model_name=model, adapter=adapter)
        results.append({"model": spec, "run": str(run.path), **metrics})
    print(compare_table(results))
    return results


def compare_table(results: list[dict]) -> str:
    keys = [k for k in ("accuracy", "accuracy_strict", "accuracy_flexible", "parse_rate", "mae", "rmse",
                        "pearson_r", "wasserstein", "n") if any(k in r for r in results)]
    header = "| model | " + " | ".join(keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 1)]
    for r in results:
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- log_generations (seed 002) -------------------------------------------------------------------
@torch.no_grad()
def log_generations(model: Any, tokenizer: Any, task: Any, examples: list, ecfg: Any, step: int = 0,
                    run: RunDir | None = None, tracker: Any = None, seed: int = 0) -> dict[str, Any]:
    """Generate for a batch of prompts and log, per sample: prompt, response, gold answer, the task's
    correctness, mean token entropy of the response and its length; plus mean response length over
    all, correct and incorrect samples. Written to <run>/generations/step_N.jsonl and the trackers."""
    from ftlab.data.jsonl import write_jsonl
    from ftlab.data.sft import tokenize_prompt_and_output
    from ftlab.losses import get_response_log_probs, masked_mean

    was_training = model.training
    model.eval()
    rows, _ = evaluate_examples(model, tokenizer, task, examples, ecfg, seed, progress=False)
    batch = tokenize_prompt_and_output([r["prompt"] for r in rows], [r["output"] for r in rows], tokenizer)
    device = next(model.parameters()).device
    out = get_response_log_probs(model, batch["input_ids"].to(device), batch["labels"].to(device),
                                 return_token_entropy=True)
    mask = batch["response_mask"].to(device)
    entropy = masked_mean(out["token_entropy"].float(), mask, dim=1)
    lengths = mask.sum(dim=1)
    samples = []
    for r, h, n in zip(rows, entropy.tolist(), lengths.tolist()):
        samples.append({"prompt": r["prompt"], "response": r["output"], "gold": r["gold"],
                        "extracted": r["extracted"], "correct": bool(r["correct"]),
                        "mean_token_entropy": h, "response_length": int(n)})
    correct = [s["response_length"] for s in samples if s["correct"]]
    wrong = [s["response_length"] for s in samples if not s["correct"]]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    agg = {"accuracy": mean([float(s["correct"]) for s in samples]),
           "mean_response_length": mean([s["response_length"] for s in samples]),
           "mean_response_length_correct": mean(correct), "mean_response_length_incorrect": mean(wrong),
           "mean_token_entropy": mean([s["mean_token_entropy"] for s in samples])}
    if run is not None:
        write_jsonl(run.path / "generations" / f"step_{step:06d}.jsonl", samples)
    if tracker is not None:
        tracker.log({f"generations/{k}": v for k, v in agg.items()}, step, axis="eval")
    if was_training:
        model.train()
    return {"samples": samples, **agg}
