"""SFT training throughput: ftlab's trainer vs TRL's SFTTrainer, same model, data, batch and steps.

    python benchmarks/bench_sft.py                 # 4 configs x 2 trainers, 6 steps each (~15 min, 1 busy core)
    python benchmarks/bench_sft.py --threads 1 --ftlab-trl-order --json out.json   # as in docs/BENCHMARKS.md
    python benchmarks/bench_sft.py --steps 3 --configs lora-fp32 --profile prof/  # op tables of step 2
    python benchmarks/bench_sft.py --threads 1 --configs full-fp32 --ftlab-trl-order --trl-group-by-length \
        --trl-padding-free               # TRL's documented speed options too (docs/BENCHMARKS.md, 2026-12-07)
    python benchmarks/bench_sft.py --threads 1 --configs full-fp32 --runs ftlab_trl_order,ftlab_packed

What is identical in both trainers
  * model: the embedded SmolLM2-135M-Instruct (fp32 weights, sdpa attention), loaded from the same cached
    safetensors directory (`ftlab.models.load.resolve_model_path("smollm2-135m-instruct")`);
  * data: the first `steps * batch` GSM8K train rows (prompt = question, response = answer). The prompt is
    rendered once with the tokenizer's chat template (user turn + generation prompt) - by ftlab itself
    (`data.task=generic`, `data.chat_template=true`) and, with the same call, for TRL's prompt/completion
    Dataset - and the response ends with EOS in both, so the token sequences are the same (checked: TRL's
    tokenized slice must hold ftlab's tokens + 1 per example, the final EOS it also feeds as an input).
    Loss on the completion (+ EOS) only in both, mean over the supervised tokens of the step.
  * effective batch 8 (8 x 1 accumulation), max length 512, `steps` optimizer steps, AdamW, constant lr (2e-4
    LoRA / 2e-5 full), weight decay 0, grad clip 1.0, LoRA r=16 alpha=32 dropout=0.05 on q/k/v/o,
    gradient checkpointing off (TRL's SFTConfig turns it on by default; off in both so both do the same
    compute), fp32 or bf16 autocast with fp32 weights (TRL `bf16=True`, ftlab `train.precision=bf16`).
  * each trainer uses its own defaults otherwise. ftlab (no data.packing / data.group_by_length override):
    unpacked, length-grouped batches (the examples are sorted by length inside mega-chunks of 50 batches,
    which here is the whole slice, cut into batches of 8, batch order shuffled with seed 0), each padded to
    its longest example; the LM head + log-softmax run on the response positions only. TRL: batches in
    its default random order (torch.randperm seeded 0), each padded to its longest example
    (packing=False, padding_free=False, group_by_length off: TRL's defaults, spelled out); TRL also
    computes its default per-step metrics (entropy, token accuracy) and uses its default optimizer
    implementation.
  * one epoch: the slice has exactly steps * batch examples, so each trainer sees every example once, in
    different batches (length grouping). Their per-step losses are therefore not comparable; the "epoch
    loss" (step losses weighted by the step's supervised tokens, all steps) is, up to the order of updates.
    `--ftlab-trl-order` adds a run of ftlab with data.group_by_length=false (and packing off): it draws
    the batches with torch.randperm seeded 0 like TRL, so it sees TRL's 8 examples at every step, pads to
    the same widths, and its fp32 losses should agree with TRL's step by step - a check that both compute
    the same loss, and ftlab's speed on TRL's exact batches. `--ftlab-packed` adds ftlab with
    data.packing=true (rows of <= 512 tokens, examples isolated by position_ids; ftlab's former default). Packing
    also turns ftlab's length grouping off, so this run draws TRL's batches too and packs each step's examples.
  * TRL's documented speed options, as extra TRL runs: `--trl-group-by-length` (transformers 5.25 has no
    `group_by_length` argument any more; `train_sampling_strategy="group_by_length"`, LengthGroupedSampler, whose
    mega-batches are min(n // (4 x batch), 50) batches: one batch for the default 48-example slice, so there it only
    sorts inside random batches) and `--trl-padding-free` (`padding_free=True`, all of a step's examples in one
    row; TRL documents it for FlashAttention 2/3, with sdpa transformers builds a block-diagonal mask from the
    position ids; `max_length=None`, which TRL requires without packing and which cuts nothing at 512). The
    padding-free run sees TRL's default batches (checked). `--runs a,b,...` runs exactly those runs per config.
    TRL runs record the padded positions per step (what the decoder computes); so do ftlab runs.

tokens/s (same definition for both): real (non-pad) tokens of steps 2..N divided by the wall time from the end
of optimizer step 1 to the end of step N. That excludes model loading, data preparation and the warm-up step,
and includes everything a trainer does between steps (collation, logging). ftlab's step ends are taken by
wrapping `ftlab.train.loop.Loop.step`; TRL's from a `TrainerCallback.on_step_end`. Real tokens: ftlab's
per-step `tokens` (sum of example input lengths, no padding); TRL: sum of `attention_mask` over the step's
batches minus one per example (the final EOS, which TRL feeds as an input and ftlab only as a label), so the
same example counts the same in both. tokens/CPU-s divides by the process CPU time over the same window
instead: with `--threads 1` that is the work done, less sensitive to other jobs on shared cores than wall
time but not immune (a busy neighbour on a 2-core VM has slowed it by ~25%: shared cache and memory
bandwidth); with more threads, OpenMP spin-waits count as CPU time too.

Runs are interleaved (per config: ftlab then TRL, the order alternating between configs, then the optional
extra ftlab and TRL runs) in one process, so load from other jobs on the shared cores hits all alike. The process
imports ftlab, whose `ftlab.models.load` sets TRANSFORMERS_SDPA_FORCE_GQA=1 on a machine without CUDA: TRL's runs
get sdpa's grouped-query path too (identical attention work in both; a plain TRL user would not have it).

`--profile DIR` writes torch.profiler tables of step 2 of every run, DIR/<config>_<run>.txt (by self CPU time, by
input shapes with FLOPs, by inclusive time: the optimizer step, autograd's backward nodes, TRL's chunked LM head)
and the op list as DIR/<config>_<run>.json (profiling slows that measured step: not for reporting).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from benchlib import parse_configs, print_report, quiet_run  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

MODEL = "smollm2-135m-instruct"
# ../shared beside the checkout (the developer/CI machines' data folder)
GSM8K = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl")
CONFIGS = ("lora-fp32", "full-fp32", "lora-bf16", "full-bf16")
LR = {"lora": 2e-4, "full": 2e-5}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


# -- data ------------------------------------------------------------------------------------------
def gsm8k_rows(path: str, n: int) -> list[dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append({"prompt": r["question"], "response": r["answer"]})
            if len(rows) >= n:
                break
    if len(rows) < n:
        raise SystemExit(f"{path} has only {len(rows)} rows, need {n}")
    return rows


def render_prompt(tokenizer: Any, question: str) -> str:
    """The same call ftlab's generic source makes (ftlab.data.sources.generic_conversations)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def ftlab_token_count(rows: list[dict[str, str]], tokenizer: Any, max_length: int) -> int:
    from ftlab.data.sft import encode_sft_example

    return sum(len(encode_sft_example(render_prompt(tokenizer, r["prompt"]), r["response"], tokenizer,
                                      max_length)["input_ids"]) for r in rows)


# -- shared helpers --------------------------------------------------------------------------------
def reset_accelerate() -> None:
    """Accelerate keeps one global state per process; each run here sets its own mixed precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def summarize(ends: list[tuple[float, float]], tokens: list[int], losses: list[float], supervised: list[int],
              load_s: float) -> dict[str, Any]:
    """ends[i] = (wall, process CPU time), tokens[i], losses[i], supervised[i] (tokens with loss) belong to
    optimizer step i+1; step 1 is warm-up (excluded from the timings, included in the epoch loss)."""
    if len(ends) < 2:
        raise SystemExit("need at least 2 steps (the first is warm-up)")
    window = ends[-1][0] - ends[0][0]
    cpu = ends[-1][1] - ends[0][1]
    measured_tokens = sum(tokens[1:])
    return {
        "steps": len(ends), "measured_steps": len(ends) - 1, "load_s": round(load_s, 1),
        "measured_s": round(window, 2), "measured_cpu_s": round(cpu, 2), "measured_tokens": measured_tokens,
        "tokens_per_s": measured_tokens / window, "tokens_per_cpu_s": measured_tokens / cpu,
        "step_s": [round(b[0] - a[0], 2) for a, b in zip(ends, ends[1:])],
        "step_cpu_s": [round(b[1] - a[1], 2) for a, b in zip(ends, ends[1:])],
        "tokens_per_step": tokens, "supervised_per_step": supervised, "losses": [round(x, 4) for x in losses],
        "mean_loss": statistics.fmean(losses[1:]), "final_loss": losses[-1],
        "epoch_loss": sum(x * n for x, n in zip(losses, supervised)) / sum(supervised),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }


class Profile:
    """torch.profiler around one optimizer step when enabled; the op table goes to `path`."""

    def __init__(self, path: str | None, enabled: bool):
        self.path, self.enabled, self.prof = path, bool(path) and enabled, None

    def __enter__(self) -> "Profile":
        if self.enabled:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                               record_shapes=True, with_flops=True)
            self.prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.prof is None:
            return
        self.prof.__exit__(*exc)
        table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40,
                                               max_name_column_width=60)
        shapes = self.prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=40, max_shapes_column_width=80)
        # inclusive times: the optimizer step (Optimizer.step#...), autograd's backward nodes, the forward modules
        inclusive = self.prof.key_averages().table(sort_by="cpu_time_total", row_limit=60, max_name_column_width=70)
        Path(self.path).write_text(table + "\n\n" + shapes + "\n\nby inclusive CPU time:\n" + inclusive)
        ops = [{"name": e.key, "count": e.count, "self_cpu_us": e.self_cpu_time_total, "cpu_us": e.cpu_time_total,
                "flops": getattr(e, "flops", 0)} for e in self.prof.key_averages()]
        Path(self.path).with_suffix(".json").write_text(json.dumps(ops, indent=1))
        self.prof, self.enabled = None, False


# -- ftlab -----------------------------------------------------------------------------------------
FTLAB_VARIANTS = {  # run name -> data overrides on top of ftlab's defaults
    "ftlab": [],
    "ftlab_trl_order": ["data.packing=false", "data.group_by_length=false"],
    "ftlab_packed": ["data.packing=true"],
}


def run_ftlab(method: str, precision: str, steps: int, batch: int, max_length: int, jsonl: str,
              workdir: str, data_overrides: list[str], profile: str | None = None) -> dict[str, Any]:
    import ftlab.train.sft as sft
    from ftlab.config import load_recipe
    from ftlab.train.loop import Loop

    overrides = [
        "name=bench", f"output_dir={workdir}/ftlab_runs", "seed=0",
        "data.task=generic", f"data.train={jsonl}", f"data.max_length={max_length}", "data.chat_template=true",
        *data_overrides,
        f"train.batch_size={batch}", "train.grad_accum=1", f"train.max_steps={steps}",
        f"train.precision={precision}", "train.grad_clip=1.0", "train.save_final=false", "train.log_every=1",
        "train.gradient_checkpointing=false",
        "optim.name=adamw", f"optim.lr={LR[method]}", "optim.weight_decay=0.0", "optim.eps=1e-8",
        "schedule.name=constant", "schedule.warmup_steps=0",
        "model.dtype=fp32", "model.attn_implementation=sdpa",
    ]
    if method == "lora":
        overrides += ["lora.enabled=true", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}",
                      f"lora.dropout={LORA['dropout']}",
                      "lora.target_modules=[" + ",".join(LORA["targets"]) + "]"]
    cfg = load_recipe(None, overrides)
    ends: list[tuple[float, float]] = []
    tokens: list[int] = []
    losses: list[float] = []
    supervised: list[int] = []
    t_load = time.perf_counter()
    first: list[float] = []
    original = Loop.step
    original_collate = sft.SFTObjective.collate
    positions: list[int] = []  # per collated micro-batch (one per step here): padded positions, pad included

    def collate(self: Any, indices: list[int]) -> dict[str, torch.Tensor]:
        out = original_collate(self, indices)
        positions.append(out["input_ids"].numel())
        return out

    def timed_train_step(*args: Any, **kwargs: Any) -> Any:
        if not first:
            first.append(time.perf_counter())
        prof = Profile(profile, len(ends) == 1)
        with prof:
            stats = original(*args, **kwargs)
        ends.append((time.perf_counter(), time.process_time()))
        if stats is not None:  # read before train_loop pops "tokens"
            tokens.append(int(stats["tokens"]))
            losses.append(float(stats["loss"]))
            supervised.append(int(stats["supervised_tokens"]))
        return stats

    reset_accelerate()
    Loop.step, sft.SFTObjective.collate = timed_train_step, collate
    try:
        sft.run_sft(cfg)
    finally:
        Loop.step, sft.SFTObjective.collate = original, original_collate
    out = summarize(ends, tokens, losses, supervised, first[0] - t_load)
    out["positions_per_step"] = positions if len(positions) == len(ends) else None  # None: not one per step
    out["data"] = {"packing": bool(cfg.data.packing), "group_by_length": bool(cfg.data.group_by_length)}
    return out


# -- TRL -------------------------------------------------------------------------------------------
TRL_VARIANTS: dict[str, dict[str, Any]] = {  # run name -> SFTConfig arguments on top of TRL's defaults
    "trl": {},
    # transformers 5.25 has no `group_by_length` argument any more: its TrainingArguments take
    # train_sampling_strategy="group_by_length" (LengthGroupedSampler) instead
    "trl_group_by_length": {"train_sampling_strategy": "group_by_length"},
    # one row of all the step's examples, position_ids restarting per example, no attention mask (TRL documents it
    # for FlashAttention 2/3; with sdpa, transformers builds a block-diagonal mask from the position_ids). TRL
    # refuses it with max_length set and no packing; None cuts nothing here (see --max-length, checked by tokens)
    "trl_padding_free": {"padding_free": True, "max_length": None},
}


def run_trl(method: str, precision: str, steps: int, batch: int, max_length: int,
            rows: list[dict[str, str]], workdir: str, profile: str | None = None,
            options: dict[str, Any] | None = None) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ftlab.models.load import load_tokenizer, resolve_model_path

    path = resolve_model_path(MODEL)
    t_load = time.perf_counter()
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    data = Dataset.from_list([{"prompt": render_prompt(tokenizer, r["prompt"]), "completion": r["response"]}
                              for r in rows])
    peft_config = None
    if method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["targets"], task_type="CAUSAL_LM")
    kwargs: dict[str, Any] = dict(
        output_dir=f"{workdir}/trl_out", seed=0, max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, learning_rate=LR[method], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, adam_epsilon=1e-8,
        bf16=precision == "bf16", fp16=False, use_cpu=True, gradient_checkpointing=False,
        max_length=max_length, packing=False, padding_free=False,  # TRL defaults, spelled out
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args = SFTConfig(**{**kwargs, **(options or {})})
    ends: list[tuple[float, float]] = []
    tokens: list[int] = []
    losses: list[float] = []
    supervised: list[int] = []
    pending = [0, 0, 0]
    positions: list[int] = []  # padded positions per step (what the decoder computes), pad included
    first: list[float] = []
    prof = Profile(profile, False)

    class Timed(SFTTrainer):
        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            if not first:
                first.append(time.perf_counter())
            # one row per example (no packing): minus 1 per row because TRL also feeds each example's final
            # EOS as an input (it predicts nothing); ftlab's inputs stop before it. Same tokens per example.
            if "attention_mask" in inputs:
                mask = inputs["attention_mask"]
                pending[0] += int(mask.sum()) - int((mask.sum(dim=1) > 0).sum())
            else:  # padding-free: one row, no padding; an example starts where its position id is 0
                pending[0] += inputs["input_ids"].numel() - int((inputs["position_ids"] == 0).sum())
            pending[1] += int((inputs["labels"][:, 1:] != -100).sum())  # positions with loss (shifted labels)
            pending[2] += inputs["input_ids"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if len(ends) == 1:  # profile step 2, like ftlab (batch already collated in both)
                prof.enabled = bool(profile)
                prof.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            prof.__exit__(None, None, None)
            ends.append((time.perf_counter(), time.process_time()))
            tokens.append(pending[0])
            supervised.append(pending[1])
            positions.append(pending[2])
            pending[0] = pending[1] = pending[2] = 0

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    reset_accelerate()
    trainer = Timed(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                    peft_config=peft_config, callbacks=[StepClock()])
    trl_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    trainer.train()
    out = summarize(ends, tokens, losses, supervised, first[0] - t_load)
    out["dataset_tokens"] = trl_tokens
    out["positions_per_step"] = positions
    out["options"] = {k: v for k, v in (options or {}).items()}
    out["sampler"] = type(trainer._get_train_sampler()).__name__
    return out


# -- driver ----------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers
    import trl

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}


def markdown(results: list[dict[str, Any]]) -> str:
    def ratio(a: dict | None, b: dict | None, key: str = "tokens_per_s") -> str:
        return f"{a[key] / b[key]:.2f}x" if a and b else "-"

    def diff(a: dict, b: dict) -> str:
        return f"{max(abs(x - y) for x, y in zip(a['losses'], b['losses'])):.4f}"

    lines = []
    if any("ftlab" in r and "trl" in r for r in results):
        lines += [("| config | ftlab tok/s | TRL tok/s | ratio | ftlab tok/CPU-s | TRL tok/CPU-s | ratio (CPU) "
                   "| ftlab epoch loss | TRL epoch loss | ftlab last | TRL last |"), "|---" + "|---:" * 10 + "|"]
        for r in results:
            f, t = r.get("ftlab"), r.get("trl")
            if not (f and t):
                continue
            lines.append(
                f"| {r['config']} | {f['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} | {ratio(f, t)} | "
                f"{f['tokens_per_cpu_s']:.1f} | {t['tokens_per_cpu_s']:.1f} | {ratio(f, t, 'tokens_per_cpu_s')} | "
                f"{f['epoch_loss']:.4f} | {t['epoch_loss']:.4f} | {f['final_loss']:.4f} | {t['final_loss']:.4f} |")
    for who in FTLAB_VARIANTS:
        if who == "ftlab" or not any(who in r for r in results):
            continue
        lines += ["", f"{who}:", "",
                  ("| config | tok/s | ratio vs TRL | tok/CPU-s | ratio (CPU) | epoch loss | last "
                   "| max step-loss diff vs TRL | same batches as TRL |"),
                  "|---" + "|---:" * 7 + "|---|"]
        for r in results:
            u, t = r.get(who), r.get("trl")
            if not (u and t):
                continue
            lines.append(
                f"| {r['config']} | {u['tokens_per_s']:.1f} | {ratio(u, t)} | "
                f"{u['tokens_per_cpu_s']:.1f} | {ratio(u, t, 'tokens_per_cpu_s')} | "
                f"{u['epoch_loss']:.4f} | {u['final_loss']:.4f} | {diff(u, t)} | "
                f"{'yes' if u['tokens_per_step'] == t['tokens_per_step'] else 'no'} |")
    if any(w in r for r in results for w in TRL_VARIANTS if w != "trl"):
        lines += ["", "TRL with its speed options (ratios: ftlab defaults / the TRL run, and ftlab on TRL's default "
                  "batch order / the TRL run):", "",
                  ("| config | TRL run | tok/s | vs TRL defaults | ftlab defaults ratio | ftlab same-order ratio "
                   "| tok/CPU-s | epoch loss | last | max step-loss diff vs TRL defaults | same batches as TRL "
                   "defaults |"), "|---|---" + "|---:" * 8 + "|---|"]
        for r in results:
            t = r.get("trl")
            for who in TRL_VARIANTS:
                q = r.get(who)
                if not q:
                    continue
                lines.append(
                    f"| {r['config']} | {who} | {q['tokens_per_s']:.1f} | {ratio(q, t)} | {ratio(r.get('ftlab'), q)} | "
                    f"{ratio(r.get('ftlab_trl_order'), q)} | {q['tokens_per_cpu_s']:.1f} | {q['epoch_loss']:.4f} | "
                    f"{q['final_loss']:.4f} | {diff(q, t) if t else '-'} | "
                    f"{('yes' if t and q['tokens_per_step'] == t['tokens_per_step'] else 'no') if t else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--batch", type=int, default=8, help="examples per optimizer step (both trainers)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--ftlab-trl-order", action="store_true",
                   help="also run ftlab with data.group_by_length=false: TRL's batches, a same-loss check")
    p.add_argument("--ftlab-packed", action="store_true", help="also run ftlab with data.packing=true")
    p.add_argument("--trl-group-by-length", action="store_true",
                   help="also run TRL with train_sampling_strategy='group_by_length' (transformers' length grouping)")
    p.add_argument("--trl-padding-free", action="store_true",
                   help="also run TRL with padding_free=True (one row per step, no padding; max_length=None)")
    p.add_argument("--runs", metavar="NAMES",
                   help="exactly these runs per config, in this order (comma list of "
                        f"{', '.join([*FTLAB_VARIANTS, *TRL_VARIANTS])}); overrides the flags above")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--data", default=GSM8K)
    p.add_argument("--json", help="also write all measurements to this JSON file")
    p.add_argument("--profile", metavar="DIR", help="torch.profiler op tables of step 2 of every run, into DIR")
    a = p.parse_args(argv)
    configs = parse_configs(p, a.configs, CONFIGS)
    runs = parse_configs(p, a.runs, (*FTLAB_VARIANTS, *TRL_VARIANTS)) if a.runs else []
    quiet_run(a.threads)

    from ftlab.models.load import load_tokenizer, resolve_model_path

    n = a.steps * a.batch
    rows = gsm8k_rows(a.data, n)
    tokenizer = load_tokenizer(resolve_model_path(MODEL))
    expected_tokens = ftlab_token_count(rows, tokenizer, a.max_length)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv, "versions": versions(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
            "examples": n, "slice_tokens": expected_tokens, "loadavg_1min_start": os.getloadavg()[0]}
    print(f"# {n} GSM8K examples, {expected_tokens} input tokens after templating; {meta['machine']}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    results = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_sft.") as tmp:
        jsonl = f"{tmp}/gsm8k_slice.jsonl"
        with open(jsonl, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        for i, config in enumerate(configs):
            method, precision = config.split("-")
            order = ["ftlab", "trl"] if i % 2 == 0 else ["trl", "ftlab"]
            order += [w for w, on in (("ftlab_trl_order", a.ftlab_trl_order), ("ftlab_packed", a.ftlab_packed),
                                      ("trl_group_by_length", a.trl_group_by_length),
                                      ("trl_padding_free", a.trl_padding_free)) if on]
            if runs:
                order = runs
            res: dict[str, Any] = {"config": config}
            for who in order:
                t0 = time.perf_counter()
                prof = None
                if a.profile:
                    Path(a.profile).mkdir(parents=True, exist_ok=True)
                    prof = str(Path(a.profile) / f"{config}_{who}.txt")
                if who in TRL_VARIANTS:
                    res[who] = run_trl(method, precision, a.steps, a.batch, a.max_length, rows, tmp, prof,
                                       TRL_VARIANTS[who])
                else:
                    res[who] = run_ftlab(method, precision, a.steps, a.batch, a.max_length, jsonl, tmp,
                                         FTLAB_VARIANTS[who], profile=prof)
                r = res[who]
                print(f"{config:10s} {who:20s} {r['tokens_per_s']:6.1f} tok/s {r['tokens_per_cpu_s']:6.1f} tok/CPU-s  "
                      f"epoch loss {r['epoch_loss']:.4f}  last {r['final_loss']:.4f}  losses {r['losses']}  "
                      f"data {r.get('data', '')}{r.get('options', '')} {r.get('sampler', '')}  step s {r['step_s']}  "
                      f"cpu s {r['step_cpu_s']}  tokens/step {r['tokens_per_step']}  "
                      f"supervised/step {r['supervised_per_step']}  positions/step {r.get('positions_per_step', '-')}  "
                      f"load {r['loadavg_1min_after']}  (run {time.perf_counter() - t0:.0f} s)", flush=True)
                gc.collect()
            # TRL's dataset holds one more token per example (the final EOS as an input); else identical
            for who in [w for w in order if w in TRL_VARIANTS]:
                if res[who]["dataset_tokens"] != expected_tokens + n:
                    print(f"WARNING: {who} tokenized the slice into {res[who]['dataset_tokens']} tokens, "
                          f"ftlab into {expected_tokens} (+{n} expected)", flush=True)
            t = res.get("trl")
            for who in ("ftlab_trl_order", "trl_padding_free"):  # these must see TRL's default batches
                u = res.get(who)
                if u and t and (u["tokens_per_step"], u["supervised_per_step"]) != (t["tokens_per_step"],
                                                                                   t["supervised_per_step"]):
                    print(f"WARNING: {who} did not see TRL's batches (tokens or supervised tokens per step "
                          "differ)", flush=True)
            for who in [w for w in order if w != "trl"]:
                if t and sum(res[who]["supervised_per_step"]) != sum(t["supervised_per_step"]):
                    print(f"WARNING: {who} and TRL supervised different numbers of tokens over the epoch",
                          flush=True)
            if "ftlab" in res and t:
                res["ratio"] = res["ftlab"]["tokens_per_s"] / t["tokens_per_s"]
            results.append(res)
    meta["total_s"] = round(time.perf_counter() - t_all)
    print_report(markdown(results), meta, results, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
