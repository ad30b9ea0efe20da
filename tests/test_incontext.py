"""In-context loss: per-position mean loss over the recipe's validation windows, for any model."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ftlab.cli import main
from ftlab.config import load_recipe
from ftlab.incontext import icl_positions
from ftlab.runs.trackers import read_metrics
from tests.pretrain_helpers import make_corpus, pretrain_recipe


def test_per_position_loss_averages_to_the_runs_eval_loss(tmp_path, capsys):
    from ftlab.train import run_training

    corpus = make_corpus(tmp_path)
    recipe = pretrain_recipe(tmp_path, corpus, train={"max_steps": 3, "eval_every": 3},
                             pretrain={"val_windows": 12, "num_categories": 2, "icl_early": 2, "icl_late": 500})
    run = run_training(load_recipe(recipe)).path
    eval_loss = [r["eval/loss"] for r in read_metrics(run / "metrics.jsonl") if "eval/loss" in r][-1]
    capsys.readouterr()
    assert main(["in-context-loss", str(recipe), "--model", str(run / "final")]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = list(csv.DictReader(Path(out["csv"]).open()))
    assert [int(r["position"]) for r in rows] == list(range(1, 17)) and all(r["windows"] == "12" for r in rows)
    # the same windows as the loop's validation: the mean over positions is the run's eval/loss
    assert out["mean_loss"] == pytest.approx(eval_loss, rel=1e-5)
    assert (out["icl_early"], out["icl_late"]) == (2, 16)  # late clamped to the window
    assert out["icl_score"] == pytest.approx(float(rows[15]["mean_loss"]) - float(rows[1]["mean_loss"]), abs=1e-5)
    assert Path(out["plot"]).is_file() and out["categories"] == json.loads((run / "categories.json").read_text())[
        "categories"]


def test_icl_positions_are_clamped():
    assert icl_positions(1024, 50, 500) == (50, 500)
    assert icl_positions(100, 50, 500) == (50, 100)
    assert icl_positions(40, 50, 500) == (39, 40)
