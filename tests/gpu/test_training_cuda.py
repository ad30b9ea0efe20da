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
def test_8bit_and_paged_adamw_train(tmp_path, name):
    pytest.importorskip("bitsandbytes")
    run = train(tiny_recipe(tmp_path), f"optim.name={name}", "train.max_steps=12", "optim.lr=3e-3",
                "schedule.name=constant")
    losses = train_losses(run.path)
    assert losses[-1] < losses[0]


def test_fp16_with_the_scaler_on_cuda(tmp_path):
    run = train(tiny_recipe(tmp_path), "train.precision=fp16", "train.fp16_init_scale=1e9", "train.max_steps=20",
                "optim.lr=3e-3", "schedule.name=constant")
    rows = [r for r in read_metrics(run.path / "metrics.jsonl") if "train/loss" in r]
    assert rows[0]["train/overflow_skipped"] and not rows[-1]["train/overflow_skipped"]
    assert read_status(run.path) == "complete"


def test_in_training_evaluation_runs_on_the_gpu(tmp_path):
    rows = [{"question": f"Tom has {a} apples and gets {b} more. How many?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(tmp_path, data={"task": "gsm8k", "train": str(data), "val": str(data), "val_limit": 4,
                                         "max_length": 128})
    run = train(recipe, "train.max_steps=2", "train.eval_every=2", "train.log_generations_every=2",
                "eval.max_new_tokens=4")
    evals = [r for r in read_metrics(run.path / "metrics.jsonl") if "eval/accuracy" in r]
    assert evals and (run.path / "generations" / "step_000002.jsonl").is_file()


def test_detached_prompt_training_on_cuda_has_the_full_forwards_first_loss(tmp_path):
    """train.detach_prompt builds its prompt/response tensors and KV cache on the model's device."""
    recipe = tiny_recipe(tmp_path, data={"group_by_length": False})
    common = ["train.max_steps=3", "train.grad_clip=1000"]
    detached = train_losses(train(recipe, "name=detached", "train.detach_prompt=true", *common).path)
    full = train_losses(train(recipe, "name=full", *common).path)
    assert len(detached) == 3 and all(map(torch.isfinite, torch.tensor(detached)))
    assert detached[0] == pytest.approx(full[0], rel=1e-4)


def test_deepspeed_zero2_one_gpu_matches_a_plain_big_batch(tmp_path):
    pytest.importorskip("deepspeed")
    recipe = tiny_recipe(tmp_path, data={"group_by_length": False})
    config = tmp_path / "zero2.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                      "deepspeed_config: {zero_stage: 2, offload_optimizer_device: none, offload_param_device: none}\n"
                      "mixed_precision: 'no'\nnum_machines: 1\nnum_processes: 1\n")
    common = ["train.max_steps=3", "train.grad_clip=1000"]
    plain = train(recipe, "name=plain", "train.batch_size=8", *common)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "ftlab.cli",
           "train", str(recipe), "name=ds", "train.batch_size=2", "train.grad_accum=4", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = next((tmp_path / "runs" / "sft").glob("*_ds"))
    assert train_losses(ds) == pytest.approx(train_losses(plain.path), rel=1e-4)
