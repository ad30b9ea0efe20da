"""The main job, shortened: generated data -> base eval -> SFT (full and LoRA) -> tuned eval -> report + plots."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftlab import quickstart_report as qr
from ftlab.cli import main
from ftlab.config import load_recipe
from ftlab.data.jsonl import write_jsonl
from ftlab.errors import UserError
from ftlab.quickstart import heldout_sets, load_heldout
from ftlab.runs.rundir import read_status
from ftlab.sokrates import parse_steps
from ftlab.tasks import generate_prontoqa, get_task

REPO = Path(__file__).resolve().parents[1]
SHORT = ["quickstart.train_examples=8", "quickstart.heldout_hops=[1,3]", "quickstart.heldout_sizes=[3,3]",
         "train.max_steps=1", "eval.max_new_tokens=12", "eval.batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shortened_quickstart_end_to_end(tmp_path, capsys, lora):
    # trained on 1 hop, evaluated on 1 and 3: the 3-hop set is a hop count not trained on
    code = main(["quickstart", str(REPO / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path}",
                 f"quickstart.heldout_dir={tmp_path / 'no-real-data'}", f"lora.enabled={lora}", *SHORT,
                 # SOKRATES prompts and proofs reach ~1400 tokens; fewer and shorter rows than SHORT's (a 1-hop
                 # training example is ~700 tokens: the suite's time goes into these steps)
                 "quickstart.train_hops=[1]", "data.max_length=1536", "quickstart.heldout_sizes=[2,2]",
                 "quickstart.train_examples=2", "train.batch_size=2", "train.grad_accum=1",
                 # the full run also takes the prompt-detached gradient (which needs checkpointing off): both
                 # method sentences are checked; the LoRA run keeps the recipe's checkpointing
                 f"train.detach_prompt={not lora}", f"train.gradient_checkpointing={lora}"])
    out = capsys.readouterr().out
    assert code == 0
    run = next((tmp_path / "quickstart").glob("2*_quickstart"))
    assert read_status(run) == "complete"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["accuracy_before"]) == {"1", "3"} and set(summary["accuracy_after"]) == {"1", "3"}
    assert "ftlab-generated held-out problems for 1-hop (2), 3-hop (2)" in summary["heldout"]
    for f in ("report.md", "training_loss.png", "accuracy_by_hops.png", "predictions_base_3hop.jsonl",
              "predictions_tuned_3hop.jsonl", "data/train.jsonl"):
        assert (run / f).is_file(), f
    # base and tuned saw identical prompts: the recipe's task (numbered premises), not plain PrOntoQA
    base = [json.loads(l) for l in (run / "predictions_base_3hop.jsonl").open()]
    tuned = [json.loads(l) for l in (run / "predictions_tuned_3hop.jsonl").open()]
    assert [r["prompt"] for r in base] == [r["prompt"] for r in tuned] and len(base) == 2
    assert "(premise 0)" in base[0]["prompt"] and {"fully_valid", "steps", "steps_valid"} <= set(tuned[0])
    final = Path(summary["sft_run"]) / "final"
    assert (final / ("adapter_config.json" if lora else "model.safetensors")).is_file()
    if lora:  # the adapter names the embedded base, so a copy on another machine (or FTLAB_CACHE) finds it
        assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            "smollm2-135m-instruct"
    # per-hop metrics with intervals; the paired lift is on the 2 identical rows
    three = summary["hops"]["3"]
    assert three["n"] == 2 and not three["trained_on"] and summary["hops"]["1"]["trained_on"]
    for model in ("base", "tuned"):
        m = three[model]
        assert m["accuracy"] == sum(r["correct"] for r in (base if model == "base" else tuned)) / 2
        lo, hi = m["accuracy_ci95"]
        assert lo <= m["accuracy"] <= hi
        assert m["fully_valid_ci95"][0] <= m["fully_valid"] <= m["fully_valid_ci95"][1]
        assert 0 <= m["proof_format"] <= 1
    assert three["lift_accuracy"]["n_paired"] == 2 and three["lift_fully_valid"]["n_paired"] == 2
    assert three["lift_accuracy"]["diff"] == pytest.approx(three["tuned"]["accuracy"] - three["base"]["accuracy"])
    assert set(summary["phases"]) == {"data", "base_eval", "sft", "tuned_eval", "report"}
    assert set(summary["phase_peak_rss_mb"]) == set(summary["phases"])
    assert all(v >= 0 for v in summary["phases"].values()) and summary["cpu"]["model"]
    report = (run / "report.md").read_text()
    assert ("LoRA (r=" in report) == lora
    assert ("keys and values computed without gradient" in report) == (not lora)  # the run's method
    assert "SOKRATES option traces" in report and "before and after" in report
    assert "| 3-hop: held-out hop count (not trained on) | 2 |" in report  # the table row
    assert "Hop counts [3] are a held-out hop count (not trained on)" in report  # and the sentence
    assert f"extraction rule: {summary['extraction_rule']}" in report and summary["extraction_rule"]
    assert "Phase wall times: data " in report and "CPU: " in report
    assert "Peak resident memory per phase: data " in report
    # the examples come from the first set, each kind shown or said not to occur
    assert "## Example proofs of the tuned model (1-hop set)" in report
    for title in ("a fully valid proof", "a proof with an invalid step", "a wrong verdict"):
        assert f"**{title}** (row " in report or f"**{title}**: none occurred" in report, title
    assert "report:" in out and "3-hop (OOD)" in out
    assert (run / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "accuracy_by_hops.png").read_bytes()[:4] == b"\x89PNG"
    assert tuned[0]["output"].strip() in report  # the unpicked first problem, with both outputs
    trained_on = json.loads((run / "data" / "train.jsonl").open().readline())
    assert {"question", "query", "chain_of_thought", "answer", "hops"} <= set(trained_on)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="per-phase peaks read Linux's /proc/self/status")
def test_each_phase_reports_its_own_peak_memory_and_the_job_keeps_its_peak():
    """A 400 MB phase, then one that allocates nothing: the second's peak is not the first's (the process's peak
    only ever grows), while the process's own peak counter, what `/usr/bin/time -v` reports, still holds the
    first phase's. It runs in a fresh process, as the job does: in the test process, memory that earlier tests
    freed but the allocator kept can hold the block without the resident size growing at all."""
    script = """if True:
        import json, time
        import numpy as np
        from ftlab.quickstart import proc_status_kb, timed
        phases, peaks = {}, {}
        with timed(phases, peaks, "big"):
            block = np.ones(100 * 2**20, dtype=np.float32)  # 400 MB, touched
            time.sleep(0.2)  # 10 sampling intervals, as a real phase holds its memory
            del block
        with timed(phases, peaks, "small"):
            time.sleep(0.1)  # a few samples
        print(json.dumps({"phases": sorted(phases), "peaks": peaks, "hwm_mb": proc_status_kb("VmHWM") / 1024}))
    """
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout)
    peaks = out["peaks"]
    assert out["phases"] == sorted(peaks) == ["big", "small"]
    assert peaks["big"] - peaks["small"] > 350
    assert out["hwm_mb"] >= peaks["big"] - 1


def _cfg(tmp_path, *overrides):
    return load_recipe(REPO / "recipes" / "quickstart.yaml", [f"output_dir={tmp_path}", *overrides])


def test_heldout_sets_use_the_authors_file_per_hop_count_after_the_offset(tmp_path):
    authors = tmp_path / "authors"
    authors.mkdir()
    records = generate_prontoqa(5, hops=1, seed=3)
    write_jsonl(authors / "generator_1hop_test.jsonl", records)  # no 3-hop file: that one is generated
    cfg = _cfg(tmp_path, f"quickstart.heldout_dir={authors}", "quickstart.heldout_hops=[1,3]",
               "quickstart.heldout_sizes=[2,3]", "quickstart.heldout_offset=2")
    sets, provenance = heldout_sets(cfg, tmp_path / "data")
    assert sets[1].authors and sets[1].path == authors / "generator_1hop_test.jsonl" and not sets[3].authors
    assert f"the authors' PrOntoQA generator test files in {authors} for 1-hop (rows 3-4)" in provenance
    assert "ftlab-generated held-out problems for 3-hop (3)" in provenance
    task = get_task(cfg.data.task, **cfg.data.task_options)
    assert [ex.id for ex in load_heldout(task, sets[1], 2)] == [records[2]["id"], records[3]["id"]]
    assert len(load_heldout(task, sets[3], 3)) == 3


def test_heldout_offset_must_not_be_negative(tmp_path):
    with pytest.raises(UserError, match="heldout_offset"):
        _cfg(tmp_path, "quickstart.heldout_offset=-1")


def _sokrates_problem():
    task = get_task("sokrates", source="prontoqa", backward_plan=True)
    return task, task.examples_from([("generated", generate_prontoqa(1, hops=3, seed=5)[0])])[0]


def test_example_picking_marks_the_invalid_step_with_the_verifiers_reason():
    task, ex = _sokrates_problem()
    valid = ex.target  # the task's own gold proof
    first = parse_steps(valid)[0]
    fact, rule = first.action.args
    # the first step cites its rule as the fact: the verifier rejects it (and the steps built on it)
    swapped = valid.replace(first.action_text, f'<Option type="MODUS_PONENS" args="[{rule}, {fact}]" />', 1)
    other = "True" if ex.gold == "False" else "False"
    wrong = valid[::-1].replace(f"answer is {ex.gold}."[::-1], f"answer is {other}."[::-1], 1)[::-1]
    rows = [{"id": ex.id, "output": out, "gold": ex.gold, **task.score(out, ex)} for out in (valid, swapped, wrong)]
    assert [r["fully_valid"] for r in rows] == [True, False, False] and rows[2]["extracted"] == other
    assert qr.pick_examples(rows) == {"fully_valid": 0, "invalid_step": 1, "wrong_verdict": 2}
    assert qr.pick_examples(rows[:1]) == {"fully_valid": 0, "invalid_step": None, "wrong_verdict": None}
    assert qr.pick_examples(rows[::-1])["invalid_step"] == 0  # the first in file order

    marked = qr.marked_trace(ex.meta["problem"], swapped).splitlines()
    at = marked.index(f'Action: <Option type="MODUS_PONENS" args="[{rule}, {fact}]" />')
    assert marked[at + 1] == f"^^^ INVALID step 1: premise {rule} is a rule, not a fact"
    assert "^^^" not in qr.marked_trace(ex.meta["problem"], valid)

    section = qr.examples_section(rows, [ex], 3, True)
    assert f"^^^ INVALID step 1: premise {rule} is a rule, not a fact" in section
    assert "**a wrong verdict** (row 3" in section and "**a fully valid proof** (row 1" in section
    assert "none occurred among the 1 tuned outputs" in qr.examples_section(rows[:1], [ex], 3, True)


def test_step_validity_pools_steps_and_resamples_problems():
    rows = [{"steps": 3, "steps_valid": 2}, {"steps": 1, "steps_valid": 0}, {"steps": 4, "steps_valid": 4},
            {"steps": 0, "steps_valid": 0}]
    value, (lo, hi) = qr.step_validity(rows)
    assert value == 6 / 8  # pooled, not the mean of per-row ratios ((2/3 + 0 + 1) / 3 = 0.56)
    assert 0 <= lo < value < hi <= 1
    assert qr.step_validity([{"steps": 2, "steps_valid": 1}] * 5) == (0.5, [0.5, 0.5])  # every resample: 5/10
    assert qr.step_validity([{"steps": 0, "steps_valid": 0}]) == (None, None)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_marks_the_run_interrupted(tmp_path, sig, code):
    """SIGTERM is what Slurm sends at a time limit or on preemption: it must not leave `running` behind."""
    cmd = [sys.executable, "-m", "ftlab.cli", "quickstart", str(REPO / "recipes" / "quickstart.yaml"),
           f"output_dir={tmp_path}", f"quickstart.heldout_dir={tmp_path / 'none'}", *SHORT,
           "eval.max_new_tokens=64"]
    # as from a terminal: a shell starts background jobs (a CI script's `&`, nohup) with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler, so Ctrl-C would never reach the job
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("quickstart/2*/data/heldout_3hop.jsonl")):
        time.sleep(0.1)
    time.sleep(2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    first = next(tmp_path.glob("quickstart/2*_quickstart"))
    assert read_status(first) == "interrupted"
    assert not (first / "report.md").exists()
