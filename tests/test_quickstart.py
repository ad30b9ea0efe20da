"""The main job, shortened: generated data -> base eval -> SFT (full and LoRA) -> tuned eval -> report + plots."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftlab.cli import main
from ftlab.runs.rundir import read_status

REPO = Path(__file__).resolve().parents[1]
SHORT = ["quickstart.train_examples=8", "quickstart.heldout_hops=[1,3]", "quickstart.heldout_sizes=[3,3]",
         "train.max_steps=1", "eval.max_new_tokens=12", "eval.batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shortened_quickstart_end_to_end(tmp_path, capsys, lora):
    code = main(["quickstart", str(REPO / "recipes" / "quickstart.yaml"), f"output_dir={tmp_path}",
                 f"quickstart.heldout_dir={tmp_path / 'no-real-data'}", f"lora.enabled={lora}", *SHORT,
                 # the LoRA run also trains on conversations: extra claims and lookup drills as follow-up turns
                 *(["quickstart.more_queries=2", "quickstart.lookups=1", "data.max_length=1024"] if lora else [])])
    out = capsys.readouterr().out
    assert code == 0
    run = next((tmp_path / "quickstart").glob("2*_quickstart"))
    assert read_status(run) == "complete"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["accuracy_before"]) == {"1", "3"} and set(summary["accuracy_after"]) == {"1", "3"}
    assert "ftlab-generated held-out problems" in summary["heldout"]  # says which data it used
    for f in ("report.md", "training_loss.png", "accuracy_by_hops.png", "predictions_base_3hop.jsonl",
              "predictions_tuned_3hop.jsonl", "data/train.jsonl"):
        assert (run / f).is_file(), f
    # base and tuned saw identical prompts
    base = [json.loads(l)["prompt"] for l in (run / "predictions_base_3hop.jsonl").open()]
    tuned = [json.loads(l)["prompt"] for l in (run / "predictions_tuned_3hop.jsonl").open()]
    assert base == tuned and len(base) == 3
    final = Path(summary["sft_run"]) / "final"
    assert (final / ("adapter_config.json" if lora else "model.safetensors")).is_file()
    if lora:  # the adapter names the embedded base, so a copy on another machine (or FTLAB_CACHE) finds it
        assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            "smollm2-135m-instruct"
    assert ("LoRA (r=" in (run / "report.md").read_text()) == lora
    assert "keys and values computed without gradient" in (run / "report.md").read_text()  # the recipe's method
    assert "report:" in out and "3-hop" in out
    assert (run / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
    report = (run / "report.md").read_text()
    assert "goal-directed proofs" in report and "before and after" in report
    first_tuned = json.loads((run / "predictions_tuned_3hop.jsonl").open().readline())["output"].strip()
    assert first_tuned in report  # the unpicked first problem, with both outputs
    trained_on = json.loads((run / "data" / "train.jsonl").open().readline())
    assert {"question", "query", "chain_of_thought", "answer", "hops"} <= set(trained_on)
    assert ({"more_queries", "lookups"} <= set(trained_on)) == lora
    if lora:  # the run log shows the follow-up answers supervised
        sft_log = (Path(summary["sft_run"]) / "run.log").read_text()
        assert "Which sentences say whether something is" in sft_log and sft_log.count("«") >= 4


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
