"""DPO training throughput: ftlab's DPO objective vs TRL's DPOTrainer, same model, pairs, batches and steps.

    python benchmarks/bench_dpo.py                       # 4 configs x 3 runs, 6 steps of 4 pairs
    python benchmarks/bench_dpo.py --threads 1 --steps 4 --configs lora-fp32,full-fp32 --json out.json
                                                         # as in docs/BENCHMARKS.md
    python benchmarks/bench_dpo.py --configs lora-fp32 --steps 3  # a quick look

What is identical in both trainers
  * model: the embedded SmolLM2-135M-Instruct (fp32 weights, sdpa attention) from the same cached directory;
  * pairs: `steps * batch` PrOntoQA problems from ftlab's generator (hops 1-3), built by the task: chosen = the
    goal-directed proof and verdict, rejected = the same proof with the opposite verdict. The prompt is rendered
    once with the chat template by ftlab (`ftlab.data.preference.task_pairs`) and handed to TRL as the same
    string with the same chosen/rejected text (TRL appends EOS = `<|im_end|>`, ftlab the template's end of
    turn, the same token). Checked: TRL's prompt/chosen/rejected token ids equal ftlab's for every pair.
  * batches: one epoch, ftlab with `data.group_by_length=false` draws torch.randperm seeded 0 like TRL's
    sampler, so both see the same pairs at every step (checked: same tokens per step);
  * loss: sigmoid DPO, beta 0.1, mean over the step's pairs; reference = the initial weights (LoRA: the same
    model with adapters disabled; full: TRL keeps a frozen copy, ftlab computes from the policy before step 1);
    no dropout (TRL's default disable_dropout; LoRA dropout 0 for ftlab);
  * AdamW, constant lr (1e-4 LoRA / 1e-5 full), weight decay 0, grad clip 1.0, LoRA r=16 alpha=32 on q/k/v/o,
    gradient checkpointing off, max length 1024 (nothing truncated), fp32 or bf16 autocast over fp32 weights.
  * each trainer's defaults otherwise: TRL computes the reference log-probs at every step (precompute off), the
    LM head on every position (its fused, chunked head: on CPU every position is scored) and its per-step
    metrics (entropy, mean logits, token accuracy); ftlab computes the reference once before step 1 and the LM
    head on response positions only, and runs each pair's prompt once (`dpo.share_prompt`, default).
    `--ftlab-two-sequences` adds ftlab with `dpo.share_prompt=false` (chosen and rejected as two sequences
    with their own prompt copies, like TRL) to show what prompt sharing contributes.
  * TRL's best setting for this comparison, run by default beside its defaults ("TRL precompute";
    `--no-trl-precompute` skips it): `precompute_ref_log_probs=True`, TRL's documented option to compute the
    reference log-probs once. In TRL 1.16 that pass runs inside `DPOTrainer.__init__` (not in
    `get_train_dataloader` or `train()`): `hash_module` hashes the initial weights (the key of the datasets cache
    file), then `_precompute_ref_logps` runs a forward over the whole dataset in dataset order, batches of
    `precompute_ref_batch_size` (default: the training batch, 4 pairs), with the adapters disabled (LoRA) or with
    the policy itself before any update (full fine-tuning: no frozen copy is loaded), and writes the log-probs as
    two dataset columns (an Arrow cache file); the steps then read them from the batch and run no reference
    forward. ftlab's reference pass plays the same part (once, before step 1) and is inside its window too. Nothing is reused between runs: an
    in-memory dataset gets a random cache-file name, and the script counts TRL's reference forwards (0 would be
    reported as a cache hit).

tokens/s (same count for all): tokens of the pairs' chosen and rejected sequences (prompt counted twice, as TRL
feeds them; the same pairs, so the same total) divided by the measured time, which always holds the reference
computation and never model loading or tokenization:
  * ftlab: wall time from the start of its reference pass (`DPOObjective.before_training`, right before step 1;
    it includes ftlab's reference cache key and pair digests) to the end of the last step;
  * TRL defaults: from the start of step 1 (`on_step_begin`; its reference forward runs inside every step) to the
    end of the last step;
  * TRL precompute: the time of `hash_module` plus `_precompute_ref_logps` (both timed inside `__init__`), plus
    the time from the start of step 1 to the end of the last step. What lies between the end of the precompute and
    step 1 (the rest of `__init__`, and `train()`'s set-up: optimizer, dataloader) is left out, as it is left out
    of the TRL-defaults window; the JSON keeps it as `gap_s` (the window from the start of `hash_module` to the
    last step's end is then `measured_s + gap_s`).
Runs are interleaved in one process (per config: ftlab, TRL defaults, TRL precompute, the order rotating between
configs, then the optional ftlab two-sequences run).

Both trainers run in one process that imports ftlab, whose `ftlab.models.load` sets
TRANSFORMERS_SDPA_FORCE_GQA=1 on a machine without CUDA: transformers' sdpa then reads SmolLM2's grouped
key/value heads without repeating them, in TRL's runs too (which a plain TRL user would not get): the decoders
do identical attention work, which can only favour TRL here.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's precompute progress bar

import torch  # noqa: E402
from benchlib import parse_configs, print_report, quiet_run  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

MODEL = "smollm2-135m-instruct"
CONFIGS = ("lora-fp32", "full-fp32", "lora-bf16", "full-bf16")
LR = {"lora": 1e-4, "full": 1e-5}
LORA = {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
BETA, MAX_LENGTH = 0.1, 1024


def bench_sft() -> Any:
    """benchmarks/bench_sft.py as a module (shared helpers)."""
    spec = importlib.util.spec_from_file_location("bench_sft", Path(__file__).with_name("bench_sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source(n: int) -> str:
    return f"generate:{n},hops=1-3,seed=5"


def ftlab_overrides(method: str, precision: str, steps: int, batch: int, workdir: str) -> list[str]:
    out = [
        "name=bench", f"output_dir={workdir}/ftlab_runs", "seed=0", "kind=dpo", "train.method=dpo",
        "data.task=prontoqa", f"data.train={source(steps * batch)}", "data.task_options={proof: backward}",
        f"data.max_length={MAX_LENGTH}", "data.chat_template=true", "data.group_by_length=false",
        f"train.batch_size={batch}", "train.grad_accum=1", f"train.max_steps={steps}", f"train.precision={precision}",
        "train.grad_clip=1.0", "train.save_final=false", "train.log_every=1", "train.gradient_checkpointing=false",
        "optim.name=adamw", f"optim.lr={LR[method]}", "optim.weight_decay=0.0", "optim.eps=1e-8",
        "schedule.name=constant", "schedule.warmup_steps=0", "model.dtype=fp32", "model.attn_implementation=sdpa",
        f"dpo.beta={BETA}", "dpo.loss_type=sigmoid",
    ]
    if method == "lora":
        out += ["lora.enabled=true", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", "lora.dropout=0.0",
                "lora.target_modules=[" + ",".join(LORA["targets"]) + "]"]
    return out


def ftlab_pairs(steps: int, batch: int) -> tuple[list[Any], list[dict]]:
    """ftlab's text pairs (what TRL gets) and encoded pairs (token ids, to check TRL's)."""
    from ftlab.config import load_recipe
    from ftlab.data.preference import encode_pair
    from ftlab.models.load import load_tokenizer, resolve_model_path
    from ftlab.train.dpo import text_pairs

    cfg = load_recipe(None, ftlab_overrides("lora", "fp32", steps, batch, "/tmp"))
    tok = load_tokenizer(resolve_model_path(MODEL))
    texts = text_pairs(cfg, cfg.data.train, "train", tok, None)
    return texts, [encode_pair(t, tok, MAX_LENGTH) for t in texts]


def summarize(start: float, ends: list[float], tokens: list[int], losses: list[float], load_s: float,
              extra: dict[str, Any]) -> dict[str, Any]:
    window = ends[-1] - start
    return {"steps": len(ends), "load_s": round(load_s, 1), "measured_s": round(window, 2),
            "tokens": sum(tokens), "tokens_per_s": sum(tokens) / window, "tokens_per_step": tokens,
            "step_end_s": [round(e - start, 2) for e in ends], "losses": losses,
            "loadavg_1min_after": round(os.getloadavg()[0], 2), **extra}


# -- ftlab -----------------------------------------------------------------------------------------------------
def run_ftlab(method: str, precision: str, steps: int, batch: int, workdir: str, share_prompt: bool = True) -> dict:
    from ftlab.config import load_recipe
    from ftlab.train.dpo import DPOObjective, run_dpo
    from ftlab.train.loop import Loop

    cfg = load_recipe(None, ftlab_overrides(method, precision, steps, batch, workdir)
                      + [f"dpo.share_prompt={str(share_prompt).lower()}"])
    t_load = time.perf_counter()
    start: list[float] = []
    ends: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []
    grad_norms: list[float] = []
    ref_s: list[float] = []
    original_step, original_before = Loop.step, DPOObjective.before_training

    def before(self: Any, loop: Any) -> None:
        start.append(time.perf_counter())
        original_before(self, loop)
        ref_s.append(time.perf_counter() - start[0])

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        stats = original_step(self, *args, **kwargs)
        ends.append(time.perf_counter())
        # full sequences: each pair's inputs (`tokens`) plus its two final tokens, as TRL counts them
        tokens.append(int(stats["tokens"]) + 2 * int(stats["pairs"]))
        losses.append(float(stats["loss"]))
        grad_norms.append(float(stats["grad_norm"]))
        return stats

    bench_sft().reset_accelerate()
    Loop.step, DPOObjective.before_training = step, before
    try:
        run_dpo(cfg)
    finally:
        Loop.step, DPOObjective.before_training = original_step, original_before
    return summarize(start[0], ends, tokens, losses, start[0] - t_load,
                     {"reference_s": round(ref_s[0], 2), "grad_norms": grad_norms, "share_prompt": share_prompt})


# -- TRL -------------------------------------------------------------------------------------------------------
def run_trl(method: str, precision: str, steps: int, batch: int, texts: list[Any], encoded: list[dict],
            workdir: str, precompute: bool = False) -> dict:
    import trl.trainer.dpo_trainer as dpo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ftlab.models.load import load_tokenizer, resolve_model_path

    path = resolve_model_path(MODEL)
    t_load = time.perf_counter()
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    data = Dataset.from_list([{"prompt": t.prompt, "chosen": t.chosen, "rejected": t.rejected} for t in texts])
    peft_config = None
    if method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                 target_modules=LORA["targets"], task_type="CAUSAL_LM")
    args = DPOConfig(
        output_dir=f"{workdir}/trl_out", seed=0, max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=LR[method], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, adam_epsilon=1e-8, bf16=precision == "bf16", fp16=False, use_cpu=True,
        gradient_checkpointing=False, max_length=MAX_LENGTH, beta=BETA, loss_type=["sigmoid"],
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, precompute_ref_log_probs=precompute,  # precompute_ref_batch_size: default
    )
    start: list[float] = []
    ends: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []
    grad_norms: list[float] = []
    pending = [0]
    pre: dict[str, float] = {"hash_s": 0.0, "precompute_s": 0.0, "reference_forwards": 0}
    original_hash = dpo_module.hash_module

    def timed_hash(module: Any) -> str:  # the precompute's cache key, computed in __init__ before the pass
        t0 = time.perf_counter()
        out = original_hash(module)
        pre["hash_s"] += time.perf_counter() - t0
        pre.setdefault("first_s", t0)
        return out

    class Timed(DPOTrainer):
        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            pending[0] += int(inputs["attention_mask"].sum())  # chosen + rejected rows: full sequences
            return super().training_step(model, inputs, num_items_in_batch)

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            t0 = time.perf_counter()
            pre.setdefault("first_s", t0)
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            pre["precompute_s"] += time.perf_counter() - t0
            pre["precompute_end"] = time.perf_counter()
            return out

        def compute_ref_log_probs(self, model: Any, inputs: Any) -> Any:
            pre["reference_forwards"] += 1
            return super().compute_ref_log_probs(model, inputs)

    class StepClock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not start:
                start.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())
            tokens.append(pending[0])
            pending[0] = 0

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                grad_norms.append(float(logs.get("grad_norm", float("nan"))))

    dpo_module.hash_module = timed_hash
    try:
        trainer = Timed(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                        peft_config=peft_config, callbacks=[StepClock()])
    finally:
        dpo_module.hash_module = original_hash
    if precompute and not pre["reference_forwards"]:
        print("WARNING: TRL precompute ran no reference forward (a cached result was reused?)", flush=True)
    same = all(list(r["prompt_ids"]) == e["chosen"][:e["prompt_len"]] and list(r["chosen_ids"]) ==
               e["chosen"][e["prompt_len"]:] and list(r["rejected_ids"]) == e["rejected"][e["prompt_len"]:]
               for r, e in zip(trainer.train_dataset, encoded))
    trainer.train()
    extra: dict[str, Any] = {"grad_norms": grad_norms, "same_token_ids_as_ftlab": same, "precompute": precompute}
    if not precompute:
        return summarize(start[0], ends, tokens, losses, start[0] - t_load, extra)
    # the window: hash + precompute pass, then step 1 to the last step (the set-up between them left out)
    reference = pre["hash_s"] + pre["precompute_s"]
    extra.update(reference_s=round(reference, 2), hash_s=round(pre["hash_s"], 2),
                 precompute_s=round(pre["precompute_s"], 2), reference_forwards=pre["reference_forwards"],
                 gap_s=round(start[0] - pre["precompute_end"], 2))
    return summarize(start[0] - reference, ends, tokens, losses, pre["first_s"] - t_load, extra)


# -- driver ----------------------------------------------------------------------------------------------------
def markdown(results: list[dict[str, Any]]) -> str:
    def ratio(a: dict | None, b: dict | None) -> str:
        return f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x" if a and b else "-"

    def diff(a: dict | None, b: dict | None) -> str:
        return f"{max(abs(x - y) for x, y in zip(a['losses'], b['losses'])):.1e}" if a and b else "-"

    lines = ["| config | ftlab tok/s | TRL defaults tok/s | ratio vs TRL defaults | TRL precompute tok/s "
             "| ratio vs TRL precompute | reference pass: ftlab / TRL precompute | ftlab, two sequences: tok/s "
             "(vs defaults, vs precompute) | max step-loss diff ftlab vs TRL defaults / precompute "
             "| same batches |", "|---" + "|---:" * 8 + "|---|"]
    for r in results:
        f, t, q, u = r["ftlab"], r["trl"], r.get("trl_precompute"), r.get("ftlab_two_sequences")
        two = f"{u['tokens_per_s']:.1f} ({ratio(u, t)}, {ratio(u, q)})" if u else "-"
        same = all(x["tokens_per_step"] == f["tokens_per_step"] for x in (t, q, u) if x)
        pre = f"{q['tokens_per_s']:.1f} | **{ratio(f, q)}** | {f['reference_s']:.1f} s / {q['reference_s']:.1f} s" \
            if q else f"- | - | {f['reference_s']:.1f} s / -"
        lines.append(f"| {r['config']} | {f['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} | **{ratio(f, t)}** | "
                     f"{pre} | {two} | {diff(f, t)} / {diff(f, q)} | {'yes' if same else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (one epoch of steps x batch pairs)")
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (both trainers)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--ftlab-two-sequences", default="", metavar="CONFIGS",
                   help="also run ftlab with dpo.share_prompt=false (no prompt sharing) for these configs (or 'all')")
    p.add_argument("--no-trl-precompute", action="store_true",
                   help="skip the TRL run with precompute_ref_log_probs=True (its reference pass once, timed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="also write all measurements to this JSON file")
    a = p.parse_args(argv)
    configs = parse_configs(p, a.configs, CONFIGS)
    quiet_run(a.threads)

    texts, encoded = ftlab_pairs(a.steps, a.batch)
    total = sum(len(e["chosen"]) + len(e["rejected"]) for e in encoded)
    prompt = sum(e["prompt_len"] for e in encoded)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv, "versions": bench_sft().versions(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
            "pairs": len(encoded), "pair_tokens": total, "prompt_tokens_once": prompt,
            "loadavg_1min_start": os.getloadavg()[0]}
    print(f"# {len(encoded)} PrOntoQA pairs, {total} tokens as two sequences each ({prompt} prompt tokens per copy); "
          f"{meta['machine']}; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_dpo.") as tmp:
        for i, config in enumerate(configs):
            method, precision = config.split("-")
            order = ["ftlab", "trl"] + ([] if a.no_trl_precompute else ["trl_precompute"])
            order = order[i % len(order):] + order[:i % len(order)]  # rotate: each run first in turn
            order += ["ftlab_two_sequences"] if a.ftlab_two_sequences in ("all", config) or \
                config in a.ftlab_two_sequences.split(",") else []
            res: dict[str, Any] = {"config": config}
            for who in order:
                t0 = time.perf_counter()
                if who.startswith("trl"):
                    res[who] = run_trl(method, precision, a.steps, a.batch, texts, encoded, tmp,
                                       precompute=who == "trl_precompute")
                else:
                    res[who] = run_ftlab(method, precision, a.steps, a.batch, tmp, who == "ftlab")
                r = res[who]
                print(f"{config:10s} {who:20s} {r['tokens_per_s']:7.1f} tok/s  window {r['measured_s']} s  "
                      f"losses {[round(x, 5) for x in r['losses']]}  grad norms {[round(x, 4) for x in r['grad_norms']]}  "
                      f"tokens/step {r['tokens_per_step']}  reference {r.get('reference_s', '-')} s  "
                      f"(hash {r.get('hash_s', '-')} s, pass {r.get('precompute_s', '-')} s, "
                      f"{r.get('reference_forwards', '-')} forwards, gap {r.get('gap_s', '-')} s)  "
                      f"same ids {r.get('same_token_ids_as_ftlab', '-')}  load {r['loadavg_1min_after']}  "
                      f"(run {time.perf_counter() - t0:.0f} s)", flush=True)
                gc.collect()
            for who in [w for w in order if w.startswith("trl")]:
                if not res[who]["same_token_ids_as_ftlab"]:
                    print(f"WARNING: {who} tokenized the pairs differently from ftlab", flush=True)
                if res["ftlab"]["tokens_per_step"] != res[who]["tokens_per_step"]:
                    print(f"WARNING: ftlab and {who} did not see the same pairs at every step", flush=True)
            results.append(res)
    meta["total_s"] = round(time.perf_counter() - t_all)
    print_report(markdown(results), meta, results, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
