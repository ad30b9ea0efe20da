"""Small builders shared by tests: a tiny recipe on a scratch model and a generic JSONL dataset."""
from __future__ import annotations

import json
import random
from pathlib import Path

TINY_SCRATCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2}


# accelerate's launch file for DeepSpeed ZeRO-2 in one CPU process (on CPU accelerate forms no process group
# under DeepSpeed, so several ZeRO processes need GPUs: tests/gpu).
DEEPSPEED_ZERO2_CPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config: {zero_stage: 2, offload_optimizer_device: none, offload_param_device: none, zero3_init_flag: false}
mixed_precision: 'no'
num_machines: 1
num_processes: 1
use_cpu: false
"""


def write_addition_data(path: Path, n: int = 32, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            f.write(json.dumps({"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}) + "\n")
    return path


def tiny_recipe(tmp: Path, **sections) -> Path:
    """A YAML recipe training a tiny random Llama on generic data, with per-section overrides."""
    import yaml

    data = tmp / "train.jsonl"
    if not data.exists():
        write_addition_data(data)
    recipe = {
        "name": "tiny", "output_dir": str(tmp / "runs"), "seed": 0,
        "model": {"scratch": TINY_SCRATCH},
        "data": {"task": "generic", "train": str(data), "max_length": 64, "chat_template": False},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 1},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
