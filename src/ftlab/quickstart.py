"""The main job: teach the embedded SmolLM2-135M-Instruct multi-hop logic on a laptop CPU.

    generate PrOntoQA-style training data (ftlab's own generator)
    -> evaluate the base model zero-shot on held-out problems (the authors' files when present)
    -> SFT, LoRA by default (bf16 autocast on CPU; full fine-tuning with lora.enabled=false)
    -> evaluate the tuned model on the identical prompts
    -> report.md + plots (training loss, accuracy before/after by hop count)
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.data.jsonl import write_jsonl
from ftlab.errors import UserError
from ftlab.runs import report as rp
from ftlab.runs.rundir import RunDir, write_json

log = logging.getLogger("ftlab")


def make_training_set(cfg: DictConfig, out: Path) -> Path:
    from ftlab.tasks import generate_prontoqa

    q = cfg.quickstart
    records = generate_prontoqa(q.train_examples, hops=list(q.train_hops), seed=q.data_seed,
                                more_queries=q.more_queries, lookups=q.lookups)
    write_jsonl(out, records)
    return out


def heldout_sizes(cfg: DictConfig) -> dict[int, int]:
    q = cfg.quickstart
    if len(q.heldout_hops) != len(q.heldout_sizes):
        raise UserError(f"quickstart.heldout_hops has {len(q.heldout_hops)} entries but heldout_sizes has "
                        f"{len(q.heldout_sizes)}; give one size per hop count")
    return {int(h): int(n) for h, n in zip(q.heldout_hops, q.heldout_sizes)}


def heldout_sets(cfg: DictConfig, data_dir: Path) -> tuple[dict[int, Path], str]:
    """{hops: jsonl path} and a sentence saying where the problems come from."""
    from ftlab.tasks import generate_prontoqa

    q = cfg.quickstart
    sizes = heldout_sizes(cfg)
    real = Path(q.heldout_dir)
    files = {h: real / f"generator_{h}hop_test.jsonl" for h in sizes}
    if all(f.is_file() for f in files.values()):
        return files, (f"the authors' PrOntoQA generator test files in {real} (first "
                       + ", ".join(f"{n} of {h}-hop" for h, n in sizes.items()) + ")")
    out = {}
    for h, n in sizes.items():  # a fresh machine: ftlab-generated problems with a disjoint seed
        out[h] = data_dir / f"heldout_{h}hop.jsonl"
        write_jsonl(out[h], generate_prontoqa(n, hops=h, seed=q.heldout_seed + h))
    return out, (f"ftlab-generated held-out problems ({real} not found; seed {q.heldout_seed}+hops, "
                 + ", ".join(f"{n} of {h}-hop" for h, n in sizes.items()) + ")")


def evaluate_all(model: Any, tokenizer: Any, sets: dict[int, Path], cfg: DictConfig, out_dir: Path,
                 label: str) -> dict[int, dict]:
    from ftlab.evaluate import evaluate_examples
    from ftlab.models.load import release_memory
    from ftlab.tasks import get_task

    task = get_task("prontoqa")
    results = {}
    for hops, path in sets.items():
        n = heldout_sizes(cfg)[hops]
        examples = task.load(str(path), limit=n)
        log.info("evaluating %s on %d %d-hop problems", label, len(examples), hops)
        rows, metrics = evaluate_examples(model, tokenizer, task, examples, cfg.eval, cfg.seed)
        write_jsonl(out_dir / f"predictions_{label}_{hops}hop.jsonl", rows)
        results[hops] = metrics
        release_memory()  # the engine's KV slots of this set
    write_json(out_dir / f"metrics_{label}.json", {str(h): m for h, m in results.items()})
    return results


def load_tuned(cfg: DictConfig, final: Path) -> tuple[Any, Any]:
    """The trained model: the LoRA adapter on its base, or the fully fine-tuned weights."""
    from ftlab.models.load import load_model_and_tokenizer

    if cfg.lora.enabled:
        return load_model_and_tokenizer(cfg.model, adapter=str(final))
    return load_model_and_tokenizer(OmegaConf.merge(cfg.model, {"name": str(final), "adapter": None}))


def method_sentence(cfg: DictConfig) -> str:
    detached = (", the prompt's keys and values computed without gradient (train.detach_prompt: an approximate "
                "gradient, see docs/BENCHMARKS.md)") if cfg.train.detach_prompt else ""
    if cfg.lora.enabled:
        where = f", last {cfg.lora.last_layers} layers" if cfg.lora.last_layers else ""
        return (f"LoRA (r={cfg.lora.r}, alpha={cfg.lora.alpha}, targets {list(cfg.lora.target_modules)}{where})"
                + detached)
    return "full fine-tuning (all weights)" + detached


def run_quickstart(cfg: DictConfig) -> RunDir:
    from ftlab.models.load import load_model_and_tokenizer, release_memory
    from ftlab.train.sft import run_sft

    started = time.time()
    run = RunDir.create(cfg.output_dir, "quickstart", cfg.name, cfg, cfg.seed)
    try:
        data_dir = run.path / "data"
        train_path = make_training_set(cfg, data_dir / "train.jsonl")
        sets, provenance = heldout_sets(cfg, data_dir)
        log.info("held-out evaluation uses %s", provenance)
        run.update_summary(heldout=provenance)

        base, tokenizer = load_model_and_tokenizer(cfg.model)
        before = evaluate_all(base, tokenizer, sets, cfg, run.path, "base")
        del base
        release_memory()  # each phase's peak then starts from what is alive, not from the last phase's peak

        sft_cfg = OmegaConf.merge(cfg, {"data": {"train": str(train_path), "task": "prontoqa"},
                                        "output_dir": str(run.path), "kind": "sft"})
        sft_run = run_sft(sft_cfg)
        run.log_to_file()  # the SFT run had taken over the log file handler
        release_memory()
        tuned, tokenizer = load_tuned(cfg, sft_run.path / "final")
        after = evaluate_all(tuned, tokenizer, sets, cfg, run.path, "tuned")

        summary = write_report(cfg, run, sft_run, before, after, provenance, time.time() - started)
    except KeyboardInterrupt:
        run.finish("interrupted")
        raise
    except BaseException as e:
        run.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    run.finish("complete", **summary)
    print_summary(run, summary)
    return run


def write_report(cfg: DictConfig, run: RunDir, sft_run: RunDir, before: dict, after: dict, provenance: str,
                 seconds: float) -> dict:
    hops = sorted(before)
    acc_b = [before[h]["accuracy"] for h in hops]
    acc_a = [after[h]["accuracy"] for h in hops]
    rp.plot_loss(sft_run.metrics_path, run.path / "training_loss.png",
                 f"{'LoRA' if cfg.lora.enabled else 'full'} SFT on generated PrOntoQA")
    rp.plot_before_after([f"{h}-hop" for h in hops], acc_b, acc_a, run.path / "accuracy_by_hops.png",
                         "PrOntoQA held-out accuracy, greedy", "reasoning depth", chance=0.5)
    sft_summary = json.loads((sft_run.path / "summary.json").read_text())
    rule = before[hops[0]].get("extraction_rule", "")
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    rows = [[f"{h}-hop", before[h]["n"], pct(before[h]["accuracy"]), pct(after[h]["accuracy"]),
             f"{100 * (after[h]['accuracy'] - before[h]['accuracy']):+.1f}",
             pct(before[h]["accuracy_strict"]), pct(after[h]["accuracy_strict"])] for h in hops]
    text = f"""# ftlab quickstart: multi-hop logic on a laptop CPU

Model: `{cfg.model.name}`, {method_sentence(cfg)},
trained on {cfg.quickstart.train_examples} ftlab-generated PrOntoQA problems ({list(cfg.quickstart.train_hops)} hops),
{sft_summary.get('steps')} optimizer steps, batch {cfg.train.batch_size} x accumulation {cfg.train.grad_accum},
lr {cfg.optim.lr}, precision {cfg.train.precision}, {sft_summary.get('step_tokens_per_s') or 0:.0f} training tokens/s
(the steps alone; {sft_summary.get('tokens_per_s') or 0:.0f} by wall clock, evaluation and checkpoints included).

Training targets: {proof_sentence(cfg)}

Held-out evaluation: {provenance}. Zero-shot prompts, identical before and after, chat template,
greedy decoding, at most {cfg.eval.max_new_tokens} new tokens.
Extraction rule: {rule}

{rp.markdown_table(["set", "n", "base", "tuned", "lift (points)", "base, strict rule", "tuned, strict rule"], rows)}

![accuracy by hops](accuracy_by_hops.png)

![training loss](training_loss.png)

{first_problem_before_after(run.path, hops[len(hops) // 2])}

Wall time of the whole job: {seconds / 60:.1f} min. Training run: `{sft_run.path}`.
Predictions: `predictions_base_*hop.jsonl`, `predictions_tuned_*hop.jsonl`.
"""
    (run.path / "report.md").write_text(text, encoding="utf-8")
    return {"accuracy_before": {str(h): before[h]["accuracy"] for h in hops},
            "accuracy_after": {str(h): after[h]["accuracy"] for h in hops},
            "heldout": provenance, "minutes": round(seconds / 60, 2), "sft_run": str(sft_run.path),
            "report": str(run.path / "report.md")}


def proof_sentence(cfg: DictConfig) -> str:
    proof = cfg.data.task_options.get("proof")
    if proof == "backward":
        return ("goal-directed proofs (`data.task_options.proof: backward`): restate the claim, find the rule "
                "about the queried property, climb back to the entity's fact, compare with the claim.")
    if proof == "closure":
        return ("forward chaining, breadth first (`data.task_options.proof: closure`): from the entity's facts, "
                "one line per concept reached, listing what the rules about it say, until the queried property.")
    return "the generator's forward chain of thought, then \"The answer is True/False.\""


def first_problem_before_after(run_dir: Path, hops: int) -> str:
    """The first held-out problem of one set with both models' outputs: what training changed, unpicked."""
    rows = {}
    for label in ("base", "tuned"):
        with open(run_dir / f"predictions_{label}_{hops}hop.jsonl", encoding="utf-8") as f:
            rows[label] = json.loads(f.readline())
    parts = [f"## The first {hops}-hop problem, before and after (gold: {rows['base']['gold']})", "",
             "The prompt, exactly as the models saw it:", "", "```text", rows["base"]["prompt"].strip(), "```"]
    for label, row in rows.items():
        verdict = "correct" if row["correct"] else "wrong"
        parts += [f"**{label}** ({verdict}):", "", "```text", row["output"].strip(), "```"]
    return "\n".join(parts)


def print_summary(run: RunDir, s: dict) -> None:
    lines = ["", "=" * 64, "ftlab quickstart finished in %.1f min" % s["minutes"], "-" * 64,
             f"{'held-out set':<14}{'base':>10}{'tuned':>10}{'lift':>10}"]
    for h in s["accuracy_before"]:
        b, a = s["accuracy_before"][h], s["accuracy_after"][h]
        lines.append(f"{h + '-hop':<14}{100 * b:>9.1f}%{100 * a:>9.1f}%{100 * (a - b):>+9.1f}")
    lines += ["-" * 64, f"data:    {s['heldout']}", f"report:  {s['report']}",
              f"plots:   {run.path / 'accuracy_by_hops.png'}", f"         {run.path / 'training_loss.png'}",
              f"model:   {s['sft_run']}/final", "=" * 64]
    print("\n".join(lines))
