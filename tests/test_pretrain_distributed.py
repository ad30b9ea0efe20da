"""Pretraining with 2 real processes (torchrun, gloo on CPU) equals 1 process with the same global batch:
the same windows per step (split across ranks), the same losses, gradient norms, parameter norms and
validation numbers; throughput and MFU are counted over both processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.config import load_recipe
from ftlab.runs.trackers import read_metrics
from tests.pretrain_helpers import make_corpus, pretrain_recipe

pytestmark = pytest.mark.timeout(600)


def named(tmp: Path, name: str) -> Path:
    found = sorted((tmp / "runs" / "pretrain").glob(f"*_{name}"))
    assert len(found) == 1, found
    return found[0]


def by_step(run: Path, axis: str) -> dict[int, dict]:
    return {r[f"{axis}_step"]: r for r in read_metrics(run / "metrics.jsonl") if f"{axis}/loss" in r}


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    from ftlab.train import run_training

    corpus = make_corpus(tmp_path)
    recipe = pretrain_recipe(tmp_path, corpus, train={"max_steps": 4, "eval_every": 2, "grad_clip": 1000},
                             pretrain={"peak_tflops": 1.0, "val_windows": 7, "num_categories": 2})
    one = run_training(load_recipe(recipe, ["name=one", "train.batch_size=4", "train.grad_accum=2"])).path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ftlab.cli",
           "train", str(recipe), "name=two", "train.batch_size=2", "train.grad_accum=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = named(tmp_path, "two")
    for axis, keys in (("train", ("loss", "grad_norm", "param_norm", "bits_per_byte", "bytes_per_token")),
                       ("eval", ("loss", "bits_per_byte"))):
        a, b = by_step(one, axis), by_step(two, axis)
        assert sorted(a) == sorted(b) and a
        for step in a:
            for key in keys:
                assert b[step][f"{axis}/{key}"] == pytest.approx(a[step][f"{axis}/{key}"], rel=1e-5), (axis, step, key)
    a, b = by_step(one, "train"), by_step(two, "train")
    assert all(b[s]["train/predicted_tokens"] == a[s]["train/predicted_tokens"] == 8 * 16 for s in a)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2
    last = b[4]  # MFU: the loop's global tokens/s against both processes' peak
    assert last["train/mfu"] == pytest.approx(last["train/step_tokens_per_s"] * summary["model_size"]["flops_per_token"]
                                              / (2 * 1e12))
    assert json.loads((two / "categories.json").read_text()) == json.loads((one / "categories.json").read_text())
    # one process replays a step of the two-process run: the same windows (all of both ranks), the same loss
    from ftlab.train.forensics import replay

    report = replay(str(two), 3)
    assert report["outcome"] == "finite" and len(report["windows"]) == 8
    assert report["loss"] == pytest.approx(report["logged_loss"], rel=1e-5)
    assert report["grad_norm"] == pytest.approx(report["logged_grad_norm"], rel=1e-5)
