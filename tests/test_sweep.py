"""`ftlab sweep`: grid x seeds -> one run per point for train/eval/loop, points.json states, resume after an
interrupt with the same losses, every point checked before the first run, summary tables and the K-sweep plot."""
from __future__ import annotations

import csv
import json
import shlex

import pytest

from ftlab.cli import main
from ftlab.config import load_recipe
from ftlab.errors import UserError
from ftlab.runs.sweep_table import stitched_metrics
from tests.helpers import tiny_recipe
from tests.pretrain_helpers import make_corpus, pretrain_recipe


def sweep_dir_from(capsys, tmp_path):
    return tmp_path / capsys.readouterr().out.strip().splitlines()[-1]


def points(sweep):
    return json.loads((sweep / "points.json").read_text())["points"]


def test_k_sweep_runs_every_seed_and_k_and_tabulates(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    recipe = pretrain_recipe(tmp_path, corpus, train={"max_steps": 2, "eval_every": 2},
                             sweep={"seeds": [0, 1], "num_categories": [1, 3]}, pretrain={"val_windows": 4})
    capsys.readouterr()
    assert main(["sweep", str(recipe)]) == 0
    sweep = sweep_dir_from(capsys, tmp_path)
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["seed"], r["pretrain.num_categories"]) for r in rows] == [("0", "1"), ("0", "3"), ("1", "1"), ("1", "3")]
    assert [r["point"] for r in rows] == ["k1_s0", "k3_s0", "k1_s1", "k3_s1"]
    for r, p in zip(rows, points(sweep)):
        assert r["status"] == p["status"] == "complete" and float(r["eval/loss"]) > 0 and float(r["eval/bits_per_byte"]) > 0
        assert r["steps"] == "2" and len(r["categories"].split()) == int(r["pretrain.num_categories"])
        run = sweep / r["run"]
        assert p["run"] == r["run"] == p["attempts"][0] and run.parent.parent == sweep / p["label"]
        assert json.loads((run / "categories.json").read_text())["categories"] == r["categories"].split()
        cfg = load_recipe(run / "config.yaml")
        assert (cfg.seed, cfg.pretrain.num_categories) == (int(r["seed"]), int(r["pretrain.num_categories"]))
        last_eval = [m for m in stitched_metrics([run]) if "eval/loss" in m][-1]
        assert float(r["eval/loss"]) == pytest.approx(last_eval["eval/loss"])
    assert (sweep / "val_loss_vs_k.png").is_file()
    assert "| point | pretrain.num_categories | seed | status |" in (sweep / "summary.md").read_text()
    assert json.loads((sweep / "summary.json").read_text())["status"] == "complete"


def test_k_sweep_checks_every_k_before_the_first_run(tmp_path):
    from ftlab.runs.sweep import run_sweep

    corpus = make_corpus(tmp_path)
    recipe = pretrain_recipe(tmp_path, corpus, train={"eval_every": 2}, sweep={"seeds": [0], "num_categories": [1, 9]})
    with pytest.raises(UserError, match="pretrain.num_categories=9, but only 3 categories"):
        run_sweep(str(recipe), [], load_recipe(recipe))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, needle", [
    (["--grid", "data.limt=[4,8]"], "unknown key 'data.limt'; did you mean 'data.limit'?"),
    (["--grid", "data.limit=[4,many]"], "override 'data.limit=many': wrong type for 'data.limit'"),
    (["--grid", "data.limit=[4,0]"], "override 'data.limit=0': 'data.limit' must be >= 1"),
    (["--grid", "optim.lr=0.1"], "grid key 'optim.lr' must list its values, e.g. optim.lr=[v1,v2]; got 0.1"),
    (["--grid", "output_dir=[a,b]"], "grid key 'output_dir' cannot be swept"),
    (["--grid", "seed=[1,2]", "--seeds", "0,1"], "the seed is swept twice"),
    (["--seeds", "0,x"], "--seeds must be integers"),
    (["sweep.verb=fit", "--seeds", "0"], "'sweep.verb' must be one of train, eval, loop; got 'fit'"),
    (["--verb", "loop", "--seeds", "0"], "sweep point s0: ftlab loop trains on option traces"),
    ([], "nothing to sweep"),
    (["--grid", "data.packing=[false,true]", "--grid", "train.detach_prompt=[false,true]"],
     ("sweep point packingtrue_detach_prompttrue: override 'train.detach_prompt=true': 'train.detach_prompt' "
      "cannot be combined with 'data.packing=True'")),
])
def test_a_bad_grid_is_one_line_before_anything_runs(tmp_path, capsys, args, needle):
    recipe = tiny_recipe(tmp_path)
    assert main(["sweep", str(recipe), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftlab: error: ") and needle in err[0], err
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_each_point_as_a_command_line_that_loads_to_the_point(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, sweep={"grid": {"data.limit": [8, 16], "optim": {"lr": [1e-3, 3e-3]}}})
    capsys.readouterr()
    assert main(["sweep", str(recipe), "train.max_steps=2", "--grid", "optim.lr=[1e-4,'2e-4']", "--seeds", "3",
                 "--dry-run"]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 4 and all(cmd[:3] == ["ftlab", "train", str(recipe)] for cmd in lines)
    loaded = [load_recipe(cmd[2], cmd[3:]) for cmd in lines]
    # the recipe's data.limit x the command line's optim.lr (the quoted '2e-4' made a number by the schema), seed 3
    assert [(c.data.limit, c.optim.lr, c.seed, c.train.max_steps) for c in loaded] == [
        (8, 1e-4, 3, 2), (8, 2e-4, 3, 2), (16, 1e-4, 3, 2), (16, 2e-4, 3, 2)]
    assert loaded[1].name == "tiny_limit8_lr2e-4_s3" and loaded[1].output_dir.endswith("/limit8_lr2e-4_s3")
    assert not (tmp_path / "runs").exists()


def test_an_interrupted_sft_sweep_resumes_to_the_same_losses(tmp_path, capsys, monkeypatch):
    """Ctrl-C right after point 2's step-2 checkpoint; --resume skips point 1 and resumes point 2 from it: every
    step's loss equals an uninterrupted sweep's. Re-running the same command with the same sweep.dir runs nothing."""
    from ftlab.train.loop import Loop

    recipe = tiny_recipe(tmp_path, train={"max_steps": 4, "save_every": 2, "keep_last": 2},
                         sweep={"grid": {"optim.lr": [1e-3, 3e-3]}})
    assert main(["sweep", str(recipe), f"sweep.dir={tmp_path / 'whole'}"]) == 0
    whole = tmp_path / "whole"

    save = Loop.save_checkpoint

    def save_then_ctrl_c(self):
        save(self)
        if self.cfg.name.endswith("lr0.003") and self.done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Loop, "save_checkpoint", save_then_ctrl_c)
    cut = tmp_path / "cut"
    command = ["sweep", str(recipe), f"sweep.dir={cut}"]
    assert main(command) == 130
    state = points(cut)
    assert [p["status"] for p in state] == ["complete", "interrupted"]
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted"
    interrupted = cut / state[1]["run"]
    assert json.loads((interrupted / "summary.json").read_text())["status"] == "interrupted"
    first_run = sorted((cut / state[0]["run"]).rglob("*"))
    monkeypatch.setattr(Loop, "save_checkpoint", save)

    capsys.readouterr()
    assert main(["sweep", "--resume", str(cut)]) == 0
    assert sweep_dir_from(capsys, tmp_path) == cut
    after = points(cut)
    assert [p["status"] for p in after] == ["complete", "complete"]
    assert after[0]["attempts"] == state[0]["attempts"] and sorted((cut / state[0]["run"]).rglob("*")) == first_run
    assert after[1]["attempts"][0] == state[1]["run"] and len(after[1]["attempts"]) == 2
    resumed = json.loads((cut / after[1]["run"] / "summary.json").read_text())
    assert resumed["resumed_from"].endswith("step_000002") and resumed["steps"] == 4
    for done, ref in zip(after, points(whole)):
        got = {r["train_step"]: r["train/loss"] for r in stitched_metrics([cut / a for a in done["attempts"]])}
        want = {r["train_step"]: r["train/loss"] for r in stitched_metrics([whole / ref["run"]])}
        assert sorted(got) == [1, 2, 3, 4] and got == pytest.approx(want, rel=1e-6, abs=1e-7)
    rows = list(csv.DictReader((cut / "summary.csv").open()))
    assert [float(r["train/loss"]) for r in rows] == pytest.approx(
        [float(r["train/loss"]) for r in csv.DictReader((whole / "summary.csv").open())], rel=1e-6)

    assert main(command) == 0  # the same sweep again: every point is complete, nothing runs
    assert points(cut) == after
    assert main(command[:2] + ["--grid", "optim.lr=[1e-3]", f"sweep.dir={cut}"]) == 2
    assert "holds another sweep (its grid" in capsys.readouterr().err


def test_an_eval_sweep_tabulates_each_points_accuracy(tmp_path, capsys):
    from tests.test_eval_infer import gsm_file

    recipe = tiny_recipe(tmp_path, eval={"task": "gsm8k", "source": str(gsm_file(tmp_path)), "max_new_tokens": 3})
    capsys.readouterr()
    assert main(["sweep", str(recipe), "--verb", "eval", "--grid", "eval.limit=[2,3]"]) == 0
    sweep = sweep_dir_from(capsys, tmp_path)
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["eval.limit"] for r in rows] == ["2", "3"]
    for r, p in zip(rows, points(sweep)):
        run = sweep / p["run"]
        assert run.parent == sweep / p["label"] / "eval" and p["command"][1] == "eval"
        predictions = [json.loads(line) for line in (run / "predictions.jsonl").open()]
        assert len(predictions) == int(r["n"]) == int(r["eval.limit"])
        assert float(r["accuracy"]) == sum(x["correct"] for x in predictions) / len(predictions)


def test_a_loop_sweep_gives_each_point_its_own_loop_directory(tmp_path, capsys):
    from tests.test_sokrates_loop import loop_recipe

    recipe = loop_recipe(tmp_path, iterations=0, eval_samples=0, dir=str(tmp_path / "shared_loop"))
    capsys.readouterr()
    assert main(["sweep", str(recipe), "--verb", "loop", "--seeds", "0"]) == 0
    sweep = sweep_dir_from(capsys, tmp_path)
    [point] = points(sweep)
    loop_dir = sweep / "s0" / "loop" / "oak_s0"  # not the recipe's loop.dir, which every point would share
    assert point["status"] == "complete" and sweep / point["run"] == loop_dir and not (tmp_path / "shared_loop").exists()
    summary = json.loads((loop_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and (loop_dir / "iter_0" / "eval" / "DONE").is_file()
    [row] = csv.DictReader((sweep / "summary.csv").open())
    assert float(row["answer_accuracy"]) == summary["last"]["answer_accuracy"] and row["problems"] == "4"


def test_a_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, schedule={"name": "constant"}, train={"max_steps": 2, "grad_clip": None})
    assert main(["sweep", str(recipe), "--grid", "optim.lr=[1e30,1e-3]", f"sweep.dir={tmp_path / 'sw'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ftlab: error: ") and "1 of 2 points failed (first: lr1e+30: TrainingDiverged:" in err
    failed, done = points(tmp_path / "sw")
    assert (failed["status"], done["status"]) == ("failed", "complete") and "non-finite" in failed["error"]
    assert json.loads((tmp_path / "sw" / failed["run"] / "summary.json").read_text())["status"] == "failed"
    assert json.loads((tmp_path / "sw" / "summary.json").read_text())["status"] == "failed"
    assert [r["status"] for r in csv.DictReader((tmp_path / "sw" / "summary.csv").open())] == ["failed", "complete"]
