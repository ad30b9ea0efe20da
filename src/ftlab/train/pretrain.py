"""From-scratch pretraining on random corpus windows as an objective of the one training loop (`train/loop.py`).

The loss unit is a predicted token: `loss` returns the summed next-token loss of a micro-batch, and the loop
divides by the predicted tokens of the whole optimizer step over all processes, so accumulation and data
parallelism are exact. What is pretraining's own:

* data: windows of `pretrain.seq_len + 1` tokens of one document of the chosen categories (`data/windows.py`),
  drawn from (seed, step) alone. The plan hands the loop global window numbers (step x windows per step + j);
  every process draws the same step and takes its share, as `StepPlan` does with examples;
* length: `train.token_budget` predicted tokens set the number of steps (train.max_steps still wins over it,
  and it wins over train.epochs); an "epoch" is as many windows as the training pool has tokens;
* categories: `pretrain.categories`, or the first `pretrain.num_categories` (K) of a seeded shuffle; written
  to the run (`categories.json`) with their documents and tokens;
* logged per step: loss, bits per byte, lr, grad norm before/after clipping (the loop), parameter norm,
  tokens/s (the loop's, global) and MFU = tokens/s x FLOPs per token / (pretrain.peak_tflops x processes);
  eval/loss and eval/bits_per_byte on fixed validation windows;
* loss spikes: a loss above `pretrain.spike_factor` x the median of the last `pretrain.spike_window` losses is
  logged (`loss_history.jsonl`, train/spike) or, with spike_action=skip, its update is skipped on every rank;
* a non-finite step: the loop's batch dump plus `nonfinite/step_N_rank_R.json` and `.txt`: every window
  of the bad micro-batch as text with its document and offset, and which parameters and gradients are not
  finite (`ftlab replay RUN --step N` reruns that step, see `train/forensics.py`).
"""
from __future__ import annotations

import json
import logging
import math
from collections import deque
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ftlab.data.corpus import Corpus, tokenizer_hash
from ftlab.data.windows import TRAIN_STREAM, VAL_STREAM, WindowSampler, choose_categories
from ftlab.errors import UserError
from ftlab.runs.rundir import RunDir, write_json
from ftlab.train.loop import train
from ftlab.train.objective import Objective

log = logging.getLogger("ftlab")

MIN_SPIKE_HISTORY = 10  # losses needed before a spike can be called (or spike_window, if smaller)


class WindowPlan:
    """`StepPlan`'s interface over random windows: step s owns global windows s*W .. s*W + W - 1
    (W = batch_size x processes x grad_accum); micro-batch m holds the next batch_size x processes of them
    and this process takes every `world`-th, so 2 processes x batch 2 see exactly 1 process x batch 4."""

    def __init__(self, batch_size: int, grad_accum: int, rank: int, world: int, epoch_windows: int):
        self.batch_size, self.grad_accum, self.rank, self.world = batch_size, grad_accum, rank, world
        self.per_step = batch_size * world * grad_accum
        self.lengths = range(epoch_windows)  # the loop logs len(): windows per epoch
        self.steps_per_epoch = max(1, math.ceil(epoch_windows / self.per_step))
        self.current_step: int | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def step_indices(self, step: int) -> list[list[int]]:
        self.current_step = step
        base, gb = step * self.per_step, self.global_batch
        return [[base + m * gb + i for i in range(self.rank, gb, self.world)] for m in range(self.grad_accum)]


class PretrainObjective(Objective):
    name = "pretrain"
    units_name = "predicted_tokens"

    def __init__(self, cfg: DictConfig, corpus: Corpus, sampler: WindowSampler, val: WindowSampler | None,
                 categories: list[str] | None, tokenizer: Any, rank: int = 0, world: int = 1,
                 replay_step: int | None = None):
        self.cfg, self.p, self.corpus, self.sampler, self.val = cfg, cfg.pretrain, corpus, sampler, val
        self.categories, self.tokenizer, self.rank, self.world = categories, tokenizer, rank, world
        t, seq = cfg.train, cfg.pretrain.seq_len
        pool_tokens = int(corpus.length[sampler.pool].sum())
        self.plan = WindowPlan(t.batch_size, t.grad_accum, rank, world, max(1, pool_tokens // seq))
        self.tokens_per_step = self.plan.per_step * seq
        self.total_steps = math.ceil(t.token_budget / self.tokens_per_step) if t.token_budget else None
        self._val = self._val_batches() if val is not None else []
        self.flops: dict[str, float] = {}
        self.loop: Any = None
        self.history: deque | None = None
        self.spike = False
        self.replay_step, self.watch = replay_step, None

    # -- batches ---------------------------------------------------------------------------------------------
    def window(self, gid: int) -> tuple[int, int]:
        step, j = divmod(gid, self.plan.per_step)
        docs, offsets = self.sampler.windows(step, self.plan.per_step)
        return int(docs[j]), int(offsets[j])

    def batch(self, sampler: WindowSampler, windows: list[tuple[int, int]], real: bool = True) -> dict[str, torch.Tensor]:
        rows = np.stack([sampler.tokens(d, o) for d, o in windows])
        x = torch.from_numpy(rows)
        labels = x[:, 1:].clone()
        if not real:  # all-masked: the forward/backward of one window, contributing exactly nothing
            labels.fill_(-100)
        n = labels.numel() if real else 0
        return {"input_ids": x[:, :-1].contiguous(), "labels": labels, "units": torch.tensor(n),
                "n_real_tokens": torch.tensor(n),
                "bytes": torch.tensor(sum(sampler.window_bytes(d) for d, _ in windows) if real else 0.0,
                                      dtype=torch.float64),
                "doc": torch.tensor([d for d, _ in windows]), "offset": torch.tensor([o for _, o in windows])}

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if not indices:
            return self.batch(self.sampler, [(int(self.sampler.pool[0]), 0)], real=False)
        return self.batch(self.sampler, [self.window(i) for i in indices])

    def _val_batches(self) -> list[dict[str, torch.Tensor]]:
        docs, offsets = self.val.windows(0, self.p.val_windows)
        windows = list(zip(docs.tolist(), offsets.tolist()))
        bs = self.cfg.train.batch_size
        return [self.batch(self.val, windows[i:i + bs]) for i in range(0, len(windows), bs)]

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        return self._val

    # -- the loss --------------------------------------------------------------------------------------------
    def loss(self, model: Any, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.replay_step is not None and self.plan.current_step == self.replay_step - 1 and model.training:
            self.arm_replay(model)
        logits = model(input_ids=micro["input_ids"], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), micro["labels"].flatten(),
                                                 ignore_index=-100, reduction="sum")
        return loss, {"bytes_per_token": micro["bytes"]}

    # -- hooks of the loop -----------------------------------------------------------------------------------
    def before_training(self, loop: Any) -> None:
        from ftlab.models.presets import flops_per_token, param_counts

        self.loop = loop
        model = loop.accelerator.unwrap_model(loop.model)
        if self.p.spike_factor and self.p.spike_action == "skip" and loop.deepspeed:
            raise UserError("pretrain.spike_action=skip is not possible under DeepSpeed (its engine steps inside "
                            "backward); use pretrain.spike_action=log")
        self.flops = {**param_counts(model), **flops_per_token(model, self.p.seq_len)}
        if loop.run:
            self.write_run_info(loop.run)

    def write_run_info(self, run: RunDir) -> None:
        info = {"categories": self.categories, "num_categories": self.p.num_categories,
                "category_seed": self.category_seed(), "train": self.sampler.describe(),
                "val": self.val.describe() if self.val else None, "corpus": str(self.corpus.path),
                "tokenizer": self.corpus.meta["tokenizer"]}
        write_json(run.path / "categories.json", info)
        length = {"token_budget": self.cfg.train.token_budget, "tokens_per_step": self.tokens_per_step,
                  "steps_from_budget": self.total_steps}
        run.update_summary(categories=self.categories, model_size=self.flops, length=length)
        log.info("model: %s parameters (%s non-embedding), %.3g training FLOPs per token at seq_len %d",
                 f"{self.flops['params']:,}", f"{self.flops['params_non_embedding']:,}", self.flops["flops_per_token"],
                 self.p.seq_len)

    def category_seed(self) -> int:
        return self.p.category_seed if self.p.category_seed is not None else self.cfg.seed

    def log_preflight(self) -> None:
        d = self.sampler.describe()
        log.info("pretraining on %s: %d documents, %d tokens (%d shorter than %d tokens dropped); categories: %s",
                 self.corpus.path, d["documents"], d["tokens"], d["dropped_short_documents"], self.p.seq_len + 1,
                 ", ".join(f"{c} ({v['documents']} docs, {v['tokens']} tokens)" for c, v in d["categories"].items()))
        t = self.cfg.train
        if t.token_budget and t.max_steps is not None:
            log.info("train.max_steps=%d wins over train.token_budget=%d (%d steps)", t.max_steps, t.token_budget,
                     self.total_steps)
        elif t.token_budget:
            log.info("train.token_budget=%d: %d steps of %d tokens", t.token_budget, self.total_steps,
                     self.tokens_per_step)
        for gid in range(min(2, self.plan.per_step)):
            shown = self.sampler.show(*self.window(gid), self.tokenizer)
            log.info("window %d of step 1: document %s (%s) at offset %d:\n%s", gid, shown["id"], shown["category"],
                     shown["offset"], shown["text"])

    def more_metrics(self, loop: Any, metrics: dict[str, Any], axis: str) -> dict[str, Any]:
        """Pretraining's values beside the loop's: bits per byte, parameter norm, MFU, spike flag."""
        if axis == "eval":
            units = sum(float(b["units"]) for b in self._val)
            nbytes = sum(float(b["bytes"]) for b in self._val)
            return {"bits_per_byte": metrics["loss"] * units / (math.log(2) * nbytes)} if nbytes else {}
        out: dict[str, Any] = {}
        bpt = metrics.get("bytes_per_token")
        if bpt:
            out["bits_per_byte"] = metrics["loss"] / (math.log(2) * bpt)
        model = loop.accelerator.unwrap_model(loop.model)
        out["param_norm"] = parameter_norm(model)
        if self.p.peak_tflops and self.flops:
            # from the steps' own throughput (evaluation and checkpoints left out), a global count over every
            # process: divide by every process's peak
            out["mfu"] = metrics["step_tokens_per_s"] * self.flops["flops_per_token"] / (
                self.p.peak_tflops * 1e12 * loop.world)
        if self.p.spike_factor:
            out["spike"] = int(self.spike)
        return out

    def skip_update(self, loop: Any, step: int, loss: float) -> bool:
        """Loss-spike policy, from the step's global loss (the same on every process)."""
        p = self.p
        if not p.spike_factor:
            return False
        if self.history is None:
            self.history = self.restore_history(loop, step)
        ready = len(self.history) >= min(p.spike_window, MIN_SPIKE_HISTORY)
        med = median(self.history) if self.history else None
        self.spike = bool(ready and math.isfinite(loss) and loss > p.spike_factor * med)
        skip = self.spike and p.spike_action == "skip"
        if not skip and math.isfinite(loss):
            self.history.append(loss)
        if self.spike:
            log.warning("loss spike at step %d: %.4f > %g x running median %.4f%s", step + 1, loss, p.spike_factor,
                        med, "; update skipped" if skip else "")
        if loop.run:
            row = {"step": step + 1, "loss": loss, "median": med, "spike": self.spike, "skipped": skip}
            with open(loop.run.path / "loss_history.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return skip

    def restore_history(self, loop: Any, step: int) -> deque:
        """The running window of losses as it was at `step`: a resumed run reads the losses of the run it
        resumed from (and copies them into its own loss_history.jsonl), so spike decisions replay exactly."""
        history: deque = deque(maxlen=self.p.spike_window)
        if loop.resumed_from is None:
            return history
        source = Path(loop.resumed_from).parent.parent / "loss_history.jsonl"
        rows = []
        if source.is_file():
            rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r["step"] <= step]
        for r in rows:
            if not r["skipped"] and r["loss"] is not None and math.isfinite(r["loss"]):
                history.append(r["loss"])
        if loop.run and rows:
            with open(loop.run.path / "loss_history.jsonl", "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return history

    def on_nonfinite(self, loop: Any, step: int, batch: dict[str, torch.Tensor] | None, what: str) -> None:
        """Before the loop clears the gradients: the bad micro-batch as text and the non-finite tensors."""
        if batch is None:
            return
        model = loop.accelerator.unwrap_model(loop.model)
        windows = [self.sampler.show(int(d), int(o), self.tokenizer)
                   for d, o in zip(batch["doc"].tolist(), batch["offset"].tolist())]
        if not loop.deepspeed:  # each window's own mean loss: which window is non-finite (no collective involved)
            with torch.no_grad(), loop.autocast():
                logits = model(input_ids=batch["input_ids"], use_cache=False).logits.float()
                per = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100,
                                                        reduction="none").mean(dim=1)
            for w, v in zip(windows, per.tolist()):
                w["loss"] = v
        report = {"step": step + 1, "rank": loop.rank, "what": what, "seed": self.cfg.seed, **nonfinite_tensors(model),
                  "windows": windows,
                  "replay": f"ftlab replay {loop.run_path} --step {step + 1}"}
        folder = loop.run_path / "nonfinite"
        folder.mkdir(exist_ok=True)
        stem = folder / f"step_{step + 1:06d}_rank{loop.rank}"
        write_json(stem.with_suffix(".json"), report)
        lines = [f"non-finite {what} at step {step + 1} (rank {loop.rank}, seed {self.cfg.seed})",
                 f"first non-finite parameter: {report['first_nonfinite_param']}",
                 f"first non-finite gradient: {report['first_nonfinite_grad']}",
                 f"replay: {report['replay']}", ""]
        for w in windows:
            lines += [f"--- document {w['doc']} {w['id']!r} ({w['category']}), offset {w['offset']}, "
                      f"loss {w.get('loss', '?')}", w["text"], ""]
        stem.with_suffix(".txt").write_text("\n".join(lines), encoding="utf-8")
        log.warning("non-finite %s at step %d: windows and tensors in %s", what, step + 1, stem.with_suffix(".txt"))

    def arm_replay(self, model: Any) -> None:
        """`ftlab replay`: at the replayed step, autograd anomaly detection and forward hooks (once)."""
        if self.watch is not None:
            return
        self.watch = ForwardWatch(self.loop.accelerator.unwrap_model(model) if self.loop else model)
        torch.autograd.set_detect_anomaly(True, check_nan=True)
        log.info("replay: step %d runs with anomaly detection and forward hooks", self.replay_step)


def parameter_norm(model: Any) -> float:
    """L2 norm of all parameters, accumulated in float64. On CPU block by block: a float64 copy of each whole
    weight (a 49k-row embedding) cost a tiny model ~5% of its step (measured by benchmarks/bench_pretrain.py);
    small blocks stay in cache. Elsewhere whole tensors (fewer kernel launches)."""
    params = [p.detach() for p in model.parameters()]
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p in params:
        for part in p.reshape(-1).split(1 << 18) if p.device.type == "cpu" else (p,):
            total += torch.linalg.vector_norm(part, dtype=torch.float64).square()
    return float(total.sqrt())


# -- non-finite forensics: `on_nonfinite` and `arm_replay` above; `ftlab replay` in train/forensics.py -------
def nonfinite_tensors(model: Any) -> dict[str, Any]:
    """Which parameters and which gradients hold a NaN/inf, in the model's parameter order."""
    params, grads = [], []
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            params.append(name)
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            grads.append(name)
    return {"nonfinite_params": params, "first_nonfinite_param": params[0] if params else None,
            "nonfinite_grads": grads, "first_nonfinite_grad": grads[0] if grads else None}


def flat_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flat_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flat_tensors(v)]
    return []


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class ForwardWatch:
    """Forward hooks that record the first module whose output holds a non-finite value."""

    def __init__(self, model: torch.nn.Module):
        self.first: dict[str, Any] | None = None
        self.handles = [m.register_forward_hook(self._hook(name or "<model>")) for name, m in model.named_modules()]

    def _hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self.first is not None or all_finite(flat_tensors(output)):
                return
            self.first = {"module": name, "type": type(module).__name__,
                          "inputs_finite": all_finite(flat_tensors(args)),
                          "weights_finite": all_finite(list(module.parameters(recurse=False)))}
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# -- building ------------------------------------------------------------------------------------------------
def model_config(cfg: DictConfig) -> Any:
    """The model's config without building the model (for checks before anything loads)."""
    from transformers import AutoConfig

    from ftlab.models.load import resolve_model_path

    if cfg.model.scratch:
        scratch = OmegaConf.to_container(cfg.model.scratch)
        model_type = scratch.pop("model_type", "llama")
        return AutoConfig.for_model(model_type, **scratch)
    return AutoConfig.from_pretrained(resolve_model_path(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)


def check_model_fits(cfg: DictConfig, tokenizer: Any) -> int:
    """pretrain.seq_len within the model's context window; returns the model's vocabulary size."""
    from types import SimpleNamespace

    from ftlab.models.load import check_context_window

    config = model_config(cfg)
    check_context_window(SimpleNamespace(config=config), cfg.pretrain.seq_len, key="pretrain.seq_len")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scratch_vocab = (cfg.model.scratch or {}).get("vocab_size") if cfg.model.scratch else None
    return int(scratch_vocab or (len(tokenizer) if cfg.model.scratch else text.vocab_size))


def open_corpus(cfg: DictConfig, tokenizer: Any) -> Corpus:
    p = cfg.pretrain
    if not p.corpus:
        raise UserError("pretrain.corpus is not set (a directory made by: ftlab prepare-corpus INPUT --out DIR)")
    corpus = Corpus.open(p.corpus)
    if corpus.meta.get("tokenizer_sha256") != tokenizer_hash(tokenizer):
        raise UserError(f"corpus {p.corpus} was tokenized with {corpus.meta['tokenizer']!r}, which is not this "
                        f"model's tokenizer ({cfg.model.tokenizer or cfg.model.name!r}); set model.tokenizer="
                        f"{corpus.meta['tokenizer']} or prepare the corpus with this tokenizer")
    return corpus


def select_categories(cfg: DictConfig, corpus: Corpus) -> list[str] | None:
    p = cfg.pretrain
    if p.categories is not None:
        if p.num_categories is not None:
            raise UserError("set pretrain.categories or pretrain.num_categories, not both")
        return list(p.categories)
    if p.num_categories is None:
        return None
    seed = p.category_seed if p.category_seed is not None else cfg.seed
    return choose_categories(corpus, p.num_categories, seed, p.train_split, p.seq_len, p.min_category_docs)


def build_samplers(cfg: DictConfig, corpus: Corpus, need_val: bool
                   ) -> tuple[list[str] | None, WindowSampler, WindowSampler | None]:
    p = cfg.pretrain
    categories = select_categories(cfg, corpus)
    sampler = WindowSampler(corpus, p.train_split, categories, p.seq_len, cfg.seed, TRAIN_STREAM)
    val = WindowSampler(corpus, p.val_split, categories, p.seq_len, cfg.seed, VAL_STREAM) if need_val else None
    return categories, sampler, val


def build_objective(cfg: DictConfig, tokenizer: Any, rank: int = 0, world: int = 1,
                    replay_step: int | None = None) -> PretrainObjective:
    """Open and check the corpus, choose categories, build the samplers: every check before step 1."""
    vocab = check_model_fits(cfg, tokenizer)
    corpus = open_corpus(cfg, tokenizer)
    t = cfg.train
    need_val = bool(t.eval_every or t.best_metric)
    categories, sampler, val = build_samplers(cfg, corpus, need_val)
    docs = sampler.pool if val is None else np.concatenate([sampler.pool, val.pool])
    corpus.check_token_ids(vocab, docs)  # an id past the embedding table: found now, with its offset
    return PretrainObjective(cfg, corpus, sampler, val, categories, tokenizer, rank, world, replay_step)


def run_pretrain(cfg: DictConfig) -> RunDir | None:
    """Train as the recipe says; returns the finished run directory (None on ranks other than 0)."""
    return train(cfg, build_objective)
