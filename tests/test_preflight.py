"""`ftlab launch ... --preflight`: a tiny model of the recipe's architecture (its ratios kept, by hand for Qwen2.5-14B
and GPT-2), a real pre-flight of a LoRA recipe through the ddp profile on 2 gloo processes followed by the launch,
and a recipe whose seed differs per rank (each process then takes other examples) stopped in one line."""
from __future__ import annotations

import math
import re
import shlex
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from ftlab.cli import main
from tests.helpers import tiny_recipe

pytestmark = pytest.mark.timeout(300)
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the 2-process run is gloo on the CPU")
QWEN14B = Path(__file__).parents[1] / "src/ftlab/launch/model_configs/Qwen__Qwen2.5-14B-Instruct.json"


def test_the_tiny_model_keeps_the_architecture_and_its_ratios():
    """Qwen2.5-14B: 40 query heads over 8 key-value heads (groups of 5), head dim 128, intermediate 13824 / hidden
    5120 = 2.7. Tiny: one key-value head and its group of 5, head dim 16, hidden 5 x 16 = 80, intermediate 2.7 x 80
    = 216, 2 layers; the vocabulary, tied embeddings and rope base are the model's."""
    from transformers import AutoConfig

    from ftlab.launch.preflight import tiny_fields
    from ftlab.models.memory import load_config

    qwen = load_config(str(QWEN14B))
    tiny = tiny_fields(qwen)
    assert tiny["model_type"] == "qwen2"
    assert (tiny["num_hidden_layers"], tiny["num_attention_heads"], tiny["num_key_value_heads"]) == (2, 5, 1)
    assert (tiny["hidden_size"], tiny["intermediate_size"]) == (80, 216)
    assert tiny["intermediate_size"] / tiny["hidden_size"] == qwen.intermediate_size / qwen.hidden_size
    assert (tiny["vocab_size"], tiny["tie_word_embeddings"]) == (152064, False)
    assert AutoConfig.for_model(**tiny).rope_parameters["rope_theta"] == 1000000.0
    assert tiny["attention_dropout"] == 0.0

    # GPT-2 names its sizes n_embd, n_head, n_layer (attribute_map); every head is its own key-value head
    gpt2 = tiny_fields(AutoConfig.for_model("gpt2", resid_pdrop=0.1))
    assert (gpt2["n_layer"], gpt2["n_head"], gpt2["n_embd"], gpt2["resid_pdrop"]) == (2, 4, 64, 0.0)
    assert "hidden_size" not in gpt2 and "num_key_value_heads" not in gpt2


def preflight(capsys, recipe: Path, *args: str) -> tuple[int, str, str, list[dict]]:
    code = main(["launch", str(recipe), "--profile", "ddp", "--gpus", "2", "--preflight", *args])
    out, err = capsys.readouterr()
    rows = [dict(zip(("check", "step", "difference", "tolerance", "result"), m.groups()))
            for m in re.finditer(r"^  (\S.*?)\s{2,}(\d+|end)\s+(\S+)\s+(\S+)\s+(ok|FAILED.*)$", err, re.MULTILINE)]
    return code, out, err, rows


@cpu_only
def test_a_passing_preflight_of_a_lora_recipe_then_the_launch(tmp_path, capsys, monkeypatch):
    """Tolerance of a step by hand: fp32, at most global batch 8 x max_length 64 = 512 tokens,
    8 x (eps / sqrt(512) + eps x sqrt(512)) x step."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    recipe = tiny_recipe(tmp_path, lora={"enabled": True})
    code, out, err, rows = preflight(capsys, recipe, "--dry-run")
    assert code == 0, err
    checks = {r["check"]: r for r in rows}
    assert sorted(checks) == sorted([
        "loss, 1 vs 2 processes", "gradient norm, 1 vs 2 processes",
        "logits: live vs saved, reloaded (adapter on its base)", "logits: live vs merged/, reloaded",
        "logits: trained vs untrained (must differ)",
        "loss, resumed at step 2 vs not", "gradient norm, resumed at step 2 vs not"]), err
    assert all(r["result"] == "ok" for r in rows)
    assert all((float(r["difference"]) <= float(r["tolerance"])) != r["check"].endswith("(must differ)") for r in rows)
    # fp32 weights computing in fp32: the logits agree to 8 units in the last place of the largest one
    merged = checks["logits: live vs merged/, reloaded"]
    assert float(merged["tolerance"]) == pytest.approx(8 * torch.finfo(torch.float32).eps, rel=1e-2)
    eps = torch.finfo(torch.float32).eps
    for name in ("loss, 1 vs 2 processes", "loss, resumed at step 2 vs not"):
        step = int(checks[name]["step"])
        assert float(checks[name]["tolerance"]) == pytest.approx(8 * (eps / 512 ** 0.5 + eps * 512 ** 0.5) * step,
                                                                 rel=1e-2)
    assert checks["loss, resumed at step 2 vs not"]["step"] == "3"
    assert "global batch 8 (2 per process)" in err and "2 layers, hidden 32, 4 heads / 2 key-value" in err
    # the launch proceeds as it would have without the pre-flight, and the pre-flight leaves nothing behind
    assert shlex.split(out) == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                "-m", "ftlab.cli", "train", str(recipe)]
    assert not list(scratch.glob("ftlab-preflight-*")) and not (tmp_path / "runs" / "sft").exists()


@cpu_only
def test_a_seed_per_rank_fails_the_preflight_and_nothing_is_launched(tmp_path, capsys):
    """`seed: ${oc.env:RANK,0}` gives rank 1 seed 1: it takes its share of another shuffle, so the 2-process step
    trains on other examples than the 1-process step, from step 1 on. No --dry-run: a passing pre-flight would
    launch the real run."""
    recipe = tiny_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["seed"] = "${oc.env:RANK,0}"
    recipe.write_text(yaml.safe_dump(data))
    code, out, err, rows = preflight(capsys, recipe)
    errors = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    # the first failing row of the table, at step 1, is the one line; the gradient norms differ by percents
    failed = [r for r in rows if r["result"].startswith("FAILED")]
    assert failed and failed[0]["step"] == "1" and "gradient norm, 1 vs 2 processes" in [r["check"] for r in failed]
    assert errors[0].startswith(f"ftlab: error: pre-flight failed: {failed[0]['check']}, step 1: ")
    assert errors[0].endswith("; nothing launched")
    difference, tolerance = map(float, re.search(r"relative difference (\S+), tolerance (\S+);", errors[0]).groups())
    assert difference > tolerance
    assert math.isclose(float(failed[0]["difference"]), difference, rel_tol=1e-2)
    assert out == "" and not (tmp_path / "runs" / "sft").exists()
