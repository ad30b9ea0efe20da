"""`ftlab prepare-socsci`: SocSci210 rows -> train/val/test JSONL for the socsci210 task, and the SOCRATES recipes."""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from ftlab.cli import main
from ftlab.data.socsci_prepare import (
    INSTRUCTION,
    SPLITS,
    AnswerLedger,
    SocsciSettings,
    prepare_socsci,
    report_table,
    to_hub_row,
)
from ftlab.tasks.socsci210 import SocSci210Task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "socsci210"
needs_data = pytest.mark.skipif(not (DATA / "val.jsonl").is_file(), reason="needs ../shared/data/socsci210")


def hub_row(study: str, condition: int, participant: int, stimuli: str, response: int, **demographic) -> dict:
    demo = {"age": 30, "gender": "Female", "education": None, "income": "50-74K", "employment": None,
            "party_id": None, "ideology": "Moderate"} | demographic
    return {"sample_id": f"{study}-{condition}-{participant}-{stimuli[:8]}", "participant": participant,
            "demographic": demo, "stimuli": stimuli, "response": response, "condition_num": condition,
            "task_num": 0, "study_id": study}


def synthetic_rows(n_studies: int = 8, conditions: int = 3, participants: int = 6, seed: int = 0) -> list[dict]:
    """Every participant (numbers repeat across studies, as in the hub) answers two questions of one condition."""
    rng = random.Random(seed)
    rows = []
    for s in range(n_studies):
        for p in range(1, participants + 1):
            c = rng.randrange(conditions)
            for q in range(2):
                rows.append(hub_row(f"st{s}", c, p, f"Study {s}, condition {c}, question {q}. Only return an "
                                    "integer from 1 to 7.", rng.randint(1, 7), age=20 + p))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def read_split(out: Path, name: str) -> list[dict]:
    with (out / f"{name}.jsonl").open() as f:
        return [json.loads(line) for line in f]


def prepare(tmp: Path, rows: list[dict], name: str = "in.jsonl", **kw) -> tuple[Path, dict]:
    out = tmp / f"out-{kw.get('split', 'study')}"
    report = prepare_socsci(SocsciSettings(source=str(write_jsonl(tmp / name, rows)), out=str(out), **kw))
    return out, report


def test_a_hub_row_becomes_the_row_the_task_reads(tmp_path):
    row = hub_row("kryns", 2, 17, "  You read a story. Only return an integer from 1 to 7.  ", 3, gender=None)
    out, report = prepare(tmp_path, [row], val_fraction=0.0, test_fraction=0.0)
    (prepared,) = read_split(out, "train")
    assert prepared == {"instruction": INSTRUCTION,
                        "input": "Demographics: Age: 30; Income: 50-74K; Ideology: Moderate\n\n"
                                 "Scenario: You read a story. Only return an integer from 1 to 7.",
                        "output": "Response: 3", "study_id": "kryns", "condition_num": 2, "participant": 17,
                        "sample_id": row["sample_id"], "task_num": 0}
    example = SocSci210Task().to_example(prepared, 0)
    assert example.meta["gold_value"] == 3 and example.question.startswith(INSTRUCTION)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"] == 1


@needs_data
def test_hub_shaped_rows_render_exactly_as_the_published_files(tmp_path):
    """The published 1% rows, turned back into the hub's shape (gzipped), come out byte for byte as they were."""
    with (DATA / "val.jsonl").open() as f:
        real = [json.loads(line) for _, line in zip(range(300), f)]
    hub = [to_hub_row(r, participant=i, sample_id=i) for i, r in enumerate(real)]
    out, _ = prepare(tmp_path, hub, name="hub.jsonl.gz", val_fraction=0.0, test_fraction=0.0)
    keys = ("instruction", "input", "output", "study_id", "condition_num")
    assert [{k: r[k] for k in keys} for r in read_split(out, "train")] == real


@pytest.mark.parametrize("kind,key", [("study", lambda r: r["study_id"]),
                                      ("condition", lambda r: (r["study_id"], r["condition_num"])),
                                      ("participant", lambda r: (r["study_id"], r["participant"]))])
def test_each_key_lands_on_one_side_whatever_the_row_order(tmp_path, kind, key):
    rows = synthetic_rows()
    out, report = prepare(tmp_path, rows, split=kind, val_fraction=0.25, test_fraction=0.25, seed=3)
    where = {name: read_split(out, name) for name in SPLITS}
    # nothing lost, nothing doubled
    assert sorted(r["sample_id"] for rs in where.values() for r in rs) == sorted(r["sample_id"] for r in rows)
    sides = defaultdict(set)
    for name, rs in where.items():
        for r in rs:
            sides[key(r)].add(name)
    assert all(len(s) == 1 for s in sides.values())
    for name, rs in where.items():
        assert report["splits"][name]["rows"] == len(rs)
        assert report["splits"][name]["studies"] == len({r["study_id"] for r in rs})
        assert report["splits"][name]["conditions"] == len({(r["study_id"], r["condition_num"]) for r in rs})
    assert report["conditions"] == len({(r["study_id"], r["condition_num"]) for r in rows})
    study_sides = defaultdict(set)
    for name, rs in where.items():
        for r in rs:
            study_sides[r["study_id"]].add(name)
    both = sum(1 for s in study_sides.values() if "train" in s and s & {"val", "test"})
    assert report["studies_on_both_sides"] == both
    if kind == "study":
        assert both == 0
    warned = [w for w in report["warnings"] if w.startswith("split by participant")]
    assert bool(warned) == (kind == "participant")
    if warned:
        assert f"{both} of 8 studies ({both / 8:.0%})" in warned[0] and both > 0
    # the split depends on (seed, key) only: shuffled input, same sides
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    (tmp_path / "again").mkdir()
    out2, _ = prepare(tmp_path / "again", shuffled, split=kind, val_fraction=0.25, test_fraction=0.25, seed=3)
    for name in SPLITS:
        assert {r["sample_id"] for r in read_split(out2, name)} == {r["sample_id"] for r in where[name]}


def test_duplicate_and_conflict_counts_by_hand(tmp_path, monkeypatch):
    monkeypatch.setattr(AnswerLedger, "BUFFER_ROWS", 3)  # several flushes into the bucket files
    a, b, c = "Question A. Only return 1 or 2.", "Question B.", "Question C."
    rows = ([hub_row("s1", 1, 1, a, 2)] * 3 +                             # 2 duplicates
            [hub_row("s1", 1, 2, b, 1), hub_row("s1", 1, 3, b, 2)] +      # a conflict: 1 prompt, 2 rows
            [hub_row("s1", 1, 4, c, 5)] * 2 + [hub_row("s1", 1, 5, c, 6)] +  # 1 duplicate and a conflict of 3 rows
            [hub_row("s1", 1, 6, c, 5, age=99)])                          # other demographics: another prompt
    _, report = prepare(tmp_path, rows, val_fraction=0.0, test_fraction=0.0)
    assert report["rows"] == 9 and report["prompts"] == 4
    assert report["duplicates"]["rows"] == 3 and report["splits"]["train"]["duplicates"] == 3
    assert report["conflicting_answers"] == {**report["conflicting_answers"], "prompts": 2, "rows": 5}
    assert report["prompts_in_several_splits"] == 0
    table = report_table(report)
    assert "duplicates (same prompt and answer): 3 rows of 9" in table
    assert "conflicting answers (same prompt, different answers): 2 prompts, 5 rows" in table


def test_counts_agree_with_a_plain_count_of_the_written_files(tmp_path, monkeypatch):
    """Many repeated prompts across studies and splits: the ledger's sorted counts equal dictionary counts."""
    monkeypatch.setattr(AnswerLedger, "BUFFER_ROWS", 50)
    rng = random.Random(7)
    rows = [hub_row(f"st{rng.randrange(12)}", 0, i, f"Question {rng.randrange(40)}.", rng.randint(1, 3),
                    age=rng.choice([30, 31])) for i in range(1500)]
    out, report = prepare(tmp_path, rows, split="participant", val_fraction=0.2, test_fraction=0.2)
    pairs, answers, splits_of = Counter(), defaultdict(set), defaultdict(set)
    within = {}
    for name in SPLITS:
        rs = read_split(out, name)
        per = Counter((r["instruction"], r["input"], r["output"]) for r in rs)
        within[name] = sum(n - 1 for n in per.values())
        for r in rs:
            prompt = (r["instruction"], r["input"])
            pairs[prompt, r["output"]] += 1
            answers[prompt].add(r["output"])
            splits_of[prompt].add(name)
    conflicting = [p for p, a in answers.items() if len(a) > 1]
    assert report["prompts"] == len(answers)
    assert report["duplicates"]["rows"] == sum(n - 1 for n in pairs.values()) > 0
    assert report["conflicting_answers"]["prompts"] == len(conflicting) > 0
    assert report["conflicting_answers"]["rows"] == sum(pairs[p, a] for p in conflicting for a in answers[p])
    assert report["prompts_in_several_splits"] == sum(1 for s in splits_of.values() if len(s) > 1) > 0
    assert {name: report["splits"][name]["duplicates"] for name in SPLITS} == within


@needs_data
def test_real_rows_duplicates_and_conflicts(tmp_path):
    """val + test of the published 1% split, as they are (prepared rows): counted as a dictionary counts them."""
    src = tmp_path / "valtest.jsonl"
    src.write_bytes((DATA / "val.jsonl").read_bytes() + (DATA / "test.jsonl").read_bytes())
    out = tmp_path / "out"
    assert main(["prepare-socsci", str(src), "--out", str(out), "--split", "condition"]) == 0
    report = json.loads((out / "report.json").read_text())
    with src.open() as f:
        rows = [json.loads(line) for line in f]
    pairs = Counter((r["input"], r["output"]) for r in rows)
    answers = defaultdict(set)
    for r in rows:
        answers[r["input"]].add(r["output"])
    assert report["rows"] == len(rows) == 2780 + 3289
    assert report["duplicates"]["rows"] == sum(n - 1 for n in pairs.values())
    assert report["conflicting_answers"]["prompts"] == sum(1 for a in answers.values() if len(a) > 1)
    assert report["studies"] == len({r["study_id"] for r in rows})


def run_cli(args: list[str]) -> int:
    """`ftlab ARGS` in this process; a usage error exits from argparse, with its code."""
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftlab: error: "), err
    return err[0]


@pytest.mark.parametrize("case,expected", [
    ("missing", "no-such.jsonl: file not found"),
    ("shape", "bad.jsonl:3: not a SocSci210 row"),
    ("response", "bad.jsonl:2: field 'response' must be an integer; got 2.5"),
    ("output", "bad.jsonl:2: field 'output' must be 'Response: <integer>'"),
    ("no_participant", "bad.jsonl:1: no 'participant' field"),
    ("gzip", "bad.jsonl.gz: not a complete gzip file"),
    ("split", "argument --split: invalid choice: 'studies'"),
    ("fractions", "--val-fraction + --test-fraction must be below 1"),
    ("hub_offline", "cannot reach the Hugging Face Hub"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch, case, expected):
    good = hub_row("s1", 1, 1, "Question.", 4)
    src, args = tmp_path / "bad.jsonl", []
    if case == "missing":
        src = tmp_path / "no-such.jsonl"
    elif case == "shape":
        write_jsonl(src, [good, good, {"prompt": "x", "response": "y"}])
    elif case == "response":
        write_jsonl(src, [good, good | {"response": 2.5}])
    elif case == "output":
        write_jsonl(src, [{"input": "x", "output": "Response: 1", "study_id": "s", "condition_num": 1},
                          {"input": "x", "output": "Answer: 1", "study_id": "s", "condition_num": 1}])
    elif case == "no_participant":
        write_jsonl(src, [{"input": "x", "output": "Response: 1", "study_id": "s", "condition_num": 1}])
        args = ["--split", "participant"]
    elif case == "gzip":
        src = tmp_path / "bad.jsonl.gz"
        src.write_bytes(gzip.compress(b"".join(json.dumps(good).encode() + b"\n" for _ in range(200)))[:-40])
    elif case == "split":
        write_jsonl(src, [good])
        args = ["--split", "studies"]
    elif case == "fractions":
        write_jsonl(src, [good])
        args = ["--val-fraction", "0.5", "--test-fraction", "0.5"]
    elif case == "hub_offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        src = "socratesft/SocSci210"
    rc = run_cli(["prepare-socsci", str(src), "--out", str(tmp_path / "out"), *args])
    assert rc == 2 and expected in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left behind


def test_a_failed_overwrite_keeps_the_previous_output(tmp_path, capsys):
    good = synthetic_rows(n_studies=2)
    out, _ = prepare(tmp_path, good)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["prepare-socsci", str(tmp_path / "in.jsonl"), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in _one_error_line(capsys)
    write_jsonl(tmp_path / "bad.jsonl", good + [{"stimuli": "x"}])
    assert main(["prepare-socsci", str(tmp_path / "bad.jsonl"), "--out", str(out), "--overwrite"]) == 2
    assert f"bad.jsonl:{len(good) + 1}: missing field 'response'" in _one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_ctrl_c_while_streaming_leaves_nothing(tmp_path):
    """Rows arrive through a pipe and stop coming; Ctrl-C then: exit 130, no output, no temp directory."""
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    # as from a terminal: a shell starts background jobs (a CI script's `&`, nohup) with SIGINT ignored, and the
    # child would inherit that
    proc = subprocess.Popen([sys.executable, "-m", "ftlab.cli", "prepare-socsci", str(fifo), "--out", str(out)],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    with fifo.open("w") as f:
        for r in synthetic_rows(n_studies=2):
            f.write(json.dumps(r) + "\n")
        f.flush()
        deadline = time.time() + 60
        while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]:
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.05)
        time.sleep(0.3)  # the rows written so far are read; the process waits for more
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "ftlab: interrupted"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_full_data_recipe_loads_with_the_seed_settings():
    from ftlab.config import load_recipe

    cfg = load_recipe(str(ROOT / "recipes" / "socrates" / "qwen14b_qlora.yaml"))
    assert cfg.model.name == "Qwen/Qwen2.5-14B-Instruct" and cfg.lora.quantize == "nf4"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.optim.lr, cfg.optim.weight_decay) == (32, 64, 1e-5, 0.1)
    assert (cfg.schedule.name, cfg.schedule.warmup_ratio, cfg.data.max_length) == ("cosine", 0.05, 2048)
    assert (cfg.train.global_batch, cfg.train.batch_size, cfg.train.precision) == (1024, 8, "bf16")
    assert cfg.data.task == "socsci210"


@needs_data
@pytest.mark.slow
def test_cpu_recipe_trains_on_a_prepared_slice_and_compares_by_split(tmp_path, capsys):
    """cpu_launch.yaml (the full-data recipe on the embedded model) for 2 steps on a prepared slice of the real rows,
    launched on 2 processes as its comment says, then base vs tuned on that split's test file: one table with the socsci210 metrics of the split kind."""
    by_study = defaultdict(list)  # the 6 shortest rows of every study: every split gets studies, steps stay short
    with (DATA / "val.jsonl").open() as f:
        for line in f:
            by_study[json.loads(line)["study_id"]].append(line)
    (tmp_path / "slice.jsonl").write_text("".join(line for rows in by_study.values()
                                                  for line in sorted(rows, key=len)[:6]))
    prepared = tmp_path / "study"
    assert main(["prepare-socsci", str(tmp_path / "slice.jsonl"), "--out", str(prepared), "--val-fraction", "0.2",
                 "--test-fraction", "0.3"]) == 0
    runs = tmp_path / "runs"
    recipe = str(ROOT / "recipes" / "socrates" / "cpu_launch.yaml")
    # as the recipe says it runs: through ftlab launch, 2 processes (gloo on a CPU), global batch 2
    assert main(["launch", recipe, "--profile", "ddp", "--gpus", "2", f"data.train={prepared / 'train.jsonl'}",
                 f"data.val={prepared / 'val.jsonl'}", f"output_dir={runs}", "train.max_steps=2",
                 "train.batch_size=1", "train.global_batch=2", "train.eval_every=null"]) == 0
    (run,) = (runs / "sft").glob("2*")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["world_size"] == 2
    losses = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").open() if "train/loss" in line]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses)
    capsys.readouterr()
    assert main(["compare-socsci", recipe, "--base", "smollm2-135m-instruct", "--pair", str(prepared),
                 str(run / "final"), f"output_dir={runs}", "eval.limit=2", "eval.max_new_tokens=8"]) == 0
    table = capsys.readouterr().out
    (result,) = json.loads(next((runs / "eval").glob("*_socsci210_by_split/by_split.json")).read_text())
    assert result["split_by"] == "study" and result["leakage"] is None
    assert result["base"]["n"] == result["tuned"]["n"] == 2
    assert "| study | smollm2-135m-instruct | 2 |" in table and "| study | tuned - base |" in table
