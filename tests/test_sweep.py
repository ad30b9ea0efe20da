"""`ftlab sweep`: seeds x K -> one pretraining run each, a summary table and a plot of validation loss vs K."""
from __future__ import annotations

import csv
import json

import pytest

from ftlab.cli import main
from ftlab.errors import UserError
from tests.pretrain_helpers import make_corpus, pretrain_recipe


def test_sweep_runs_every_seed_and_k_and_tabulates(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    recipe = pretrain_recipe(tmp_path, corpus, train={"max_steps": 2, "eval_every": 2},
                             sweep={"seeds": [0, 1], "num_categories": [1, 3]}, pretrain={"val_windows": 4})
    capsys.readouterr()
    assert main(["sweep", str(recipe)]) == 0
    sweep = tmp_path / capsys.readouterr().out.strip().splitlines()[-1]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["seed"], r["k"]) for r in rows] == [("0", "1"), ("0", "3"), ("1", "1"), ("1", "3")]
    for r in rows:
        assert r["status"] == "complete" and float(r["final_val_loss"]) > 0 and float(r["final_val_bits_per_byte"]) > 0
        assert len(r["categories"].split()) == int(r["k"])
        run_cfg = json.loads((tmp_path / r["run"] / "categories.json").read_text())
        assert run_cfg["categories"] == r["categories"].split()
    assert (sweep / "val_loss_vs_k.png").is_file() and "| seed | k |" in (sweep / "summary.md").read_text()
    assert json.loads((sweep / "summary.json").read_text())["status"] == "complete"


def test_sweep_checks_every_k_before_the_first_run(tmp_path):
    from ftlab.config import load_recipe
    from ftlab.runs.sweep import run_sweep

    corpus = make_corpus(tmp_path)
    recipe = pretrain_recipe(tmp_path, corpus, train={"eval_every": 2}, sweep={"seeds": [0], "num_categories": [1, 9]})
    with pytest.raises(UserError, match="pretrain.num_categories=9, but only 3 categories"):
        run_sweep(str(recipe), [], load_recipe(recipe))
    assert not (tmp_path / "runs" / "pretrain").exists()
