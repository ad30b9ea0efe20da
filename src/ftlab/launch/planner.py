"""`ftlab plan`: before a long run, what it needs per GPU, how many steps and tokens, and what it costs.

    ftlab plan recipes/socrates/base.yaml --gpus 8 --gpu-type a100-80gb --profile zero2 \
        --examples 2900000 --mean-tokens 220
    ftlab plan recipes/quickstart.yaml --gpus 2 --gpu-type h100-80gb --measure

One table, every figure with how it was found:

* memory per GPU: `ftlab memory`'s estimate (ftlab.models.memory) for the recipe's model, method, micro-batch and
  data.max_length, with what the profile shards divided by the data-parallel world: ZeRO-1 shards optimizer
  states, ZeRO-2 also gradients, ZeRO-3 and FSDP2 also the weights (plus two layers gathered whole at a time);
  single and DDP shard nothing;
* data: examples counted in data.train when it is a local file, tokens per example from an evenly spaced sample
  encoded as training encodes it; or `--examples N --mean-tokens T`;
* steps: epochs x examples / global batch (train.global_batch, else batch_size x grad_accum x processes);
* time: tokens / (tokens/s per GPU x GPUs), tokens/s from gpu_table.yaml (measured rows, each citing its source),
  from `--measure` (a few real steps of the recipe on this machine) or from `--tokens-per-s`; both the table and
  `--measure` are scaled to the recipe's model and GPU by FLOPs (ftlab.launch.throughput says how);
* cost: hours x GPUs x $ per GPU-hour (gpu_table.yaml, or `--usd-per-gpu-hour`).

Left out: evaluation, checkpoints, start-up, data loading and padding.

`estimate_for_launch(cfg, profile, gpus, nodes)` is the same table, cheap and never raising, printed by
`ftlab launch` before a run starts.
"""
from __future__ import annotations

import argparse
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ftlab.errors import UserError
from ftlab.launch.throughput import (TABLE, Gpu, GpuTable, Throughput, flop_params, load_gpu_table, local_gpu_type,
                                     measured_throughput, table_throughput)
from ftlab.models.memory import OPTIMIZERS, Architecture, GiB, architecture, estimate_memory, load_config

log = logging.getLogger("ftlab")

HERE = Path(__file__).parent
PROFILES = HERE / "profiles"
MODEL_CONFIGS = HERE / "model_configs"     # configs of hub models the seeds use, for planning without the hub
CUDA_CONTEXT_GIB = 1.0                     # CUDA context + allocator slack added before "fits"
SHARDED_ROWS = {"none": (), "zero1": ("optimizer states",), "zero2": ("gradients", "optimizer states"),
                "full": ("weights", "gradients", "optimizer states")}
KNOWN_PROFILES = {"single": "none", "ddp": "none", "zero2": "zero2", "zero3": "full", "fsdp2": "full"}


# -- profiles ----------------------------------------------------------------------------------------
def sharding_of(profile: str) -> str:
    """"none", "zero1", "zero2" or "full" for a profile name (ftlab/launch/profiles/NAME.yaml) or a profile file: an
    accelerate config, at the top or under `accelerate:`; or `sharding: fsdp2`."""
    path = PROFILES / f"{profile}.yaml" if "/" not in profile and not profile.endswith(".yaml") else Path(profile)
    if not path.is_file():
        if profile in KNOWN_PROFILES:
            return KNOWN_PROFILES[profile]
        raise UserError(f"unknown profile {profile!r}; choose from {', '.join(KNOWN_PROFILES)} or a profile file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the profile: {e}") from None
    if isinstance(data, dict) and data.get("sharding") == "fsdp2":  # a torchrun profile whose loop shards (FSDP2)
        return "full"
    acc = data.get("accelerate", data) if isinstance(data, dict) else {}
    kind = str(acc.get("distributed_type", "")).upper()
    if kind == "DEEPSPEED":
        stage = int((acc.get("deepspeed_config") or {}).get("zero_stage", 0))
        return {1: "zero1", 2: "zero2", 3: "full"}.get(stage, "none")
    return "full" if kind == "FSDP" else "none"


def sharding_words(sharding: str, world: int) -> str:
    return {"none": "nothing sharded (a whole copy per GPU)",
            "zero1": f"optimizer states sharded over {world}",
            "zero2": f"gradients and optimizer states sharded over {world}",
            "full": f"weights, gradients and optimizer states sharded over {world}"}[sharding]


# -- the model ---------------------------------------------------------------------------------------
def method_of(cfg: DictConfig) -> str:
    if not cfg.lora.enabled:
        return "full"
    return "qlora" if cfg.lora.quantize else "lora"


def model_config(cfg: DictConfig) -> tuple[Any, str]:
    """(transformers config, where it came from) for the recipe's model; nothing but a config is read."""
    from transformers import AutoConfig

    if cfg.model.scratch:
        scratch = dict(cfg.model.scratch)
        scratch.setdefault("vocab_size", len(recipe_tokenizer(cfg)[0]))
        return AutoConfig.for_model(scratch.pop("model_type", "llama"), **scratch), "model.scratch"
    name = cfg.model.name
    try:
        return load_config(name), name
    except UserError:
        copy = MODEL_CONFIGS / (name.replace("/", "__") + ".json")
        if not copy.is_file():
            raise
        return load_config(str(copy)), f"{name} (config from ftlab's copy: the hub is not reachable)"


def recipe_tokenizer(cfg: DictConfig) -> tuple[Any, str]:
    """The recipe's tokenizer when it is here, else the embedded model's (saying so)."""
    from ftlab.config.schema import EMBEDDED_MODEL
    from ftlab.models.load import hub_cached, load_tokenizer, resolve_model_path

    name = cfg.model.tokenizer or (EMBEDDED_MODEL if cfg.model.scratch else cfg.model.name)
    path = Path(name).expanduser()
    if name == EMBEDDED_MODEL or path.is_dir() or path.suffix == ".gguf" or hub_cached(name):
        return load_tokenizer(resolve_model_path(name)), f"{name} tokenizer"
    return load_tokenizer(resolve_model_path(EMBEDDED_MODEL)), f"{EMBEDDED_MODEL} tokenizer ({name}'s is not here)"


# -- the data ----------------------------------------------------------------------------------------
@dataclass
class Dataset:
    examples: int
    mean_tokens: float
    how: str
    supervised_share: float = 1.0    # share of tokens that carry loss (the LM head runs on those only)


def count_lines(path: Path) -> int:
    """Non-blank lines (JSONL records), streamed: constant memory for a 2.9M-row file."""
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def count_dataset(cfg: DictConfig, sample: int = 1000) -> Dataset:
    """Examples in data.train (a local JSONL) and mean tokens per example over `sample` evenly spaced rows,
    encoded as training encodes them (prompt template, answer terminator, data.max_length truncation)."""
    from ftlab.data.sources import load_conversations
    from ftlab.train.sft import encode_conversations

    d = cfg.data
    if cfg.train.method != "sft":
        raise UserError(f"data.train is counted for SFT recipes; for train.method={cfg.train.method} pass "
                        "--examples N --mean-tokens T")
    path = Path(str(d.train)) if d.train else None
    if path is None or not path.is_file():
        raise UserError(f"data.train ({d.train}) is not a local file: pass --examples N --mean-tokens T")
    total = count_lines(path)
    examples = min(total, d.limit) if d.limit else total
    if examples < 1:
        raise UserError(f"{path}: no examples")
    stride = max(1, examples // max(sample, 1))
    tokenizer, which = recipe_tokenizer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / path.name
        with path.open("rb") as src, subset.open("wb") as out:
            lines = (line for line in src if line.strip())
            for i, line in zip(range(examples), lines):
                if i % stride == 0:
                    out.write(line.rstrip(b"\r\n") + b"\n")
        samples = load_conversations(d, str(subset), d.train_split, tokenizer, sample)
    encoded = [e for e in encode_conversations(samples, tokenizer, d.max_length) if e is not None]
    lengths = [len(e["input_ids"]) for e in encoded]
    if not lengths:
        raise UserError(f"{path}: no sampled example fits data.max_length={d.max_length}")
    every = "every row" if stride == 1 else f"every {stride}th"
    supervised = sum(sum(e["response_mask"]) for e in encoded) / sum(lengths)
    return Dataset(examples, sum(lengths) / len(lengths), f"{len(lengths)} rows ({every}) of {path.name}, {which}",
                   supervised)


# -- the plan ----------------------------------------------------------------------------------------
@dataclass
class Plan:
    title: str
    rows: list[tuple[str, str, str]] = field(default_factory=list)   # (quantity, value, how), as printed
    values: dict[str, float] = field(default_factory=dict)           # the numbers behind them, unrounded

    def add(self, quantity: str, value: str, how: str = "") -> None:
        self.rows.append((quantity, value, how))


def shard_rows(rows: list[tuple[str, float, str]], sharding: str, world: int,
               n_layers: int) -> list[tuple[str, float, str]]:
    """Per-GPU memory rows (name, bytes, how): what the profile shards divided by the data-parallel world. With the
    weights sharded, each decoder layer is gathered whole for its forward and backward and the next one prefetched:
    about two layers' worth of the unsharded weights stay resident."""
    out = []
    for name, nbytes, how in rows:
        if name not in SHARDED_ROWS[sharding] or world == 1:
            out.append((name, nbytes, how))
            continue
        out.append((name, nbytes / world, f"1/{world} of {nbytes / GiB:.2f} GiB ({how})"))
        if name == "weights":
            out.append(("gathered layers", 2 * nbytes / n_layers,
                        "2 decoder layers' whole weights (the one computing and the prefetched next)"))
    return out


def memory_rows(plan: Plan, arch: Architecture, cfg: DictConfig, method: str, sharding: str, world: int,
                gpu: Gpu | None, supervised_share: float = 1.0) -> None:
    """Add the per-GPU memory rows and their total (`ftlab memory`'s estimate, sharded as the profile says)."""
    t, lora = cfg.train, cfg.lora
    est = estimate_memory(arch, method=method, optim=cfg.optim.name if cfg.optim.name in OPTIMIZERS else "adamw",
                          precision=t.precision if t.precision != "auto" else "bf16", batch_size=t.batch_size,
                          seq_len=cfg.data.max_length, lora_r=lora.r, target_modules=list(lora.target_modules),
                          gradient_checkpointing=t.gradient_checkpointing,
                          attn_implementation=cfg.model.attn_implementation, lora_dropout=lora.dropout,
                          weight_dtype=cfg.model.dtype, supervised_share=supervised_share)
    rows = shard_rows(est.rows, sharding, world, arch.n_layers)
    for name, nbytes, how in rows:
        plan.add(name, f"{nbytes / GiB:.2f} GiB", how)
    total_gib = sum(b for _, b, _ in rows) / GiB + CUDA_CONTEXT_GIB
    plan.values["memory_gib"] = total_gib
    verdict = "" if gpu is None else (("fits in" if total_gib <= gpu.memory_gib else "DOES NOT FIT in")
                                      + f" {gpu.name}'s {gpu.memory_gib:g} GiB; ")
    plan.add("memory per GPU", f"{total_gib:.1f} GiB",
             f"{verdict}sum of the rows + {CUDA_CONTEXT_GIB:g} GiB CUDA context; micro-batch {t.batch_size} x "
             f"data.max_length {cfg.data.max_length} (an upper bound)")


def global_batch(cfg: DictConfig, world: int) -> tuple[int, str]:
    t = cfg.train
    fixed = OmegaConf.select(cfg, "train.global_batch", default=None)
    if fixed:
        return int(fixed), f"train.global_batch (accumulation {fixed / (t.batch_size * world):g} at this size)"
    return t.batch_size * t.grad_accum * world, f"batch_size {t.batch_size} x grad_accum {t.grad_accum} x {world} GPUs"


def check_arguments(gpus: int, nodes: int, examples: int | None, mean_tokens: float | None,
                    tokens_per_s: float | None, usd_per_gpu_hour: float | None, measure_steps: int,
                    sample: int) -> None:
    if gpus < 1 or nodes < 1:
        raise UserError(f"--gpus and --nodes must be >= 1, got {gpus} and {nodes}")
    if (examples is None) != (mean_tokens is None):
        raise UserError("pass --examples and --mean-tokens together (or neither, to count data.train)")
    if examples is not None and (examples < 1 or mean_tokens <= 0):
        raise UserError(f"--examples must be >= 1 and --mean-tokens > 0, got {examples} and {mean_tokens}")
    if (tokens_per_s is not None and tokens_per_s <= 0) or (usd_per_gpu_hour is not None and usd_per_gpu_hour < 0):
        raise UserError(f"--tokens-per-s must be > 0 and --usd-per-gpu-hour >= 0, got {tokens_per_s} and "
                        f"{usd_per_gpu_hour}")
    if measure_steps < 1 or sample < 1:
        raise UserError(f"--measure-steps and --sample must be >= 1, got {measure_steps} and {sample}")


def build_plan(cfg: DictConfig, profile: str, gpus: int, nodes: int = 1, gpu_type: str | None = None, *,
               examples: int | None = None, mean_tokens: float | None = None, measure: bool = False,
               measure_steps: int = 4, tokens_per_s: float | None = None, usd_per_gpu_hour: float | None = None,
               supervised_share: float | None = None, sample: int = 1000, lenient: bool = False,
               table: GpuTable | None = None, title: str = "") -> Plan:
    """The plan for `gpus` GPUs per node on `nodes` nodes. `lenient`: a part that cannot be worked out (no config,
    no local data, no GPU type) becomes an "unknown" row instead of an error (ftlab launch must never fail here)."""
    check_arguments(gpus, nodes, examples, mean_tokens, tokens_per_s, usd_per_gpu_hour, measure_steps, sample)
    if supervised_share is not None and not 0 < supervised_share <= 1:
        raise UserError(f"--supervised-share must be in (0, 1], got {supervised_share}")
    table = table or load_gpu_table()
    gpu = table.gpu(gpu_type) if gpu_type else None
    world, method, sharding = gpus * nodes, method_of(cfg), sharding_of(profile)
    where = f"{world} x {gpu.name if gpu else 'GPU'}" + (f" ({nodes} nodes x {gpus})" if nodes > 1 else "")
    plan = Plan(f"ftlab plan: {title or cfg.name} on {where}, profile {profile}: {sharding_words(sharding, world)}")

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except UserError as e:
            if not lenient:
                raise
            plan.add(what, "unknown", str(e))
            return None

    found = attempt("model", lambda: model_config(cfg))
    arch = architecture(found[0], name=found[1]) if found else None
    if examples is not None:
        data = Dataset(examples, float(mean_tokens), "given (--examples, --mean-tokens)")
    else:
        data = attempt("examples", lambda: count_dataset(cfg, sample))
    if supervised_share is not None and data is not None:
        data.supervised_share = supervised_share
    share = data.supervised_share if data else 1.0
    if arch is not None:
        add_model(plan, arch, cfg, method, found[1], share)
        attempt("memory per GPU", lambda: memory_rows(plan, arch, cfg, method, sharding, world, gpu, share))
    batch, batch_how = global_batch(cfg, world)
    plan.add("global batch", f"{batch:,}", batch_how)
    plan.values["global_batch"] = batch
    if data is None:
        return plan
    tokens = add_steps(plan, cfg, data, batch, counted=examples is None)
    if gpu is None and tokens_per_s is None:
        plan.add("time", "unknown", "no GPU type (ftlab plan --gpu-type " + "|".join(table.gpus) + ")")
        return plan
    if tokens_per_s is not None:
        speed = Throughput(tokens_per_s, "given (--tokens-per-s)")
    elif arch is None:
        return plan
    elif measure:
        speed = attempt("throughput", lambda: measured_throughput(cfg, found[0], table, gpu, flop_params(arch, share),
                                                                  method, measure_steps, share))
    else:
        micro = cfg.train.batch_size * data.mean_tokens
        speed = attempt("throughput", lambda: table_throughput(table, gpu, method, flop_params(arch, share), micro,
                                                               cfg.train.gradient_checkpointing))
    if speed is not None:
        add_time_and_cost(plan, tokens, speed, world, gpu, usd_per_gpu_hour)
    return plan


def add_model(plan: Plan, arch: Architecture, cfg: DictConfig, method: str, where: str, share: float) -> None:
    detail = f"r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}" if method != "full" else "every weight"
    plan.add("model", f"{human(arch.total_params)} params",
             f"{where}, {method} ({detail}); {human(flop_params(arch, share))} in matmuls per token (the LM head on "
             f"the {share:.1%} of tokens supervised)")


def add_steps(plan: Plan, cfg: DictConfig, data: Dataset, batch: int, counted: bool) -> float:
    """Examples, tokens per example, steps and tokens; returns the tokens the run trains on."""
    t = cfg.train
    limit = f" (data.limit {cfg.data.limit})" if cfg.data.limit and counted else ""
    plan.add("examples", f"{data.examples:,}", f"lines of data.train{limit}" if counted else data.how)
    plan.add("tokens per example", f"{data.mean_tokens:,.0f}", f"mean of {data.how}" if counted else data.how)
    plan.add("supervised share", f"{data.supervised_share:.1%}", "of tokens, in the same rows" if counted else
             "--supervised-share" if data.supervised_share < 1 else "every token (an upper bound; --supervised-share)")
    if t.max_steps:
        steps, tokens = t.max_steps, t.max_steps * batch * data.mean_tokens
        plan.add("steps", f"{steps:,}", "train.max_steps")
    else:
        steps, tokens = math.ceil(t.epochs * data.examples / batch), t.epochs * data.examples * data.mean_tokens
        plan.add("steps", f"{steps:,}", f"{t.epochs:g} epoch(s) x {data.examples:,} / {batch:,}")
    plan.add("tokens", human(tokens), "real tokens (padding left out)")
    plan.values.update(examples=data.examples, mean_tokens=data.mean_tokens, steps=steps, tokens=tokens,
                       supervised_share=data.supervised_share)
    return tokens


def add_time_and_cost(plan: Plan, tokens: float, speed: Throughput, world: int, gpu: Gpu | None,
                      usd_per_gpu_hour: float | None) -> None:
    hours = tokens / (speed.tokens_per_s * world) / 3600
    plan.values.update(tokens_per_s=speed.tokens_per_s, hours=hours)
    plan.add("throughput", f"{speed.tokens_per_s:,.0f} tok/s/GPU", speed.how)
    plan.add("time", duration(hours), f"{human(tokens)} tokens / ({speed.tokens_per_s:,.0f} x {world} tok/s); "
                                       "evaluation, checkpoints and start-up not included")
    if usd_per_gpu_hour is not None:
        price, source = usd_per_gpu_hour, "--usd-per-gpu-hour"
    elif gpu is not None:
        price, source = gpu.usd_per_gpu_hour, gpu.price_source.split(";")[0]
    else:
        return
    cost = plan.values["usd"] = hours * world * price
    plan.add("cost", f"${cost:,.0f}" if cost >= 10 else f"${cost:.2f}",
             f"{world} GPUs x {duration(hours)} x ${price:.2f}/h ({source})")


def human(n: float) -> str:
    """1.23B, 456.7M, 8.9K, 12."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}" if unit == "B" else f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:,.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"


def format_plan(plan: Plan) -> str:
    width = max(len(q) for q, _, _ in plan.rows) if plan.rows else 8
    vwidth = max(len(v) for _, v, _ in plan.rows) if plan.rows else 8
    lines = [plan.title, ""]
    lines += [f"  {q:<{width}}  {v:>{vwidth}}   {how}".rstrip() for q, v, how in plan.rows]
    return "\n".join(lines)


# -- ftlab launch ------------------------------------------------------------------------------------
def estimate_for_launch(cfg: DictConfig, profile: str, gpus: int, nodes: int) -> str:
    """The plan printed before a launch: cheap (a model config, a 200-row data sample, no download, no training)
    and never raising: what cannot be worked out reads "unknown"."""
    try:
        table = load_gpu_table()
        plan = build_plan(cfg, profile, gpus, nodes, local_gpu_type(table), sample=200, lenient=True, table=table)
        return format_plan(plan)
    except Exception as e:  # an estimate must never stop a launch: say why it is missing instead
        log.debug("plan failed", exc_info=True)
        return f"ftlab plan: unknown ({type(e).__name__}: {e})"


# -- the command line --------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    from ftlab.config import load_recipe

    cfg = load_recipe(args.recipe, args.overrides, resolve_hardware=False)  # auto: as on the GPUs planned for
    plan = build_plan(cfg, args.profile, args.gpus, args.nodes, args.gpu_type, examples=args.examples,
                      mean_tokens=args.mean_tokens, measure=args.measure, measure_steps=args.measure_steps,
                      tokens_per_s=args.tokens_per_s, usd_per_gpu_hour=args.usd_per_gpu_hour, sample=args.sample,
                      supervised_share=args.supervised_share,
                      title=args.recipe)
    print(format_plan(plan))
    return 0


def add_plan_verbs(sub: argparse._SubParsersAction) -> None:
    """`ftlab plan`."""
    p = sub.add_parser("plan", help="memory per GPU, steps, tokens, hours and cost of a recipe on N GPUs",
                       description="plan a run: memory per GPU by profile, steps, tokens, hours and cost "
                                   f"(throughput from {TABLE.name}, --measure or --tokens-per-s)")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=4")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-type", help=f"a GPU type of {TABLE.name}: a100-80gb, h100-80gb, h200, ...")
    p.add_argument("--profile", default="ddp", help="single, ddp, zero2, zero3, fsdp2 or a profile file (default ddp)")
    p.add_argument("--examples", type=int, help="training examples, when data.train is not a local file")
    p.add_argument("--mean-tokens", type=float, help="mean tokens per example (with --examples)")
    p.add_argument("--supervised-share", type=float, metavar="FRACTION",
                   help="share of tokens that carry loss (with --examples; counted from data.train otherwise)")
    p.add_argument("--sample", type=int, default=1000, help="rows of data.train encoded for tokens per example")
    p.add_argument("--measure", action="store_true", help="time a few real steps here and scale by FLOPs")
    p.add_argument("--measure-steps", type=int, default=4, help="steps --measure trains (default 4)")
    p.add_argument("--tokens-per-s", type=float, help="training tokens/s per GPU, instead of the table")
    p.add_argument("--usd-per-gpu-hour", type=float, help="price per GPU-hour, instead of the table's")
    p.set_defaults(fn=cmd_plan)
