"""`ftlab launch ... --preflight`: before the real launch, the same recipe on a tiny random model of the same
architecture must compute the same thing on 1 process and on N, and survive saving, reloading and resuming.

What runs, in a temporary directory removed afterwards:

* the tiny model: the recipe model's own config (a scratch config, a local directory, the embedded model, a hub id
  or ftlab's copy of its config) with 2 layers, about 4 query heads of at most 16 dimensions (the query/key-value
  head ratio kept), the intermediate/hidden ratio kept, dropout off, random weights, saved with its tokenizer. The
  vocabulary stays the model's and the tokenizer is the recipe's whenever it is here: the data then encodes
  exactly as in the real run (chat template, supervised spans, every token id valid). Only a hub model whose
  tokenizer is not here gets the embedded tokenizer and its vocabulary, and the table says so;
* the recipe with that model, a few steps at one small global batch (2 per process x accumulation 2 x N on N
  processes, accumulation 2N on one), a constant learning rate of at least MIN_LR (a trained adapter must move
  the logits beyond rounding, or a lost adapter would pass), a checkpoint at CHECKPOINT_STEP, run through the
  profile's own launcher at 1 process and at N (N: the launch's processes, at most 2 on a CPU, at most the GPUs
  here). A profile that cannot run N processes here (DeepSpeed on a CPU) runs at 1, and the N-process
  arithmetic is checked through the ddp profile; QLoRA without CUDA is checked as plain LoRA;
* the checks: per step, equal loss and gradient norm (read from metrics.jsonl); the live model's logits
  (written by the training processes after the run, which for LoRA has merged the adapter into it to save
  merged/) equal to those of the saved model reloaded (adapter on its base and merged/ for LoRA, the full model
  otherwise), and apart from the untrained model's; a run resumed from the checkpoint gives the same next step.

Tolerances come from the dtype and the sizes: a step's loss and gradient are means over at most n = global batch
x max_length tokens, so rounding of each term in the compute dtype (eps_c) averages to eps_c / sqrt(n), while
the float32 sums accumulate eps_32 x sqrt(n); updates carry it on, so the bound grows with the step:
    tol(step) = SAFETY x (eps_c / sqrt(n) + eps_32 x sqrt(n)) x step        (relative)
and the gradient norm also sums the squares of the model's P parameters in float32: + SAFETY x eps_32 x sqrt(P) x
step. Logits are compared in the dtype the live model computes in (eps_l), with the saved weights reloaded in that
dtype: the same weights through the same kernels, where only the order of a reduction can differ, a few units in
the last place of the largest logit: SAFETY x eps_l, relative to it. A failing check stops the launch in one line
naming the check, the step and the difference.

Dropout is off because its masks are drawn per process: 1 and N processes cannot agree with it on, by design.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ftlab.errors import UserError
from ftlab.launch.launcher import Launch, Profile, load_profile, prepare_launch
from ftlab.train.checkpoint import step_name

log = logging.getLogger("ftlab")

STEPS = 3                   # optimizer steps of every pre-flight run
CHECKPOINT_STEP = 2         # the resumed run starts here and runs step 3
TINY_LAYERS = 2
TINY_HEADS = 4              # about this many query heads (a multiple of the query/key-value group)
TINY_HEAD_DIM = 16          # at most this many dimensions per head
PER_PROCESS_BATCH = 2       # at most this many examples per micro-batch
MIN_LR = 1e-3
CPU_PROCESSES = 2           # N on a machine without CUDA (gloo)
SAFETY = 8.0
RUN_TIMEOUT_S = 900         # a pre-flight run that takes longer is taken for a hang
LIVE_LOGITS = "preflight_live_logits.pt"
PROBE_TEXT = "A pre-flight check: the same logits before saving and after loading."


class PreflightFailed(UserError):
    """A pre-flight check that disagrees, or a pre-flight run that failed: one line, exit code 2."""


@dataclass
class Check:
    name: str
    step: str = ""
    difference: float | None = None    # relative
    tolerance: float | None = None
    passed: bool = True
    note: str = ""


# -- the tiny model ----------------------------------------------------------------------------------------
def tiny_fields(config: Any) -> dict[str, Any]:
    """The config's fields with TINY_LAYERS layers and narrow attention/MLP in the same ratios; dropout 0.

    Per-layer lists (sized for the full depth) and quantization are left out; everything else is kept. Fields go
    under the config's own names (`attribute_map`: GPT-2's n_embd for hidden_size)."""
    names = getattr(config, "attribute_map", {})
    fields = {k: v for k, v in config.to_diff_dict().items()
              if k not in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "quantization_config",
                           "model_type")
              and not (isinstance(v, list) and len(v) == config.num_hidden_layers)}
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    group = heads // kv
    tiny_kv = max(1, min(kv, TINY_HEADS // group))
    head_dim = min(getattr(config, "head_dim", None) or hidden // heads, TINY_HEAD_DIM)
    tiny_hidden = tiny_kv * group * head_dim
    for key, value in list(fields.items()):
        if "intermediate_size" in key and isinstance(value, int):
            fields[key] = max(1, round(value * tiny_hidden / hidden))
        elif ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            fields[key] = 0.0
    fields.update({names.get("num_hidden_layers", "num_hidden_layers"): TINY_LAYERS,
                   names.get("hidden_size", "hidden_size"): tiny_hidden,
                   names.get("num_attention_heads", "num_attention_heads"): tiny_kv * group})
    if "num_key_value_heads" in fields or getattr(config, "num_key_value_heads", None):
        fields["num_key_value_heads"] = tiny_kv
    if "head_dim" in fields:
        fields["head_dim"] = head_dim
    return {"model_type": config.model_type, **fields}


@dataclass
class TinyModel:
    config: Any
    params: int
    description: str


def save_tiny_base(cfg: DictConfig, out: Path) -> TinyModel:
    """Build the tiny random model of the recipe's architecture and save it with its tokenizer under `out`."""
    from ftlab.launch.planner import model_config, recipe_tokenizer
    from ftlab.models.load import DTYPES, build_scratch_model

    config, where = model_config(cfg)
    tokenizer, tokenizer_how = recipe_tokenizer(cfg)
    fields = tiny_fields(config)
    # The planner's word for the embedded tokenizer standing in for one that is not here: the vocabulary is then
    # that tokenizer's, which every id it makes fits (and the model's own vocabulary would only cost time).
    if tokenizer_how.endswith("is not here)") or fields.get("vocab_size", 0) < len(tokenizer):
        fields["vocab_size"] = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_scratch_model(fields, tokenizer, DTYPES[cfg.model.dtype], cfg.model.attn_implementation)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    c, params = model.config, sum(p.numel() for p in model.parameters())
    return TinyModel(c, params, f"a random {c.model_type} of {where}'s config: {c.num_hidden_layers} layers, hidden "
                                f"{c.hidden_size}, {c.num_attention_heads} heads / "
                                f"{getattr(c, 'num_key_value_heads', c.num_attention_heads)} key-value, vocabulary "
                                f"{c.vocab_size} ({tokenizer_how}), {params / 1e6:.1f}M parameters")


# -- what runs where ---------------------------------------------------------------------------------------
@dataclass
class Layout:
    profile: Profile          # the launch's, run at 1 process and, where it can, at N
    processes: int            # N here (1: no comparison)
    many: Profile             # the profile of the N-process run: the launch's, or ddp where it cannot run N here
    notes: list[str]

    @property
    def own_processes(self) -> int:
        """The most processes the launch's profile runs here: its saving and resuming are checked there."""
        return self.processes if self.many is self.profile else 1


def layout_here(launch: Launch) -> Layout:
    """N and the profiles this machine can run, with what it cannot said in notes."""
    from ftlab.launch.launcher import check_this_machine

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = min(launch.processes, cuda or CPU_PROCESSES)
    notes = [] if n == launch.processes else [f"{n} processes here instead of the launch's {launch.processes}"]
    prof = launch.profile
    if prof.max_processes == 1 or n == 1:
        return Layout(prof, 1, prof, notes + ["1 process: no 1 vs N comparison"])
    # as the pre-flight runs it: QLoRA without CUDA as LoRA (preflight_overrides)
    cfg = launch.cfg if runs_qlora(launch.cfg) else OmegaConf.merge(launch.cfg, {"lora": {"quantize": None}})
    check_this_machine(Launch(prof, cfg, 1, 1, launch.argv))  # e.g. DeepSpeed not installed: nothing to run
    try:
        check_this_machine(Launch(prof, cfg, n, 1, launch.argv))
    except UserError:
        if not prof.multi_process_needs_cuda:
            raise
        notes.append(f"profile {prof.name} runs several processes on CUDA GPUs only: here it runs at 1 process "
                     f"(saving and resuming checked there), the {n}-process arithmetic through ddp")
        return Layout(prof, n, load_profile("ddp"), notes)
    return Layout(prof, n, prof, notes)


@dataclass
class TinyRecipe:
    overrides: list[str]      # on top of the recipe and the launch's own overrides
    global_batch: int
    notes: list[str]


def preflight_overrides(cfg: DictConfig, base: Path, processes: int) -> TinyRecipe:
    """The overrides that turn the recipe into the pre-flight's, with notes on what they change."""
    batch = min(cfg.train.batch_size, PER_PROCESS_BATCH)
    global_batch = batch * processes * 2
    if cfg.train.method == "grpo":  # whole groups of completions per step
        global_batch = math.lcm(batch * processes, cfg.grpo.num_generations)
    limit = global_batch * STEPS if cfg.data.limit is None else min(cfg.data.limit, global_batch * STEPS)
    lr = max(cfg.optim.lr, MIN_LR)
    out = [f"model.name={base}", "model.scratch=null", "model.preset=null", "model.tokenizer=null",
           "model.adapter=null", "model.revision=null",
           f"train.max_steps={STEPS}", f"train.save_every={CHECKPOINT_STEP}", f"train.keep_last={STEPS}",
           "train.save_final=true", f"train.save_merged={bool(cfg.lora.enabled)}", "train.resume=null",
           "train.max_minutes=null", "train.eval_every=null", "train.best_metric=null",
           "train.log_generations_every=null", "train.log_every=1", "train.token_budget=null",
           f"train.batch_size={batch}", f"train.global_batch={global_batch}", f"data.limit={limit}",
           "schedule.name=constant", "schedule.warmup_steps=0", "schedule.warmup_ratio=0.0", f"optim.lr={lr}",
           "track.wandb=false", "track.tensorboard=false"]
    notes = [f"{STEPS} steps at global batch {global_batch} ({batch} per process), constant lr {lr:g}"]
    if cfg.lora.enabled:
        out.append("lora.dropout=0.0")
        if cfg.lora.last_layers:  # fewer than all layers: a frozen lower layer stays part of what is checked
            out.append(f"lora.last_layers={min(cfg.lora.last_layers, TINY_LAYERS - 1)}")
        if cfg.lora.quantize and not runs_qlora(cfg):
            out.append("lora.quantize=null")
            notes.append(f"lora.quantize={cfg.lora.quantize} (QLoRA) needs CUDA: checked as plain LoRA")
    if cfg.model.attn_implementation.startswith("flash") and not torch.cuda.is_available():
        out.append("model.attn_implementation=sdpa")
        notes.append(f"model.attn_implementation={cfg.model.attn_implementation} needs CUDA: sdpa here")
    if cfg.train.method == "dpo":
        out += ["dpo.reference=null", "dpo.reference_cache=null"]
    if cfg.train.method == "grpo":
        out += [f"grpo.max_completion_length={min(cfg.grpo.max_completion_length, 16)}", "grpo.engine=hf",
                "grpo.log_completions_every=null"]
    return TinyRecipe(out, global_batch, notes)


def runs_qlora(cfg: DictConfig) -> bool:
    """QLoRA is checked as QLoRA where it runs (CUDA), else as plain LoRA."""
    return bool(cfg.lora.enabled and cfg.lora.quantize) and torch.cuda.is_available()


# -- running the tiny recipe -------------------------------------------------------------------------------
def worker_argv(argv: Sequence[str]) -> list[str]:
    """The launch command with this module in place of `ftlab.cli`: the same launcher, flags and recipe."""
    argv = list(argv)
    i = max(k for k in range(len(argv) - 1) if argv[k:k + 2] == ["-m", "ftlab.cli"])
    return [*argv[:i + 1], "ftlab.launch.preflight", *argv[i + 2:]]


@dataclass
class TinyRun:
    """A pre-flight training started through a profile's launcher, in its own process group (a timeout or an
    error elsewhere ends the launcher and every process it started); its output goes to a log file."""

    label: str
    out: Path
    log: Path
    child: subprocess.Popen

    def wait(self, deadline: float) -> Path:
        """The run directory once it finished; a failure or a hang is one line with the last error it printed."""
        try:
            code = self.child.wait(timeout=max(deadline - time.time(), 0))
        except subprocess.TimeoutExpired:
            self.kill()
            raise PreflightFailed(f"pre-flight: the {self.label} run did not finish in {RUN_TIMEOUT_S} s (a hang?); "
                                  f"its last line: {last_error(self.log)}") from None
        if code != 0:
            raise PreflightFailed(f"pre-flight: the {self.label} run failed (exit {code}): {last_error(self.log)}")
        # <output_dir>/<kind>/<stamp>_<name>, beside the link `latest` (and an accelerate profile's launch/)
        [run] = [p.parent for p in self.out.glob("*/*/metrics.jsonl") if not p.parent.is_symlink()]
        return run

    def kill(self) -> None:
        if self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGKILL)
            self.child.wait()


def start_tiny(prof: Profile, processes: int, recipe: str, overrides: Sequence[str], out: Path, label: str) -> TinyRun:
    launch = prepare_launch(prof, processes, 1, None, "train", recipe, [*overrides, f"output_dir={out}",
                                                                         f"name={label}"])
    log_path = out.with_suffix(".log")
    with log_path.open("w") as f:
        child = subprocess.Popen(worker_argv(launch.argv), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return TinyRun(label, out, log_path, child)


def finish(runs: Sequence[TinyRun]) -> list[Path]:
    """Wait for runs started together (they are independent: on a machine with idle cores they overlap); the
    first failure ends the others."""
    deadline = time.time() + RUN_TIMEOUT_S
    try:
        return [run.wait(deadline) for run in runs]
    finally:
        for run in runs:
            run.kill()


def last_error(logfile: Path) -> str:
    """What a failed run said last: its `ftlab: error:` line, else an exception line, else its last line."""
    lines = [line.strip() for line in logfile.read_text(errors="replace").splitlines() if line.strip()]
    mine = [line for line in lines if line.startswith("ftlab: error: ")]
    raised = [line for line in lines if re.match(r"\w+(Error|Exception): ", line)]
    return (mine or raised or lines or ["(no output)"])[-1].removeprefix("ftlab: error: ")


# -- the checks ----------------------------------------------------------------------------------------------
def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


@dataclass(frozen=True)
class Tolerances:
    """Relative tolerances from the dtypes and the sizes of the pre-flight runs (module doc)."""

    compute: torch.dtype      # the coarser of the weights' dtype and train.precision's autocast
    tokens: int               # at most, per step: the step's loss and gradient are means over them
    params: int               # the tiny model's: the gradient norm sums their squares

    def step(self, step: int, norm: bool = False) -> float:
        n, fp32 = max(self.tokens, 1), unit_roundoff(torch.float32)
        bound = unit_roundoff(self.compute) / math.sqrt(n) + fp32 * math.sqrt(n)
        return SAFETY * (bound + (fp32 * math.sqrt(self.params) if norm else 0.0)) * step


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def train_rows(run: Path) -> dict[int, dict[str, Any]]:
    from ftlab.runs.trackers import read_metrics

    return {r["train_step"]: r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}


def compare_steps(name: str, a: Path, b: Path, steps: Sequence[int], tol: Tolerances) -> list[Check]:
    """Loss and gradient norm of runs `a` and `b` at `steps`; each check keeps its worst step, or its first failing
    one."""
    rows_a, rows_b = train_rows(a), train_rows(b)
    checks = []
    for key, what in (("train/loss", "loss"), ("train/grad_norm", "gradient norm")):
        check = Check(f"{what}, {name}", passed=True)
        for step in steps:
            if step not in rows_a or step not in rows_b:
                raise PreflightFailed(f"pre-flight: {what}, {name}: step {step} was not logged by both runs")
            x, y = rows_a[step][key], rows_b[step][key]
            diff, bound = relative(x, y), tol.step(step, norm=key == "train/grad_norm")
            if not diff <= bound:  # NaN fails too
                checks.append(Check(f"{what}, {name}", str(step), diff, bound, False, f"{x:.6g} vs {y:.6g}"))
                break
            if check.difference is None or diff / bound > check.difference / check.tolerance:
                check.step, check.difference, check.tolerance = str(step), diff, bound
        else:
            checks.append(check)
    return checks


def probe_ids(tokenizer: Any) -> torch.Tensor:
    return tokenizer(PROBE_TEXT, return_tensors="pt").input_ids


def logits_of(model_dir: Path, dtype: torch.dtype, **placement: Any) -> torch.Tensor:
    """Logits of the probe text from a saved model or adapter (on its base), loaded as `ftlab` loads models, in
    `dtype` (`placement`: QLoRA's 4-bit loading)."""
    from ftlab.config.schema import ModelConfig
    from ftlab.models.load import DTYPES, load_model_and_tokenizer

    name = next(k for k, v in DTYPES.items() if v == dtype)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=str(model_dir), dtype=name), **placement)
    with torch.no_grad():
        return model(input_ids=probe_ids(tokenizer).to(model.device)).logits.float().cpu()


def compare_logits(name: str, live: torch.Tensor, reloaded: torch.Tensor, tol: float) -> Check:
    diff = float((live - reloaded).abs().max() / live.abs().max().clamp(min=1e-12))
    return Check(name, "end", diff, tol, diff <= tol)


def reload_checks(run: Path, base: Path, cfg: DictConfig) -> list[Check]:
    """The live model's logits against the saved model reloaded in the live model's dtype (DeepSpeed holds bf16
    weights under bf16 precision): the adapter on its base and merged/, or the full model. The untrained base
    must differ from the live model: a save that lost the training (an empty adapter) would otherwise pass.

    QLoRA (on CUDA) reloads its adapter on a 4-bit base as training loaded it; its merged/ is folded into an
    unquantized bf16 base, so it is compared with the adapter on that base."""
    from ftlab.models.adapters import quantization_config

    live = torch.load(run / LIVE_LOGITS, weights_only=True)
    dtype = getattr(torch, live["dtype"])
    tol = SAFETY * unit_roundoff(dtype)
    quantized = {"quantization_config": quantization_config(cfg.lora), "device_map": {"": 0}} \
        if runs_qlora(cfg) else {}
    checks = [compare_logits("logits: live vs saved, reloaded" + (" (adapter on its base)" if cfg.lora.enabled else ""),
                             live["logits"], logits_of(run / "final", dtype, **quantized), tol)]
    if cfg.lora.enabled:
        folded = logits_of(run / "final", torch.bfloat16) if quantized else live["logits"]
        checks.append(compare_logits("logits: adapter on bf16 base vs merged/" if quantized else
                                     "logits: live vs merged/, reloaded",
                                     folded, logits_of(run / "merged", torch.bfloat16 if quantized else dtype),
                                     SAFETY * unit_roundoff(torch.bfloat16) if quantized else tol))
    untrained = compare_logits("logits: trained vs untrained (must differ)", live["logits"],
                               logits_of(base, dtype, **quantized), tol)
    untrained.passed = not untrained.passed
    untrained.note = "" if untrained.passed else "training moved no logit beyond rounding"
    return checks + [untrained]


# -- the pre-flight --------------------------------------------------------------------------------------------
def run_preflight(launch: Launch, recipe: str, overrides: Sequence[str]) -> list[Check]:
    """Run every check (module doc); log the table; raise PreflightFailed naming the first failing check."""
    from tqdm.auto import tqdm

    cfg, began = launch.cfg, time.time()
    here = layout_here(launch)
    n = here.processes
    with tempfile.TemporaryDirectory(prefix="ftlab-preflight-") as tmp, \
            tqdm(total=3 + (n > 1), desc="pre-flight", disable=not sys.stderr.isatty()) as bar:
        base = Path(tmp) / "base"
        model = save_tiny_base(cfg, base)
        bar.update()
        tiny = preflight_overrides(cfg, base, n)
        tol = tolerances(cfg, model, tiny.global_batch * tokens_per_example(cfg))
        args = [*overrides, *tiny.overrides]
        runs = [start_tiny(here.profile, 1, recipe, args, Path(tmp) / "one", "1-process")]
        if n > 1:
            runs.append(start_tiny(here.many, n, recipe, args, Path(tmp) / "many", f"{n}-process"))
        done = finish(runs)
        bar.update(len(runs))
        checks: list[Check] = []
        if n > 1:
            via = "" if here.many is here.profile else f" ({here.profile.name} vs {here.many.name})"
            checks += compare_steps(f"1 vs {n} processes{via}", done[0], done[1], range(1, STEPS + 1), tol)
        own = done[-1] if here.own_processes == n else done[0]  # the launch's profile at its most processes here
        if all(c.passed for c in checks):
            checks += reload_checks(own, base, cfg)
        if all(c.passed for c in checks):
            checkpoint = own / "checkpoints" / step_name(CHECKPOINT_STEP)
            [resumed] = finish([start_tiny(here.profile, here.own_processes, recipe,
                                           [*args, f"train.resume={checkpoint}"], Path(tmp) / "resumed", "resumed")])
            bar.update()
            checks += compare_steps(f"resumed at step {CHECKPOINT_STEP} vs not", own, resumed,
                                    range(CHECKPOINT_STEP + 1, STEPS + 1), tol)
    log.info("%s", format_table(checks, [model.description, *here.notes, *tiny.notes], time.time() - began))
    failed = next((c for c in checks if not c.passed), None)
    if failed:
        said = f"{failed.note}; " if failed.note else ""
        raise PreflightFailed(f"pre-flight failed: {failed.name}, step {failed.step}: {said}relative difference "
                              f"{failed.difference:.3g}, tolerance {failed.tolerance:.3g}; nothing launched")
    return checks


def tokens_per_example(cfg: DictConfig) -> int:
    """At most: a pretraining window, a preference pair's two sequences, or one sequence."""
    if cfg.train.method == "pretrain":
        return cfg.pretrain.seq_len
    return cfg.data.max_length * (2 if cfg.train.method == "dpo" else 1)


def tolerances(cfg: DictConfig, model: TinyModel, tokens: int) -> Tolerances:
    from ftlab.models.load import DTYPES

    weights = DTYPES[cfg.model.dtype]
    compute = max(weights, DTYPES.get(cfg.train.precision, torch.float32), key=unit_roundoff)
    return Tolerances(compute, tokens, model.params)


def format_table(checks: Sequence[Check], notes: Sequence[str], seconds: float) -> str:
    lines = ["pre-flight: " + notes[0], *(f"  {note}" for note in notes[1:]), ""]
    width = max((len(c.name) for c in checks), default=10)
    lines.append(f"  {'check':<{width}}  {'step':>4}  {'difference':>10}  {'tolerance':>9}  result")
    for c in checks:
        result = "ok" if c.passed else f"FAILED {c.note}".rstrip()
        diff = "" if c.difference is None else f"{c.difference:.2e}"
        tol = "" if c.tolerance is None else f"{c.tolerance:.2e}"
        lines.append(f"  {c.name:<{width}}  {c.step:>4}  {diff:>10}  {tol:>9}  {result}")
    lines.append(f"  ({seconds:.0f} s)")
    return "\n".join(lines)


def preflight_launch(args: argparse.Namespace) -> None:
    """`ftlab launch --preflight`: what this machine refuses for the real launch first (a local launch), then the
    pre-flight; returns when every check passed."""
    from ftlab.launch.launcher import check_this_machine

    if args.verb != "train":
        raise UserError(f"--preflight checks training launches (--verb train); got --verb {args.verb}")
    launch = prepare_launch(args.profile, args.gpus, args.nodes, args.rdzv_endpoint, args.verb, args.recipe,
                            args.overrides)
    if not (args.dry_run or args.slurm or args.submit):
        check_this_machine(launch)  # refused now, not after a minute of pre-flight
    # What libraries print while it runs (DeepSpeed's banner on import) goes to stderr: a dry run's stdout is the
    # command alone.
    with contextlib.redirect_stdout(sys.stderr):
        run_preflight(launch, args.recipe, args.overrides)


# -- the training processes ----------------------------------------------------------------------------------
class KeepsLoop:
    """A method's objective, unchanged, that also keeps the loop training it: the live model afterwards."""

    def __init__(self, objective: Any):
        self.objective, self.loop = objective, None

    def before_training(self, loop: Any) -> None:
        self.loop = loop
        self.objective.before_training(loop)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.objective, name)


def objective_builder(method: str) -> Any:
    import importlib

    return importlib.import_module(f"ftlab.train.{method}").build_objective


def train_and_record_logits(recipe: str, overrides: Sequence[str]) -> None:
    """Train as `ftlab train` does, then write the live model's logits of the probe text (rank 0; every rank runs
    the forward, which ZeRO-3 needs to gather its weights)."""
    from ftlab.config import load_recipe
    from ftlab.train.loop import train

    cfg = load_recipe(recipe, list(overrides))
    build, kept = objective_builder(cfg.train.method), []

    def keep(cfg: DictConfig, tokenizer: Any, rank: int, world: int) -> KeepsLoop:
        kept.append(KeepsLoop(build(cfg, tokenizer, rank, world)))
        return kept[-1]

    train(cfg, keep, keep_model=True)
    loop = kept[-1].loop
    model = loop.accelerator.unwrap_model(loop.model)
    model.eval()
    # the dtype the live model computes in (DeepSpeed casts it to bf16/fp16 under that precision; QLoRA's 4-bit
    # weights are not floating point, its other weights are)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with torch.no_grad():
        logits = model(input_ids=probe_ids(loop.tokenizer).to(loop.device)).logits.float().cpu()
    if loop.rank == 0:
        torch.save({"logits": logits, "dtype": str(dtype).removeprefix("torch.")}, loop.run_path / LIVE_LOGITS)
    loop.accelerator.wait_for_everyone()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ftlab.launch.preflight train RECIPE [overrides]`: what each pre-flight process runs."""
    from ftlab.cli import setup_console_logging

    _verb, recipe, *overrides = list(sys.argv[1:] if argv is None else argv)
    setup_console_logging()
    try:
        train_and_record_logits(recipe, overrides)
    except UserError as e:
        print(f"ftlab: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
