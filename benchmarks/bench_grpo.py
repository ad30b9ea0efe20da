"""GRPO training throughput: ftlab's GRPO objective vs TRL's GRPOTrainer, side by side in one process.

    python benchmarks/bench_grpo.py --threads 1 --json out.json --write   # the measurement (docs/BENCHMARKS.md)
    python benchmarks/bench_grpo.py --steps 1 --num-generations 2 --prompts-per-step 1 --batch 2 \
        --max-completion-length 8                                         # a smoke run (works, measures nothing)

What is identical in both trainers
  * model: the embedded SmolLM2-135M-Instruct (or `--model`: a directory or the embedded name), fp32 weights,
    sdpa attention, loaded from the same directory (`ftlab.models.load.resolve_model_path`); LoRA r=16, alpha=32,
    dropout 0 on q/k/v/o (TRL: `peft_config`, ftlab: `lora.*`), a fresh adapter in both;
  * prompts: `steps x prompts-per-step` PrOntoQA problems from ftlab's generator (hops 1-3), rendered once by
    ftlab's task with the chat template (`load_prompts`, what ftlab's GRPO samples from) and handed to TRL as the
    same string (non-conversational: TRL tokenizes it as text). Each step takes the same problems in both: TRL's
    dataset is ordered as ftlab's step plan draws them and `shuffle_dataset=False` (checked: the same prompt token
    ids at every step);
  * rewards: ftlab's built-in `correctness` (the task's checker) and `format` (weight 0.1), the same functions
    called for TRL (`reward_funcs`, `reward_weights=[1.0, 0.1]`); group-scaled advantages (`scale_rewards`);
  * G = `num_generations` completions per prompt, `max_completion_length` new tokens, temperature 1, top_p 1, no
    top-k, sampling on the CPU with transformers (TRL: `use_vllm=False`, `model.generate` on the whole generation
    batch; ftlab: its HF engine with one shared prefill per prompt), stopping at `<|im_end|>`;
  * a step = P x G completions = `batch` per micro-batch x `grad_accum` micro-batches (TRL:
    `per_device_train_batch_size`, `gradient_accumulation_steps`, `steps_per_generation` = grad_accum, so
    `generation_batch_size` = P x G: one generation round per optimizer step, as ftlab); `num_iterations=1`,
    `beta=0.0` (no reference model), `loss_type="dapo"`, epsilon 0.2 / epsilon_high 0.28,
    `mask_truncated_completions=False`;
  * AdamW, constant lr 1e-5, weight decay 0, eps 1e-8, grad clip 1.0, fp32 (`bf16=False`), gradient
    checkpointing off, dropout off (`disable_dropout=True`; LoRA dropout 0), no evaluation, no checkpoints.

What still differs (each trainer's own defaults)
  * the samples themselves: both sample at temperature 1 from the same distribution with their own random
    streams, so completion lengths differ; hence completion tokens/s (tokens over time) beside steps per minute;
  * generation: TRL pads the generation batch to its longest prompt and decodes all rows in one `generate` call;
    ftlab prefills each prompt once for its G rows and refills finished rows' slots (`grpo.generation_batch_size`
    = P x G rows here);
  * TRL computes per-step metrics (entropy, clip ratios, rewards) and logs completions' statistics; ftlab writes
    every round's completions to the run directory and its own metrics (entropy, clip shares) too.

Measured: the wall time from the start of step 1 (ftlab: `GRPOObjective.before_training` returns, right before
the first round is sampled inside step 1; TRL: `on_step_begin` of step 1, whose `training_step` samples) to the end
of the last step, so sampling, rewards and training are all inside it; model loading and data preparation are
not. Reported: completion tokens (generated, end-of-turn included) per second over that window, optimizer steps
per minute, and each trainer's sampling time (ftlab: its round's `timing/generate_seconds`, sampling and scoring;
TRL: `_generate_and_score_completions`, the same work).

"Equal loss for equal completions": ftlab's last round (its completions, advantages, mask) through both losses:
(1) the same per-token log-probs into `ftlab.train.grpo_loss.grpo_loss` and into TRL's own
`GRPOTrainer._compute_loss` (tests/test_grpo.py's `trl_loss`: a trainer whose forward returns those log-probs):
loss and gradient; (2) each trainer's own forward on the same model (TRL's trained one): ftlab's
`completion_logps` against TRL's `_get_per_token_logps_and_entropies`, and TRL's `_compute_loss` against ftlab's
`GRPOObjective.loss` / the step's loss units (what ftlab's loop backpropagates), values and gradients on the LoRA
weights. With one update per round the ratio is 1 and the loss value is -sum(A x length) / tokens (docs/grpo.md),
so the gradients are the telling part.

The process imports ftlab, whose `ftlab.models.load` sets TRANSFORMERS_SDPA_FORCE_GQA=1 on a machine without
CUDA: TRL's model gets sdpa's grouped-query path too (identical attention work; a plain TRL user would not).
"""
from __future__ import annotations

import argparse
import functools
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
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from benchlib import cpu_model, print_report, quiet_run, write_section  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SECTION = "## GRPO: ftlab vs TRL's `GRPOTrainer`"
MODEL = "smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LR, MAX_LENGTH = 1e-5, 1024
REWARDS = (("correctness", 1.0), ("format", 0.1))


def load_by_path(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_sft() -> Any:
    return load_by_path("bench_sft", Path(__file__).with_name("bench_sft.py"))


@functools.cache
def test_grpo() -> Any:
    """tests/test_grpo.py (its `trl_loss`: TRL's `_compute_loss` on given log-probs), importable from here."""
    sys.path.insert(0, str(REPO))
    return load_by_path("bench_test_grpo", REPO / "tests" / "test_grpo.py")


def ftlab_overrides(a: argparse.Namespace, workdir: str) -> list[str]:
    eps, eps_high = test_grpo().EPS, test_grpo().EPS_HIGH
    per_step = a.prompts_per_step * a.num_generations
    rewards = ", ".join(f"{{fn: {fn}, weight: {w}}}" for fn, w in REWARDS)
    return [
        "name=bench", f"output_dir={workdir}/ftlab_runs", "seed=0", "kind=grpo", "train.method=grpo",
        f"model.name={a.model}", "model.dtype=fp32", "model.attn_implementation=sdpa",
        "data.task=prontoqa", f"data.train=generate:{a.steps * a.prompts_per_step},hops=1-3,seed=5",
        "data.task_options={proof: backward}", f"data.max_length={MAX_LENGTH}", "data.chat_template=true",
        f"train.batch_size={a.batch}", f"train.grad_accum={per_step // a.batch}", f"train.max_steps={a.steps}",
        "train.precision=fp32", "train.grad_clip=1.0", "train.save_final=false", "train.log_every=1",
        "train.gradient_checkpointing=false", "optim.name=adamw", f"optim.lr={LR}", "optim.weight_decay=0.0",
        "optim.eps=1e-8", "schedule.name=constant", "schedule.warmup_steps=0",
        "lora.enabled=true", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}", "lora.dropout=0.0",
        "lora.target_modules=[" + ",".join(LORA["targets"]) + "]",
        f"grpo.num_generations={a.num_generations}", "grpo.num_iterations=1", "grpo.loss_type=dapo",
        f"grpo.epsilon={eps}", f"grpo.epsilon_high={eps_high}", "grpo.beta=0.0", "grpo.scale_rewards=group",
        "grpo.mask_truncated=false", "grpo.temperature=1.0", "grpo.top_p=1.0",
        f"grpo.max_completion_length={a.max_completion_length}", f"grpo.generation_batch_size={per_step}",
        f"grpo.rewards=[{rewards}]", "grpo.log_completions_every=null", "grpo.engine=hf",
    ]


def prompts_in_step_order(a: argparse.Namespace) -> tuple[Any, Any, list[Any], list[int]]:
    """(cfg, task, ftlab's prompt rows, the rows' order over the run's steps as ftlab's step plan draws them)."""
    from ftlab.config import load_recipe
    from ftlab.models.load import load_tokenizer, resolve_model_path
    from ftlab.train.grpo import load_prompts
    from ftlab.train.plan import StepPlan

    cfg = load_recipe(None, ftlab_overrides(a, "/tmp"))
    tok = load_tokenizer(resolve_model_path(a.model))
    task, prompts, dropped = load_prompts(cfg, tok)
    assert not dropped, "a prompt did not fit data.max_length"
    plan = StepPlan([len(p.ids) for p in prompts], a.prompts_per_step, 1, cfg.seed)  # GRPOObjective's prompt plan
    return cfg, task, prompts, [i for s in range(a.steps) for i in plan.global_step(s)[0]]


def window(start: float, ends: list[float], tokens: list[int], gen_s: list[float], losses: list[float],
           load_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    span = ends[-1] - start
    return {"steps": len(ends), "load_s": round(load_s, 1), "measured_s": round(span, 2),
            "completion_tokens": sum(tokens), "completion_tokens_per_s": sum(tokens) / span,
            "steps_per_min": 60 * len(ends) / span, "sampling_s": round(sum(gen_s), 2),
            "sampling_tokens_per_s": sum(tokens) / max(sum(gen_s), 1e-9), "tokens_per_step": tokens,
            "step_end_s": [round(e - start, 2) for e in ends], "losses": losses,
            "loadavg_1min_after": round(os.getloadavg()[0], 2), **extra}


# -- ftlab -----------------------------------------------------------------------------------------------------
def run_ftlab(a: argparse.Namespace, workdir: str, prompts: list[Any]) -> tuple[dict, Any]:
    from ftlab.config import load_recipe
    from ftlab.train.grpo import GRPOObjective, run_grpo
    from ftlab.train.loop import Loop

    cfg = load_recipe(None, ftlab_overrides(a, workdir))
    t_load = time.perf_counter()
    start: list[float] = []
    ends: list[float] = []
    losses: list[float] = []
    rounds: list[Any] = []
    made: list[Any] = []
    original = (Loop.step, GRPOObjective.before_training, GRPOObjective.sample_round)

    def before(self: Any, loop: Any) -> None:
        original[1](self, loop)
        made.append(self)
        start.append(time.perf_counter())

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        stats = original[0](self, *args, **kwargs)
        ends.append(time.perf_counter())
        losses.append(float(stats["loss"]))
        return stats

    def sample_round(self: Any, index: int, step: int) -> Any:
        r = original[2](self, index, step)
        rounds.append(r)
        return r

    bench_sft().reset_accelerate()
    Loop.step, GRPOObjective.before_training, GRPOObjective.sample_round = step, before, sample_round
    try:
        run_grpo(cfg)
    finally:
        Loop.step, GRPOObjective.before_training, GRPOObjective.sample_round = original
    tokens = [sum(len(x) for x in r.ids) for r in rounds]
    seen = [[list(made[0].prompts[row].ids) for row in r.rows[::a.num_generations]] for r in rounds]
    result = window(start[0], ends, tokens, [r.metrics["timing/generate_seconds"] for r in rounds], losses,
                    start[0] - t_load, {"prompt_ids_per_step": seen})
    return result, (made[0], rounds[-1])


# -- TRL -------------------------------------------------------------------------------------------------------
def run_trl(a: argparse.Namespace, workdir: str, task: Any, prompts: list[Any], order: list[int]) -> tuple[dict, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ftlab.models.load import load_tokenizer, resolve_model_path
    from ftlab.train import rewards as R

    eps, eps_high = test_grpo().EPS, test_grpo().EPS_HIGH
    path = resolve_model_path(a.model)
    t_load = time.perf_counter()
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    data = Dataset.from_list([{"prompt": prompts[i].text, "row": i} for i in order])
    examples = [p.example for p in prompts]

    def reward(fn: Any) -> Any:
        """ftlab's reward `fn` as a TRL reward function (the dataset's `row` column finds each completion's problem)."""
        def call(completions: list, row: list, **_: Any) -> list[float]:
            return fn(completions=completions, examples=[examples[i] for i in row], task=task)
        call.__name__ = fn.__name__
        return call

    per_step = a.prompts_per_step * a.num_generations
    args = GRPOConfig(
        output_dir=f"{workdir}/trl_out", seed=0, max_steps=a.steps, per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=per_step // a.batch, steps_per_generation=per_step // a.batch,
        num_generations=a.num_generations, max_completion_length=a.max_completion_length, temperature=1.0,
        top_p=1.0, top_k=0, use_vllm=False, beta=0.0, num_iterations=1, loss_type="dapo", epsilon=eps,
        epsilon_high=eps_high, scale_rewards="group", mask_truncated_completions=False,
        reward_weights=[w for _, w in REWARDS], shuffle_dataset=False, disable_dropout=True,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        adam_epsilon=1e-8, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        log_completions=False, remove_unused_columns=False,
    )
    start: list[float] = []
    ends: list[float] = []
    losses: list[float] = []
    tokens: list[int] = []
    gen_s: list[float] = []
    seen: list[list[list[int]]] = []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            gen_s.append(time.perf_counter() - t0)
            tokens.append(int(out["completion_mask"].sum()))
            ids, mask = out["prompt_ids"], out["prompt_mask"].bool()
            seen.append([ids[k][mask[k]].tolist() for k in range(0, ids.shape[0], a.num_generations)])
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not start:
                start.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["targets"],
                             task_type="CAUSAL_LM")
    trainer = Timed(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config,
                    reward_funcs=[reward(R.correctness), reward(R.format_reward)], callbacks=[StepClock()])
    trainer.train()
    return window(start[0], ends, tokens, gen_s, losses, start[0] - t_load, {"prompt_ids_per_step": seen}), trainer


# -- equal loss for equal completions --------------------------------------------------------------------------
def same_loss(objective: Any, last: Any, trainer: Any) -> dict[str, float]:
    """ftlab's last round through both losses: the same log-probs (tests/test_grpo.py's `trl_loss`), then each
    trainer's own forward on TRL's trained model."""
    from ftlab.train.grpo import completion_logps
    from ftlab.train.grpo_loss import grpo_loss

    helpers = test_grpo()
    model = trainer.model
    model.eval()  # TRL's loss in eval mode: one batch, no accumulation scaling (the whole round at once)
    objective.current = last
    every = list(range(len(last.ids)))
    micro = objective.collate(every)
    substituted = not bool(micro["advantages"].any())
    if substituted:  # every group's rewards were equal: +-1 instead, so that the gradients compared are not 0
        micro["advantages"] = torch.tensor([1.0 if k % 2 == 0 else -1.0 for k in every])
    with torch.no_grad():
        ours_lp, _ = completion_logps(model, micro)
    mask = micro["completion_mask"].double()
    lp = ours_lp.double().detach().requires_grad_(True)
    adv = micro["advantages"].double()
    ours = grpo_loss(lp, lp.detach(), adv, mask, loss_type="dapo", epsilon=helpers.EPS, epsilon_high=helpers.EPS_HIGH)
    ours.backward()
    ours_grad, lp.grad = lp.grad.clone(), None
    theirs = helpers.trl_loss(lp, lp.detach(), adv, mask, None, "dapo", 0.0)
    theirs.backward()
    ours, theirs = ours.detach(), theirs.detach()
    out = {"same_logps_loss_ftlab": float(ours), "same_logps_loss_trl": float(theirs),
           "same_logps_loss_diff": abs(float(ours) - float(theirs)),
           "same_logps_grad_max_diff": float((ours_grad - lp.grad).abs().max())}
    # TRL's own forward and loss on the same completions: prompts left-padded, completions right-padded
    pad = objective.pad_id
    prompts = [objective.prompts[row].ids for row in last.rows]
    width = max(map(len, prompts))
    prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cols = mask.shape[1]
    completion_ids = torch.tensor([ids + [pad] * (cols - len(ids)) for ids in last.ids])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": micro["completion_mask"].long(), "advantages": micro["advantages"].float(),
              "old_per_token_logps": None, "ref_per_token_logps": None,
              "num_items_in_batch": micro["completion_mask"].sum().float()}
    with torch.no_grad():
        trl_lp, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, inputs["completion_mask"]], 1),
            cols)
    real = micro["completion_mask"]
    # the losses with their forwards, and their gradients on the LoRA weights: TRL's `_compute_loss`, and ftlab's
    # objective's `loss` divided by the step's units (what the loop does)
    params = [q for q in model.parameters() if q.requires_grad]
    grads = []
    for compute in (lambda: trainer._compute_loss(model, inputs),
                    lambda: objective.loss(model, micro)[0] / micro["units"]):
        model.zero_grad(set_to_none=True)
        value = compute()
        value.backward()
        grads.append((float(value.detach()), torch.cat([q.grad.flatten() for q in params])))
    model.zero_grad(set_to_none=True)
    (trl_own, trl_grad), (ours_own, ours_grad) = grads
    out.update(own_forward_logps_max_diff=float((trl_lp - ours_lp)[real].abs().max()),
               own_forward_loss_ftlab=ours_own, own_forward_loss_trl=trl_own,
               own_forward_loss_diff=abs(ours_own - trl_own),
               own_forward_grad_rel_diff=float((ours_grad - trl_grad).norm() / trl_grad.norm().clamp(min=1e-30)),
               own_forward_grad_norm=float(trl_grad.norm()), completions=len(every), completion_tokens=int(real.sum()),
               advantages="+-1 (the round's were all 0)" if substituted else "the round's")
    return out


# -- driver ----------------------------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    f, t, eq = res["ftlab"], res["trl"], res["equal_loss"]

    def row(name: str, r: dict) -> str:
        return (f"| {name} | {r['completion_tokens_per_s']:.1f} | {r['steps_per_min']:.2f} | {r['completion_tokens']} "
                f"| {r['measured_s']:.1f} | {r['sampling_s']:.1f} ({r['sampling_tokens_per_s']:.1f} tok/s) |")

    header = ("| trainer | completion tok/s | optimizer steps / min | completion tokens | window s "
              "| sampling s (tok/s while sampling) |")
    ratio = (f"| ratio ftlab / TRL | **{f['completion_tokens_per_s'] / t['completion_tokens_per_s']:.2f}x** "
             f"| **{f['steps_per_min'] / t['steps_per_min']:.2f}x** | | | |")
    equal = (f"- Equal loss for equal completions (ftlab's last round, {eq['completions']} completions, "
             f"{eq['completion_tokens']} tokens, advantages: {eq['advantages']}): the same log-probs into both "
             f"losses: |loss diff| {eq['same_logps_loss_diff']:.1e}, "
             f"max |grad diff| {eq['same_logps_grad_max_diff']:.1e}; "
             f"each trainer's own forward and loss on the same model: max |log-prob diff| "
             f"{eq['own_forward_logps_max_diff']:.1e}, |loss diff| {eq['own_forward_loss_diff']:.1e}, LoRA gradient "
             f"relative diff {eq['own_forward_grad_rel_diff']:.1e} (norm {eq['own_forward_grad_norm']:.3g}).")
    lines = [header, "|---|---:|---:|---:|---:|---:|", row("ftlab", f), row("TRL GRPOTrainer", t), ratio, "",
             f"- Same prompts at every step (token ids): {'yes' if res['same_prompts'] else 'NO'}.", equal]
    return "\n".join(lines)


def section(res: dict[str, Any], meta: dict[str, Any]) -> str:
    intro = ("`benchmarks/bench_grpo.py`: ftlab's GRPO next to TRL's `GRPOTrainer` in one process, HF generation on "
             "the CPU for both, the same model, prompts, rewards, G, completion length, LoRA and optimizer settings "
             "(the script's docstring lists what is equal and what is not).")
    return "\n".join([
        SECTION, "", intro, "",
        f"Command: `{' '.join(meta['argv'])}`  ",
        f"Date: {meta['date']} ({meta['total_s']} s); versions {meta['versions']}.  ",
        f"Machine: {meta['machine']}; load average {meta['loadavg_1min_start']:.2f} before.  ",
        f"Settings: {meta['settings']}.", "", markdown(res), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL, help="a model directory or the embedded model's name")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per trainer")
    p.add_argument("--num-generations", type=int, default=4, help="G: completions per prompt")
    p.add_argument("--prompts-per-step", type=int, default=2, help="P: prompts per optimizer step")
    p.add_argument("--batch", type=int, default=4, help="completions per micro-batch (P x G / batch micro-batches)")
    p.add_argument("--max-completion-length", type=int, default=128, help="new tokens per completion")
    p.add_argument("--trl-first", action="store_true", help="run TRL before ftlab (default: ftlab first)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="also write all measurements to this JSON file")
    p.add_argument("--write", action="store_true", help=f"replace or append '{SECTION}' in docs/BENCHMARKS.md")
    a = p.parse_args(argv)
    if (a.prompts_per_step * a.num_generations) % a.batch:
        p.error("--batch must divide prompts-per-step x num-generations")
    quiet_run(a.threads)
    t_all = time.perf_counter()
    _, task, prompts, order = prompts_in_step_order(a)
    settings = (f"{a.steps} steps of {a.prompts_per_step} prompts x G={a.num_generations} "
                f"(micro-batches of {a.batch}), max_completion_length {a.max_completion_length}, temperature 1, "
                f"LoRA r={LORA['r']} alpha={LORA['alpha']} on {'/'.join(t[0] for t in LORA['targets'])}, fp32, "
                f"dapo, beta 0, lr {LR}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "argv": ["python", "benchmarks/bench_grpo.py", *sys.argv[1:]],
            "versions": bench_sft().versions(),
            "machine": f"{os.cpu_count()}-CPU {cpu_model()} ({platform.machine()}), torch threads "
                       f"{torch.get_num_threads()}", "loadavg_1min_start": os.getloadavg()[0], "settings": settings}
    print(f"# {settings}; {meta['machine']}", flush=True)
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_grpo.") as tmp:
        for who in (["trl", "ftlab"] if a.trl_first else ["ftlab", "trl"]):
            t0 = time.perf_counter()
            if who == "ftlab":
                res["ftlab"], (objective, last) = run_ftlab(a, tmp, prompts)
            else:
                res["trl"], trainer = run_trl(a, tmp, task, prompts, order)
            r = res[who]
            print(f"{who:6s} {r['completion_tokens_per_s']:7.1f} completion tok/s  "
                  f"{r['steps_per_min']:6.2f} steps/min  "
                  f"window {r['measured_s']} s  sampling {r['sampling_s']} s  tokens/step {r['tokens_per_step']}  "
                  f"losses {[round(x, 5) for x in r['losses']]}  load {r['loadavg_1min_after']}  "
                  f"(run {time.perf_counter() - t0:.0f} s)", flush=True)
            gc.collect()
        res["same_prompts"] = res["ftlab"].pop("prompt_ids_per_step") == res["trl"].pop("prompt_ids_per_step")
        if not res["same_prompts"]:
            print("WARNING: ftlab and TRL did not sample the same prompts at every step", flush=True)
        res["equal_loss"] = same_loss(objective, last, trainer)
    meta["total_s"] = round(time.perf_counter() - t_all)
    print_report(markdown(res), meta, [res], a.json)
    if a.write:
        write_section(REPO / "docs" / "BENCHMARKS.md", SECTION, section(res, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
