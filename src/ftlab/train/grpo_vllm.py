"""Where GRPO rounds are sampled (`grpo.engine`): ftlab's HF engine on the policy itself (default), or vLLM in
the training process ("colocate": TRL's `vllm_mode="colocate"`), fed the policy's current weights every round.

vLLM runs in the training process on the same GPU (`distributed_executor_backend="external_launcher"`, vLLM's
in-process mode, as TRL's colocate mode builds it; one engine per process under torchrun). It loads the base
model once (`vllm_model_paths`, the directory ftlab trains from), and at the start of every round gets the
policy as it is now:

* a LoRA policy: the trainable adapter is saved to a fresh temporary directory and vLLM generates through it
  with a *new* `LoRARequest` id (vLLM caches an adapter by its id: the same id would keep last round's
  weights). The adapter is loaded into vLLM right away (`add_lora`), so the push is complete when the sync ends.
  The base weights never change, so nothing else moves; TRL instead merges the adapter, pushes every merged
  weight and unmerges, which drifts the base weights by float rounding at every round.
* a full model: every parameter goes to vLLM's own model through its `load_weights` (TRL's colocate sync,
  `model_runner.model.load_weights([(name, tensor)])`, one tensor at a time), then the prefix cache is reset
  (its KV blocks were computed with the old weights).

The push runs under a deadline (`grpo.vllm_sync_timeout`): a weight sync that hangs is a known failure of
colocated vLLM (a collective or a CUDA call that never returns). A thread cannot interrupt the main thread
inside C code, so on expiry the watchdog writes one line (run.log, summary.json marked failed, stderr) and ends
the process: a stuck job fails loudly instead of holding the GPU forever.

Where vLLM cannot run (no CUDA or no vllm package, or a scratch model without a directory) the HF engine
samples, after one warning, as `make_engine` does.

Sampling settings match the HF engine's: per-(prompt, sample) seeds from the round's seed (`request_seeds`),
prompts tokenized by the SFT rule, the chat template's end-of-turn as a stop token, raw (untempered)
log-probs. vLLM's dtype follows `train.precision` (fp32 -> float32, bf16 -> bfloat16) unless `grpo.vllm` sets it.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from ftlab.errors import UserError
from ftlab.train.checkpoint import save_model

log = logging.getLogger("ftlab")

SYNC_TIMEOUT_EXIT = 3            # the process's exit status when a weight push to vLLM outlives its deadline
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# -- the engines ----------------------------------------------------------------------------------------------
def hf_generate(model: Any, tokenizer: Any, texts: list[str], cfg: Any, autocast: Callable[[], Any],
                hook: Callable[[Any], Any] | None = None) -> list[list[Any]]:
    """The round's completions from ftlab's HF engine on the policy itself (eval mode: no dropout), under the
    training precision's autocast; `hook(engine)` makes the engine's logits hook (a constraint), if any."""
    from ftlab.generate import HFEngine

    was_training = model.training
    model.eval()
    try:
        with autocast():
            engine = HFEngine(model, tokenizer)
            if hook is not None:
                engine.logits_processor = hook(engine)
            return engine.generate_full(texts, cfg, progress=False)
    finally:
        model.train(was_training)


def start_vllm(cfg: DictConfig, loop: Any, tokenizer: Any, rank: int, world: int) -> Any:
    """grpo.engine=vllm: vLLM colocated in this process (`VLLMRollouts`), or None (the HF engine) with one warning
    where it cannot run."""
    why = vllm_unusable(cfg)
    if why:
        log.warning("grpo.engine=vllm: %s", why)
        return None

    def failed(line: str) -> None:  # the deadline expired: the run ends here, marked failed
        log.error(line)
        if loop.run is not None:
            loop.run.finish("failed", error=line)

    return VLLMRollouts(cfg, loop.accelerator.unwrap_model(loop.model), tokenizer, rank, world, failed)


# -- the deadline --------------------------------------------------------------------------------------------
@contextmanager
def sync_deadline(seconds: float, what: str, on_timeout: Callable[[str], None] | None = None) -> Iterator[None]:
    """Run the body; if it has not returned after `seconds`, report it in one line and end the process.

    `on_timeout(line)` runs first (to mark the run failed); then the line goes to stderr as `ftlab: error: ...`
    and the process exits with SYNC_TIMEOUT_EXIT: the main thread is stuck in vLLM, nothing else can stop it."""
    done = threading.Event()

    def expire() -> None:
        if done.is_set():
            return
        line = (f"{what} did not finish within {seconds:g} s (grpo.vllm_sync_timeout): vLLM's weight sync hangs; "
                "the process stops here (raise grpo.vllm_sync_timeout if the push is only slow, or use grpo.engine=hf)")
        try:
            if on_timeout is not None:
                on_timeout(line)
        finally:
            sys.stderr.write(f"ftlab: error: {line}\n")
            sys.stderr.flush()
            os._exit(SYNC_TIMEOUT_EXIT)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        done.set()
        timer.cancel()


# -- vLLM, colocated ------------------------------------------------------------------------------------------
class VLLMRollouts:
    """vLLM in this process, on the policy's base model, with `sync(model)` pushing the policy's weights."""

    def __init__(self, cfg: DictConfig, model: Any, tokenizer: Any, rank: int = 0, world: int = 1,
                 on_timeout: Callable[[str], None] | None = None):
        from ftlab.evaluate import vllm_model_paths
        from ftlab.generate.vllm_engine import VLLMEngine

        self.cfg, self.tokenizer, self.on_timeout = cfg, tokenizer, on_timeout
        self.lora = is_peft(model)
        self.adapter_dir: Path | None = None
        self.pushes = 0
        path, _ = vllm_model_paths(cfg.model)  # the base; the adapter being trained is pushed by `sync`
        colocate_environment(rank, world)
        kwargs: dict[str, Any] = {"distributed_executor_backend": "external_launcher", "seed": int(cfg.seed),
                                  "max_model_len": int(cfg.data.max_length), "gpu_memory_utilization": 0.3,
                                  "dtype": DTYPES.get(cfg.train.precision, "auto"), "enable_prefix_caching": True}
        if self.lora:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(model), max_loras=1)
        kwargs.update(OmegaConf.to_container(cfg.grpo.vllm, resolve=True))
        log.info("grpo.engine=vllm: vLLM in this process on %s (%s), %s pushed every round", path,
                 ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())),
                 "the LoRA adapter" if self.lora else "every weight")
        self.engine = VLLMEngine(path, tokenizer=tokenizer, **kwargs)

    def sync(self, model: Any, label: str) -> float:
        """Give vLLM the policy's current weights (under the deadline); returns the seconds it took."""
        began = time.perf_counter()
        with sync_deadline(float(self.cfg.grpo.vllm_sync_timeout), f"grpo.engine=vllm: the weight push for {label}",
                           self.on_timeout):
            if self.lora:
                self.push_adapter(model)
            else:
                self.push_weights(model)
        self.pushes += 1
        return time.perf_counter() - began

    def push_adapter(self, model: Any) -> None:
        folder = Path(tempfile.mkdtemp(prefix="ftlab-grpo-adapter-"))
        save_model(model, None, folder)  # the trainable adapter only (adapter_config.json + safetensors)
        self.engine.set_adapter(str(folder))  # a new path: VLLMEngine gives it a new LoRA id
        request = self.engine._lora_request()
        add = getattr(self.engine.llm.llm_engine, "add_lora", None)
        if add is not None:  # load it now, inside the deadline, not lazily in the first generate call
            add(request)
        previous, self.adapter_dir = self.adapter_dir, folder
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def push_weights(self, model: Any) -> None:
        target = vllm_model(self.engine.llm)
        for name, param in model.named_parameters():
            target.load_weights([(vllm_name(name), param.data)])
        self.engine.llm.reset_prefix_cache()  # cached KV blocks hold the old weights' keys and values

    def generate(self, model: Any, texts: list[str], cfg: Any, label: str) -> list[list[Any]]:
        self.sync(model, label)
        return self.engine.generate_full(texts, cfg, progress=False)

    def close(self) -> None:
        self.engine.close()
        if self.adapter_dir is not None:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
            self.adapter_dir = None


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "save_pretrained")


def lora_rank_slot(model: Any) -> int:
    """The smallest max_lora_rank vLLM accepts that holds the adapter's rank."""
    r = max(int(getattr(c, "r", 8)) for c in model.peft_config.values())
    return next((x for x in LORA_RANKS if x >= r), r)


def vllm_name(name: str) -> str:
    """A parameter's name as the checkpoint (and so vLLM's loader) spells it: gradient checkpointing's and
    torch.compile's wrappers removed."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def vllm_model(llm: Any) -> Any:
    """vLLM's torch module of the model, in this process (external_launcher keeps the worker in-process)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError:
        raise UserError("grpo.engine=vllm: this vLLM keeps its model outside the training process, so full-model "
                        "weights cannot be pushed to it; set VLLM_ENABLE_V1_MULTIPROCESSING=0, train a LoRA adapter, "
                        "or use grpo.engine=hf") from None


def colocate_environment(rank: int, world: int) -> None:
    """What vLLM's external_launcher reads: torchrun sets it; a single process gets rank 0 of 1 on a free port.
    Its engine core must run in this process (the model is reached through it for full-model pushes)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def vllm_unusable(cfg: DictConfig) -> str | None:
    """Why vLLM cannot sample this run's rounds here (None: it can)."""
    from ftlab.generate import VLLM_FALLBACK_WARNING, vllm_available

    if not vllm_available():
        return VLLM_FALLBACK_WARNING
    if cfg.model.scratch:
        return "a scratch model has no directory for vLLM to load; using the HF engine"
    return None
