"""DeepSpeed ZeRO-2 through `accelerate launch`, one process on CPU (on CPU accelerate forms no process group
under DeepSpeed; several processes run in tests/gpu): saving without a full-model gather, and resuming past a
checkpoint that DeepSpeed cannot load."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.runs.trackers import read_metrics
from tests.helpers import DEEPSPEED_ZERO2_CPU, tiny_recipe

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(not __import__("importlib.util").util.find_spec("deepspeed"), reason="needs deepspeed")]

# Runs ftlab with accelerate's full-state-dict gather made to fail: under ZeRO-2 every rank holds the whole
# model, so a save must not copy it to CPU on every rank (28 GB per rank for a 14B model in bf16).
NO_GATHER = """\
import sys
from accelerate import Accelerator

def refuse(self, *args, **kwargs):
    raise AssertionError("full state dict gathered under ZeRO-2")

Accelerator.get_state_dict = refuse
from ftlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    config, script = tmp / "zero2.yaml", tmp / "no_gather.py"
    config.write_text(DEEPSPEED_ZERO2_CPU)
    script.write_text(NO_GATHER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=800, env={**os.environ, "OMP_NUM_THREADS": "1"})


def losses(run: Path) -> dict[int, float]:
    return {r["train_step"]: r["train/loss"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}


def test_zero2_saves_the_adapter_without_a_gather_and_resumes_past_a_checkpoint_it_cannot_load(tmp_path):
    from safetensors.torch import load_file

    recipe = tiny_recipe(tmp_path, lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]},
                         data={"group_by_length": False})
    steps = ["train.max_steps=6", "train.save_every=2", "train.keep_last=5", "optim.lr=1e-2"]
    proc = launch(tmp_path, "train", str(recipe), "name=ref", *steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = next((tmp_path / "runs" / "sft").glob("*_ref"))
    assert json.loads((ref / "summary.json").read_text())["distributed"] == "DEEPSPEED"
    for model_dir in (ref / "final", ref / "checkpoints" / "step_000004" / "model"):
        weights = load_file(model_dir / "adapter_model.safetensors")
        assert weights and all("lora_" in k for k in weights)
        assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # trained, not empty

    # A DeepSpeed checkpoint without its `latest` tag: DeepSpeed only warns and loads nothing, and the run
    # went on from fresh weights at step 4. It is damaged: fall back to step 2, and replay the same losses.
    (ref / "checkpoints" / "step_000004" / "deepspeed" / "latest").unlink()
    proc = launch(tmp_path, "train", str(recipe), "name=resumed", f"train.resume={ref}", *steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_000004 is damaged" in proc.stderr
    resumed = next((tmp_path / "runs" / "sft").glob("*_resumed"))
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"].endswith("step_000002")
    got, want = losses(resumed), losses(ref)
    assert sorted(got) == [3, 4, 5, 6]
    for step, value in got.items():
        assert value == pytest.approx(want[step], rel=1e-5), step
