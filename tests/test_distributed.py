"""Real multi-process training: 2 processes through torchrun with the gloo backend on CPU.

The invariant: with the same global batch, 2 processes log the same per-step loss and gradient norm as
1 process (the loss is normalised by the step's supervised tokens over all processes, and logged values
are reduced), also when the last batch is uneven (a rank with nothing to do runs an all-masked
micro-batch instead of leaving the others waiting), when one rank meets a non-finite loss, when
max_minutes stops the run, and across a resume.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.runs.rundir import read_status
from ftlab.runs.trackers import read_metrics
from tests.helpers import DEEPSPEED_ZERO2_CPU, TINY_SCRATCH, tiny_recipe, write_addition_data

pytestmark = pytest.mark.timeout(600)


def torchrun(recipe: Path, *overrides: str, procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "ftlab.cli", "train", str(recipe), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env)


def single(recipe: Path, *overrides: str) -> Path:
    from ftlab.config import load_recipe
    from ftlab.train import run_training

    return run_training(load_recipe(recipe, list(overrides))).path


def run_named(tmp: Path, name: str) -> Path:
    found = sorted((tmp / "runs" / "sft").glob(f"*_{name}"))
    assert len(found) == 1, found
    return found[0]


def train_rows(run: Path) -> dict[int, dict]:
    return {r["train_step"]: r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}


def assert_same_steps(a: dict[int, dict], b: dict[int, dict], keys=("train/loss", "train/grad_norm")) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        for key in keys:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
        assert b[step]["train/supervised_tokens"] == a[step]["train/supervised_tokens"]


@pytest.mark.parametrize("detach", [False, True], ids=["full-gradient", "detached-prompt"])
def test_two_processes_match_one_with_an_uneven_last_batch(tmp_path, detach):
    """33 examples, global batch 8: the 5th step has one example, so rank 1 has nothing to do (with the
    prompt-detached loss too: its all-masked micro-batch must still reach every gradient hook)."""
    write_addition_data(tmp_path / "train.jsonl", n=33)
    recipe = tiny_recipe(tmp_path, data={"group_by_length": False}, train={"max_steps": None, "epochs": 1})
    common = ["train.grad_clip=1000", "schedule.name=constant", f"train.detach_prompt={str(detach).lower()}"]
    one = single(recipe, "name=one", "train.batch_size=8", *common)
    proc = torchrun(recipe, "name=two", "train.batch_size=4", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = run_named(tmp_path, "two")
    a, b = train_rows(one), train_rows(two)
    assert len(a) == 5 and a[5]["train/supervised_tokens"] < a[4]["train/supervised_tokens"]
    assert_same_steps(a, b)
    # throughput and tokens are global: the 2-process run counts both ranks' tokens
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert read_status(two) == "complete"


def test_two_processes_with_accumulation_match_one_big_batch(tmp_path):
    recipe = tiny_recipe(tmp_path, data={"group_by_length": False})
    common = ["train.grad_clip=1000", "train.max_steps=3", "schedule.name=constant"]
    one = single(recipe, "name=one", "train.batch_size=8", "train.grad_accum=1", *common)
    proc = torchrun(recipe, "name=two", "train.batch_size=2", "train.grad_accum=2", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_steps(train_rows(one), train_rows(run_named(tmp_path, "two")))


def poisoned_model(tmp: Path, word: str) -> Path:
    """A tiny model whose embedding rows for `word`'s tokens are NaN: any batch holding it has a NaN loss."""
    from ftlab.models.load import EMBEDDED_MODEL, build_scratch_model, load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(EMBEDDED_MODEL))
    model = build_scratch_model(TINY_SCRATCH, tok)
    with_word = set(tok(f"What is {word}?", add_special_tokens=False).input_ids)
    without = set(tok("What is 1?", add_special_tokens=False).input_ids)
    rows = sorted(with_word - without)
    assert rows
    emb = model.get_input_embeddings().weight
    emb.data[rows] = float("nan")
    out = tmp / "poisoned"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    data = tmp_path / "train.jsonl"
    write_addition_data(data, n=31)
    with data.open("a") as f:  # one example whose tokens are poisoned
        f.write(json.dumps({"prompt": "What is zebra?", "response": "zebra is an animal."}) + "\n")
    model = poisoned_model(tmp_path, "zebra")
    recipe = tiny_recipe(tmp_path, model={"name": str(model), "scratch": None},
                         data={"group_by_length": False}, train={"max_steps": None, "epochs": 1})
    common = ["train.nan_policy=skip", "train.save_final=false", "train.grad_clip=1000",
              "schedule.name=constant"]
    one = single(recipe, "name=one", "train.batch_size=8", *common)
    proc = torchrun(recipe, "name=two", "train.batch_size=4", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = run_named(tmp_path, "two")
    a, b = train_rows(one), train_rows(two)
    assert len(a) == 3  # 4 steps, one skipped
    assert_same_steps(a, b)
    dumps = list((two / "nonfinite").glob("step_*_rank*.pt"))
    assert len(dumps) == 1  # only the rank that held the poisoned example saw the NaN
    assert read_status(two) == "complete"


def test_max_minutes_stops_every_rank_at_the_same_step(tmp_path):
    recipe = tiny_recipe(tmp_path)
    proc = torchrun(recipe, "name=two", "train.max_steps=50", "train.max_minutes=0.0001", "train.batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_named(tmp_path, "two")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 1
    assert sorted(train_rows(run)) == [1]


def test_resume_of_a_two_process_run_replays_the_same_losses(tmp_path):
    recipe = tiny_recipe(tmp_path, lora={"enabled": True, "r": 4, "dropout": 0.1,
                                         "target_modules": ["q_proj", "v_proj"]})
    steps = ["train.max_steps=6", "train.save_every=2", "train.keep_last=5", "train.batch_size=2"]
    proc = torchrun(recipe, "name=ref", *steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = run_named(tmp_path, "ref")
    ckpt = ref / "checkpoints" / "step_000004"
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    proc = torchrun(recipe, "name=resumed", f"train.resume={ckpt}", *steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = train_rows(ref), train_rows(run_named(tmp_path, "resumed"))
    assert sorted(b) == [5, 6]
    for step in b:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-6)
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-6)


@pytest.mark.skipif(not __import__("importlib.util").util.find_spec("deepspeed"), reason="needs deepspeed")
def test_deepspeed_zero2_accumulates_like_one_big_batch(tmp_path):
    """DeepSpeed steps once per optimizer step (not once per micro-batch), clips once, and starts
    without a dataloader in prepare(). One process: on CPU, accelerate forms no process group under
    DeepSpeed, so 2-process ZeRO runs only on GPUs (tests/gpu)."""
    recipe = tiny_recipe(tmp_path, data={"group_by_length": False})
    config = tmp_path / "zero2.yaml"
    config.write_text(DEEPSPEED_ZERO2_CPU)
    common = ["train.max_steps=3", "train.grad_clip=1000"]
    plain = single(recipe, "name=plain", "train.batch_size=8", "train.grad_accum=1", *common)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "ftlab.cli",
           "train", str(recipe), "name=ds", "train.batch_size=2", "train.grad_accum=4", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=580,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = run_named(tmp_path, "ds")
    assert json.loads((ds / "summary.json").read_text())["distributed"] == "DEEPSPEED"
    a, b = train_rows(plain), train_rows(ds)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:  # one optimizer step per step: the lr schedule and the losses agree
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-6)
        assert b[step]["train/lr"] == pytest.approx(a[step]["train/lr"])
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-4)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is about CPU machines")
@pytest.mark.parametrize("launch, needle", [
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 2}\nnum_processes: 2\n", "FSDP launches are not supported"),
    (DEEPSPEED_ZERO2_CPU.replace("num_processes: 1", "num_processes: 2"), "DeepSpeed with several processes"),
], ids=["fsdp", "deepspeed-2-procs-on-cpu"])
def test_launches_that_would_silently_change_are_refused(tmp_path, launch, needle):
    """Without this, FSDP on CPU ran as plain DDP and 2 DeepSpeed processes each trained alone (measured)."""
    recipe = tiny_recipe(tmp_path)
    config = tmp_path / "launch.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\nmixed_precision: 'no'\nnum_machines: 1\n" + launch
                      if "compute_environment" not in launch else launch)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "ftlab.cli",
           "train", str(recipe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and needle in proc.stderr
    assert not list((tmp_path / "runs").glob("sft/*/summary.json"))


def test_validation_loss_and_accuracy_are_split_across_processes_and_agree(tmp_path):
    """eval/loss and the task's accuracy: each process takes a share of the validation rows, the sums and
    rows are gathered, and the numbers equal one process's (greedy decoding of the same weights)."""
    rows = [{"question": f"Tom has {a} apples and gets {b} more. How many?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1), (4, 4), (6, 3), (5, 5)]]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(tmp_path, data={"task": "gsm8k", "train": str(data), "val": str(data), "val_limit": 9,
                                         "max_length": 128, "group_by_length": False})
    common = ["train.max_steps=2", "train.eval_every=2", "eval.max_new_tokens=6", "train.grad_clip=1000"]
    one = single(recipe, "name=one", "train.batch_size=4", *common)
    proc = torchrun(recipe, "name=two", "train.batch_size=2", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [[r for r in read_metrics(run / "metrics.jsonl") if "eval/loss" in r][-1]
             for run in (one, run_named(tmp_path, "two"))]
    assert evals[1]["eval/loss"] == pytest.approx(evals[0]["eval/loss"], rel=1e-5)
    for key in ("eval/accuracy", "eval/accuracy_strict", "eval/parse_rate"):
        assert evals[1][key] == evals[0][key], key
