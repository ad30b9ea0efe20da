"""`ftlab verify TASK FILE.jsonl [--traces]`: solver agreement and proof validity over a file.

Without --traces, every problem is solved independently (PrOntoQA: forward chaining; FOLIO: z3 over
the FOL annotations), its gold proof optionized and verified. With --traces, each record's `response`
(a model's Thought/Action trace) is verified instead, step by step.

The run directory (runs/verify/<stamp>_<task>-<file>/) holds summary.json, rows.jsonl (one result
per problem), unparsed.jsonl (the problems whose premises or formulas cannot be read, with the reason:
counted, never dropped silently) and, for FOLIO, disagreements.jsonl. A file that cannot be read at
all (not JSONL, missing fields, bad labels) is one line and exit 2, like every ftlab input error.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ftlab.data.jsonl import write_jsonl
from ftlab.data.responses import RESPONSE_FIELD
from ftlab.errors import UserError
from ftlab.sokrates.logic import LogicParseError
from ftlab.sokrates.optionizer import OptionizeError, optionize
from ftlab.sokrates.problems import Problem, problem_from_example
from ftlab.sokrates.verifier import solve_problem, verify_trace

log = logging.getLogger("ftlab")
TASKS = ("prontoqa", "folio")


def load_problems(task_name: str, path: str, limit: int | None = None,
                  traces: bool = False) -> list[tuple[str, Problem, str | None]]:
    """(location, problem, response) per record; UserError (one line) when the file cannot be read."""
    from ftlab.tasks import get_task

    if task_name not in TASKS:
        raise UserError(f"verify: task {task_name!r} is not one of {', '.join(TASKS)}")
    if task_name == "folio":
        from ftlab.sokrates.folio_solver import require_z3

        require_z3()  # one line now, not a failed run directory later
    task = get_task(task_name)
    located = task.load_records(path, None, limit)
    examples = task.examples_from(located)
    out, stories = [], {}
    for (where, record), ex in zip(located, examples):
        response = record.get(RESPONSE_FIELD, record.get("output"))
        if traces and not isinstance(response, str):
            raise UserError(f"{where}: --traces needs a model trace in a string field {RESPONSE_FIELD!r}")
        problem = problem_from_example(ex, task_name)
        if task_name == "folio" and problem.story is None:  # validation has no story_id: number premise sets
            problem.story = stories.setdefault(tuple(problem.premises), f"v{len(stories)}")
        out.append((where, problem, response))
    return out


def _check_gold(problem: Problem, row: dict) -> None:
    try:
        proof = optionize(problem)
    except OptionizeError as e:
        row.update(gold_proof_valid=False, proof_error=str(e))
        return
    report = verify_trace(problem, proof.text())
    # PrOntoQA counts a proof only when it was built from the dataset's own chain; FOLIO has no gold
    # proofs, so its target (CONCLUDE over the premises z3 needs for the gold label) is what is checked.
    from_gold = proof.source == "gold" or problem.task == "folio"
    row.update(proof_source=proof.source, gold_proof_valid=report.fully_valid and from_gold,
               proof_steps=len(proof.steps))
    if proof.notes:
        row["proof_notes"] = proof.notes
    if not report.fully_valid:
        row["proof_reasons"] = [r for r in report.reasons if r] + report.errors


def verify_file(task_name: str, path: str, traces: bool = False, limit: int | None = None,
                problems: list | None = None) -> tuple[dict, list, list]:
    """(summary, rows, unparsed) for one file (or its `problems`, already loaded); see the module docstring."""
    start = time.time()
    if problems is None:
        problems = load_problems(task_name, path, limit, traces)
    rows, unparsed = [], []
    for where, problem, response in problems:
        row: dict[str, Any] = {"id": problem.id, "gold": problem.gold}
        if problem.story is not None:
            row["story"] = problem.story
        try:
            row["solver"] = solve_problem(problem)
        except (LogicParseError, ValueError) as e:  # FolError is a ValueError
            unparsed.append({"id": problem.id, "where": where, "reason": str(e)})
            continue
        row["solver_agrees"] = row["solver"] == problem.gold
        if traces:
            row.update(verify_trace(problem, response).to_dict())
        else:
            _check_gold(problem, row)
        rows.append(row)
    summary = {"task": task_name, "file": str(path), "mode": "traces" if traces else "gold",
               "rows": len(problems), "unparsed": len(unparsed),
               "solver_agrees": sum(r["solver_agrees"] for r in rows)}
    summary["solver_agreement"] = _rate(summary["solver_agrees"], len(problems))
    if traces:
        steps = [v for r in rows for v in r["step_valid"]]
        summary.update(traces=len(rows), steps=len(steps), steps_valid=sum(steps),
                       step_validity=_rate(sum(steps), len(steps)),
                       traces_fully_valid=sum(r["fully_valid"] for r in rows),
                       answers_correct=sum(r["answer_correct"] for r in rows))
    else:
        summary["gold_proofs_valid"] = sum(r["gold_proof_valid"] for r in rows)
        summary["gold_proof_rate"] = _rate(summary["gold_proofs_valid"], len(problems))
        summary["proof_sources"] = dict(Counter(r.get("proof_source", "none") for r in rows))
    if task_name == "folio":
        wrong = [r for r in rows if not r["solver_agrees"]]
        summary["solver_labels"] = dict(Counter(r["solver"] for r in rows))
        summary["disagreements"] = len(wrong)
        summary["disagreeing_stories"] = sorted({r["story"] for r in wrong}, key=_story_order)
        summary["disagreeing_ids"] = [r["id"] for r in wrong]
        summary.update(_premise_checks(problems))
    if unparsed:
        summary["unparsed_reasons"] = dict(Counter(_reason_kind(u["reason"]) for u in unparsed).most_common(10))
    summary["seconds"] = round(time.time() - start, 2)
    return summary, rows, unparsed


def _premise_checks(problems: list) -> dict:
    """Per story (premise set), whether its formulas parse and are consistent: checkable even where
    conclusions have no FOL (FOLIO v0.0 train)."""
    from ftlab.sokrates.folio_solver import premises_status

    status: dict[str, str] = {}
    for _, problem, _ in problems:
        if problem.story not in status:
            try:
                status[problem.story] = premises_status(problem)
            except ValueError:
                status[problem.story] = "unreadable"
    counts = Counter(status.values())
    return {"stories": len(status), "stories_premises_unreadable": counts["unreadable"],
            "stories_premises_inconsistent": sorted((s for s, v in status.items() if v == "inconsistent"),
                                                    key=_story_order),
            "stories_premises_unknown": counts["unknown"]}


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


def _story_order(story: str) -> tuple:
    return (0, int(story)) if story.isdigit() else (1, len(story), story)


def _reason_kind(reason: str) -> str:
    return reason.split(" at token")[0].split(":")[0][:60]


def run_verify(task_name: str, path: str, traces: bool = False, limit: int | None = None,
               output_dir: str = "runs") -> tuple[Any, dict]:
    """verify_file, writing the run directory; returns (run, summary)."""
    from ftlab.runs.rundir import RunDir, write_json

    problems = load_problems(task_name, path, limit, traces)  # bad input fails before a run dir exists
    run = RunDir.create(output_dir, "verify", f"{task_name}-{Path(path).stem}")
    try:
        summary, rows, unparsed = verify_file(task_name, path, traces, limit, problems)
    except BaseException as e:
        run.finish("interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=repr(e))
        raise
    write_jsonl(run.path / "rows.jsonl", rows)
    write_jsonl(run.path / "unparsed.jsonl", unparsed)
    if task_name == "folio":
        write_jsonl(run.path / "disagreements.jsonl", [r for r in rows if not r["solver_agrees"]])
    summary["run_dir"] = str(run.path)
    write_json(run.path / "verify.json", summary)
    run.finish("complete", **summary)
    log.info("verify %s %s: %s", task_name, path, json.dumps({k: summary[k] for k in ("rows", "unparsed", "solver_agrees")}))
    return run, summary
