"""Real run directories for the `ftlab report` tests: tiny SFT runs (two seeds, a smaller data.limit),
evaluations of their models, two pretraining runs of a K sweep, a run that crashed with a damaged metrics line,
a loop directory and sweep directories in both layouts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.helpers import tiny_recipe
from tests.pretrain_helpers import make_corpus, pretrain_recipe


def write_gsm8k(path: Path, n: int = 4) -> Path:
    path.write_text("".join(json.dumps({"question": f"What is {i} plus 1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"})
                            + "\n" for i in range(n)))
    return path


def only(folder: Path, pattern: str = "2*") -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def build_runs(root: Path) -> dict[str, Path]:
    """Every run the report tests read, under root/runs (root/sweeps holds the sweep directories)."""
    from ftlab.cli import main

    recipe = tiny_recipe(root, train={"eval_every": 2, "max_steps": 4},
                         data={"val": str(root / "train.jsonl"), "val_limit": 8})
    made: dict[str, Path] = {}
    for name, extra in [("seed0", ["seed=0"]), ("seed1", ["seed=1"]), ("small", ["data.limit=16"])]:
        assert main(["train", str(recipe), f"name={name}", *extra]) == 0
        made[name] = only(root / "runs" / "sft", f"2*_{name}")
    gsm = write_gsm8k(root / "gsm.jsonl")
    for name, limit in (("seed0", 4), ("small", 3)):
        assert main(["eval", str(recipe), "eval.task=gsm8k", f"eval.source={gsm}", "eval.max_new_tokens=2",
                     f"eval.limit={limit}", f"model.name={made[name] / 'final'}", "model.scratch=null"]) == 0
        made[f"eval_{name}"] = max((root / "runs" / "eval").glob("2*"))
    corpus = make_corpus(root)
    pt = pretrain_recipe(root, corpus, train={"eval_every": 2})
    for k in (1, 2):
        assert main(["train", str(pt), f"pretrain.num_categories={k}", f"name=k{k}"]) == 0
        made[f"k{k}"] = only(root / "runs" / "pretrain", f"2*_k{k}")
    made["crashed"] = crashed_copy(made["seed1"], root / "runs" / "sft" / "20200101_000000_crashed")
    made["loop"] = loop_dir(root / "runs" / "loop" / "oak")
    made["sweep_points"], made["sweep_summary"] = sweep_dirs(root / "sweeps", made["k1"], made["k2"])
    return made


def crashed_copy(run: Path, to: Path) -> Path:
    """A copy of a finished run cut off after step 3, its summary still 'running', line 2 of its metrics damaged."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("final"))
    rows = (to / "metrics.jsonl").read_text().splitlines()
    kept = [r for r in rows if json.loads(r).get("train_step", json.loads(r).get("eval_step")) <= 3]
    kept[1] = kept[1][: len(kept[1]) // 2]   # half a JSON object, followed by more lines
    (to / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    summary = json.loads((to / "summary.json").read_text())
    summary.update(status="running", name="crashed")
    for key in ("finished", "steps", "final_loss"):
        summary.pop(key, None)
    (to / "summary.json").write_text(json.dumps(summary))
    return to


def loop_dir(path: Path) -> Path:
    """A loop directory as `ftlab loop` leaves it (recipe.json, metrics.jsonl by iteration, summary.json)."""
    path.mkdir(parents=True)
    (path / "recipe.json").write_text(json.dumps({"hash": "0" * 16, "flat": {"name": "oak", "seed": 0,
                                                                              "loop.max_new_tokens": 12}}))
    rows = [{"iteration": 0, "answer_accuracy": 0.25, "fully_valid": 0.0, "problems": 8},
            {"iteration": 1, "answer_accuracy": 0.5, "fully_valid": 0.125, "problems": 8}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "summary.json").write_text(json.dumps({"status": "complete", "last": rows[-1]}))
    return path


def sweep_dirs(root: Path, k1: Path, k2: Path) -> tuple[Path, Path]:
    """The same two pretraining runs as a points.json sweep (paths relative to it, one point never started)
    and as an older sweep whose summary.json lists its runs."""
    points = root / "points_sweep"
    points.mkdir(parents=True)
    rel = [str(Path("..", "..", "runs", "pretrain", p.name)) for p in (k1, k2)]
    (points / "points.json").write_text(json.dumps({"version": 1, "points": [
        {"index": 0, "status": "complete", "run": rel[0]}, {"index": 1, "status": "complete", "run": rel[1]},
        {"index": 2, "status": "pending", "run": None}]}))
    (points / "summary.json").write_text(json.dumps({"status": "running", "kind": "sweep"}))
    old = root / "summary_sweep"
    old.mkdir()
    (old / "summary.json").write_text(json.dumps({"status": "complete", "kind": "sweep", "runs": [str(k1), str(k2)]}))
    return points, old


def build_small(root: Path) -> dict[str, Path]:
    """Two seeds of a tiny SFT run, a crashed copy of one and a loop directory: a report with curves, a seed
    band, an unfinished run and a damaged metrics line, in a few seconds."""
    from ftlab.cli import main

    recipe = tiny_recipe(root, train={"eval_every": 2, "max_steps": 4},
                         data={"val": str(root / "train.jsonl"), "val_limit": 8})
    made: dict[str, Path] = {}
    for seed in (0, 1):
        assert main(["train", str(recipe), f"name=seed{seed}", f"seed={seed}"]) == 0
        made[f"seed{seed}"] = only(root / "runs" / "sft", f"2*_seed{seed}")
    made["crashed"] = crashed_copy(made["seed1"], root / "runs" / "sft" / "20200101_000000_crashed")
    made["loop"] = loop_dir(root / "runs" / "loop" / "oak")
    return made
