"""The quickstart's report: per-hop metrics with intervals, the paired lifts, example proofs, report.md.

Everything here reads the evaluated rows (one dict per problem, as `evaluate_examples` returns them) and the
task's metrics; nothing is re-generated. Step-level fields (`steps`, `steps_valid`, `fully_valid`) come from a
task that checks proofs step by step (`sokrates`); without them the step columns say "n/a".
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ftlab.runs import report as rp
from ftlab.tasks.scoring import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_ci

OOD_NOTE = "held-out hop count (not trained on)"
EXAMPLE_KINDS = (("fully_valid", "a fully valid proof"),
                 ("invalid_step", "a proof with an invalid step"),
                 ("wrong_verdict", "a wrong verdict"))


def step_validity(rows: Sequence[dict], resamples: int = BOOTSTRAP_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED) -> tuple[float | None, list[float] | None]:
    """Valid steps / all steps, pooled over the rows, with a 95% interval from resampling problems (not
    steps: the steps of one output are not independent). (None, None) when no row has a step."""
    steps = np.array([r.get("steps", 0) for r in rows], dtype=float)
    valid = np.array([r.get("steps_valid", 0) for r in rows], dtype=float)
    if steps.sum() == 0:
        return None, None
    picks = np.random.default_rng(seed).integers(0, len(rows), size=(resamples, len(rows)))
    totals = steps[picks].sum(axis=1)
    # a resample that drew only step-less outputs has no ratio: it shows 0 valid steps, as aggregate does
    ratios = np.divide(valid[picks].sum(axis=1), totals, out=np.zeros(resamples), where=totals > 0)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(valid.sum() / steps.sum()), [float(lo), float(hi)]


def model_metrics(rows: Sequence[dict], metrics: dict) -> dict[str, Any]:
    """One model on one set: accuracy (the task's primary rule), step validity, fully valid proofs, and the
    share of outputs in the proof format (at least one parsed Thought/Action step)."""
    checked = all("fully_valid" in r for r in rows)
    fully = [bool(r.get("fully_valid")) for r in rows]
    sv, sv_ci = step_validity(rows)
    return {"accuracy": metrics["accuracy"], "accuracy_ci95": metrics.get("accuracy_ci95"),
            "step_validity": sv, "step_validity_ci95": sv_ci,
            "fully_valid": sum(fully) / len(fully) if checked and fully else None,
            "fully_valid_ci95": bootstrap_ci(fully) if checked else None,
            "proof_format": sum(r.get("steps", 0) >= 1 for r in rows) / len(rows) if checked and rows else None}


def paired_lift(base_rows: Sequence[dict], tuned_rows: Sequence[dict], key: str) -> dict[str, Any]:
    """Tuned minus base of a per-row flag over the rows both models answered (same ids, same prompts)."""
    from ftlab.report.stats import paired_difference

    def by_id(rows: Sequence[dict]) -> dict[str, list[bool]]:
        out: dict[str, list[bool]] = {}
        for r in rows:
            out.setdefault(str(r["id"]), []).append(bool(r.get(key)))
        return out

    d = paired_difference(by_id(base_rows), by_id(tuned_rows))
    return {"diff": d["accuracy_diff"], "ci95": d["accuracy_diff_ci95"], "n_paired": d["n_paired"]}


def hop_metrics(rows: dict[str, dict[int, list[dict]]], metrics: dict[str, dict[int, dict]],
                train_hops: Sequence[int]) -> dict[int, dict]:
    """Per hop count: n, the majority-class rate, both models' metrics and the paired lifts."""
    out = {}
    for h in sorted(metrics["base"]):
        base, tuned = rows["base"][h], rows["tuned"][h]
        checked = all("fully_valid" in r for r in base + tuned)
        out[h] = {"n": metrics["base"][h]["n"], "majority_rate": metrics["base"][h].get("majority_class_rate"),
                  "trained_on": h in set(train_hops),
                  "base": model_metrics(base, metrics["base"][h]),
                  "tuned": model_metrics(tuned, metrics["tuned"][h]),
                  "lift_accuracy": paired_lift(base, tuned, "correct"),
                  "lift_fully_valid": paired_lift(base, tuned, "fully_valid") if checked else None}
    return out


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _with_ci(x: float | None, ci: list[float] | None) -> str:
    return pct(x) if not ci else f"{100 * x:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _lift(d: dict | None) -> str:
    if not d or not d["n_paired"]:
        return "n/a"
    lo, hi = d["ci95"]
    return f"{100 * d['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def hop_table(per_hop: dict[int, dict]) -> str:
    header = ["set", "n", "majority", "base acc.", "tuned acc.", "acc. lift (points)", "base step validity",
              "tuned step validity", "base fully valid", "tuned fully valid", "fully-valid lift (points)",
              "tuned in proof format"]
    rows = []
    for h, m in per_hop.items():
        b, t = m["base"], m["tuned"]
        name = f"{h}-hop" + ("" if m["trained_on"] else f": {OOD_NOTE}")
        rows.append([name, m["n"], pct(m["majority_rate"]), _with_ci(b["accuracy"], b["accuracy_ci95"]),
                     _with_ci(t["accuracy"], t["accuracy_ci95"]), _lift(m["lift_accuracy"]),
                     _with_ci(b["step_validity"], b["step_validity_ci95"]),
                     _with_ci(t["step_validity"], t["step_validity_ci95"]),
                     _with_ci(b["fully_valid"], b["fully_valid_ci95"]),
                     _with_ci(t["fully_valid"], t["fully_valid_ci95"]), _lift(m["lift_fully_valid"]),
                     pct(t["proof_format"])])
    return rp.markdown_table(header, rows)


def plot_hops(per_hop: dict[int, dict], out: Path) -> Path:
    hops = list(per_hop)
    series = {label: ([per_hop[h][key]["accuracy"] for h in hops], [per_hop[h][key]["accuracy_ci95"] for h in hops])
              for key, label in (("base", "base model"), ("tuned", "after SFT"))}
    return rp.plot_accuracy_by_hops(hops, series, out, "held-out accuracy by hop count, greedy decoding",
                                    ood=[h for h in hops if not per_hop[h]["trained_on"]],
                                    majority=[per_hop[h]["majority_rate"] for h in hops])


def pick_examples(rows: Sequence[dict]) -> dict[str, int | None]:
    """Per kind, the index of the first row in file order of that kind (None when none is):
    fully_valid: the verifier accepts every step and the verdict; invalid_step: at least one step the verifier
    rejects; wrong_verdict: an answer was read (the task's primary rule) and it is not the gold one.
    A row can be the first of two kinds."""
    tests = {"fully_valid": lambda r: bool(r.get("fully_valid")),
             "invalid_step": lambda r: r.get("steps_valid", 0) < r.get("steps", 0),
             "wrong_verdict": lambda r: r.get("extracted") is not None and not r.get("correct")}
    return {kind: next((i for i, r in enumerate(rows) if test(r)), None) for kind, test in tests.items()}


def marked_trace(problem: Any, output: str) -> str:
    """The trace as the verifier parsed it, one step after another, each invalid step followed by a line
    giving the verifier's reason; trace-level errors (no CONCLUDE, ...) at the end."""
    from ftlab.sokrates import parse_steps, verify_trace

    report = verify_trace(problem, output)
    steps = parse_steps(output)
    if not steps:
        return output.strip()
    lines = []
    for k, (step, ok, reason) in enumerate(zip(steps, report.step_valid, report.reasons), 1):
        lines.append(step.text())
        if not ok:
            lines.append(f"^^^ INVALID step {k}: {reason}")
    lines += [f"^^^ trace: {e}" for e in report.errors]
    return "\n".join(lines)


def examples_section(rows: Sequence[dict], examples: Sequence[Any], hops: int, middle_trained: bool) -> str:
    where = ("the middle trained hop count" if middle_trained
             else "the first held-out set; the middle trained hop count was not evaluated")
    parts = [f"## Example proofs of the tuned model ({hops}-hop set)", "",
             f"From the tuned model's outputs on the {hops}-hop set ({where}), by a fixed rule: the first output "
             "in file order of each kind (a fully valid proof; a proof with a step the verifier rejects; a read "
             "answer that is wrong), nothing picked by hand. Each trace is shown as the verifier parsed it, an "
             "invalid step followed by a `^^^ INVALID` line with the verifier's reason.", ""]
    problems = {ex.id: ex.meta.get("problem") for ex in examples}
    picks = pick_examples(rows)
    for kind, title in EXAMPLE_KINDS:
        i = picks[kind]
        if i is None:
            parts += [f"**{title}**: none occurred among the {len(rows)} tuned outputs on this set.", ""]
            continue
        row = rows[i]
        problem = problems.get(row["id"])
        text = marked_trace(problem, row["output"]) if problem is not None else row["output"].strip()
        parts += [f"**{title}** (row {i + 1}, id `{row['id']}`, gold {row['gold']}, read answer "
                  f"{row.get('extracted')}):", "", "```text", text, "```", ""]
    return "\n".join(parts)


def example_set(per_hop: dict[int, dict], train_hops: Sequence[int]) -> tuple[int, bool]:
    """The middle trained hop count when it was evaluated, else the first held-out set."""
    trained = sorted(train_hops)
    middle = trained[len(trained) // 2] if trained else None
    return (middle, True) if middle in per_hop else (next(iter(per_hop)), False)


def first_problem_before_after(run_dir: Path, hops: int) -> str:
    """The first held-out problem of one set with both models' outputs: what training changed, unpicked."""
    rows = {}
    for label in ("base", "tuned"):
        with open(run_dir / f"predictions_{label}_{hops}hop.jsonl", encoding="utf-8") as f:
            rows[label] = json.loads(f.readline())
    parts = [f"## The first {hops}-hop problem, before and after (gold: {rows['base']['gold']})", "",
             "The prompt, exactly as the models saw it:", "", "```text", rows["base"]["prompt"].strip(), "```"]
    for label, row in rows.items():
        verdict = "correct" if row["correct"] else "wrong"
        parts += [f"**{label}** ({verdict}):", "", "```text", row["output"].strip(), "```"]
    return "\n".join(parts)


def proof_sentence(cfg: DictConfig) -> str:
    opts = cfg.data.task_options
    if cfg.data.task == "sokrates":
        plan = (" Each proof starts with its search back from the claim (`backward_plan: true`)."
                if opts.get("backward_plan") else "")
        return ("SOKRATES option traces (`data.task: sokrates`): numbered premises in the prompt; the proof is "
                "Thought/Action steps (MODUS_PONENS / MODUS_TOLLENS citing premise and derived-fact indices), "
                "ending in CONCLUDE with \"The answer is True/False.\"; every step is checked by the verifier."
                + plan)
    proof = opts.get("proof")
    if proof == "backward":
        return ("goal-directed proofs (`data.task_options.proof: backward`): restate the claim, find the rule "
                "about the queried property, climb back to the entity's fact, compare with the claim.")
    if proof == "closure":
        return ("forward chaining, breadth first (`data.task_options.proof: closure`): from the entity's facts, "
                "one line per concept reached, listing what the rules about it say, until the queried property.")
    return "the generator's forward chain of thought, then \"The answer is True/False.\""


def ood_sentence(per_hop: dict[int, dict], train_hops: Sequence[int]) -> str:
    ood = [h for h, m in per_hop.items() if not m["trained_on"]]
    if not ood:
        return f"Every evaluated hop count was among the training hop counts {list(train_hops)}."
    return (f"Hop counts {ood} are a {OOD_NOTE}: training used {list(train_hops)} only, so these rows measure "
            "generalisation to another depth.")


def timing_line(phases: dict[str, float], cpu: dict[str, Any], peaks: dict[str, float | None]) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" if v is not None else f"{k} unknown"
                      for k, v in cpu.items() if k != "model")
    line = "Phase wall times: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in phases.items()) + "."
    if all(peaks.get(k) is not None for k in phases):
        line += " Peak resident memory per phase: " + ", ".join(
            f"{k.replace('_', ' ')} {peaks[k] / 1024:.2f} GB" for k in phases) + "."
    return line + f" CPU: {cpu['model']} ({flags})."
