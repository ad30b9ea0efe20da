"""GPU telemetry in the training metrics (ftlab.train.telemetry) on a real CUDA device."""
from __future__ import annotations

import shutil

import torch

from ftlab.config import load_recipe
from ftlab.runs.trackers import read_metrics
from ftlab.train.telemetry import GiB, gpu_metrics
from tests.helpers import tiny_recipe


def test_memory_figures_follow_what_is_allocated():
    device = torch.device("cuda")
    before = gpu_metrics(device)
    block = torch.empty(256 * 1024 ** 2, dtype=torch.uint8, device=device)  # 0.25 GiB
    now = gpu_metrics(device)
    assert now["gpu/mem_allocated_gib"] - before["gpu/mem_allocated_gib"] >= 0.25 - 1e-6
    assert now["gpu/mem_peak_gib"] >= now["gpu/mem_allocated_gib"]
    assert now["gpu/mem_reserved_gib"] >= now["gpu/mem_allocated_gib"]
    del block
    after = gpu_metrics(device)
    assert after["gpu/mem_allocated_gib"] < now["gpu/mem_allocated_gib"]
    assert after["gpu/mem_peak_gib"] >= now["gpu/mem_allocated_gib"] - 1 / GiB  # the peak is never reset here


def test_utilisation_where_nvml_or_nvidia_smi_is_there():
    util = gpu_metrics(torch.device("cuda")).get("gpu/util_pct")
    try:
        import pynvml  # noqa: F401

        have_reader = True
    except ImportError:
        have_reader = shutil.which("nvidia-smi") is not None
    assert (util is not None) == have_reader
    if util is not None:
        assert 0 <= util <= 100


def test_training_logs_gpu_memory_per_step(tmp_path):
    from ftlab.train import run_training

    run = run_training(load_recipe(tiny_recipe(tmp_path, train={"max_steps": 3})))
    steps = [r for r in read_metrics(run.path / "metrics.jsonl") if "train/loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["train/gpu/mem_peak_gib"] >= r["train/gpu/mem_allocated_gib"] > 0
        assert "train/tokens_per_s" in r
