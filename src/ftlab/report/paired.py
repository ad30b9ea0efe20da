"""Paired differences between evaluations of the same rows: each model against the base model.

Two evaluations are paired only when everything but the model is equal: the evaluation set (content hash),
the extraction rule, the shots and the generation budget. Within such a set of runs the baseline is the one
that scored a model no training run made (the base model); where there is none or several, the first
listed. The difference is tuned minus base accuracy over the rows both answered, with the paired bootstrap
95% interval of `ftlab eval --compare` (question difficulty cancels, so it is narrower than two separate
intervals); an interval that holds 0 is said to show no difference.
"""
from __future__ import annotations

from collections.abc import Sequence

from ftlab.report import compare as C
from ftlab.report.render import Block, Heading, Table, Text
from ftlab.report.runs import Run
from ftlab.report.stats import paired_difference, predictions_by_id


def same_rows_key(run: Run) -> tuple:
    """What must be equal for two evaluations' rows to be paired."""
    return (C.eval_set(run), C.extraction_rule(run), C.shots(run), C.max_new_tokens(run))


def pairable_sets(runs: Sequence[Run]) -> list[list[Run]]:
    """Complete evaluations with predictions, grouped by `same_rows_key`; sets of one are dropped."""
    sets: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.kind == "eval" and run.status == "complete" and (run.path / "predictions.jsonl").is_file():
            sets.setdefault(same_rows_key(run), []).append(run)
    return [s for s in sets.values() if len(s) > 1]


def baseline(runs: Sequence[Run]) -> Run:
    """The evaluation of a model no training run made, where exactly one is there; else the first."""
    base = [r for r in runs if r.origin_path is None]
    return base[0] if len(base) == 1 else runs[0]


def verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no difference shown (the interval holds 0)"


def paired_section(runs: Sequence[Run]) -> list[Block]:
    sets = pairable_sets(runs)
    if not sets:
        return []
    blocks: list[Block] = [Heading("Paired differences (same rows, same prompts)"),
                           Text("Accuracy minus the baseline's over the rows both answered, in points, with a paired "
                                "bootstrap 95% interval; evaluations are paired only when their evaluation set, "
                                "extraction rule, shots and max new tokens are equal.")]
    for members in sets:
        base = baseline(members)
        base_rows = predictions_by_id(base.path)
        rows = []
        for run in members:
            if run is base:
                continue
            d = paired_difference(base_rows, predictions_by_id(run.path))
            if not d["n_paired"]:  # the same set by its hash, but no id in common: nothing to pair
                continue
            lo, hi = d["accuracy_diff_ci95"]
            rows.append([run.label, f"{100 * d['accuracy_diff']:+.1f}", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]",
                         str(d["n_paired"]), verdict(lo, hi)])
        shots, budget = C.shots(base), C.max_new_tokens(base)
        blocks.append(Text(f"Baseline {base.label} (shots {shots}, max new tokens {budget}):"))
        blocks.append(Table(["run", "difference (points)", "95% interval", "rows paired", "verdict"], rows,
                            [r[0] for r in rows]))
    return blocks
