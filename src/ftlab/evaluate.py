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
from ftlab.report.stats import paired_difference, predictions_by_id
from ftlab.runs.rundir import RunDir, write_json

log = logging.getLogger("ftlab")


def generation_config(ecfg: Any, seed: int = 0) -> Any:
    from ftlab.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature, top_p=ecfg.top_p,
                            n=ecfg.n, stop=list(ecfg.stop), batch_size=ecfg.batch_size, seed=seed,
                            stop_line_repeats=ecfg.get("stop_line_repeats", 0))


def evaluate_examples(model: Any, tokenizer: Any, task: Any, examples: list, ecfg: Any, seed: int = 0,
                      engine: Any = None, on_row: Callable[[dict], None] | None = None,
                      progress: bool = True) -> tuple[list[dict], dict]:
    """Generate for every example and score it; returns (rows in example order, metrics).

    `model` may be None when `engine` does not need it (vLLM loads its own weights). The HF engine
    generates on whatever device the model is on (in-training evaluation: the training device).
    """
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
    """bf16/fp16 autocast on the model's device (bf16 is ~1.8x faster on this CPU), or nothing
    (fp32, or no HF model: vLLM chooses its own dtype)."""
    import contextlib

    if precision == "fp32" or model is None:
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def eval_task(cfg: DictConfig, task_name: str) -> Any:
    """The task to evaluate with: the recipe's `data.task_options` apply when it is the recipe's own task
    (a SOKRATES recipe's source and prompt layout are the ones its policy was trained on)."""
    from ftlab.tasks import get_task

    same = str(task_name).strip().lower() == str(cfg.data.task).strip().lower()
    return get_task(task_name, **(cfg.data.task_options if same else {}))


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


def vllm_model_paths(mcfg: Any) -> tuple[str, str | None]:
    """The model directory (or hub id) and adapter directory vLLM should load, resolved as
    `load_model_and_tokenizer` resolves them: the embedded model's name becomes its cached
    directory, and an adapter directory given as the model becomes its base model + that adapter."""
    from ftlab.models.load import adapter_base, is_adapter_dir, resolve_model_path

    path, adapter = resolve_model_path(mcfg.name), mcfg.adapter
    if is_adapter_dir(path):
        adapter, path = path, resolve_model_path(adapter_base(path))
    return path, (resolve_model_path(adapter) if adapter else None)


def load_eval_tokenizer(mcfg: Any, path: str, adapter: str | None) -> Any:
    """The tokenizer `load_model_and_tokenizer` would pick (model.tokenizer, the adapter's own, or
    the model's), without loading any weights."""
    from ftlab.models.load import load_tokenizer, resolve_model_path

    if mcfg.tokenizer:
        source = resolve_model_path(mcfg.tokenizer)
    else:
        source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else path
    return load_tokenizer(source, bool(mcfg.trust_remote_code))


def eval_device() -> torch.device:
    """Where `ftlab eval` runs the HF model: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_generation(mcfg: Any, engine: str) -> tuple[Any, Any, Any]:
    """(model or None, tokenizer, engine) for `ftlab eval` and `ftlab infer`.

    With the vllm engine on a machine where vLLM runs, only the tokenizer is loaded here (vLLM loads
    the weights itself; a second copy would only take memory). Otherwise the HF model is loaded and
    moved to the GPU when there is one."""
    from ftlab.generate import make_engine, vllm_available
    from ftlab.models.load import load_model_and_tokenizer

    kind = engine.lower()
    if kind == "vllm" and mcfg.scratch:
        log.warning("vLLM cannot build a model from model.scratch; using the HF engine")
        kind = "hf"
    if kind == "vllm" and vllm_available():
        model_path, adapter_path = vllm_model_paths(mcfg)
        tokenizer = load_eval_tokenizer(mcfg, model_path, adapter_path)
        return None, tokenizer, make_engine("vllm", None, tokenizer, model_path=model_path, adapter_path=adapter_path)
    model, tokenizer = load_model_and_tokenizer(mcfg)
    model.to(eval_device())
    return model, tokenizer, make_engine(kind, model, tokenizer, model_path=mcfg.name, adapter_path=mcfg.adapter)


def run_eval(cfg: DictConfig, model_name: str | None = None, adapter: str | None = None) -> tuple[RunDir, dict]:
    """Evaluate one model as the recipe's eval section says; writes a run directory under runs/eval."""
    task_name, source = eval_source(cfg)
    task = eval_task(cfg, task_name)
    examples = eval_examples(task, source, cfg.eval)
    # a model named explicitly (--compare) is that model, not the recipe's from-scratch config
    mcfg = OmegaConf.merge(cfg.model, {"name": model_name or cfg.model.name,
                                       "adapter": adapter if model_name else (adapter or cfg.model.adapter),
                                       "scratch": None if model_name else cfg.model.scratch})
    torch.manual_seed(cfg.seed)
    model, tokenizer, engine = load_for_generation(mcfg, cfg.eval.engine)
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
    from ftlab.report.fingerprint import eval_set_hash, tokenizer_fingerprint

    # hashes that let `ftlab report` tell whether two accuracies were measured on the same rows and prompts
    metrics.update({"model": mcfg.name, "adapter": mcfg.adapter, "task": task_name, "source": source,
                    "split": cfg.eval.split, "eval_set_hash": eval_set_hash(examples),
                    **tokenizer_fingerprint(tokenizer, cfg.eval.chat_template)})
    write_json(run.path / "metrics.json", metrics)
    log.info("%s: %s -> %s", name, format_metrics(metrics), run.path)
    run.finish("complete", metrics=headline(metrics))
    return run, metrics


def headline(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


SUMMARY_KEYS = ("accuracy", "accuracy_strict", "accuracy_flexible", "parse_rate", "majority_class_rate",
                "mae_raw", "mae_norm", "pearson_r", "wasserstein")


def format_metrics(metrics: dict) -> str:
    keys = [k for k in SUMMARY_KEYS if k in metrics]
    text = ", ".join(f"{k}={metrics[k]:.3f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                     for k in keys + ["n"])
    # "accuracy" alone does not say how answers were read; the rule travels with the number
    return text + (f" (accuracy rule: {metrics['primary_rule']})" if "primary_rule" in metrics else "")


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """'base' model or an adapter/model directory; 'model+adapter' selects both explicitly."""
    if "+" in spec:
        model, adapter = spec.split("+", 1)
        return model, adapter
    return spec, None


def check_model_spec(spec: str) -> None:
    """Fail with one line when a model or adapter of `spec` cannot be found, before anything is evaluated.

    Local directories get the checks loading does (config, complete weights, an adapter's base model);
    a hub id can only be checked for network access or a cached copy, which `resolve_model_path` does.
    """
    from ftlab.models.load import (
        adapter_base_path,
        check_adapter_files,
        check_model_files,
        is_adapter_dir,
        resolve_model_path,
    )

    model, adapter = parse_model_spec(spec)
    try:
        path = resolve_model_path(model)
        if is_adapter_dir(path):  # an adapter directory named alone: its base must load too
            check_adapter_files(path)
            path = adapter_base_path(path)
        check_model_files(path)
        if adapter is not None:
            if not Path(adapter).expanduser().exists():
                raise UserError(f"adapter path {adapter!r} does not exist")
            check_adapter_files(adapter)
    except UserError as e:
        raise UserError(f"--compare {spec}: {e}") from None


def run_compare(cfg: DictConfig, specs: list[str]) -> list[dict]:
    """Evaluate BASE and TUNED on identical prompts and print one table with the paired difference.

    Every model/adapter is checked before the first evaluation, so a typo in TUNED fails at once
    instead of after a full BASE run. The difference is stored in the last (tuned) result.
    """
    for spec in specs:
        check_model_spec(spec)
    results = []
    for spec in specs:
        model, adapter = parse_model_spec(spec)
        run, metrics = run_eval(cfg, model_name=model, adapter=adapter)
        results.append({"model": spec, "run": str(run.path), **metrics})
    if len(results) == 2:
        base, tuned = (predictions_by_id(r["run"]) for r in results)
        results[1].update(paired_difference(base, tuned))
    print(compare_table(results))
    return results


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list) and len(value) == 2:  # a [lo, hi] interval
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return "" if value is None else str(value)


def compare_table(results: list[dict]) -> str:
    """Markdown table of the models' metrics, each accuracy with its 95% interval; then which rule the
    accuracy used and, for two models, the paired difference tuned - base."""
    keys = [k for k in ("accuracy", "accuracy_ci95", "accuracy_strict", "accuracy_flexible", "parse_rate",
                        "majority_class_rate", "mae_raw", "mae_norm", "pearson_r", "wasserstein", "n")
            if any(k in r for r in results)]
    lines = ["| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for r in results:
        lines.append(f"| {r['model']} | " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
    rules = sorted({str(r["primary_rule"]) for r in results if "primary_rule" in r})
    if rules:
        lines.append(f"accuracy = primary rule: {'; '.join(rules)} (accuracy_strict / accuracy_flexible: "
                     "that rule alone; extraction rules in each run's metrics.json)")
    last = results[-1] if results else {}
    if "accuracy_diff" in last:
        lo_hi = last["accuracy_diff_ci95"]
        ci = f"95% CI [{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]" if lo_hi else "no CI (no paired rows)"
        lines.append(f"tuned - base accuracy: {last['accuracy_diff']:+.3f}, {ci}, paired bootstrap over "
                     f"{last['n_paired']} rows matched by id" +
                     (f" ({last['n_unpaired']} unmatched rows left out)" if last["n_unpaired"] else ""))
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
