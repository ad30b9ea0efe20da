"""The OaK loop's stages (see `ftlab.loops.oak`): each is `fn(ctx, ..., tmp)` run on every rank, writing its
files into the stage's temp directory and returning (on rank 0) what stage.json records.

Policies are overrides of `cfg.model`: {} for the recipe's model, {"adapter": dir} for a LoRA adapter on the
recipe's base, {"name": dir, ...} for a full model a stage trained.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftlab.data.jsonl import iter_jsonl, write_jsonl
from ftlab.errors import UserError
from ftlab.loops.stages import LoopDir
from ftlab.runs.rundir import write_json

log = logging.getLogger("ftlab")


class Ctx:
    """What every stage needs: the recipe, the task, the loop directory, this process's rank."""

    def __init__(self, cfg: DictConfig, task: Any, ldir: LoopDir, rank: int, world: int):
        self.cfg, self.loop, self.task, self.ldir, self.rank, self.world = cfg, cfg.loop, task, ldir, rank, world


def stage_config(cfg: DictConfig, overrides_key: str, forced: dict[str, Any],
                 defaults: dict[str, Any] | None = None) -> DictConfig:
    """The recipe with a stage's dotted overrides (the stage's defaults, the user's, then the loop's own), checked
    like a recipe."""
    from ftlab.config.load import check_choices, check_ranges, check_reward_entries

    out = OmegaConf.structured(cfg)  # a copy that keeps the schema's types
    user = dict(OmegaConf.select(cfg, overrides_key) or {})
    where = f"{overrides_key}: "
    if "grpo.rewards" in user:  # an entry's bad key named as grpo.rewards[i]
        check_reward_entries(OmegaConf.create({"grpo": {"rewards": user["grpo.rewards"]}}), where)
    for key, value in {**(defaults or {}), **user, **forced}.items():
        try:
            OmegaConf.update(out, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise UserError(f"{overrides_key}: bad key or value {key}={value!r}: {str(e).splitlines()[0]}") from None
    check_choices(out, lambda key: where)
    check_ranges(out, lambda key: where)
    return out


def as_policy(ctx: Ctx, result: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stage's model directory as overrides of cfg.model (a stage that trained nothing keeps `previous`):
    an adapter goes on the recipe's base model (also a scratch one), a full model replaces it."""
    from ftlab.models.load import is_adapter_dir

    if not result.get("model"):
        return previous or {}
    path = str(ctx.ldir.path / result["model"])
    if is_adapter_dir(path):
        return {"adapter": path}
    return {"name": path, "adapter": None, "scratch": None, "preset": None}

# -- training stages -------------------------------------------------------------------------------
def sft_stage(ctx: Ctx, tmp: Path) -> dict[str, Any] | None:
    from ftlab.train.sft import run_sft

    cfg = stage_config(ctx.cfg, "loop.sft_overrides", {
        "train.method": "sft", "kind": "sft", "name": "sft", "output_dir": str(tmp),
        "train.resume": interrupted_run(tmp, "sft"), "train.save_final": True})
    with own_run_log():
        run = run_sft(cfg)
    return {"model": _relative(ctx, run, tmp, 0, "sft"), "summary": run.summary} if run else None


def dpo_stage(ctx: Ctx, policy: dict[str, Any], k: int, tmp: Path) -> dict[str, Any] | None:
    from ftlab.train.dpo import run_dpo

    rows = [r for _, r in iter_jsonl(ctx.ldir.stage_dir(k, "pairs") / "pairs.jsonl")]
    if not rows:
        log.warning("loop: iteration %d built no preference pairs; the policy stays as it is", k)
        return {"model": None, "skipped": "no pairs"}
    # The reference is the DPO run's initial weights (dpo.reference: null), i.e. the previous policy. A policy
    # that is a LoRA adapter keeps training that adapter (no second one on top), so its initial weights are
    # base + that adapter; a full model gets a fresh adapter or full training, as the recipe says.
    forced = {"train.method": "dpo", "kind": "dpo", "name": f"iter{k}", "output_dir": str(tmp),
              "train.resume": interrupted_run(tmp, "dpo"), "train.save_final": True, "data.train": None, "data.val": None,
              "data.limit": None, "dpo.reference": None, "dpo.reference_cache": None,
              **{f"model.{key}": v for key, v in policy.items()}}
    if OmegaConf.merge(ctx.cfg.model, policy).adapter:
        forced["lora.enabled"] = False
    pairs = [{key: r[key] for key in ("prompt", "chosen", "rejected", "partial") if key in r} for r in rows]
    with own_run_log():
        run = run_dpo(stage_config(ctx.cfg, "loop.dpo_overrides", forced), pairs=pairs)
    return {"model": _relative(ctx, run, tmp, k, "dpo"), "pairs": len(rows), "summary": run.summary} if run else None


# loop.optimizer: grpo. The rewards when the recipe names none in grpo.rewards: the answer as the verifier reads
# it (the loop's answer_accuracy) and the verifier's share of valid steps, so a trace with a wrong verdict still
# earns for its valid steps, and a right verdict reached through invalid steps earns less than a valid proof.
# Weights: loop.grpo_overrides.
LOOP_REWARDS = [{"fn": "verified_answer", "weight": 1.0, "name": None},
                {"fn": "step_validity", "weight": 1.0, "name": None}]


def grpo_stage_config(cfg: DictConfig, policy: dict[str, Any], k: int, tmp: Path | None) -> DictConfig:
    """The GRPO stage's recipe: the recipe's grpo.* and training settings, loop.grpo_overrides on top, trained
    from `policy` on the loop's training problems (loop.problems or data.train, the first loop.max_problems).
    Defaults below those: the loop's rewards (LOOP_REWARDS) and loop.engine for grpo.engine."""
    lp, d = cfg.loop, cfg.data
    forced = {"train.method": "grpo", "kind": "grpo", "name": f"iter{k}", "train.save_final": True,
              "data.train": lp.problems or d.train, "data.limit": lp.max_problems, "data.val": None,
              **{f"model.{key}": v for key, v in policy.items()}}
    if tmp is not None:
        forced.update({"output_dir": str(tmp), "train.resume": interrupted_run(tmp, "grpo")})
    if OmegaConf.merge(cfg.model, policy).adapter:  # keep training the policy's adapter, not a second one on it
        forced["lora.enabled"] = False
    defaults: dict[str, Any] = {} if len(cfg.grpo.rewards) else {"grpo.rewards": LOOP_REWARDS}
    if cfg.grpo.engine == "hf":  # the loop's engine samples the rounds too, unless grpo.engine says otherwise
        defaults["grpo.engine"] = lp.engine
    return stage_config(cfg, "loop.grpo_overrides", forced, defaults)


def grpo_stage(ctx: Ctx, policy: dict[str, Any], k: int, tmp: Path) -> dict[str, Any] | None:
    """GRPO from the previous policy: rounds of sampled traces on the training problems, rewarded by the verifier
    and the answer (`grpo_stage_config`); with loop.constrained the rounds are sampled under the Action-line
    constraint (the loss still takes the policy's own log-probs, as DPO does on constrained traces)."""
    from ftlab.runs.trackers import read_metrics
    from ftlab.train.grpo import run_grpo

    constraint = None
    if ctx.loop.constrained:
        def constraint(rows: list, engine: Any) -> Any:
            return option_constraint(ctx, engine.tokenizer, [r.example.meta["problem"] for r in rows], engine.eos_ids)

    cfg = grpo_stage_config(ctx.cfg, policy, k, tmp)
    with own_run_log():
        run = run_grpo(cfg, constraint)
    if run is None:
        return None
    # per step, from every run of this stage (an interrupted attempt's steps, then the run that resumed it)
    steps = {r["train_step"]: r for folder in sorted(tmp.glob("grpo/2*_*")) if (folder / "metrics.jsonl").is_file()
             for r in read_metrics(folder / "metrics.jsonl") if "train/reward" in r}
    first, last = (steps[min(steps)], steps[max(steps)]) if steps else ({}, {})
    per_reward = {key.split("/")[2]: v for key, v in last.items() if key.startswith("train/rewards/") and
                  key.endswith("/mean")}
    return {"model": _relative(ctx, run, tmp, k, "grpo"), "steps": run.summary.get("steps"),
            "reward_first": first.get("train/reward"), "reward_last": last.get("train/reward"),
            "rewards_last": per_reward,
            "rewards": OmegaConf.to_container(cfg.grpo.rewards), "summary": run.summary}


@contextmanager
def own_run_log() -> Iterator[None]:
    """A training stage's run.log takes the log lines of that run only: its handler stays attached after the run
    (until the next run replaces it), and would take the next stages' lines too (in its finished stage directory)."""
    try:
        yield
    finally:
        logger = logging.getLogger("ftlab")
        for handler in [h for h in logger.handlers if getattr(h, "_ftlab_run", False)]:
            logger.removeHandler(handler)
            handler.close()


def interrupted_run(tmp: Path, kind: str) -> str | None:
    """The newest run an interrupted attempt of this stage left with a complete checkpoint (same recipe: the
    loop directory's hash says so), to resume from; None: start the stage's training afresh."""
    from ftlab.train.checkpoint import complete_checkpoints

    runs = sorted((p for p in (tmp / kind).glob("*_*") if p.is_dir()), reverse=True)
    found = next((str(run) for run in runs if complete_checkpoints(run / "checkpoints")), None)
    if found:
        log.info("loop: resuming the interrupted %s run %s", kind, found)
    return found


def _relative(ctx: Ctx, run: Any, tmp: Path, k: int, stage: str) -> str:
    """The run's final model as a path relative to the loop directory, once the stage is in place."""
    return str(Path(f"iter_{k}") / stage / run.path.relative_to(tmp) / "final")


# -- generation stages -----------------------------------------------------------------------------
@contextmanager
def policy_engine(ctx: Ctx, policy: dict[str, Any]) -> Iterator[tuple[Any, Any, Any]]:
    """(HF model or None, tokenizer, engine) for the policy; vLLM where it runs, else the HF engine."""
    from ftlab.evaluate import load_eval_tokenizer, vllm_model_paths
    from ftlab.generate import make_engine, vllm_available
    from ftlab.models.load import load_model_and_tokenizer

    mcfg = OmegaConf.merge(ctx.cfg.model, policy)
    model = None
    if ctx.loop.engine == "vllm" and vllm_available() and not mcfg.scratch:
        path, adapter = vllm_model_paths(mcfg)
        tokenizer = load_eval_tokenizer(mcfg, path, adapter)
        kwargs = {"seed": ctx.cfg.seed, **OmegaConf.to_container(ctx.loop.vllm)}
        if ctx.world > 1:  # one engine per rank, each on its share of the prompts (vLLM's torchrun mode)
            kwargs.setdefault("distributed_executor_backend", "external_launcher")
            kwargs.setdefault("data_parallel_size", ctx.world)
        engine = make_engine("vllm", None, tokenizer, model_path=path, adapter_path=adapter, vllm_kwargs=kwargs)
    else:
        torch.manual_seed(ctx.cfg.seed)  # a scratch base is rebuilt as training built it (same seed)
        model, tokenizer = load_model_and_tokenizer(mcfg)
        model.to(torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else "cpu")
        kind = "hf" if mcfg.scratch else ctx.loop.engine  # vllm here: not installed or no GPU (make_engine warns)
        engine = make_engine(kind, model, tokenizer, model_path=mcfg.name, adapter_path=mcfg.adapter)
    try:
        yield model, tokenizer, engine
    finally:
        engine.close()  # vLLM: its workers, weights and KV cache; the stage runner then collects the rest


def sample(ctx: Ctx, model: Any, tokenizer: Any, engine: Any, examples: list, n: int, temperature: float,
           seed: int) -> tuple[list[dict], dict]:
    """This rank's share of `examples`, n verified traces each, gathered: (all records on rank 0, stats)."""
    from ftlab.evaluate import autocast_for
    from ftlab.generate import GenerationConfig
    from ftlab.sokrates import verify_trace
    from ftlab.sokrates.traces import trace_record

    mine = list(range(ctx.rank, len(examples), ctx.world))
    problems = [examples[i].meta["problem"] for i in mine]
    prompts = [ctx.task.render_prompt(examples[i], 0, tokenizer, ctx.cfg.data.chat_template) for i in mine]
    constraint = None
    if ctx.loop.constrained and hasattr(engine, "logits_processor"):
        constraint = engine.logits_processor = option_constraint(ctx, tokenizer, problems, engine.eos_ids)
    gcfg = GenerationConfig(max_new_tokens=ctx.loop.max_new_tokens, temperature=temperature, top_p=ctx.loop.top_p,
                            n=n, batch_size=ctx.loop.batch_size, seed=seed)
    with autocast_for(model, ctx.cfg.eval.precision):
        results = engine.generate_full(prompts, gcfg, progress=ctx.rank == 0) if prompts else []
    records = [trace_record(examples[i].id, i, s, c, verify_trace(p, c.text))
               for i, p, completions in zip(mine, problems, results) for s, c in enumerate(completions)]
    stats = {k: v for k, v in getattr(engine, "stats", {}).items() if isinstance(v, (int, float))}
    if constraint is not None:
        stats["constraint"] = dict(constraint.stats)
    if ctx.world > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    return sorted(records, key=lambda r: (r["index"], r["sample"])), stats


def option_constraint(ctx: Ctx, tokenizer: Any, problems: list, eos_ids: set[int]) -> Any:
    """loop.constrained: Action lines can only be well-formed options citing existing indices (request i is
    problems[i]; `ftlab.sokrates.constrain`)."""
    from ftlab.sokrates.constrain import OptionConstraint

    folio = ctx.task.source == "folio"
    return OptionConstraint(tokenizer, [len(p.premises) for p in problems], eos_ids,
                            options=("CONCLUDE",) if folio else None, arity=None if folio else {"CONCLUDE": (1, 1)})


def traces_stage(ctx: Ctx, policy: dict, problems: list, k: int, tmp: Path) -> dict[str, Any] | None:
    from ftlab.sokrates.metrics import trace_summary

    with policy_engine(ctx, policy) as (model, tokenizer, engine):
        records, stats = sample(ctx, model, tokenizer, engine, problems, ctx.loop.samples, ctx.loop.temperature,
                                ctx.cfg.seed + k)
        templated = ctx.cfg.data.chat_template and bool(getattr(tokenizer, "chat_template", None))
    if ctx.rank:
        return None
    write_jsonl(tmp / "traces.jsonl", records)
    return {"summary": trace_summary(records), "generation": stats, "templated": templated}


def pairs_stage(ctx: Ctx, problems: list, k: int, templated: bool, tmp: Path) -> dict[str, Any] | None:
    from ftlab.sokrates.pairs import build_pairs

    if ctx.rank:
        return None
    by_id = {ex.id: ex for ex in problems}
    records = [r for _, r in iter_jsonl(ctx.ldir.stage_dir(k, "traces") / "traces.jsonl")]
    if ctx.loop.gold_chosen:  # the optionized gold proof stands in where no sample is fully valid
        valid = {r["problem"] for r in records if r["fully_valid"]}
        records += [{"problem": ex.id, "index": i, "sample": -1, "text": ex.target, "fully_valid": True,
                     "step_valid": [], "answer_correct": True} for i, ex in enumerate(problems) if ex.id not in valid]

    def prompt_of(pid: str) -> str:  # what the traces were sampled from, as run_dpo renders a prompt row
        ex = by_id[pid]
        return ex.question if templated else ctx.task.render_prompt(ex, 0, None, False)

    lp = ctx.loop
    rows, stats = build_pairs(records, {pid: ex.meta["problem"] for pid, ex in by_id.items()}, prompt_of,
                              lp.max_pairs_per_problem, lp.prefix_pairs, lp.outcome_pairs, lp.step_pairs)
    write_jsonl(tmp / "pairs.jsonl", rows)
    return {"stats": stats}


def eval_stage(ctx: Ctx, policy: dict, heldout: list, tmp: Path) -> dict[str, Any] | None:
    from ftlab.sokrates import metrics as M
    from ftlab.sokrates.traces import answer_confidence

    lp = ctx.loop
    with policy_engine(ctx, policy) as (model, tokenizer, engine):
        greedy, _ = sample(ctx, model, tokenizer, engine, heldout, 1, 0.0, ctx.cfg.seed)
        sampled = sample(ctx, model, tokenizer, engine, heldout, lp.eval_samples, lp.temperature,
                         ctx.cfg.seed + 10_000)[0] if lp.eval_samples else []
        if ctx.rank:
            return None
        confidence = [(answer_confidence(r, tokenizer), r["answer_correct"]) for r in greedy]
    write_jsonl(tmp / "greedy.jsonl", greedy)
    write_jsonl(tmp / "samples.jsonl", sampled)
    out = {k: v for k, v in M.trace_summary(greedy).items() if k != "traces"}
    out["problems"] = len(greedy)
    for k in lp.pass_k if sampled else []:
        out[f"answer_pass@{k}"] = M.mean_pass_at_k(M.pass_counts(sampled, "answer_correct"), k)
        out[f"proof_pass@{k}"] = M.mean_pass_at_k(M.pass_counts(sampled, "fully_valid"), k)
    probs = [(p, y) for p, y in confidence if p is not None]
    out["answer_calibration_n"] = len(probs)
    if probs:
        table = M.reliability([p for p, _ in probs], [y for _, y in probs], lp.calibration_bins)
        out["answer_ece"] = M.ece([p for p, _ in probs], [y for _, y in probs], lp.calibration_bins)
        write_json(tmp / "calibration_answer.json", table)
        M.reliability_diagram(table, tmp / "reliability_answer.png",
                              f"answer-token probability (greedy, n={len(probs)}), ECE {out['answer_ece']:.3f}")
    return {"metrics": out}


def head_stage(ctx: Ctx, policy: dict, problems: list, k: int, tmp: Path) -> dict[str, Any] | None:
    from ftlab.data.sft import prompt_ids
    from ftlab.models.load import load_model_and_tokenizer
    from ftlab.sokrates import head as H
    from ftlab.sokrates import metrics as M

    lp = ctx.loop
    records = [r for _, r in iter_jsonl(ctx.ldir.stage_dir(k, "traces") / "traces.jsonl")]
    torch.manual_seed(ctx.cfg.seed)
    model, tokenizer = load_model_and_tokenizer(OmegaConf.merge(ctx.cfg.model, policy))  # the policy that sampled
    model.to(torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else "cpu")
    by_id = {ex.id: ex for ex in problems}
    prompts = {r["problem"]: prompt_ids(tokenizer, ctx.task.render_prompt(by_id[r["problem"]], 0, tokenizer,
                                                                          ctx.cfg.data.chat_template))
               for r in records}
    x, y, owners = H.collect_features(model, tokenizer, prompts, records[ctx.rank::ctx.world])
    del model
    if ctx.world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([(x, y, owners)])
        x = torch.cat([p[0] for p in parts if len(p[2])]) if any(len(p[2]) for p in parts) else x
        y = torch.cat([p[1] for p in parts if len(p[2])]) if any(len(p[2]) for p in parts) else y
        owners = [o for p in parts for o in p[2]]
    if ctx.rank:
        return None
    test = torch.tensor([H.held_out(o, lp.head_holdout) for o in owners], dtype=torch.bool)
    out: dict[str, Any] = {"steps": len(owners), "train_steps": int((~test).sum()), "heldout_steps": int(test.sum())}
    if not len(owners) or not (~test).any() or not test.any() or len(set(y[~test].tolist())) < 2:
        out["skipped"] = "too few Action lines, or only one label, to train and calibrate a head"
        return {"head": out}
    head = H.train_head(x[~test], y[~test], lp.head_epochs, lp.head_lr, seed=ctx.cfg.seed)
    torch.save(head, tmp / "head.pt")
    p, truth = H.predict(head, x[test]).tolist(), [bool(v) for v in y[test].tolist()]
    table = M.reliability(p, truth, lp.calibration_bins)
    out.update(ece=M.ece(p, truth, lp.calibration_bins), accuracy=sum((q >= 0.5) == t for q, t in zip(p, truth)) / len(p),
               heldout_valid_rate=sum(truth) / len(truth))
    write_json(tmp / "calibration_head.json", table)
    M.reliability_diagram(table, tmp / "reliability_head.png", f"option head, held-out steps (n={len(p)}), "
                                                               f"ECE {out['ece']:.3f}")
    return {"head": out}
