"""Training throughput for `ftlab plan`: the table of GPUs and measured rows (gpu_table.yaml), and `--measure`.

Both turn a measured tokens/s into a utilisation, the share of the device's peak FLOPs the run used, and apply it
to the target model and GPU: tokens/s = utilisation x peak / FLOPs per token. FLOPs per token are k x N, N the
parameters in matmuls (the input embedding is a lookup), k = 6 for full fine-tuning (forward 2N, backward 4N), 4 for
LoRA and QLoRA (the frozen base needs input gradients, not weight gradients), + 2 with gradient checkpointing (one
more forward). Attention's own FLOPs are left out on both sides.
"""
from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ftlab.errors import UserError
from ftlab.models.memory import Architecture, GiB, architecture

log = logging.getLogger("ftlab")

TABLE = Path(__file__).with_name("gpu_table.yaml")
MEASURE_LAYERS = 2                         # decoder layers of the stand-in model `--measure` times for a hub model


# -- the table of GPUs and throughputs ---------------------------------------------------------------
@dataclass(frozen=True)
class Gpu:
    name: str
    peak_tflops: float           # dense bf16 tensor-core peak
    memory_gib: float
    usd_per_gpu_hour: float
    peak_source: str
    price_source: str


@dataclass(frozen=True)
class ThroughputRow:
    gpu: str
    method: str                  # full | lora | qlora
    params_b: float              # the measured model's parameters, billions
    embedding_b: float           # of which its input embedding (a lookup, no FLOPs; 0 when tied to the LM head)
    micro_batch_tokens: int      # tokens per micro-batch on one GPU
    tokens_per_s: float          # per GPU
    gradient_checkpointing: bool
    source: str
    how: str = ""

    @property
    def flop_params(self) -> float:
        return (self.params_b - self.embedding_b) * 1e9

    def utilisation(self, peak_tflops: float) -> float:
        """The share of the GPU's peak the measured run used, counting the FLOPs its method really runs."""
        flops = flops_per_token(self.flop_params, self.method, self.gradient_checkpointing)
        return self.tokens_per_s * flops / (peak_tflops * 1e12)


@dataclass
class GpuTable:
    gpus: dict[str, Gpu]
    rows: list[ThroughputRow]

    def gpu(self, name: str) -> Gpu:
        if name not in self.gpus:
            raise UserError(f"unknown GPU type {name!r}; the table ({TABLE.name}) has: {', '.join(self.gpus)}")
        return self.gpus[name]

    def nearest(self, gpu: str, method: str, params: float, micro_tokens: float) -> ThroughputRow:
        """The row of this GPU and method closest in model size and micro-batch tokens (on log scales: a 2x
        bigger model is as far as a 2x smaller one)."""
        rows = [r for r in self.rows if r.gpu == gpu and r.method == method]
        if not rows:
            raise UserError(f"{TABLE.name} has no {method} throughput for {gpu}; pass --tokens-per-s or --measure")

        def distance(r: ThroughputRow) -> float:
            size = math.log(params / r.flop_params)
            return abs(size) + abs(math.log(max(micro_tokens, 1) / r.micro_batch_tokens))

        return min(rows, key=distance)


def flop_params(arch: Architecture, head_share: float = 1.0) -> float:
    """Parameters a token goes through in matmuls: every Linear of the decoder, plus the LM head for the share of
    tokens it runs on (ftlab's losses run it on supervised positions only). The input embedding is a lookup."""
    head = arch.head_params or (arch.vocab * arch.hidden if arch.tied_embeddings else 0)
    return arch.linear_params + head * head_share


def flops_per_token(params: float, method: str, gradient_checkpointing: bool) -> float:
    """Training FLOPs per token: 6N full, 4N LoRA/QLoRA (no weight gradients for the frozen base), +2N when
    gradient checkpointing repeats the forward pass."""
    k = (6 if method == "full" else 4) + (2 if gradient_checkpointing else 0)
    return k * params


def load_gpu_table(path: Path = TABLE) -> GpuTable:
    """Read gpu_table.yaml: GPUs, measured rows, and derived rows (another GPU's rows x a stated speed-up)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        gpus = {name: Gpu(name=name, **spec) for name, spec in data["gpus"].items()}
        rows = [ThroughputRow(**row) for row in data["throughput"]]
        for d in data.get("derived", []):
            rows += [replace(r, gpu=d["gpu"], tokens_per_s=r.tokens_per_s * d["speedup"],
                             how=f"{r.how} on {d['from']}", source=f"{r.source}; x {d['speedup']} ({d['source']})")
                     for r in rows if r.gpu == d["from"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a readable GPU table: {type(e).__name__}: {e}") from None
    for r in rows:
        if r.gpu not in gpus or not r.source:
            raise UserError(f"{path}: throughput row {r} names an unknown GPU or no source")
    return GpuTable(gpus, rows)


def local_gpu_type(table: GpuTable) -> str | None:
    """The table's name for this machine's GPU (model name and memory size), or None (no CUDA, or a GPU the table
    does not list: an A100 40GB is not the a100-80gb)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    return next((key for key, gpu in table.gpus.items()
                 if key.split("-")[0] in name and abs(memory - gpu.memory_gib) < 4), None)


# -- throughput --------------------------------------------------------------------------------------
@dataclass
class Throughput:
    tokens_per_s: float          # per GPU
    how: str


def table_throughput(table: GpuTable, gpu: Gpu, method: str, params: float, micro_tokens: float,
                     checkpointing: bool) -> Throughput:
    row = table.nearest(gpu.name, method, params, micro_tokens)
    u = row.utilisation(gpu.peak_tflops)
    flops = flops_per_token(params, method, checkpointing)
    return Throughput(u * gpu.peak_tflops * 1e12 / flops,
                      f"row {row.method} {row.params_b:g}B, {row.micro_batch_tokens}-token micro-batches: "
                      f"{row.tokens_per_s:,.0f} tok/s ({row.how}; {row.source}) = {u:.1%} of {gpu.peak_tflops:g} "
                      f"TFLOPS, applied to {flops:.3g} FLOPs/token")


def scale_measured(tokens_per_s: float, params_measured: float, device_tflops: float, gpu: Gpu, params: float,
                   method: str, checkpointing: bool) -> tuple[float, float]:
    """(target tokens/s per GPU, utilisation): the measured run's share of its device's peak, applied to the
    target GPU's peak and the target model's FLOPs per token."""
    u = tokens_per_s * flops_per_token(params_measured, method, checkpointing) / (device_tflops * 1e12)
    return u * gpu.peak_tflops * 1e12 / flops_per_token(params, method, checkpointing), u


def device_peak_tflops(table: GpuTable, dtype: str) -> tuple[float, str]:
    """This machine's device peak: the table's for a GPU it knows, else a timed dense matmul in `dtype`."""
    import time

    import torch

    known = local_gpu_type(table)
    if known:
        gpu = table.gpus[known]
        return gpu.peak_tflops, f"{gpu.name} peak ({gpu.peak_source.split(':')[0]})"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 4096 if device == "cuda" else 1024
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dt)
    a @ a  # warm-up
    reps, began = 5, time.perf_counter()
    for _ in range(reps):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    tflops = 2 * n ** 3 * reps / (time.perf_counter() - began) / 1e12
    return tflops, f"timed {n}x{n} {dtype} matmul on this {device}"


def measure_config(cfg: DictConfig, config: Any, out: Path, steps: int) -> tuple[DictConfig, Any]:
    """The recipe cut to `steps` optimizer steps without evaluation or saving; a hub model whose weights are
    not here is replaced by a random model of its config with MEASURE_LAYERS decoder layers (its width, hence
    its matmul shapes, kept; saved under `out` for QLoRA). Returns (config to run, the config of the model it runs)."""
    from transformers import AutoConfig

    from ftlab.config.load import resolve_precision
    from ftlab.models.load import hub_cached

    run = OmegaConf.merge(cfg, {"output_dir": str(out), "train": {
        "max_steps": steps, "eval_every": None, "save_every": None, "log_generations_every": None,
        "save_final": False, "resume": None}, "track": {"wandb": False}})
    resolve_precision(run)  # the recipe's `precision: auto` as this machine, which runs the steps, resolves it
    name = cfg.model.name
    if not cfg.model.scratch and not Path(name).expanduser().exists() and not _embedded(name) and not hub_cached(name):
        small = {**stand_in_fields(config), "model_type": config.model_type}
        config = AutoConfig.for_model(**small)
        if cfg.lora.quantize:  # bitsandbytes quantizes while loading: the stand-in must be a model directory
            run.model.name, run.model.scratch = save_stand_in(small, cfg, out / "stand-in"), None
        else:
            run.model.scratch = small
    return run, config


def save_stand_in(scratch: dict[str, Any], cfg: DictConfig, path: Path) -> str:
    """A random model of `scratch`'s fields saved (bf16) with the tokenizer scratch models use."""
    import torch

    from ftlab.config.schema import EMBEDDED_MODEL
    from ftlab.models.load import build_scratch_model, load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(cfg.model.tokenizer or EMBEDDED_MODEL))
    build_scratch_model(scratch, tokenizer, torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def stand_in_fields(config: Any) -> dict[str, Any]:
    """The config's own scalar fields with MEASURE_LAYERS decoder layers. Lists and mappings are left out (per-layer
    types sized for the full depth, rope scaling): none changes the FLOPs; the rope base is kept as rope_theta."""
    skip = ("transformers_version", "_name_or_path", "torch_dtype", "dtype")
    small = {k: v for k, v in config.to_diff_dict().items() if not isinstance(v, (dict, list)) and k not in skip}
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in rope:
        small["rope_theta"] = rope["rope_theta"]
    small.pop("model_type", None)
    return {**small, "num_hidden_layers": MEASURE_LAYERS}


def _embedded(name: str) -> bool:
    from ftlab.models.load import EMBEDDED

    return name in EMBEDDED


def measured_throughput(cfg: DictConfig, config: Any, table: GpuTable, gpu: Gpu, params: float, method: str,
                        steps: int = 4, head_share: float = 1.0) -> Throughput:
    """Train `steps` real steps of the recipe on this machine's device and scale by FLOPs to `params` (matmul
    parameters per token of the target). `head_share`: the share of tokens the LM head runs on, the same in the
    measured run (same data)."""
    from ftlab.train import run_training

    with tempfile.TemporaryDirectory() as tmp:
        run_cfg, run_model = measure_config(cfg, config, Path(tmp), steps)
        model = "the recipe's model" if run_model is config else f"a {MEASURE_LAYERS}-layer random model of its config"
        log.info("--measure: %d training steps of %s on this machine", steps, model)
        run = run_training(run_cfg)
        measured = (run.summary.get("step_tokens_per_s") if run else None) or 0.0
    if measured <= 0:
        raise UserError("--measure: the training steps reported no throughput")
    n_measured = flop_params(architecture(run_model), head_share)
    device_tflops, device_how = device_peak_tflops(table, run_cfg.train.precision)
    tps, u = scale_measured(measured, n_measured, device_tflops, gpu, params, method, cfg.train.gradient_checkpointing)
    return Throughput(tps, f"measured {measured:,.0f} tok/s over {steps} steps (first step's warm-up included) of a "
                           f"{n_measured / 1e6:,.1f}M-param model = {u:.1%} of {device_tflops:.3g} TFLOPS "
                           f"({device_how}), applied to {gpu.name}")
