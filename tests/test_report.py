"""`ftlab report`: real tiny runs in, report.md + PNGs + one self-contained report.html out; intervals, seed groups,
configuration differences and comparability flags checked by hand. The page in a browser: test_report_browser.py."""
from __future__ import annotations

import base64
import json
import math
import re
import time
from pathlib import Path

import pytest

from ftlab.cli import main
from ftlab.report.runs import Run
from tests.report_runs import build_runs


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    return build_runs(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report(made, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "report"
    runs = made["seed0"].parents[1]
    assert main(["report", str(runs), str(made["sweep_points"]), "--out", str(out)]) == 0
    return out


def table_row(md: str, label: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_every_run_is_in_the_report_with_its_status_and_last_step(made, report):
    md = (report / "report.md").read_text()
    for label in ("seed0", "seed1", "small", "k1", "k2", "crashed", "oak", "seed0-final_gsm8k_gsm_0shot",
                  "small-final_gsm8k_gsm_0shot", "(point 3 not started)"):
        assert f"| {label} |" in md, label
    crashed = table_row(md, "crashed")
    assert crashed[2:4] == ["running", "3"]            # never skipped: status and last step
    assert table_row(md, "(point 3 not started)")[2] == "pending"
    # the damaged line is named file:line, and the rows around it still count
    assert f"{made['crashed'] / 'metrics.jsonl'}:2: damaged metrics line" in md
    assert "train/loss" in crashed[5]


def test_accuracy_intervals_are_wilson_over_the_answers(made, report):
    metrics = json.loads((made["eval_small"] / "metrics.json").read_text())
    n, k = metrics["n"], round(metrics["accuracy"] * metrics["n"])
    z = 1.959964
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    cell = table_row((report / "report.md").read_text(), "small-final_gsm8k_gsm_0shot")[5]
    assert f"[{max(0, centre - half):.3f}, {min(1, centre + half):.3f}] (n={n})" in cell
    loop = table_row((report / "report.md").read_text(), "oak")[5]
    assert "answer_accuracy 0.5 [0.215, 0.785] (n=8)" in loop   # 4 of 8 by hand: 0.5 +- 0.285


def test_seed_group_mean_and_t_interval_by_hand(made, report):
    finals = []
    for name in ("seed0", "seed1"):
        rows = [json.loads(line) for line in (made[name] / "metrics.jsonl").read_text().splitlines()]
        finals.append([r["eval/loss"] for r in rows if "eval/loss" in r][-1])
    mean = sum(finals) / 2
    half = 12.706 * abs(finals[0] - finals[1]) / math.sqrt(2) / math.sqrt(2)  # t(1) * sd / sqrt(n)
    row = table_row((report / "report.md").read_text(), "seed (2 seeds)")
    assert row[1:3] == ["2", "0, 1"]
    assert f"eval/loss {mean:.4g} [{mean - half:.4g}, {mean + half:.4g}]" in row[3]


def test_config_diff_and_comparability_flags(report):
    md = (report / "report.md").read_text()
    sft = md[md.index("## sft runs"):]
    assert re.search(r"\| data\.limit \| None \| None \| None \| 16 \|", sft)
    assert "| optim.lr |" not in sft                        # equal keys are left out
    evals = md[md.index("## eval runs"):md.index("## pretrain runs")]
    assert "| ⚠ eval set |" in evals and "eval set differs:" in evals   # eval.limit 4 vs 3: other rows
    assert "| tokenizer |" in evals                          # same tokenizer: no flag on that column
    sweep = re.search(r"### accuracy against training-set size\n(.*?)\n#", md, re.DOTALL).group(1)
    assert "Not comparable here: eval set differs" in sweep   # written beside the plot it spoils
    pretrain = md[md.index("## pretrain runs"):md.index("## sft runs")]
    assert "| pretrain.num_categories | 1 | 2 |" in pretrain
    # K = 1 and K = 2 draw their validation windows from their own categories: other text, flagged as such
    assert "| ⚠ eval set |" in pretrain and re.search(r"val\[\w[\w-]*, seed 0, \d+ x \d+\] \(k1\)", pretrain)
    assert "| ⚠ tokenizer |" not in pretrain


def test_sweep_plots_and_pngs_are_written_and_inlined(report):
    md = (report / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "img/sweep_accuracy_vs_size.png" in images and "img/sweep_val_loss_vs_k.png" in images
    assert "img/curve_00_training_loss.png" in images
    page = (report / "report.html").read_text()
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(inlined) == len(images)
    assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in inlined)
    assert not re.search(r'(src|href)="(?!data:)', page)    # nothing loaded from anywhere else


def test_both_sweep_layouts_expand_to_their_runs(made, tmp_path):
    for sweep, expected in ((made["sweep_points"], {"k1", "k2", "(point 3 not started)"}),
                            (made["sweep_summary"], {"k1", "k2"})):
        out = tmp_path / sweep.name
        assert main(["report", str(sweep), "--out", str(out)]) == 0
        rows = re.findall(r'<tr data-run="([^"]+)">', (out / "report.html").read_text())
        assert set(rows) == expected


def test_tokens_and_time_axes(made, tmp_path):
    out = tmp_path / "tokens"
    assert main(["report", str(made["seed0"]), str(made["seed1"]), "--out", str(out), "--x", "tokens",
                 "--smooth", "3"]) == 0
    md = (out / "report.md").read_text()
    assert "Curves (x: tokens)" in md and "trailing mean over 3 points" in md
    assert main(["report", str(made["loop"]), str(made["seed0"]), "--out", str(tmp_path / "time"),
                 "--x", "time"]) == 0
    assert "Not on the time axis (nothing recorded to place them): oak" in (tmp_path / "time" / "report.md").read_text()


def test_tokens_seen_counts_unlogged_steps_by_hand():
    from ftlab.report.runs import tokens_by_step

    # train.log_every=2: each logged count stands for its own step and the one before it
    run = Run(Path("x"), "sft", "complete", rows=[
        {"train_step": 2, "train/supervised_tokens": 10}, {"eval_step": 2, "eval/loss": 1.0},
        {"train_step": 4, "train/supervised_tokens": 30}, {"train_step": 5, "train/supervised_tokens": 7}])
    assert tokens_by_step(run) == {2: 20.0, 4: 80.0, 5: 87.0}


def test_peak_memory_is_the_latest_recorded_running_maximum():
    from ftlab.report.runs import peak_memory

    run = Run(Path("x"), "sft", "complete", rows=[{"train_step": 1, "train/gpu/mem_peak_gib": 3.5},
                                                  {"train_step": 2, "train/gpu/mem_peak_gib": 4.25},
                                                  {"eval_step": 2, "eval/loss": 1.0}])
    assert peak_memory(run) == "4.25 (mem_peak_gib)"
    assert peak_memory(Run(Path("y"), "sft", "complete", rows=[{"train_step": 1, "train/loss": 1.0}])) is None


def test_stats_by_hand():
    from ftlab.report.stats import band, smooth, wilson_interval

    lo, hi = wilson_interval(0.5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)   # the textbook Wilson interval of 5/10
    assert wilson_interval(0.0, 10)[0] == pytest.approx(0.0) and round(wilson_interval(0.0, 10)[1], 4) == 0.2775
    x, mean, _, high = band([([1, 2, 3], [1, 2, 3]), ([1, 3], [3, 5])])   # the second is 2 + x
    assert list(x) == [1, 2, 3] and list(mean) == [2, 3, 4]
    assert list(high - mean) == pytest.approx([12.706] * 3)  # t(1) * sqrt(2) / sqrt(2)
    assert smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5] and smooth([1, 5], 0) == [1, 5]


def test_seed_groups_need_equal_settings_and_finished_runs():
    from ftlab.report.compare import differing_keys, seed_groups

    def run(name: str, status: str = "complete", **config) -> Run:
        r = Run(Path(name), "sft", status, {"name": name, "output_dir": "o", "seed": 0, "optim.lr": 1, **config})
        r.label = name
        return r
    a, b, c, d = run("a"), run("b", seed=1), run("c", seed=2, **{"optim.lr": 2}), run("d", "failed", seed=3)
    groups = seed_groups([a, b, c, d])
    assert [[r.label for r in g.runs] for g in groups] == [["a", "b"], ["c"], ["d"]]
    assert groups[0].label == "a (2 seeds)"                  # "a" and "b" share no name: the first one's
    named = [run(f"tiny_limit16_s{s}", seed=s) for s in (0, 1)]
    assert seed_groups(named)[0].label == "tiny_limit16 (2 seeds)"   # a sweep's names, the seed taken out
    assert differing_keys([a.config, c.config]) == ["optim.lr", "seed"]    # names and folders never differ


def test_a_folder_without_runs_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "empty"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ftlab: error: ") and "no run directory found" in err and "\n" not in err
    assert not out.exists()
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_read_metrics_names_a_damaged_line_and_goes_on_only_when_asked(tmp_path):
    from ftlab.errors import UserError
    from ftlab.runs.trackers import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"train_step": 1}\n{"train_st\n[1, 2]\n{"train_step": 3}\n{"train_step": 4, "tr')
    damaged: list[str] = []
    assert [r["train_step"] for r in read_metrics(path, damaged)] == [1, 3]   # the unfinished last line: left out
    assert damaged == [f"{path}:2: damaged metrics line", f"{path}:3: damaged metrics line"]
    with pytest.raises(UserError, match=r"metrics.jsonl:2: damaged"):
        read_metrics(path)


def test_eval_hashes_match_the_trained_tokenizer(made):
    from ftlab.report.fingerprint import saved_tokenizer_fingerprint

    metrics = json.loads((made["eval_seed0"] / "metrics.json").read_text())
    saved = saved_tokenizer_fingerprint(made["seed0"] / "final", chat_template=True)
    assert metrics["tokenizer_hash"] == saved["tokenizer_hash"]
    assert metrics["chat_template_hash"] == saved["chat_template_hash"] != "none"
    other = json.loads((made["eval_small"] / "metrics.json").read_text())
    assert other["eval_set_hash"] != metrics["eval_set_hash"]   # 3 of the same rows are another eval set


def test_wandb_run_gets_a_final_summary_and_config_tags(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from omegaconf import OmegaConf

    from ftlab.config import load_recipe
    from ftlab.runs.rundir import RunDir
    from ftlab.runs.trackers import Trackers
    from tests.helpers import tiny_recipe

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_recipe(tiny_recipe(tmp_path), ["optim.lr=0.005", "track.wandb=true"])
    run = RunDir.create(tmp_path / "runs", "sft", "wb", cfg)
    trackers = Trackers(run, cfg.track, OmegaConf.to_container(cfg, resolve=True))
    assert "optim.lr=0.005" in trackers.wandb.tags and "train.max_steps=4" in trackers.wandb.tags
    assert not any(t.startswith(("name=", "output_dir=")) for t in trackers.wandb.tags)
    for step, (loss, ev) in enumerate([(3.0, 2.5), (2.0, 2.7)], start=1):
        trackers.log({"loss": loss}, step)
        trackers.log({"loss": ev}, step, axis="eval")
    trackers.close()
    deadline = time.time() + 20   # wandb-core may still be writing the file when finish() returns
    while True:
        summary, tags = offline_summary_and_tags(next((run.path / "wandb").glob("offline-run-*/run-*.wandb")))
        if "status" in summary or time.time() > deadline:
            break
        time.sleep(0.5)
    assert "optim.lr=0.005" in tags
    assert summary["final/train/loss"] == 2.0 and summary["final/eval/loss"] == 2.7
    assert summary["best/eval/loss"] == 2.5 and summary["status"] == "complete" and summary["train_steps"] == 2


def offline_summary_and_tags(path: Path) -> tuple[dict, list[str]]:
    """What an offline W&B run file holds (what `wandb sync` would upload): its summary updates and tags. The
    file is a 7-byte header, then LevelDB-log records (7-byte headers, 32 KiB blocks) of protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending = path.read_bytes(), 7, b""
    summary: dict = {}
    tags: list[str] = []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:   # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):        # FIRST/MIDDLE pieces of a record: wait for its LAST piece
            continue
        record, pending = pb.Record.FromString(pending), b""
        if record.WhichOneof("record_type") == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update})
        elif record.WhichOneof("record_type") == "run":
            tags = list(record.run.tags)
    return summary, tags


def test_evaluations_of_the_same_rows_are_paired_against_the_base_model(made, tmp_path):
    """Copies of a real evaluation with correctness set by hand: the base model (a model no run made) answers
    rows 1 of 4, the tuned one rows 1-3: +50 points over 4 paired rows, the paired bootstrap interval of those
    differences, and a run on other rows (another limit) is not paired with them."""
    import shutil

    from ftlab.tasks.scoring import bootstrap_ci

    evals = tmp_path / "runs" / "eval"
    for name, model, correct in (("20260101_000000_base", "smollm2-135m-instruct", [1, 0, 0, 0]),
                                 ("20260101_000001_tuned", str(made["seed0"] / "final"), [1, 1, 1, 0])):
        shutil.copytree(made["eval_seed0"], evals / name)
        rows = [json.loads(line) for line in (evals / name / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 4
        (evals / name / "predictions.jsonl").write_text(
            "".join(json.dumps({**r, "correct": bool(c)}) + "\n" for r, c in zip(rows, correct)))
        metrics = json.loads((evals / name / "metrics.json").read_text())
        (evals / name / "metrics.json").write_text(json.dumps({**metrics, "model": model, "adapter": None}))
    shutil.copytree(made["eval_small"], evals / "20260101_000002_other_rows")
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    section = md.split("## Paired differences", 1)[1].split("\n## ", 1)[0]
    assert "Baseline base " in section
    lo, hi = bootstrap_ci([0, 1, 1, 0])
    assert table_row(section, "tuned") == ["tuned", "+50.0", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]", "4",
                                           "better" if lo > 0 else "no difference shown (the interval holds 0)"]
    assert "| other_rows |" not in section


def test_training_runs_nothing_evaluated_keep_their_accuracy_beside_a_base_evaluation(made, tmp_path):
    """A size sweep's training runs (in-training accuracy on GSM8K-shaped rows) and an evaluation of the base model:
    the base model trained on no data.limit, so it is left out of accuracy-against-size, and the sweep plot is
    still drawn from the training runs (an evaluation replaces only the run whose model it scored)."""
    import shutil

    from tests.helpers import tiny_recipe
    from tests.report_runs import write_gsm8k

    gsm = write_gsm8k(tmp_path / "gsm.jsonl", n=8)
    recipe = tiny_recipe(tmp_path, train={"eval_every": 2, "max_steps": 2},
                         data={"task": "gsm8k", "train": str(gsm), "val": str(gsm), "val_limit": 2},
                         eval={"max_new_tokens": 2})
    for limit in (4, 8):
        assert main(["train", str(recipe), f"data.limit={limit}", f"name=size{limit}"]) == 0
    base = tmp_path / "runs" / "eval" / "20260101_000000_base"
    shutil.copytree(made["eval_seed0"], base)
    metrics = json.loads((base / "metrics.json").read_text())
    (base / "metrics.json").write_text(json.dumps({**metrics, "model": "smollm2-135m-instruct", "adapter": None}))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    sweeps = md.split("## Sweeps", 1)[1].split("\n## ", 1)[0]
    assert "sweep_accuracy_vs_size.png" in sweeps and (out / "img" / "sweep_accuracy_vs_size.png").is_file()
    assert "Left out (setting not recorded): base" in sweeps
