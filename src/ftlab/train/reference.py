"""DPO reference log-probs: computed once before step 1, stored in the run directory, reused by key.

`<run>/reference_logps.pt` holds, for every pair, the reference's summed log-probs of the chosen and the
rejected response, with the cache key; `<run>/reference_logps.json` shows the key. The key is

* the reference's identity: for `dpo.reference: null`, the policy's initial weights (the model's resolved
  directory and its weight files' sizes and modification times - a cheap stand-in for a weights hash
  that changes whenever the files are rewritten; a scratch model's config and seed; a starting adapter
  likewise); for a path, that directory the same way (a checkpoint's path holds its step);
* the weights dtype, autocast precision and attention implementation (they change the numbers);
* a hash of the chat template;
* per pair, a hash of its token ids (prompt length, chosen and rejected sequences).

A later run (`dpo.reference_cache: <run dir or file>`, or a resumed run's own directory) reuses every
pair whose key matches and computes only the rest; a different reference or template computes all.
The pass runs the training pairs in the micro-batches of the first epoch, each process its own share (so
a pair's reference forward has the same shapes as its first training forward: under bf16 autocast, other
padding changes sequence log-probs by ~0.1, and step 1 would not start at log 2), then gathers them.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from ftlab.errors import UserError

log = logging.getLogger("ftlab")

CACHE_FILE = "reference_logps.pt"
FORMAT = "ftlab-dpo-reference-v1: log-probs summed over response tokens incl. the end-of-turn token"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".json")


# -- the key ---------------------------------------------------------------------------------------------
def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def pair_digest(pair: dict[str, Any]) -> str:
    return sha(json.dumps([pair["prompt_len"], pair["chosen"], pair["rejected"]]))


def directory_identity(name: str) -> dict[str, Any]:
    """A model or adapter directory (or embedded name / cached hub id) by path and weight files' size+mtime."""
    from ftlab.models.load import resolve_model_path

    path = Path(resolve_model_path(name))
    if not path.is_dir():  # a hub id: its cached snapshot directory names the commit
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
        path = Path(found).parent if isinstance(found, str) else path
    files = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.glob("*")
                   if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) if path.is_dir() else []
    return {"path": str(path.resolve()) if path.exists() else name, "files": files}


def reference_identity(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.model
    if cfg.dpo.reference:
        ident: dict[str, Any] = {"reference": directory_identity(cfg.dpo.reference)}
    elif m.scratch:
        ident = {"initial": {"scratch": OmegaConf.to_container(m.scratch), "seed": cfg.seed}}
    else:
        ident = {"initial": directory_identity(m.name)}
    if not cfg.dpo.reference and m.adapter:
        ident["adapter"] = directory_identity(m.adapter)
    ident.update(dtype=m.dtype, precision=cfg.train.precision, attention=m.attn_implementation,
                 quantize=cfg.lora.quantize, revision=m.revision)
    return ident


def cache_key(cfg: DictConfig, tokenizer: Any) -> dict[str, Any]:
    template = getattr(tokenizer, "chat_template", None)
    return {"format": FORMAT, "reference": reference_identity(cfg),
            "chat_template": sha(template) if isinstance(template, str) else None}


# -- the cache -------------------------------------------------------------------------------------------
def cache_path(where: str | os.PathLike) -> Path:
    """The cache file a `dpo.reference_cache` value names (a file, or a run directory holding one)."""
    path = Path(where).expanduser()
    return path / CACHE_FILE if path.is_dir() else path


def check_cache_option(cfg: DictConfig) -> None:
    if cfg.dpo.reference_cache and not cache_path(cfg.dpo.reference_cache).is_file():
        raise UserError(f"dpo.reference_cache: no {CACHE_FILE} at {cfg.dpo.reference_cache}")


def read_cache(path: Path, key: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """{pair digest: (chosen, rejected)} of a cache file made with `key`; {} (saying why) otherwise."""
    try:
        data = torch.load(path, weights_only=True)
        digests, logps = data["digests"], data["logps"].tolist()
    except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, never fatal
        log.warning("reference cache %s is unreadable (%s); computing the reference log-probs", path,
                    type(e).__name__)
        return {}
    if data.get("key") != key:
        changed = [k for k in key if data.get("key", {}).get(k) != key[k]]
        log.info("reference cache %s was made with another %s; computing the reference log-probs",
                 path, " and ".join(changed) or "key")
        return {}
    return {d: (c, r) for d, (c, r) in zip(digests, logps)}


def write_cache(run_path: Path, key: dict[str, Any], digests: list[str], logps: torch.Tensor,
                reused: int) -> None:
    """reference_logps.pt (+ .json showing the key), each written to a temp file and renamed."""
    target = run_path / CACHE_FILE
    tmp = target.with_name(target.name + ".tmp")
    torch.save({"key": key, "digests": digests, "logps": logps.cpu()}, tmp)
    os.replace(tmp, target)
    side = run_path / "reference_logps.json"
    side.with_name(side.name + ".tmp").write_text(json.dumps(
        {"key": key, "pairs": len(digests), "reused": reused, "computed": len(digests) - reused}, indent=2))
    os.replace(side.with_name(side.name + ".tmp"), side)


# -- the reference model ---------------------------------------------------------------------------------
@contextlib.contextmanager
def reference_model(cfg: DictConfig, model: Any, accelerator: Any) -> Iterator[Any]:
    """The model to compute reference log-probs with, in eval mode, no gradients.

    `dpo.reference: null`: the policy itself before step 1 (its initial weights); with a fresh LoRA
    adapter, the same model with the adapters disabled (equal to the initial policy, LoRA starts at
    zero, and cheaper). A path: that model loaded once as a frozen copy, freed afterwards (only the
    log-probs are kept, so the copy never sits beside the policy during training).
    """
    was_training = model.training
    model.eval()
    try:
        if cfg.dpo.reference:
            from ftlab.config.schema import ModelConfig
            from ftlab.models.load import load_model_and_tokenizer

            m = cfg.model
            ref, _ = load_model_and_tokenizer(ModelConfig(name=cfg.dpo.reference, dtype=m.dtype,
                                                          trust_remote_code=m.trust_remote_code,
                                                          attn_implementation=m.attn_implementation))
            ref.requires_grad_(False)
            try:
                with torch.no_grad():
                    yield ref.to(accelerator.device).eval()
            finally:
                del ref
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        else:
            inner = accelerator.unwrap_model(model)
            fresh_lora = (cfg.lora.enabled and not cfg.model.adapter and hasattr(inner, "disable_adapter")
                          and len(getattr(inner, "peft_config", {})) == 1 and not starts_from_adapter(cfg))
            with torch.no_grad(), (inner.disable_adapter() if fresh_lora else contextlib.nullcontext()):
                yield model
    finally:
        model.train(was_training)


def starts_from_adapter(cfg: DictConfig) -> bool:
    """model.name is an adapter directory: disabling adapters would drop it too, so the policy is the reference."""
    from ftlab.models.load import is_adapter_dir, resolve_model_path

    return not cfg.model.scratch and is_adapter_dir(resolve_model_path(cfg.model.name))


def compute_sharded(per_rank: list[list[list[int]]], rank: int, world: int,
                    forward: Callable[[list[int]], torch.Tensor]) -> dict[int, tuple[float, float]]:
    """{pair index: (chosen, rejected)} for the micro-batches `per_rank[rank]`, gathered on every rank.

    `forward(indices)` returns a (len(indices), 2) tensor; every rank runs as many forwards as the busiest
    one (an empty list still runs one: the rank symmetry ZeRO-3 needs)."""
    mine = per_rank[rank]
    out: list[tuple[int, float, float]] = []
    for b in range(max(map(len, per_rank))):
        idx = mine[b] if b < len(mine) else []
        out += [(i, c, r) for i, (c, r) in zip(idx, forward(idx).tolist())]
    if world > 1:
        from accelerate.utils import gather_object

        out = gather_object(out)
    return {i: (c, r) for i, c, r in out}
