"""The loop's edge paths an outside review found broken: steps without an update keep the schedule, forensics
get the batch the model saw, best/ follows each metric's direction, half-precision weights are refused, the
merged export of a quantized base, throughput without evaluation time, and memory given back after a run."""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch

from ftlab.config import load_recipe
from ftlab.runs.rundir import read_status
from ftlab.runs.trackers import read_metrics
from tests.helpers import TINY_SCRATCH, tiny_recipe
from tests.pretrain_helpers import make_corpus, pretrain_recipe


def train(recipe: Path, *overrides: str):
    from ftlab.train import run_training

    return run_training(load_recipe(recipe, list(overrides)))


def rows(run: Path, key: str) -> dict[int, dict]:
    return {r["train_step"]: r for r in read_metrics(run / "metrics.jsonl") if key in r}


def saved_model(tmp: Path, final_norm: float | None = None) -> Path:
    """A tiny random model on disk (reloadable, unlike a scratch one). With `final_norm` = 1e20 the logits are
    ~1e20: the loss stays finite while the gradient norm overflows to inf (squares beyond float32)."""
    from ftlab.models.load import EMBEDDED_MODEL, build_scratch_model, load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(EMBEDDED_MODEL))
    torch.manual_seed(0)
    model = build_scratch_model(TINY_SCRATCH, tok)
    if final_norm is not None:
        model.model.norm.weight.data.fill_(final_norm)
    out = tmp / ("huge_norm" if final_norm else "tiny_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -- a step without an update is still a step ------------------------------------------------------------------
def test_a_step_without_update_keeps_checkpoints_the_final_evaluation_and_the_time_limit(tmp_path):
    """Every step's gradient norm is inf (nan_policy=skip): before, each skip `continue`d past saving,
    evaluating and stopping, so the save step lost its checkpoint, the last step its evaluation, and
    train.max_minutes ran on to train.max_steps."""
    model = saved_model(tmp_path, final_norm=1e20)
    recipe = tiny_recipe(tmp_path, model={"name": str(model), "scratch": None},
                         data={"val": str(tmp_path / "train.jsonl"), "val_limit": 4})
    common = ["train.nan_policy=skip", "train.grad_clip=null", "train.save_final=false"]
    run = train(recipe, "name=sched", "train.max_steps=4", "train.save_every=2", "train.keep_last=5",
                "train.eval_every=4", *common).path
    assert read_status(run) == "complete"
    assert not rows(run, "train/loss")  # no update at all
    assert sorted(p.name for p in (run / "nonfinite").glob("*.pt")) == [f"step_00000{s}_rank0.pt" for s in (1, 2, 3, 4)]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000002"]
    assert [r["eval_step"] for r in read_metrics(run / "metrics.jsonl") if "eval/loss" in r] == [4]

    timed = train(recipe, "name=timed", "train.max_steps=50", "train.max_minutes=1e-9", *common).path
    assert json.loads((timed / "summary.json").read_text())["steps"] == 1


def test_forensics_get_the_micro_batch_the_model_saw(tmp_path):
    """On a non-finite gradient norm the hook got the CPU copy of the first micro-batch: on a GPU its forward
    died with a device mismatch and the dump was never written. Now both paths hand over the batch the model
    saw, on the model's device."""
    from ftlab.train import sft
    from ftlab.train.loop import train as loop_train

    class Recording(sft.SFTObjective):
        def loss(self, model, micro):
            self.seen.append(micro)
            return super().loss(model, micro)

        def on_nonfinite(self, loop, step, batch, what):
            self.handed.append((step, batch, what, loop.device))

    built = []

    def build(cfg, tokenizer, rank, world):
        objective = sft.build_objective(cfg, tokenizer, rank, world)
        objective.__class__ = Recording
        objective.seen, objective.handed = [], []
        built.append(objective)
        return objective

    model = saved_model(tmp_path, final_norm=1e20)
    recipe = tiny_recipe(tmp_path, model={"name": str(model), "scratch": None})
    cfg = load_recipe(recipe, ["train.max_steps=2", "train.grad_accum=2", "train.batch_size=2",
                               "train.nan_policy=skip", "train.grad_clip=null", "train.save_final=false"])
    run = loop_train(cfg, build)
    objective = built[0]
    assert [(step, what) for step, _, what, _ in objective.handed] == [(0, "grad_norm"), (1, "grad_norm")]
    for step, batch, _, device in objective.handed:
        assert batch is objective.seen[2 * step]  # the first micro-batch of that step, as the model saw it
        assert all(v.device == device for v in batch.values())
    dump = torch.load(run.path / "nonfinite" / "step_000001_rank0.pt", weights_only=False)
    assert dump["what"] == "grad_norm" and torch.equal(dump["batch"]["input_ids"], objective.seen[0]["input_ids"])


# -- best/ by each metric's own direction ----------------------------------------------------------------
def test_best_checkpoint_by_bits_per_byte_keeps_the_lowest(tmp_path):
    """`"loss" in key` made eval/bits_per_byte (pretraining's headline metric) higher-is-better: best/ kept
    the worst checkpoint."""
    corpus = make_corpus(tmp_path)
    recipe = pretrain_recipe(tmp_path, corpus, train={"max_steps": 6, "eval_every": 2,
                                                      "best_metric": "eval/bits_per_byte"})
    run = train(recipe).path
    values = [r["eval/bits_per_byte"] for r in read_metrics(run / "metrics.jsonl") if "eval/bits_per_byte" in r]
    assert len(values) == 3 and min(values) < max(values)
    best = json.loads((run / "summary.json").read_text())["best"]
    assert best["value"] == pytest.approx(min(values)) and best["step"] == 2 * (values.index(min(values)) + 1)


def test_metric_directions():
    from ftlab.config.schema import metric_direction

    assert [metric_direction(m) for m in ("eval/accuracy", "accuracy_strict", "eval/parse_rate_flexible")] == \
        ["higher"] * 3
    assert [metric_direction(m) for m in ("eval/loss", "eval/bits_per_byte", "perplexity", "eval/ece", "mae",
                                          "wasserstein")] == ["lower"] * 6
    assert metric_direction("eval/bleu") is None and metric_direction("eval/lossy") is None


# -- weights in half precision --------------------------------------------------------------------------------
def test_lora_on_a_bf16_base_trains_its_fp32_adapters(tmp_path):
    """The refusal of half-precision trainable weights leaves LoRA on a bf16 base alone: peft keeps adapters in fp32."""
    recipe = tiny_recipe(tmp_path, lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]})
    run = train(recipe, "model.dtype=bf16", "train.max_steps=1", "train.save_final=false")
    assert read_status(run.path) == "complete"


# -- the merged export -------------------------------------------------------------------------------------
def test_merge_into_a_fresh_bf16_base_gives_the_adapters_logits(tmp_path):
    """What `train.save_merged` does under QLoRA (merging into the 4-bit base would re-quantize): the saved
    adapter folded into a fresh bf16 copy of the base gives the adapter model's logits, to bf16 rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftlab.train.checkpoint import save_merged_from_adapter

    base = saved_model(tmp_path)
    recipe = tiny_recipe(tmp_path, model={"name": str(base), "scratch": None},
                         lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj", "o_proj"]})
    cfg = load_recipe(recipe, ["train.max_steps=3", "optim.lr=2e-2"])
    from ftlab.train import run_training

    final = run_training(cfg).path / "final"
    save_merged_from_adapter(cfg.model, final, tmp_path / "merged", dtype="bf16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16 and not any("lora" in n for n, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 7]])
    with torch.no_grad():
        want, got, before = (m(input_ids=ids).logits.float() for m in (adapted, merged.float(), plain))
    scale = want.abs().max().item()
    tol = 8 * torch.finfo(torch.bfloat16).eps * scale  # bf16 weights: relative rounding 2**-8 per weight
    assert (got - want).abs().max().item() < tol
    assert (before - want).abs().max().item() > 4 * tol  # the adapter changed the logits: the merge carries it


# -- throughput without evaluation time ---------------------------------------------------------------------
def test_step_throughput_leaves_out_evaluation(tmp_path):
    """tokens_per_s was a cumulative average over wall time, evaluation and generation included (and the MFU
    computed from it); step_tokens_per_s counts the training steps alone."""
    rows_ = [{"question": f"Tom has {a} apples and gets {b} more. How many?", "answer": f"#### {a + b}"}
             for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    recipe = tiny_recipe(tmp_path, data={"task": "gsm8k", "train": str(data), "val": str(data), "max_length": 128})
    run = train(recipe, "train.max_steps=4", "train.eval_every=1", "eval.max_new_tokens=24").path
    steps = rows(run, "train/loss")
    for step in (2, 3, 4):  # after an evaluation: wall-clock throughput is lower than the steps'
        assert steps[step]["train/tokens_per_s"] < steps[step]["train/step_tokens_per_s"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step_tokens_per_s"] == pytest.approx(steps[4]["train/step_tokens_per_s"])


# -- memory given back --------------------------------------------------------------------------------------
def test_a_finished_run_gives_its_model_back(tmp_path, monkeypatch):
    """accelerate keeps every prepared model and optimizer until told to free them: while anything still held
    the accelerator, the training model stayed in memory, and a loop stage that generates after training (the
    OaK loop's vLLM engine) found it there. The accelerator is kept alive here; the model must still be gone."""
    from ftlab.train import loop

    alive, accelerators = [], []
    prepare, make = loop.prepare_model, loop.make_accelerator

    def recording_prepare(cfg, local_rank=0):
        model, tokenizer = prepare(cfg, local_rank)
        alive.append(weakref.ref(model))
        return model, tokenizer

    def recording_make(cfg):
        accelerators.append(make(cfg))
        return accelerators[-1]

    monkeypatch.setattr(loop, "prepare_model", recording_prepare)
    monkeypatch.setattr(loop, "make_accelerator", recording_make)
    train(tiny_recipe(tmp_path), "train.max_steps=1", "train.save_final=false")
    assert accelerators and alive and alive[0]() is None  # freed by the loop itself, not by this test


def test_a_generation_stage_closes_its_engine(tmp_path):
    """The OaK loop's sampling and evaluation stages end by closing their engine (vLLM: workers, weights and KV
    cache), so the training stage that follows in the same process has the memory."""
    from ftlab.loops.oak_stages import Ctx, policy_engine

    cfg = load_recipe(tiny_recipe(tmp_path), [])
    with policy_engine(Ctx(cfg, None, None, 0, 1), {}) as (model, _, engine):
        assert engine.model is model
    assert engine.model is None


def test_log_generations_runs_without_autograd(tmp_path):
    """`train.log_generations_every` scores its samples' entropy with a forward pass: under autograd it kept
    a full activation graph over 8 sequences on rank 0 (memory at 7-14B). Every forward runs without it."""
    from ftlab.evaluate import log_generations
    from ftlab.models.load import build_scratch_model, load_tokenizer, resolve_model_path
    from ftlab.tasks import get_task

    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    torch.manual_seed(0)
    model = build_scratch_model(TINY_SCRATCH, tok)
    grad_modes: list[bool] = []
    model.register_forward_hook(lambda module, args, out: grad_modes.append(torch.is_grad_enabled()))
    rows_ = [{"question": f"Tom has {a} apples and gets 1 more. How many?", "answer": f"#### {a + 1}"} for a in range(3)]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    task = get_task("gsm8k")
    examples = task.load(str(data))
    cfg = load_recipe(tiny_recipe(tmp_path), ["eval.max_new_tokens=4", "eval.chat_template=false"])
    with torch.enable_grad():
        out = log_generations(model, tok, task, examples, cfg.eval)
    assert len(out["samples"]) == 3 and grad_modes and not any(grad_modes)
