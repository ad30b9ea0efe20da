"""DeepSpeed ZeRO-3 and LoRA: the saved adapter holds every LoRA weight, equal to the weights gathered from the
partitions (peers' users found 40-byte adapters: ZeRO-3 leaves each process an empty placeholder per weight, and
a save that does not gather writes those).

ZeRO-3 partitions the weights also at one process, so one GPU already tests the gather; two are used where
present. The trained model is seen through `worker` (this file run under `accelerate launch`): after training it
gathers the LoRA weights with DeepSpeed's own `GatheredParameters` (not the loop's save path) and records the
live model's logits on a probe; both are compared with final/ loaded by peft.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ftlab.runs.trackers import read_metrics
from tests.helpers import TINY_SCRATCH, tiny_recipe

LIVE = "zero3_live.pt"  # written into the run directory by `worker`
PROBE = [[1, 450, 2933, 310, 278, 1353, 338, 263, 1243, 29889]]


def worker(recipe: str, *overrides: str) -> None:
    """Train as `ftlab train` does under ZeRO-3, keep the engine, and save its gathered LoRA weights and logits."""
    import deepspeed

    from ftlab.config import load_recipe
    from ftlab.launch.preflight import KeepsLoop
    from ftlab.train.loop import train
    from ftlab.train.sft import build_objective

    kept: list[KeepsLoop] = []

    def keep(cfg: Any, tokenizer: Any, rank: int, world: int) -> KeepsLoop:
        kept.append(KeepsLoop(build_objective(cfg, tokenizer, rank, world)))
        return kept[-1]

    train(load_recipe(recipe, list(overrides)), keep, keep_model=True)
    loop = kept[0].loop
    lora = [(n, p) for n, p in loop.accelerator.unwrap_model(loop.model).named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in lora]):  # every rank joins; whole weights inside
        gathered = {n: p.detach().float().cpu().clone() for n, p in lora}
    loop.model.eval()
    with torch.no_grad():  # every rank runs the forward: ZeRO-3 gathers each layer's weights for it
        logits = loop.model(input_ids=torch.tensor(PROBE, device=loop.device)).logits.float().cpu()
    if loop.rank == 0:
        torch.save({"logits": logits, "trained": gathered}, loop.run_path / LIVE)


def test_zero3_lora_adapter_is_whole_and_equals_the_gathered_weights(tmp_path: Path, embedded_tokenizer: Any):
    pytest.importorskip("deepspeed")
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ftlab.config import load_recipe
    from ftlab.launch.launcher import accelerate_flags, load_profile, write_accelerate_config
    from ftlab.models.load import build_scratch_model

    torch.manual_seed(0)
    build_scratch_model(dict(TINY_SCRATCH), embedded_tokenizer).save_pretrained(tmp_path / "base")
    embedded_tokenizer.save_pretrained(tmp_path / "base")
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    recipe = tiny_recipe(tmp_path, model={"name": str(tmp_path / "base"), "scratch": None}, lora=lora,
                         optim={"lr": 1e-2}, train={"max_steps": 2, "batch_size": 2})
    processes = min(2, torch.cuda.device_count())
    profile = load_profile("zero3")
    config = write_accelerate_config(profile, load_recipe(recipe, []))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *accelerate_flags(profile, config, processes, 1, None),
           "-m", "tests.gpu.test_zero3_adapter", str(recipe), "name=zero3"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2],
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "sft").glob("*_zero3")
    assert [r["train_step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r] == [1, 2]

    live = torch.load(run / LIVE, weights_only=True)
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    # every LoRA weight, nothing else: A and B of 2 modules in each layer (peft drops the adapter's name)
    assert len(adapter) == len(live["trained"]) == 2 * 2 * TINY_SCRATCH["num_hidden_layers"]
    for name, weight in live["trained"].items():
        saved = adapter[name.replace(".default", "")]
        assert saved.numel() > 0 and saved.shape == weight.shape, name  # not ZeRO-3's empty placeholder
        assert torch.equal(saved.float(), weight), name
    assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # B starts at 0: it trained

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        tuned = PeftModel.from_pretrained(base, run / "final").eval()(input_ids=torch.tensor(PROBE).cuda()).logits
    # the same weights on the same GPU; the kernels may tile the 32-term dot products differently
    scale = float(live["logits"].abs().max())
    torch.testing.assert_close(tuned.float().cpu(), live["logits"], rtol=0, atol=1e-5 * scale)


if __name__ == "__main__":  # under accelerate launch: ... -m tests.gpu.test_zero3_adapter RECIPE [overrides]
    worker(*sys.argv[1:])
