"""What `ftlab chat/serve/export` are pointed at: a model, an adapter, or a training run (its final/)."""
from __future__ import annotations

import json

import pytest

from ftlab.errors import UserError
from ftlab.use.source import resolve_source


def fake_run(tmp_path, status="complete", final=True):
    run = tmp_path / "runs" / "sft" / "20260101_000000_x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    (run / "summary.json").write_text(json.dumps({"status": status}))
    if final:
        (run / "final").mkdir()
    return run


def test_a_run_directory_stands_for_its_final_model(tmp_path):
    run = fake_run(tmp_path)
    src = resolve_source(str(run))
    assert src.name == str(run / "final") and src.run == run and src.adapter is None
    assert src.label == run.name


def test_a_model_name_is_passed_through():
    src = resolve_source("smollm2-135m-instruct")
    assert (src.name, src.run, src.label) == ("smollm2-135m-instruct", None, "smollm2-135m-instruct")


def test_a_run_without_final_names_its_status_and_what_it_has(tmp_path):
    run = fake_run(tmp_path, status="interrupted", final=False)
    ckpt = run / "checkpoints" / "step_000004"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    with pytest.raises(UserError, match=r"saved no final/ model \(status: interrupted\).*step_000004/model"):
        resolve_source(str(run))


def test_a_missing_adapter_directory_is_one_line(tmp_path):
    with pytest.raises(UserError, match="--adapter .*not a directory"):
        resolve_source("smollm2-135m-instruct", adapter=str(tmp_path / "nope"))
