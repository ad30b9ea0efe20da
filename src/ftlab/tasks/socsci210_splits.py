"""Base vs tuned on SocSci210, one row per split kind: `ftlab compare-socsci`.

    ftlab compare-socsci RECIPE --base MODEL --pair DIR TUNED [--pair DIR TUNED ...] [key=value ...]

DIR is a `ftlab prepare-socsci` output (its report.json says how it was split: by study, condition or
participant) and TUNED the model or adapter trained on DIR/train.jsonl. Each pair is evaluated as
`ftlab eval --compare BASE TUNED eval.source=DIR/test.jsonl` would (same prompts, same generation settings), and
one table puts the socsci210 metrics of every split kind side by side: the normalised MAE, Pearson r and the
Wasserstein distance per study x condition (the SOCRATES paper's measure), with tuned - base for each. The
split kind decides what a score means: a study split scores unseen studies, a participant split mostly
unseen people in seen studies, so the same adapter scores better there without predicting new experiments
any better.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.errors import UserError

METRICS = ("n", "parse_rate", "accuracy", "mae_norm", "pearson_r", "wasserstein")
LOWER_IS_BETTER = {"mae_norm", "wasserstein"}


def split_kind(prepared: Path) -> str:
    """'study', 'condition' or 'participant', from a prepare-socsci directory's report.json."""
    report = prepared / "report.json"
    if not (prepared / "test.jsonl").is_file() or not report.is_file():
        raise UserError(f"--pair {prepared}: not a prepare-socsci output (needs test.jsonl and report.json); "
                        f"make it with: ftlab prepare-socsci SOURCE --out {prepared}")
    try:
        return str(json.loads(report.read_text(encoding="utf-8"))["split_by"])
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{report}: unreadable ({type(e).__name__}); prepare the directory again") from None


def trained_on(tuned: str) -> str | None:
    """The training file of the run a tuned model or adapter came from (its run's config.yaml), if known."""
    from ftlab.evaluate import parse_model_spec

    model, adapter = parse_model_spec(tuned)
    path = Path(adapter or model).expanduser()
    for config in (path / "config.yaml", path.parent / "config.yaml"):  # a run directory, or its final/ or best/
        if config.is_file():
            train = OmegaConf.load(config).get("data", {}).get("train")
            return None if train is None else str(train)
    return None


def leakage_note(prepared: Path, tuned: str) -> str | None:
    """A line when TUNED was trained on another file than DIR/train.jsonl: its test rows may be training rows."""
    train = trained_on(tuned)
    if train is None or Path(train).resolve() == (prepared / "train.jsonl").resolve():
        return None
    return (f"{tuned} was trained on {train}, not on {prepared / 'train.jsonl'}: rows of {prepared / 'test.jsonl'} "
            "may be among its training rows")


def compare_pair(cfg: DictConfig, base: str, tuned: str, prepared: Path) -> dict[str, Any]:
    """Base and tuned on DIR/test.jsonl, the paired accuracy difference, and the split kind."""
    from ftlab.evaluate import parse_model_spec, run_eval
    from ftlab.report.stats import paired_difference, predictions_by_id

    pair_cfg = OmegaConf.merge(cfg, {"eval": {"task": "socsci210", "source": str(prepared / "test.jsonl")}})
    runs = {}
    for role, spec in (("base", base), ("tuned", tuned)):
        model, adapter = parse_model_spec(spec)
        run, metrics = run_eval(pair_cfg, model_name=model, adapter=adapter)
        runs[role] = {"model": spec, "run": str(run.path), **{k: metrics.get(k) for k in METRICS}}
    paired = paired_difference(predictions_by_id(runs["base"]["run"]), predictions_by_id(runs["tuned"]["run"]))
    diff = {k: runs["tuned"][k] - runs["base"][k] for k in METRICS[2:]
            if runs["tuned"][k] is not None and runs["base"][k] is not None}
    return {"split_by": split_kind(prepared), "prepared": str(prepared), **runs, "tuned_minus_base": diff,
            "accuracy_diff_ci95": paired["accuracy_diff_ci95"], "leakage": leakage_note(prepared, tuned)}


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def by_split_table(results: list[dict[str, Any]]) -> str:
    """One block per split kind: base, tuned, and tuned - base (the sign of a better model noted per metric)."""
    lines = ["| split | model | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    for r in results:
        for role in ("base", "tuned"):
            lines.append(f"| {r['split_by']} | {r[role]['model']} | " +
                         " | ".join(_cell(r[role][k]) for k in METRICS) + " |")
        diff = r["tuned_minus_base"]
        lines.append(f"| {r['split_by']} | tuned - base | | | " +
                     " | ".join(f"{diff[k]:+.3f}" if k in diff else "" for k in METRICS[2:]) + " |")
    lines.append("lower is better: " + ", ".join(sorted(LOWER_IS_BETTER)) + "; higher: accuracy, pearson_r "
                 "(normalised on each question's answer scale; see ftlab.tasks.socsci210.SCALE_RULE)")
    lines += [f"note: {r['leakage']}" for r in results if r["leakage"]]
    return "\n".join(lines)


def run_compare_by_split(cfg: DictConfig, base: str, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Every directory and model is checked before the first evaluation; then each pair; then one table."""
    from ftlab.evaluate import check_model_spec
    from ftlab.runs.rundir import RunDir, write_json

    prepared = [(Path(d), tuned) for d, tuned in pairs]
    for d, tuned in prepared:
        split_kind(d)
        check_model_spec(tuned)
    check_model_spec(base)
    results = [compare_pair(cfg, base, tuned, d) for d, tuned in prepared]
    run = RunDir.create(cfg.output_dir, "eval", "socsci210_by_split", cfg, cfg.seed)
    write_json(run.path / "by_split.json", results)
    table = by_split_table(results)
    (run.path / "by_split.md").write_text(table + "\n", encoding="utf-8")
    run.finish("complete")
    print(table)
    print(run.path / "by_split.json")
    return results


def cmd_compare_socsci(args: argparse.Namespace) -> int:
    from ftlab.config import load_recipe

    run_compare_by_split(load_recipe(args.recipe, args.overrides), args.base, [tuple(p) for p in args.pair])
    return 0


def add_compare_socsci_verb(sub: Any) -> None:
    p = sub.add_parser("compare-socsci", help="SocSci210 base vs tuned on the test file of each split kind, one table",
                       description="evaluate BASE and each TUNED on DIR/test.jsonl of its prepare-socsci directory "
                                   "and print the socsci210 metrics by split kind (study, condition, participant)")
    p.add_argument("recipe", help="recipe YAML file (its eval section: engine, limit, max_new_tokens, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.limit=200")
    p.add_argument("--base", required=True, help="the base model (name, directory or hub id)")
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("DIR", "TUNED"),
                   help="a prepare-socsci directory and the model or adapter trained on its train.jsonl (repeatable)")
    p.set_defaults(fn=cmd_compare_socsci)
