"""SFT trainer on a tiny random Llama: learning, exact accumulation, resume after SIGKILL, NaN guard, exports."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftlab.cli import main
from ftlab.config import load_recipe
from ftlab.runs.rundir import read_status
from ftlab.runs.trackers import read_metrics
from tests.helpers import tiny_recipe


def train(recipe, *overrides):
    from ftlab.train import run_training

    return run_training(load_recipe(recipe, list(overrides)))


def losses(run_path: Path) -> dict[int, float]:
    return {r["train_step"]: r["train/loss"] for r in read_metrics(run_path / "metrics.jsonl") if "train/loss" in r}


def test_full_finetune_learns_and_writes_a_complete_run(tmp_path):
    recipe = tiny_recipe(tmp_path)
    run = train(recipe, "train.max_steps=12", "optim.lr=3e-3", "schedule.name=constant")
    l = losses(run.path)
    assert l[12] < l[1] - 0.5, l
    for f in ("config.yaml", "env.json", "run.log", "metrics.jsonl", "summary.json"):
        assert (run.path / f).is_file(), f
    assert read_status(run.path) == "complete"
    assert (run.path.parent / "latest").resolve() == run.path.resolve()
    env = json.loads((run.path / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 0
    # the final model is a plain HF model directory: loads without ftlab
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(run.path / "final")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "length-grouped"])
def test_accumulation_matches_a_bigger_batch(tmp_path, grouped):
    """batch 8 x accum 1 and batch 2 x accum 4 see the same 8 examples at every step (also when batches are
    grouped by length, as the quickstart's are): same supervised tokens, loss and gradient norm."""
    recipe = tiny_recipe(tmp_path)
    common = ["train.max_steps=3", f"data.group_by_length={str(grouped).lower()}", "train.grad_clip=1000"]
    a = train(recipe, "train.batch_size=8", "train.grad_accum=1", "name=a", *common)
    b = train(recipe, "train.batch_size=2", "train.grad_accum=4", "name=b", *common)
    ra, rb = (read_metrics(r.path / "metrics.jsonl") for r in (a, b))
    assert len(ra) == len(rb) >= 3
    for x, y in zip(ra, rb):
        assert x["train/supervised_tokens"] == y["train/supervised_tokens"]
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5)
        assert x["train/grad_norm"] == pytest.approx(y["train/grad_norm"], rel=1e-5)


def test_detached_prompt_steps_accumulate_exactly_and_differ_from_full_gradients(tmp_path):
    """train.detach_prompt: the first step's loss is the full forward's (same weights); 8 x 1 and 2 x 4 agree
    step by step; the gradient is not the full one (the prompt path is left out)."""
    recipe = tiny_recipe(tmp_path)
    common = ["train.max_steps=3", "data.group_by_length=true", "train.grad_clip=1000"]
    a = train(recipe, "train.batch_size=8", "train.grad_accum=1", "train.detach_prompt=true", "name=a", *common)
    b = train(recipe, "train.batch_size=2", "train.grad_accum=4", "train.detach_prompt=true", "name=b", *common)
    full = train(recipe, "train.batch_size=8", "train.grad_accum=1", "name=full", *common)
    ra, rb, rf = (read_metrics(r.path / "metrics.jsonl") for r in (a, b, full))
    assert len(ra) == len(rb) >= 3
    for x, y in zip(ra, rb):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5)
        assert x["train/grad_norm"] == pytest.approx(y["train/grad_norm"], rel=1e-5)
    assert ra[0]["train/loss"] == pytest.approx(rf[0]["train/loss"], rel=1e-5)
    assert ra[0]["train/grad_norm"] != pytest.approx(rf[0]["train/grad_norm"], rel=1e-3)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_lm_head_on_supervised_positions_only_matches_full_logits(tmp_path, monkeypatch, packing):
    """The trainer's fast path (LM head on response positions only) vs full logits sliced afterwards."""
    import ftlab.losses as losses

    recipe = tiny_recipe(tmp_path)
    common = ["train.max_steps=1", "train.grad_clip=1000", f"data.packing={str(packing).lower()}",
              f"data.val={tmp_path / 'train.jsonl'}", "data.val_limit=8", "train.eval_every=1"]
    used, check = [], losses.accepts_logits_to_keep

    def probe(model, mask=False):
        if not mask:
            return check(model)
        used.append(check(model, mask=True))
        return used[-1]

    monkeypatch.setattr(losses, "accepts_logits_to_keep", probe)
    fast = read_metrics(train(recipe, "name=fast", *common).path / "metrics.jsonl")
    assert used and all(used)
    monkeypatch.setattr(losses, "accepts_logits_to_keep", lambda model, mask=False: not mask and check(model))
    full = read_metrics(train(recipe, "name=full", *common).path / "metrics.jsonl")
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        a, b = (next(r[key] for r in rows if key in r) for rows in (fast, full))
        assert a == pytest.approx(b, rel=1e-5), key


def test_packing_and_padding_give_the_same_loss(tmp_path):
    recipe = tiny_recipe(tmp_path)
    common = ["train.max_steps=2", "data.group_by_length=false", "train.batch_size=4"]
    packed = losses(train(recipe, "data.packing=true", "name=p", *common).path)
    padded = losses(train(recipe, "data.packing=false", "name=q", *common).path)
    assert packed[1] == pytest.approx(padded[1], rel=1e-5)
    assert packed[2] == pytest.approx(padded[2], rel=1e-4)


def test_resume_after_sigkill_replays_the_same_losses(tmp_path):
    recipe = tiny_recipe(tmp_path, lora={"enabled": True, "r": 4, "dropout": 0.1,
                                         "target_modules": ["q_proj", "v_proj"]})
    steps = ["train.max_steps=10", "train.save_every=2", "train.keep_last=5"]
    reference = losses(train(recipe, "name=ref", *steps).path)

    cmd = [sys.executable, "-m", "ftlab.cli", "train", str(recipe), "name=killed", *steps]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = tmp_path / "runs" / "sft"
    deadline = time.time() + 300
    ckpt = None
    while time.time() < deadline and ckpt is None:
        found = list(runs.glob("*_killed/checkpoints/step_000004/state.json"))
        ckpt = found[0] if found else None
        time.sleep(0.02)
    assert ckpt is not None, "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    killed = ckpt.parents[2]
    assert read_status(killed) == "running"  # never looks finished
    # a checkpoint half-written when the kill came is never picked: fake one that is newer
    half = killed / "checkpoints" / "step_000009"
    half.mkdir()
    (half / "optimizer.pt").write_bytes(b"partial")
    (killed / "checkpoints" / ".tmp_step_000010").mkdir()

    resumed = train(recipe, "name=resumed", f"train.resume={killed}", *steps)
    got = losses(resumed.path)
    start = json.loads((resumed.path / "summary.json").read_text())["resumed_from"]
    assert "step_000009" not in start
    assert got and min(got) >= 5
    for step, value in got.items():
        assert value == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, value, reference[step])
    assert max(got) == 10


def test_nan_guard_stops_dumps_the_batch_and_saves_nothing(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    code = main(["train", str(recipe), "optim.lr=1e30", "schedule.name=constant", "train.grad_clip=null",
                 "train.max_steps=4"])
    err = capsys.readouterr().err
    assert code == 2 and "non-finite" in err and "Traceback" not in err
    run = next((tmp_path / "runs" / "sft").glob("*_tiny"))
    assert read_status(run) == "failed"
    assert list((run / "nonfinite").glob("step_*.pt"))
    assert not (run / "final").exists()


def test_nan_guard_skip_policy_keeps_going(tmp_path):
    recipe = tiny_recipe(tmp_path)
    run = train(recipe, "optim.lr=1e30", "schedule.name=constant", "train.grad_clip=null", "train.max_steps=3",
                "train.nan_policy=skip", "train.save_final=false")
    assert read_status(run.path) == "complete"
    assert list((run.path / "nonfinite").glob("step_*.pt"))


def test_lora_adapter_and_merged_export_load_with_peft(tmp_path):
    recipe = tiny_recipe(tmp_path, lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]})
    run = train(recipe, "train.max_steps=2", "train.save_merged=true", "train.gradient_checkpointing=true")
    final = run.path / "final"
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(run.path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_checkpoints_keep_last_and_best(tmp_path):
    recipe = tiny_recipe(tmp_path)
    run = train(recipe, "train.max_steps=8", "train.save_every=2", "train.keep_last=2", "train.eval_every=2",
                f"data.val={tmp_path / 'train.jsonl'}", "train.best_metric=eval/loss")
    kept = sorted(p.name for p in (run.path / "checkpoints").iterdir())
    assert kept == ["step_000004", "step_000006"]
    best = json.loads((run.path / "summary.json").read_text())["best"]
    evals = [r["eval/loss"] for r in read_metrics(run.path / "metrics.jsonl") if "eval/loss" in r]
    assert best["value"] == pytest.approx(min(evals))
    assert (run.path / "best" / "config.json").is_file()


def test_task_data_logs_validation_accuracy_and_generations(tmp_path):
    """With task data, eval_every adds the task's accuracy and log_generations writes per-sample rows."""
    import json as _json
    rows = [{"question": f"Tom has {a} apples and gets {b} more. How many?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1), (4, 4), (6, 3)]]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(tmp_path, data={"task": "gsm8k", "train": str(data), "val": str(data), "val_limit": 4,
                                         "max_length": 128})
    run = train(recipe, "train.max_steps=2", "train.eval_every=2", "train.log_generations_every=2",
                "eval.max_new_tokens=4", "eval.batch_size=2")
    evals = [r for r in read_metrics(run.path / "metrics.jsonl") if "eval/loss" in r]
    assert evals and 0.0 <= evals[-1]["eval/accuracy"] <= 1.0 and "eval/accuracy_strict" in evals[-1]
    gens = [_json.loads(l) for l in (run.path / "generations" / "step_000002.jsonl").open()]
    assert len(gens) == 4
    for g in gens:
        assert {"prompt", "response", "gold", "correct", "mean_token_entropy", "response_length"} <= set(g)
        assert g["response_length"] >= 1  # the response tokens (incl. any EOS) were counted
    gen_rows = [r for r in read_metrics(run.path / "metrics.jsonl") if "eval/generations/accuracy" in r]
    assert gen_rows and "eval/generations/mean_response_length_correct" in gen_rows[0]


def test_fp16_overflow_is_skipped_by_the_scaler_not_fatal(tmp_path):
    """fp16 with a loss scale far too high: the first steps overflow, the scaler skips them and lowers
    the scale, then training proceeds (before, the first routine overflow stopped the run)."""
    recipe = tiny_recipe(tmp_path)
    run = train(recipe, "train.precision=fp16", "train.fp16_init_scale=1e9", "train.max_steps=16",
                "optim.lr=3e-3", "schedule.name=constant")
    rows = [r for r in read_metrics(run.path / "metrics.jsonl") if "train/loss" in r]
    skipped = [r["train/overflow_skipped"] for r in rows]
    assert skipped[0] and not skipped[-1], skipped
    scales = [r["train/loss_scale"] for r in rows]
    assert scales[-1] < scales[0]
    assert read_status(run.path) == "complete"


def test_sigterm_saves_a_checkpoint_and_marks_the_run_interrupted(tmp_path):
    recipe = tiny_recipe(tmp_path)
    cmd = [sys.executable, "-m", "ftlab.cli", "train", str(recipe), "name=term", "train.max_steps=100000",
           "train.save_every=1000", "train.batch_size=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs" / "sft"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training steps are being logged
        found = list(runs.glob("*_term/metrics.jsonl"))
        if found and found[0].read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    run = next(runs.glob("*_term"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    ckpts = list((run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and int(ckpts[0].name[5:]) == summary["steps"]
    # and the saved checkpoint resumes
    resumed = train(recipe, "name=after", f"train.resume={run}", f"train.max_steps={summary['steps'] + 2}",
                    "train.batch_size=2")
    assert sorted(losses(resumed.path)) == [summary["steps"] + 1, summary["steps"] + 2]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    recipe = tiny_recipe(tmp_path)
    steps = ["train.max_steps=6", "train.save_every=2", "train.keep_last=5"]
    ref = train(recipe, "name=ref", *steps)
    ckpts = ref.path / "checkpoints"
    weights = ckpts / "step_000004" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    resumed = train(recipe, "name=resumed", f"train.resume={ref.path}", *steps)
    assert "step_000004 is damaged" in caplog.text
    assert json.loads((resumed.path / "summary.json").read_text())["resumed_from"].endswith("step_000002")
    got, want = losses(resumed.path), losses(ref.path)
    assert sorted(got) == [3, 4, 5, 6]
    for step, value in got.items():
        assert value == pytest.approx(want[step], rel=1e-6)


def test_resume_refuses_other_models_and_too_few_steps(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    ref = train(recipe, "name=ref", "train.max_steps=4", "train.save_every=2")
    code = main(["train", str(recipe), f"train.resume={ref.path}", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "below the checkpoint's step 2" in err and "Traceback" not in err
    code = main(["train", str(recipe), f"train.resume={ref.path}", "model.scratch.hidden_size=64"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ftlab: error")]
    assert code == 2 and len(errors) == 1 and "was trained from" in errors[0]
    assert not list((tmp_path / "runs" / "sft").glob("*_tiny*"))  # both refused before a run dir appeared


def test_resume_latest_skips_runs_without_a_checkpoint(tmp_path):
    recipe = tiny_recipe(tmp_path)
    ref = train(recipe, "name=ref", "train.max_steps=4", "train.save_every=2")
    train(recipe, "name=nockpt", "train.max_steps=1")  # newer, no checkpoint (a failed attempt would be alike)
    resumed = train(recipe, "name=resumed", "train.resume=latest", "train.max_steps=4")
    assert json.loads((resumed.path / "summary.json").read_text())["resumed_from"].startswith(str(ref.path))


def test_weight_decay_spares_norms_and_biases():
    from omegaconf import OmegaConf

    from ftlab.train.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, OmegaConf.create({"name": "adamw", "lr": 1.0, "weight_decay": 0.5,
                                                  "betas": [0.9, 0.999], "eps": 1e-8}))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.5 for p in g["params"]}
    assert decayed == {id(model[0].weight)}  # not the bias, not the norm's weight and bias
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
