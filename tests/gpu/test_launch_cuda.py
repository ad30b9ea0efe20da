"""`ftlab launch` on a CUDA machine: more GPUs than present is one line; the zero2 profile on one GPU trains what
the single profile trains at the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ftlab.cli import main
from ftlab.runs.trackers import read_metrics
from tests.helpers import tiny_recipe


def test_more_gpus_than_present_is_one_line(tmp_path, capsys):
    present = torch.cuda.device_count()
    code = main(["launch", str(tiny_recipe(tmp_path)), "--profile", "ddp", "--gpus", str(present + 1)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    assert code == 2 and len(lines) == 1, err
    assert f"--gpus {present + 1} but this machine has {present} CUDA GPU(s)" in lines[0]
    assert not (tmp_path / "runs" / "sft").exists()


def launch(recipe, profile: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ftlab.cli", "launch", str(recipe), "--profile", profile, "--gpus", "1", *overrides]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, env=dict(os.environ))


def test_zero2_on_one_gpu_matches_the_single_profile_at_the_same_global_batch(tmp_path):
    """Global batch 8: the single profile takes batch 8 x accumulation 1, zero2 batch 2 x accumulation 4."""
    pytest.importorskip("deepspeed")
    recipe = tiny_recipe(tmp_path, data={"group_by_length": False})
    common = ["train.max_steps=3", "train.grad_clip=1000", "train.global_batch=8"]
    for profile, name, batch in (("single", "plain", 8), ("zero2", "ds", 2)):
        proc = launch(recipe, profile, f"name={name}", f"train.batch_size={batch}", *common)
        assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {name: [r["train/loss"] for r in read_metrics(next((tmp_path / "runs" / "sft").glob(f"*_{name}"))
                                                           / "metrics.jsonl") if "train/loss" in r]
              for name in ("plain", "ds")}
    assert len(losses["plain"]) == 3
    assert losses["ds"] == pytest.approx(losses["plain"], rel=1e-4)
