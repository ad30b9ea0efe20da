"""Training paths that only exist on a CUDA GPU: QLoRA (4-bit NF4), 8-bit / paged AdamW, fp16 with the
gradient scaler, DeepSpeed ZeRO-2, in-training evaluation on the GPU. Skipped without CUDA (conftest)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftlab.config import load_recipe
from ftlab.runs.rundir import read_status
from ftlab.runs.trackers import read_metrics
from tests.helpers import TINY_SCRATCH, tiny_recipe


def train(recipe: Path, *overrides: str):
    from ftlab.train import run_training

    return run_training(load_recipe(recipe, list(overrides)))


def train_losses(run: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small Llama saved as a model directory: QLoRA quantizes at load time, so it needs one."""
    from ftlab.models.load import EMBEDDED_MODEL, build_scratch_model, load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(EMBEDDED_MODEL))
    model = build_scratch_model({**TINY_SCRATCH, "hidden_size": 128, "intermediate_size": 256}, tok)
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_qlora_quantizes_the_base_to_4bit_and_learns(tmp_path, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from ftlab.train.loop import prepare_model

    recipe = tiny_recipe(tmp_path, model={"name": str(tiny_model_dir), "scratch": None},
                         lora={"enabled": True, "quantize": "nf4", "r": 8, "target_modules": ["q_proj", "v_proj"]})
    cfg = load_recipe(recipe, [])
    model, _ = prepare_model(cfg)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.weight.quant_type == "nf4" for m in four_bit)
    assert next(model.parameters()).device.type == "cuda"
    del model
    run = train(recipe, "train.max_steps=20", "optim.lr=3e-3", "schedule.name=constant", "train.precision=bf16")
    losses = train_losses(run.path)
    assert losses[-1] < losses[0] and read_status(run.path) == "complete"


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_and_paged_adamw_train_with_8bit_state_and_resume(tmp_path, name):
    """The optimizer is bitsandbytes' own class with 8-bit moments (not a silent fall-back to AdamW), the
    loss falls, and a resumed run replays the uninterrupted run's losses from the saved 8-bit state."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from ftlab.train.optim import build_optimizer

    recipe = tiny_recipe(tmp_path)
    cfg = load_recipe(recipe, [f"optim.name={name}"])
    model = torch.nn.Linear(256, 256).cuda()
    optimizer = build_optimizer(model, cfg.optim)
    assert type(optimizer) is (bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit)
    model(torch.randn(4, 256, device="cuda")).square().sum().backward()
    optimizer.step()
    state = optimizer.state[model.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    del model, optimizer

    steps = [f"optim.name={name}", "train.max_steps=12", "optim.lr=3e-3", "schedule.name=constant",
             "train.save_every=6", "train.keep_last=3"]
    ref = train(recipe, "name=ref", *steps)
    losses = train_losses(ref.path)
    assert losses[-1] < losses[0]
    resumed = train(recipe, "name=resumed", f"train.resume={ref.path}", *steps)
    assert train_losses(resumed.path) == pytest.approx(losses[6:], rel=1e-5)


def test_fp16_with_the_scaler_on_cuda(tmp_path):
    run = train(tiny_recipe(tmp_path), "train.precision=fp16", "train.fp16_init_scale=1e9", "train.max_steps=20",
                "optim.lr=3e-3", "schedule.name=constant")
    rows = [r for r in read_metrics(run.path / "metrics.jsonl") if "train/loss" in r]
    assert rows[0]["train/overflow_skipped"] and not rows[-1]["train/overflow_skipped"]
    assert read_status(run.path) == "complete"


def test_in_training_evaluation_runs_on_the_gpu_and_agrees_with_ftlab_eval(tmp_path):
    """The loop's eval/accuracy at the last step is what `ftlab eval` gives for the saved final model on the
    same rows, prompts and generation settings."""
    from ftlab.evaluate import run_eval

    rows = [{"question": f"Tom has {a} apples and gets {b} more. How many?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(tmp_path, data={"task": "gsm8k", "train": str(data), "val": str(data), "val_limit": 4,
                                         "max_length": 128})
    run = train(recipe, "train.max_steps=6", "train.eval_every=6", "train.log_generations_every=6",
                "eval.max_new_tokens=8", "optim.lr=3e-3")
    evals = [r for r in read_metrics(run.path / "metrics.jsonl") if "eval/accuracy" in r]
    assert evals and (run.path / "generations" / "step_000006.jsonl").is_file()
    cfg = load_recipe(recipe, ["eval.max_new_tokens=8", f"eval.source={data}", "eval.limit=4",
                               "eval.chat_template=false"])
    _, metrics = run_eval(cfg, model_name=str(run.path / "final"))
    assert metrics["accuracy"] == pytest.approx(evals[-1]["eval/accuracy"])


def test_detached_prompt_training_on_cuda_has_the_full_forwards_first_loss(tmp_path):
    """train.detach_prompt builds its prompt/response tensors and KV cache on the model's device."""
    recipe = tiny_recipe(tmp_path, data={"group_by_length": False})
    common = ["train.max_steps=3", "train.grad_clip=1000"]
    detached = train_losses(train(recipe, "name=detached", "train.detach_prompt=true", *common).path)
    full = train_losses(train(recipe, "name=full", *common).path)
    assert len(detached) == 3 and all(map(torch.isfinite, torch.tensor(detached)))
    assert detached[0] == pytest.approx(full[0], rel=1e-4)


ZERO2_GPU = ("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
             "deepspeed_config: {zero_stage: 2, offload_optimizer_device: none, offload_param_device: none}\n"
             "mixed_precision: 'no'\nnum_machines: 1\nnum_processes: 1\n")


def accelerate_train(config: Path, recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "ftlab.cli",
           "train", str(recipe), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))


def test_deepspeed_zero2_one_gpu_matches_a_plain_big_batch_with_clipping_active(tmp_path):
    """grad_clip far below the gradient norm: ftlab's clipping is DeepSpeed's only one, applied once per step."""
    pytest.importorskip("deepspeed")
    recipe = tiny_recipe(tmp_path, data={"group_by_length": False})
    config = tmp_path / "zero2.yaml"
    config.write_text(ZERO2_GPU)
    common = ["train.max_steps=3", "train.grad_clip=0.05", "optim.lr=1e-2"]
    plain = train(recipe, "name=plain", "train.batch_size=8", *common)
    proc = accelerate_train(config, recipe, "name=ds", "train.batch_size=2", "train.grad_accum=4", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = next((tmp_path / "runs" / "sft").glob("*_ds"))
    rows = [r for r in read_metrics(ds / "metrics.jsonl") if "train/loss" in r]
    assert all(r["train/grad_norm"] > 0.05 for r in rows)  # clipping is active at every step
    assert train_losses(ds) == pytest.approx(train_losses(plain.path), rel=1e-4)


def test_deepspeed_fp16_overflow_skips_the_schedule_too(tmp_path):
    """An fp16 overflow makes DeepSpeed skip its update; the learning-rate schedule must wait with it."""
    pytest.importorskip("deepspeed")
    recipe = tiny_recipe(tmp_path)
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True,
                                     "initial_scale_power": 32}, "train_micro_batch_size_per_gpu": "auto",
                                     "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    config = tmp_path / "zero2_fp16.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                      f"deepspeed_config: {{deepspeed_config_file: {ds_config}}}\n"
                      "mixed_precision: fp16\nnum_machines: 1\nnum_processes: 1\n")
    proc = accelerate_train(config, recipe, "train.precision=fp16", "train.max_steps=20", "schedule.name=linear",
                            "schedule.warmup_steps=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "runs" / "sft").glob("*_tiny"))
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    skipped = [r["train/overflow_skipped"] for r in rows]
    assert skipped[0] and not skipped[-1], skipped
    applied = 0
    for row in rows:  # 10 warm-up steps then linear decay to 0 at step 20, counted in applied steps
        applied += not row["train/overflow_skipped"]
        shape = applied / 10 if applied <= 10 else (20 - applied) / 10
        assert row["train/lr"] == pytest.approx(1e-3 * shape), row


def test_qlora_merged_export_gives_the_adapters_logits_on_a_bf16_base(tmp_path, tiny_model_dir):
    """save_merged under QLoRA merges into a fresh bf16 base, not into the 4-bit one (which re-quantizes)."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = tiny_recipe(tmp_path, model={"name": str(tiny_model_dir), "scratch": None},
                         lora={"enabled": True, "quantize": "nf4", "r": 8, "target_modules": ["q_proj", "v_proj"]})
    run = train(recipe, "train.max_steps=10", "optim.lr=1e-2", "train.precision=bf16", "train.save_merged=true")
    merged = AutoModelForCausalLM.from_pretrained(run.path / "merged").cuda().eval()
    assert merged.dtype == torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
    adapted = PeftModel.from_pretrained(base, run.path / "final").eval()
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000, 7]], device="cuda")
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits.float(), merged(input_ids=ids).logits.float()
    assert (got - want).abs().max().item() < 16 * torch.finfo(torch.bfloat16).eps * want.abs().max().item()
