"""DPO (full, LoRA, QLoRA) as an objective of the one training loop (`train/loop.py`).

The loss unit is a preference pair: `loss` returns the summed per-pair loss of a micro-batch and the loop
divides by the pairs of the whole optimizer step over all processes, so accumulation and data
parallelism are exact. Per pair:

    loss = dpo_loss(policy chosen/rejected log-probs, reference chosen/rejected log-probs)
           + dpo.nll_weight * (mean NLL of the chosen response's tokens)      ("RPO"; logged as `nll`)

Log-probs are summed over the response tokens (incl. the end-of-turn token), computed with the LM head on
those positions only. Chosen and rejected run in one forward: by default one row per pair with the prompt
computed once (`shared_prompt_batch`; same numbers as separate sequences, ~2x fewer tokens when prompts
dominate), else concatenated along the batch (`dpo.share_prompt: false`, or attention other than sdpa).
The reference log-probs are computed once, before step 1 (`before_training`, see `train/reference.py`),
and looked up by pair index. A function too: `run_dpo(cfg, pairs=[{prompt, chosen, rejected}, ...])`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ftlab.data.collate import pad_collate
from ftlab.data.preference import (PairReport, audit_pairs, encode_pair, generic_pairs, rows_to_pairs, shifted,
                                   task_pairs)
from ftlab.errors import UserError
from ftlab.losses import dpo_loss, log_probs_at, response_token_log_probs
from ftlab.runs.rundir import RunDir
from ftlab.train import reference as ref
from ftlab.train.loop import train
from ftlab.train.objective import Objective
from ftlab.train.plan import StepPlan

log = logging.getLogger("ftlab")

LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
          "logps/rejected", "nll")


class DPOObjective(Objective):
    name = "dpo"
    units_name = "pairs"

    def __init__(self, cfg: DictConfig, pairs: list[dict], val_pairs: list[dict], report: PairReport,
                 tokenizer: Any, rank: int = 0, world: int = 1):
        self.cfg, self.dpo, self.report, self.tokenizer = cfg, cfg.dpo, report, tokenizer
        self.pairs, self.n_train = pairs + val_pairs, len(pairs)  # reference log-probs cover both
        self.pad_id, self.rank, self.world = tokenizer.pad_token_id, rank, world
        self.plan = StepPlan([len(p["chosen"]) + len(p["rejected"]) for p in pairs], cfg.train.batch_size,
                             cfg.train.grad_accum, cfg.seed, cfg.data.group_by_length, rank, world)
        self.ref_logps: torch.Tensor | None = None  # (pairs, 2): set by before_training
        self.share_prompt = cfg.dpo.share_prompt      # checked against the model in before_training
        self.preflight_logged = False

    # -- batches -----------------------------------------------------------------------------------------
    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The pairs' micro-batch (prompt shared or not, see `shared_prompt_batch`); [] gives pair 0 with
        nothing supervised. `n_real_tokens` counts both sequences of a pair (the prompt twice) either way."""
        pairs = [self.pairs[i] for i in indices or [0]]
        out = (shared_prompt_batch if self.share_prompt else two_sequence_batch)(pairs, self.pad_id, not indices)
        out["weight"] = torch.full((len(pairs),), float(bool(indices)))
        out["units"] = torch.tensor(len(indices))
        out["n_real_tokens"] = torch.tensor(sum(len(p["chosen"]) + len(p["rejected"]) - 2 for p in pairs)
                                            if indices else 0)
        return out

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        out = self.batch(indices)
        out["ref"] = self.ref_logps[indices or [0]].clone()
        return out

    # -- the loss ------------------------------------------------------------------------------------------
    def loss(self, model: Any, micro: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, tokens = sequence_logps(model, micro)
        (pc, pr), (nc, nr) = logps.chunk(2), tokens.chunk(2)
        rc, rr = micro["ref"].unbind(1)
        losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, self.dpo.beta, self.dpo.loss_type,
                                                self.dpo.label_smoothing, nc, nr)
        nll = -pc / nc.clamp(min=1)
        w = micro["weight"]  # 0 for the stand-in pair of an empty micro-batch: it adds exactly nothing

        def total(x: torch.Tensor) -> torch.Tensor:  # per-pair sums: the loop divides by the step's pairs
            return (w * x).sum()

        loss = total(losses + self.dpo.nll_weight * nll) if self.dpo.nll_weight else total(losses)
        logged = (chosen_r, rejected_r, chosen_r - rejected_r, (chosen_r > rejected_r).float(), pc, pr, nll)
        return loss, {k: total(v.detach()) for k, v in zip(LOGGED, logged)}

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        bs, n = self.cfg.train.batch_size, len(self.pairs)
        return [self.collate(list(range(i, min(i + bs, n)))) for i in range(self.n_train, n, bs)]

    def log_preflight(self) -> None:
        if self.preflight_logged:  # already, before the reference pass
            return
        self.preflight_logged = True
        log.info("pair audit: %s", self.report.summary())
        for s in self.report.samples:
            log.info("preference pair, supervised spans in «»:\n%s", s)

    # -- reference log-probs, once before step 1 ------------------------------------------------------------
    def before_training(self, loop: Any) -> None:
        say = log.info if loop.run else log.debug  # rank 0 speaks for all
        if loop.run:
            self.log_preflight()  # what will be trained, before the reference pass takes its time
        config = loop.accelerator.unwrap_model(loop.model).config
        why_not = prompt_sharing_unsupported(config, self.cfg.data.max_length)
        if self.share_prompt and why_not:
            say("dpo.share_prompt: %s; chosen and rejected run as two sequences", why_not)
        self.share_prompt = self.share_prompt and not why_not
        key = ref.cache_key(self.cfg, self.tokenizer)
        digests = [ref.pair_digest(p) for p in self.pairs]
        known: dict[str, tuple[float, float]] = {}
        for source in cache_sources(self.cfg):
            known.update(ref.read_cache(source, key))
        todo = [i for i, d in enumerate(digests) if d not in known]
        if todo:
            say("reference log-probs: computing %d of %d pairs (%s)", len(todo), len(digests),
                f"reference {self.cfg.dpo.reference}" if self.cfg.dpo.reference else "the initial weights")
            with ref.reference_model(self.cfg, loop.model, loop.accelerator) as model:
                def forward(indices: list[int]) -> torch.Tensor:
                    b = {k: v.to(loop.device) for k, v in self.batch(indices).items()}
                    with loop.autocast():
                        logps, _ = sequence_logps(model, b)
                    return torch.stack(logps.float().chunk(2), dim=1)[:len(indices)].cpu()

                wanted = set(todo)
                per_rank = [self.reference_batches(wanted, r) for r in range(self.world)]
                computed = ref.compute_sharded(per_rank, self.rank, self.world, forward)
                known.update({digests[i]: v for i, v in computed.items() if i in wanted})
        self.ref_logps = torch.tensor([known[d] for d in digests], dtype=torch.float32)
        say("reference log-probs: %d reused from a cache, %d computed", len(digests) - len(todo), len(todo))
        if loop.rank == 0:
            ref.write_cache(loop.run_path, key, digests, self.ref_logps, len(digests) - len(todo))

    def reference_batches(self, todo: set[int], rank: int) -> list[list[int]]:
        """Rank `rank`'s micro-batches of the reference pass: its training micro-batches of the first epoch
        that hold a pair to compute (same shapes as in training), then its share of the other pairs (validation)."""
        first_epoch = [b[rank::self.world] for b in self.plan.epoch_batches(0)]
        batches = [b for b in first_epoch if todo.intersection(b)]
        rest = sorted(i for i in todo if i >= self.n_train)[rank::self.world]
        bs = self.cfg.train.batch_size
        return batches + [rest[i:i + bs] for i in range(0, len(rest), bs)]


# -- the forward: two layouts of a micro-batch of B pairs ----------------------------------------------------
def two_sequence_batch(pairs: list[dict], pad_id: int, empty: bool = False) -> dict[str, torch.Tensor]:
    """2B right-padded rows: the chosen sequences, then the rejected ones (each with its own prompt copy)."""
    seqs = [shifted(p[side], p["prompt_len"]) for side in ("chosen", "rejected") for p in pairs]
    out = pad_collate(seqs, pad_id)
    if empty:
        out["response_mask"].zero_()
    return out


def shared_prompt_batch(pairs: list[dict], pad_id: int, empty: bool = False) -> dict[str, torch.Tensor]:
    """B rows `prompt | chosen | rejected`: the prompt is computed once per pair.

    Position ids restart for the rejected response where the chosen one started, and a (B, 1, T, T) mask
    lets each response attend to the prompt and to itself only, so both get exactly the activations
    they would get as separate sequences. The last prompt position predicts the first token of both
    responses; its logits are gathered twice. A response's last token is only a label, never an input.
    `keep` marks the positions whose logits are needed; `gather`, `targets` and `seq` list, per
    supervised token, its row in the kept logits, its id and its sequence (chosen b, rejected B + b).
    """
    ids, pos, seg, preds = [], [], [], []
    for b, p in enumerate(pairs):
        n = p["prompt_len"]
        c, r = p["chosen"][n:], p["rejected"][n:]
        ids.append(p["chosen"][:n] + c[:-1] + r[:-1])
        pos.append(list(range(n)) + list(range(n, n + len(c) - 1)) + list(range(n, n + len(r) - 1)))
        seg.append([0] * n + [1] * (len(c) - 1) + [2] * (len(r) - 1))
        chosen_at = [n - 1] + list(range(n, n + len(c) - 1))
        rejected_at = [n - 1] + list(range(n + len(c) - 1, n + len(c) + len(r) - 2))
        preds += [(b, q, t, b) for q, t in zip(chosen_at, c)]
        preds += [(b, q, t, len(pairs) + b) for q, t in zip(rejected_at, r)]
    width = max(map(len, ids))
    segs = torch.tensor([s + [-1] * (width - len(s)) for s in seg])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segs[:, :, None] == segs[:, None, :]  # (B, query, key); padding (-1) only sees padding
    out = {"input_ids": torch.tensor([x + [pad_id] * (width - len(x)) for x in ids]),
           "position_ids": torch.tensor([x + list(range(width - len(x))) for x in pos]),
           "attention_mask": (causal & (same | (segs == 0)[:, None, :]))[:, None]}
    preds = [] if empty else preds
    rows, at, targets, seq = (torch.tensor([x[k] for x in preds], dtype=torch.long) for k in range(4))
    keep = torch.zeros(len(pairs), width, dtype=torch.bool)
    keep[rows, at] = True
    rank = keep.flatten().cumsum(0) - 1  # row of each kept position in the model's (N, V) logits
    out.update(keep=keep, gather=rank[rows * width + at], targets=targets, seq=seq)
    return out


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, supervised token count) of the 2B sequences (chosen, then rejected), for either
    layout; the LM head runs on supervised positions only."""
    if "keep" not in batch:
        mask = batch["response_mask"]
        logps = response_token_log_probs(model, batch["input_ids"], batch["labels"], mask,
                                         attention_mask=batch.get("attention_mask"))
        seq = mask.nonzero()[:, 0]  # sequence of each supervised token, in the row-major order of logps
        return logps.new_zeros(mask.shape[0]).index_add(0, seq, logps), mask.sum(dim=1).float()
    keep, n = batch["keep"], 2 * batch["keep"].shape[0]
    kwargs = {"use_cache": False, "attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}
    logps = log_probs_at(model, keep, batch["targets"], select=batch["gather"], input_ids=batch["input_ids"],
                         **kwargs)
    counts = torch.bincount(batch["seq"], minlength=n).float()
    return logps.new_zeros(n).index_add(0, batch["seq"], logps), counts


def prompt_sharing_unsupported(config: Any, max_length: int) -> str | None:
    """Why the shared-prompt layout cannot run on this model (None: it can). It needs attention that takes
    a custom 4D mask as given (sdpa) and no sliding window shorter than a sequence (the mask replaces it)."""
    impl = getattr(config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"the model's attention is {impl!r}, not sdpa"
    window = getattr(config.get_text_config(), "sliding_window", None)
    if window is not None and window < max_length + 1:
        return f"the model's sliding window ({window}) is shorter than data.max_length"
    return None


def cache_sources(cfg: DictConfig) -> list:
    """Reference caches to reuse: dpo.reference_cache, and the run being resumed (its own cache)."""
    sources = [ref.cache_path(cfg.dpo.reference_cache)] if cfg.dpo.reference_cache else []
    if cfg.train.resume:
        from ftlab.train.loop import resolve_resume

        run = resolve_resume(cfg)[0]
        run = run.parents[1] if run.parent.name == "checkpoints" else run
        sources += [run / ref.CACHE_FILE] if (run / ref.CACHE_FILE).is_file() else []
    return sources


# -- data ------------------------------------------------------------------------------------------------
def text_pairs(cfg: DictConfig, source: Any, split: str, tokenizer: Any, limit: int | None) -> list:
    """Preference pairs from a JSONL path (generic), rows handed in by a caller, or the task's own data."""
    d = cfg.data
    if isinstance(source, list):
        return rows_to_pairs(((f"pairs[{i}]", r) for i, r in enumerate(source)), tokenizer, d.chat_template, limit)
    if d.task == "generic":
        return generic_pairs(source, tokenizer, d.chat_template, limit)
    from ftlab.tasks import get_task

    return task_pairs(get_task(d.task, **d.task_options), source, split, limit, tokenizer, d.shots, d.chat_template)


def check_recipe(cfg: DictConfig, tokenizer: Any) -> None:
    """Settings DPO cannot use, and the reference: found, and with the policy's tokenizer."""
    d, p = cfg.data, cfg.dpo
    if d.packing:
        raise UserError("data.packing is not supported with train.method=dpo (pairs are padded batches)")
    if d.filter_correct:
        raise UserError("data.filter_correct selects SFT data; with train.method=dpo the pairs say what is correct")
    if p.label_smoothing and p.loss_type != "sigmoid":
        raise UserError(f"dpo.label_smoothing applies to dpo.loss_type=sigmoid (conservative DPO); got "
                        f"dpo.loss_type={p.loss_type}")
    ref.check_cache_option(cfg)
    if p.reference:
        from ftlab.models.load import adapter_base_path, is_adapter_dir, load_tokenizer, resolve_model_path

        try:
            path = resolve_model_path(p.reference)
            if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").is_file():
                path = adapter_base_path(path)  # an adapter without a tokenizer uses its base model's
            theirs = load_tokenizer(path)
        except (UserError, OSError, ValueError) as e:
            raise UserError(f"dpo.reference: {e}") from None
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"dpo.reference {p.reference}: its tokenizer differs from the policy's "
                            f"({len(theirs)} vs {len(tokenizer)} tokens or other ids); reference log-probs must "
                            "score the same token ids")


def build_objective(cfg: DictConfig, tokenizer: Any, rank: int = 0, world: int = 1,
                    pairs: list[dict] | None = None) -> DPOObjective:
    """Read, encode and audit the pairs (fails hard before any compute), check the reference."""
    d = cfg.data
    check_recipe(cfg, tokenizer)
    if pairs is None and not d.train:
        raise UserError("data.train is not set (preference JSONL, or a task's data)")
    texts = text_pairs(cfg, pairs if pairs is not None else d.train, d.train_split, tokenizer, d.limit)
    encoded, report = audit_pairs([encode_pair(t, tokenizer, d.max_length) for t in texts], tokenizer,
                                  d.max_bad_share)
    val = []
    if d.val:
        val_texts = text_pairs(cfg, d.val, d.val_split, tokenizer, d.val_limit)
        val, _ = audit_pairs([encode_pair(t, tokenizer, d.max_length) for t in val_texts], tokenizer,
                             d.max_bad_share)
    return DPOObjective(cfg, encoded, val, report, tokenizer, rank, world)


def run_dpo(cfg: DictConfig, pairs: list[dict] | None = None) -> RunDir | None:
    """Train as the recipe says; returns the finished run directory (None on ranks other than 0).

    `pairs`: preference rows (dicts as in a preference JSONL) instead of `data.train`, for loops that build
    them (e.g. generate -> verify -> prefer); pass the previous run as `dpo.reference_cache` to reuse its
    reference log-probs where the key matches.
    """
    return train(cfg, lambda c, tok, rank, world: build_objective(c, tok, rank, world, pairs))
