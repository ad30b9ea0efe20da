"""`ftlab plan` (ftlab.launch.planner, ftlab.launch.throughput) and the CPU path of the loop's GPU telemetry."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ftlab.cli import main
from ftlab.config import load_recipe
from ftlab.launch import planner, throughput
from ftlab.launch.planner import build_plan, estimate_for_launch, shard_rows, sharding_of
from ftlab.launch.throughput import Gpu, GpuTable, ThroughputRow, flops_per_token, load_gpu_table, scale_measured
from ftlab.models.memory import architecture, estimate_memory
from ftlab.runs.trackers import read_metrics
from ftlab.train.telemetry import gpu_metrics
from helpers import TINY_SCRATCH, tiny_recipe, write_addition_data


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return tiny_recipe(tmp_path)


def tiny_matmul_params(cfg) -> tuple[int, int]:
    """(parameters of every Linear of the real, built model, LM head included; those of the LM head)."""
    from ftlab.models.load import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(cfg.model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(p.numel() for m in linears for p in m.parameters()), model.get_output_embeddings().weight.numel()


# -- the table -------------------------------------------------------------------------------------
def test_every_table_row_cites_a_source_and_uses_less_than_the_peak():
    table = load_gpu_table()
    assert {"a100-80gb", "h100-80gb", "h200"} <= set(table.gpus)
    for gpu in table.gpus.values():
        assert "http" in gpu.peak_source and gpu.price_source and gpu.usd_per_gpu_hour > 0
    for row in table.rows:
        assert "http" in row.source or "seed 004" in row.source, row
        # a measured run above the peak, or at a small fraction of it, would be a typo in the table
        assert 0.02 < row.utilisation(table.gpus[row.gpu].peak_tflops) < 0.7, row


def test_flops_per_token_count_what_each_method_runs():
    n = 1e9
    assert flops_per_token(n, "full", False) == 6 * n       # forward 2N + backward 4N
    assert flops_per_token(n, "lora", False) == 4 * n       # no weight gradients for the frozen base
    assert flops_per_token(n, "qlora", True) == 6 * n       # + one more forward under checkpointing
    assert flops_per_token(n, "full", True) == 8 * n


def test_nearest_row_matches_model_size_then_micro_batch():
    table = load_gpu_table()
    row = table.nearest("a100-80gb", "qlora", 14.77e9, 8 * 220)  # seed 004: 8 x ~220-token examples
    assert (row.params_b, row.micro_batch_tokens) == (14.2, 2048)
    row = table.nearest("a100-80gb", "lora", 1.5e9, 600)
    assert (row.params_b, row.micro_batch_tokens) == (1.8, 512)


# -- memory by profile -----------------------------------------------------------------------------
def test_profiles_shard_what_they_shard(tiny: Path):
    cfg = load_recipe(tiny)
    config, _ = planner.model_config(cfg)
    arch = architecture(config)
    rows = estimate_memory(arch, method="full").rows
    whole = {name: b for name, b, _ in rows}
    for sharding, divided in (("none", set()), ("zero1", {"optimizer states"}),
                              ("zero2", {"gradients", "optimizer states"}),
                              ("full", {"weights", "gradients", "optimizer states"})):
        got = {name: b for name, b, _ in shard_rows(rows, sharding, 4, arch.n_layers)}
        for name, b in whole.items():
            assert got[name] == pytest.approx(b / 4 if name in divided else b), (sharding, name)
        assert ("gathered layers" in got) == (sharding == "full")
    assert shard_rows(rows, "full", 1, arch.n_layers) == rows  # one process: nothing to shard over


def test_sharding_read_from_profile_files(tmp_path: Path):
    def profile(text: str) -> str:
        path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(text)
        return str(path)

    assert sharding_of(profile("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 2}\n")) == "zero2"
    assert sharding_of(profile("accelerate:\n  distributed_type: DEEPSPEED\n  deepspeed_config: {zero_stage: 3}\n")) \
        == "full"
    assert sharding_of(profile("accelerate: {distributed_type: FSDP}\n")) == "full"
    assert sharding_of(profile("distributed_type: MULTI_GPU\n")) == "none"
    assert sharding_of(profile("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 1}\n")) == "zero1"
    assert [sharding_of(p) for p in ("single", "ddp", "zero2", "zero3", "fsdp2")] == \
        ["none", "none", "zero2", "full", "full"]


# -- data, steps, time and cost --------------------------------------------------------------------
def test_examples_and_tokens_counted_from_local_data(tmp_path: Path):
    from ftlab.data.sources import load_conversations
    from ftlab.models.load import load_tokenizer, resolve_model_path
    from ftlab.train.sft import encode_conversations

    write_addition_data(tmp_path / "train.jsonl", n=37)
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write("\n")  # a blank line is not an example
    recipe = tiny_recipe(tmp_path, train={"max_steps": None, "epochs": 2, "batch_size": 4, "grad_accum": 2})
    cfg = load_recipe(recipe)
    plan = build_plan(cfg, "ddp", gpus=2)
    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    encoded = encode_conversations(load_conversations(cfg.data, cfg.data.train, "train", tok, None), tok,
                                   cfg.data.max_length)
    lengths = [len(e["input_ids"]) for e in encoded]
    v = plan.values
    assert v["global_batch"] == 4 * 2 * 2
    assert v["examples"] == 37
    assert v["mean_tokens"] == pytest.approx(sum(lengths) / 37)
    assert v["steps"] == math.ceil(2 * 37 / 16) == 5
    assert v["tokens"] == pytest.approx(2 * sum(lengths))
    assert v["supervised_share"] == pytest.approx(sum(sum(e["response_mask"]) for e in encoded) / sum(lengths))
    assert 0 < v["supervised_share"] < 1  # prompts carry no loss
    assert "hours" not in v  # no GPU type, no throughput: time is unknown, not guessed

    limited = build_plan(load_recipe(recipe, ["data.limit=10"]), "ddp", gpus=1, sample=5)
    assert limited.values["examples"] == 10
    assert limited.values["steps"] == math.ceil(2 * 10 / 8)


def test_time_and_cost_from_a_table_row(tiny: Path):
    cfg = load_recipe(tiny, ["train.max_steps=null", "train.global_batch=64"])
    n, head = tiny_matmul_params(cfg)
    gpu = Gpu("test-gpu", peak_tflops=100.0, memory_gib=16.0, usd_per_gpu_hour=2.0, peak_source="s", price_source="s")
    row = ThroughputRow("test-gpu", "full", params_b=n / 1e9, embedding_b=0.0, micro_batch_tokens=4 * 30,
                        tokens_per_s=5000.0, gradient_checkpointing=True, source="s")
    table = GpuTable({"test-gpu": gpu}, [row])
    plan = build_plan(cfg, "zero2", gpus=4, nodes=2, gpu_type="test-gpu", examples=1000, mean_tokens=30.0,
                      table=table)
    # the row's utilisation, 5000 x 8N / 100e12, applied to the recipe's own 6N (no checkpointing)
    tps = 5000 * 8 * n / 100e12 * 100e12 / (6 * n)
    hours = 1000 * 30 / (tps * 8) / 3600
    v = plan.values
    assert v["global_batch"] == 64 and v["steps"] == math.ceil(1000 / 64)
    assert v["tokens_per_s"] == pytest.approx(tps)
    assert v["hours"] == pytest.approx(hours)
    assert v["usd"] == pytest.approx(hours * 8 * 2.0)
    # the LM head runs on supervised tokens only: a quarter of them leaves 3/4 of its FLOPs out
    quarter = build_plan(cfg, "zero2", gpus=4, nodes=2, gpu_type="test-gpu", examples=1000, mean_tokens=30.0,
                         table=table, supervised_share=0.25)
    assert quarter.values["tokens_per_s"] == pytest.approx(tps * n / (n - 0.75 * head))
    given = build_plan(cfg, "ddp", gpus=1, gpu_type="test-gpu", examples=1000, mean_tokens=30.0, table=table,
                       tokens_per_s=100.0, usd_per_gpu_hour=3.0)
    assert given.values["hours"] == pytest.approx(1000 * 30 / 100 / 3600)
    assert given.values["usd"] == pytest.approx(given.values["hours"] * 3.0)


def test_measured_throughput_scales_by_flops_and_peak():
    gpu = Gpu("g", peak_tflops=300.0, memory_gib=80, usd_per_gpu_hour=1, peak_source="s", price_source="s")
    tps, u = scale_measured(1000.0, params_measured=1e8, device_tflops=2.0, gpu=gpu, params=1e9, method="lora",
                            checkpointing=False)
    assert u == pytest.approx(1000 * 4e8 / 2e12)
    assert tps == pytest.approx(1000 * (300 / 2) * (1e8 / 1e9))


def test_measure_trains_real_steps_here(tiny: Path):
    cfg = load_recipe(tiny, ["train.max_steps=null"])
    plan = build_plan(cfg, "ddp", gpus=2, gpu_type="h100-80gb", measure=True, measure_steps=2)
    assert plan.values["tokens_per_s"] > 0 and plan.values["hours"] > 0
    how = {q: h for q, _, h in plan.rows}["throughput"]
    assert how.startswith("measured") and "over 2 steps" in how


# -- ftlab launch and the command line -------------------------------------------------------------
def test_estimate_for_launch_never_fails(tiny: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = estimate_for_launch(load_recipe(tiny), "ddp", 2, 1)
    assert "memory per GPU" in text and "global batch" in text
    if not torch.cuda.is_available():  # no GPU type here: time is unknown, said so
        assert "unknown" in text.split("time")[-1]
    cfg = load_recipe(tiny, ["model.scratch=null", "model.name=nobody/no-such-model", "data.train=hub/dataset"])
    text = estimate_for_launch(cfg, "zero2", 8, 2)
    assert "model" in text and "unknown" in text and "examples" in text
    assert estimate_for_launch(load_recipe(tiny), "no-such-profile", 2, 1).startswith("ftlab plan: unknown")


def test_cli_prints_one_table_and_refuses_bad_input(tiny: Path, capsys):
    assert main(["plan", str(tiny), "--gpus", "2", "--gpu-type", "a100-80gb", "--examples", "100",
                 "--mean-tokens", "50", "train.max_steps=null"]) == 0
    out = capsys.readouterr().out
    for quantity in ("memory per GPU", "steps", "tokens", "throughput", "time", "cost"):
        assert f"\n  {quantity} " in out
    for argv, message in ((["--gpu-type", "tpu-v9"], "unknown GPU type 'tpu-v9'"),
                          (["--examples", "10"], "--examples and --mean-tokens together"),
                          (["--profile", "zero9"], "unknown profile 'zero9'"),
                          (["--gpus", "0"], "--gpus and --nodes must be >= 1")):
        assert main(["plan", str(tiny), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ftlab: error:") and message in err and "\n" not in err


def test_auto_precision_is_planned_for_the_gpus_not_for_this_machine(tiny: Path, capsys):
    """`precision: auto` means bf16 on the A100s planned for, whatever this CPU resolves it to (fp32 on one
    without bf16 hardware): the plan equals the bf16 plan, and differs from the fp32 one."""
    assert load_recipe(str(tiny), ["train.precision=auto"], resolve_hardware=False).train.precision == "auto"
    tables = {}
    for precision in ("auto", "bf16", "fp32"):
        assert main(["plan", str(tiny), "--gpus", "2", "--gpu-type", "a100-80gb", "--examples", "100",
                     "--mean-tokens", "50", f"train.precision={precision}"]) == 0
        tables[precision] = capsys.readouterr().out
    body = {k: v.split("\n", 1)[1] for k, v in tables.items()}  # the first line names the recipe file
    assert body["auto"] == body["bf16"] != body["fp32"]


# -- telemetry -------------------------------------------------------------------------------------
def test_no_gpu_telemetry_on_cpu(tmp_path: Path):
    from ftlab.train import run_training

    assert gpu_metrics(torch.device("cpu")) == {}
    run = run_training(load_recipe(tiny_recipe(tmp_path, train={"max_steps": 2})))
    steps = [r for r in read_metrics(run.path / "metrics.jsonl") if "train/loss" in r]
    assert len(steps) == 2 and all("train/tokens_per_s" in r for r in steps)
    assert not [k for r in steps for k in r if "gpu/" in k]


def test_scratch_config_is_the_recipe_model():
    cfg = load_recipe(None, [f"model.scratch={json.dumps(TINY_SCRATCH)}"])
    config, where = planner.model_config(cfg)
    assert where == "model.scratch" and config.num_hidden_layers == TINY_SCRATCH["num_hidden_layers"]


def test_measure_stands_in_a_two_layer_model_for_a_hub_model(tiny: Path, tmp_path: Path):
    from transformers import AutoConfig

    from ftlab.train import run_training

    fields = {k: v for k, v in TINY_SCRATCH.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", **{**fields, "num_hidden_layers": 5, "vocab_size": 49152})
    cfg = load_recipe(tiny, ["model.scratch=null", "model.name=nobody/no-such-model"])
    run_cfg, measured = throughput.measure_config(cfg, config, tmp_path / "measure", steps=2)
    assert run_cfg.model.scratch.num_hidden_layers == measured.num_hidden_layers == throughput.MEASURE_LAYERS
    assert run_cfg.model.scratch.hidden_size == config.hidden_size  # the width, hence the matmul shapes, kept
    assert run_cfg.train.max_steps == 2 and not run_cfg.train.save_final
    run = run_training(run_cfg)
    assert run.summary["steps"] == 2 and run.summary["step_tokens_per_s"] > 0
    assert architecture(measured).total_params < architecture(config).total_params


def test_measure_saves_the_stand_in_for_qlora(tiny: Path, tmp_path: Path):
    """bitsandbytes quantizes while loading, so a QLoRA stand-in is a model directory, not model.scratch."""
    from transformers import AutoConfig

    fields = {k: v for k, v in TINY_SCRATCH.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", **{**fields, "num_hidden_layers": 4, "vocab_size": 49152})
    cfg = load_recipe(tiny, ["model.scratch=null", "model.name=nobody/no-such-model", "lora.enabled=true",
                             "lora.quantize=nf4"])
    run_cfg, measured = throughput.measure_config(cfg, config, tmp_path, steps=2)
    assert run_cfg.model.scratch is None
    saved = json.loads((Path(run_cfg.model.name) / "config.json").read_text())
    assert saved["num_hidden_layers"] == measured.num_hidden_layers == throughput.MEASURE_LAYERS
    assert saved["hidden_size"] == config.hidden_size and (Path(run_cfg.model.name) / "tokenizer.json").is_file()
