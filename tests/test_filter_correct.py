"""data.filter_correct: scores recorded model responses (not gold-built targets) and keeps the correct ones."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ftlab.config.schema import DataConfig
from ftlab.data.responses import training_examples
from ftlab.data.sources import load_conversations
from ftlab.errors import UserError
from ftlab.tasks import get_task

# GSM8K rows with a model's reasoning trace in `response`; the comment says what the checker reads
# (primary rule: the strict '#### N' / 'The answer is N' when present, else the last number).
TRACES = [
    {"question": "Ann has 1 pen and buys 2. How many?", "answer": "1+2=3\n#### 3",
     "response": "1 + 2 = 3\n#### 3"},                              # strict 3 = gold: kept
    {"question": "Bo has 3 pens and buys 4. How many?", "answer": "3+4=7\n#### 7",
     "response": "3 + 4 = 8\n#### 8"},                              # strict 8 != 7: dropped
    {"question": "Cy has 5 pens and buys 6. How many?", "answer": "5+6=11\n#### 11",
     "response": "5 plus 6 is 11"},                                 # no strict form, last number 11: kept
    {"question": "Di has 10 pens and buys 20. How many?", "answer": "10+20=30\n#### 30",
     "response": "The answer is 31. Check: 10 + 20 = 30"},          # strict 31 wins over the later 30: dropped
]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_filter_keeps_correct_responses_and_logs_the_retention_rate(tmp_path, caplog):
    src = write_jsonl(tmp_path / "traces.jsonl", TRACES)
    with caplog.at_level(logging.INFO, logger="ftlab"):
        kept = training_examples(get_task("gsm8k"), src, None, None, filter_correct=True)
    assert [ex.gold for ex in kept] == ["3", "11"]
    assert [ex.target for ex in kept] == [TRACES[0]["response"], TRACES[2]["response"]]  # trained on the traces
    assert "kept 2 of 4 examples (retention 50.0%)" in caplog.text


def test_responses_are_the_targets_without_the_filter_too(tmp_path):
    # the unfiltered baseline of a filtered run must train on the same kind of text: all four traces
    src = write_jsonl(tmp_path / "traces.jsonl", TRACES)
    examples = training_examples(get_task("gsm8k"), src, None, None, filter_correct=False)
    assert [ex.target for ex in examples] == [r["response"] for r in TRACES]


def test_filter_refuses_gold_built_targets(tmp_path):
    # without responses every target is "... #### <gold>", which always scores correct
    src = write_jsonl(tmp_path / "gsm.jsonl", [{k: v for k, v in r.items() if k != "response"} for r in TRACES])
    with pytest.raises(UserError, match="always score correct, so the filter would remove nothing"):
        training_examples(get_task("gsm8k"), src, None, None, filter_correct=True)
    assert len(training_examples(get_task("gsm8k"), src, None, None)) == 4   # unfiltered: gold targets, as before


def test_filter_errors_name_the_record(tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [TRACES[0], {k: v for k, v in TRACES[1].items() if k != "response"}])
    with pytest.raises(UserError, match=r"mixed\.jsonl: record 2: missing field 'response'"):
        training_examples(get_task("gsm8k"), mixed, None, None, filter_correct=True)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [TRACES[1], TRACES[3]])
    with pytest.raises(UserError, match=r"kept no example \(0 of 2 responses are correct\)"):
        training_examples(get_task("gsm8k"), wrong, None, None, filter_correct=True)
    bad_type = write_jsonl(tmp_path / "bad.jsonl", [{**TRACES[0], "response": 3}])
    with pytest.raises(UserError, match=r"bad\.jsonl: record 1: field 'response' must be a string"):
        training_examples(get_task("gsm8k"), bad_type, None, None)


def test_load_conversations_filters_task_data_and_refuses_generic(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "traces.jsonl", TRACES)
    val = write_jsonl(tmp_path / "val.jsonl", TRACES)
    cfg = DataConfig(task="gsm8k", filter_correct=True, chat_template=False, train=src, val=val)
    conversations = load_conversations(cfg, src, "train", tiny_tokenizer, None)
    assert [c[0][1] for c in conversations] == [TRACES[0]["response"], TRACES[2]["response"]]
    assert len(load_conversations(cfg, val, "validation", tiny_tokenizer, None)) == 4   # val is not filtered
    generic = write_jsonl(tmp_path / "generic.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(UserError, match="data.filter_correct needs a task to check answers"):
        load_conversations(DataConfig(task="generic", filter_correct=True), generic, "train", tiny_tokenizer, None)


def test_ftlab_filter_keeps_the_rows_data_filter_correct_keeps(tmp_path):
    """One checker, two places: `ftlab filter` ahead of training and data.filter_correct at its start."""
    from ftlab.config import load_recipe
    from ftlab.data.traces import run_filter

    src = write_jsonl(tmp_path / "traces.jsonl", TRACES)
    out = tmp_path / "kept.jsonl"
    stats = run_filter(load_recipe(None, ["data.task=gsm8k"]), src, str(out))
    kept_rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    in_training = training_examples(get_task("gsm8k"), src, None, None, filter_correct=True)
    assert [r["response"] for r in kept_rows] == [ex.target for ex in in_training] == [TRACES[0]["response"],
                                                                                       TRACES[2]["response"]]
    assert (stats["original"], stats["kept"], stats["retention"]) == (4, 2, 0.5)
    # filtering the kept rows again removes nothing
    assert len(training_examples(get_task("gsm8k"), str(out), None, None, filter_correct=True)) == 2
