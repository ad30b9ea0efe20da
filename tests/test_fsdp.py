"""FSDP2 (train.sharding=fsdp2, torch fully_shard) on 2 CPU processes with gloo, through torchrun.

What must hold: the sharded run computes what one process computes at the same global batch (per-step loss and
gradient norm, with the gradients clipped on the shards), a run resumed from a sharded (DCP) checkpoint
continues exactly, and final/ is what the trained sharded model is: a plain HF model, or a PEFT adapter of only
the LoRA weights, equal to the weights gathered from the shards and giving the same logits.

The trained sharded model is seen through `worker` (this file run under torchrun): after training it saves, from
the live sharded model, its logits on a probe (every rank joins the forward) and its gathered trainable weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ftlab.cli import main
from ftlab.runs.trackers import read_metrics
from tests.helpers import TINY_SCRATCH, tiny_recipe

pytestmark = pytest.mark.timeout(600)

LIVE = "fsdp_live.pt"  # written into the run directory by `worker`
PROBE = [[1, 450, 2933, 310, 278, 1353, 338, 263, 1243, 29889]]
# A global batch of 8: one process x batch 8, or 2 processes x batch 2 x accumulation 2 (no_sync at work).
ONE = ["train.batch_size=8", "train.grad_accum=1"]
TWO = ["train.batch_size=2", "train.grad_accum=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- the processes -----------------------------------------------------------------------------------------
def worker(recipe: str, *overrides: str) -> None:
    """Train as `ftlab train` does, keep the sharded model, and save what it computes (see the module docstring)."""
    from ftlab.config import load_recipe
    from ftlab.launch.preflight import KeepsLoop
    from ftlab.train import fsdp
    from ftlab.train.loop import train
    from ftlab.train.sft import build_objective

    kept: list[KeepsLoop] = []

    def keep(cfg: Any, tokenizer: Any, rank: int, world: int) -> KeepsLoop:
        kept.append(KeepsLoop(build_objective(cfg, tokenizer, rank, world)))
        return kept[-1]

    train(load_recipe(recipe, list(overrides)), keep, keep_model=True)
    loop = kept[0].loop
    loop.model.eval()
    with torch.no_grad():
        logits = loop.model(input_ids=torch.tensor(PROBE)).logits
    gathered = fsdp.gathered_state_dict(loop.model)
    if loop.rank == 0:
        torch.save({"logits": logits, "trained": fsdp.trainable_state_dict(loop.model, gathered)},
                   loop.run_path / LIVE)


def torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=500, env=ENV,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_worker(recipe: Path, *overrides: str) -> Path:
    torchrun("-m", "tests.test_fsdp", str(recipe), "train.sharding=fsdp2", *overrides)
    return run_named(recipe.parent, next(o for o in overrides if o.startswith("name=")).removeprefix("name="))


def single(recipe: Path, *overrides: str) -> Path:
    from ftlab.config import load_recipe
    from ftlab.train import run_training

    return run_training(load_recipe(recipe, list(overrides))).path


def run_named(tmp: Path, name: str) -> Path:
    (run,) = (tmp / "runs" / "sft").glob(f"*_{name}")
    return run


def train_rows(run: Path) -> dict[int, dict]:
    return {r["train_step"]: r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}


def assert_logits_equal(got: torch.Tensor, live: torch.Tensor) -> None:
    # The same weights and the same kernels: equal up to the rounding of fp32 dot products over the hidden size
    # (32 terms), relative to the largest logit; in practice they are bit for bit equal.
    scale = float(live.abs().max())
    torch.testing.assert_close(got.float(), live.float(), rtol=0, atol=1e-7 * 32 ** 0.5 * scale)


# -- full fine-tuning ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_run(tmp_path_factory: Any) -> Path:
    """4 steps of full fine-tuning on 2 processes, a sharded checkpoint at step 2."""
    tmp = tmp_path_factory.mktemp("fsdp_full")
    return run_worker(tiny_recipe(tmp), "name=fsdp", "train.save_every=2", *TWO)


def test_fsdp2_steps_equal_one_process_at_the_same_global_batch(full_run: Path):
    one = single(full_run.parents[2] / "recipe.yaml", "name=one", *ONE)
    a, b = train_rows(one), train_rows(full_run)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert json.loads((full_run / "summary.json").read_text())["distributed"] == "FSDP2"
    for step in a:
        # The loss sums ~100 token terms per micro-batch in another order: fp32 rounding, ~1e-7 relative.
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-6), step
        # The norm sums the squares of 1.6M fp32 gradient entries (the embedding and head), per shard on 2 ranks:
        # measured, one process's own fp32 norm is 2e-5 off the float64 norm, so two orders may differ by 4e-5.
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-4), step
        assert b[step]["train/supervised_tokens"] == a[step]["train/supervised_tokens"]
        # grad_clip=1 is below every norm: the clipping on the shards is in the equal losses after step 1
        assert a[step]["train/grad_norm"] > 1.0


def test_fsdp2_final_model_is_the_trained_sharded_model(full_run: Path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    live = torch.load(full_run / LIVE, weights_only=True)
    saved = load_file(full_run / "final" / "model.safetensors")
    # every weight trains in full fine-tuning: 9 per layer, the embeddings, the final norm and the (untied) head
    assert set(saved) == set(live["trained"]) and len(saved) == 9 * TINY_SCRATCH["num_hidden_layers"] + 3
    for name, weight in live["trained"].items():
        assert torch.equal(saved[name], weight), name
    model = AutoModelForCausalLM.from_pretrained(full_run / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_logits_equal(model(input_ids=torch.tensor(PROBE)).logits, live["logits"])
    # the checkpoint is sharded: each rank's part of the weights and optimizer state, no HF export in it
    ckpt = full_run / "checkpoints" / "step_000002"
    assert sorted(p.suffix for p in (ckpt / "dcp").iterdir()) == ["", ".distcp", ".distcp"]  # .metadata + 2 shards
    assert not (ckpt / "model").exists() and not (ckpt / "optimizer.pt").exists()


def test_launch_profile_fsdp2_resumes_a_sharded_checkpoint_exactly(full_run: Path, capsys):
    recipe = full_run.parents[2] / "recipe.yaml"
    resume = ["name=resumed", f"train.resume={full_run / 'checkpoints' / 'step_000002'}", *TWO]
    assert main(["launch", str(recipe), "--profile", "fsdp2", "--gpus", "2", *resume, "--dry-run"]) == 0
    command = capsys.readouterr().out
    assert "torch.distributed.run" in command and command.rstrip().endswith("train.sharding=fsdp2")
    assert main(["launch", str(recipe), "--profile", "fsdp2", "--gpus", "2", *resume]) == 0
    a, b = train_rows(full_run), train_rows(run_named(recipe.parent, "resumed"))
    assert sorted(b) == [3, 4]
    for step in b:  # the same computation from the same state, in the same order: bit for bit
        for key in ("train/loss", "train/grad_norm"):
            assert b[step][key] == a[step][key], (step, key)


def test_a_sharded_checkpoint_is_not_resumed_without_sharding(full_run: Path, capsys):
    ckpt = full_run / "checkpoints" / "step_000002"
    assert main(["train", str(full_run.parents[2] / "recipe.yaml"), "name=unsharded", f"train.resume={ckpt}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: error:")]
    assert len(lines) == 1 and "was written with train.sharding=fsdp2, this run has train.sharding=none" in lines[0]
    assert not list((full_run.parent).glob("*_unsharded"))


# -- LoRA ----------------------------------------------------------------------------------------------------
def test_fsdp2_lora_matches_one_process_and_saves_the_gathered_adapter(tmp_path: Path, embedded_tokenizer: Any):
    """The peers' 40-byte adapter: here the adapter holds every LoRA weight, equal to the gathered shards."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ftlab.models.load import build_scratch_model

    torch.manual_seed(0)
    base = build_scratch_model(dict(TINY_SCRATCH), embedded_tokenizer)
    base.save_pretrained(tmp_path / "base")
    embedded_tokenizer.save_pretrained(tmp_path / "base")
    # dropout off: its masks are drawn per process, so 1 and 2 processes could not agree with it on
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    recipe = tiny_recipe(tmp_path, model={"name": str(tmp_path / "base"), "scratch": None}, lora=lora,
                         optim={"lr": 1e-2}, train={"max_steps": 3})
    one, run = single(recipe, "name=one", *ONE), run_worker(recipe, "name=lora", *TWO)
    a, b = train_rows(one), train_rows(run)
    for step in a:  # only 4 small matrices per layer train: their norm is a short fp32 sum
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-6), step
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-5), step

    live = torch.load(run / LIVE, weights_only=True)
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    # every LoRA weight, nothing else: A and B of 2 modules in each layer (peft drops the adapter's name)
    assert len(adapter) == len(live["trained"]) == 2 * 2 * TINY_SCRATCH["num_hidden_layers"]
    for name, weight in live["trained"].items():
        assert "lora_" in name and weight.numel() > 0
        assert torch.equal(adapter[name.replace(".default", "")], weight), name
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # B starts at 0: it trained

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        untuned = base(input_ids=torch.tensor(PROBE)).logits
        tuned = PeftModel.from_pretrained(base, run / "final").eval()(input_ids=torch.tensor(PROBE)).logits
    assert_logits_equal(tuned, live["logits"])
    assert not torch.allclose(untuned, live["logits"], atol=1e-3)  # the adapter matters to these logits


# -- what FSDP2 refuses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ("train.precision=fp16", "train.precision=fp16 under FSDP2"),
    ("train.method=dpo", "train.method=dpo: FSDP2 is wired for sft"),
    ("train.save_merged=true", "merge the saved adapter afterwards"),
])
def test_what_fsdp2_does_not_do_is_one_line(tmp_path: Path, capsys, override: str, needle: str):
    code = main(["train", str(tiny_recipe(tmp_path)), "train.sharding=fsdp2", override])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "runs").exists()


if __name__ == "__main__":  # under torchrun: python -m torch.distributed.run ... -m tests.test_fsdp RECIPE [overrides]
    worker(*sys.argv[1:])
