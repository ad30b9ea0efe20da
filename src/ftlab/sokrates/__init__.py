"""SOKRATES-style option traces: numbered premises, optionized gold proofs, a step verifier and solvers.

* `problems`: `Problem`, `render_problem` (the prompt: "... (premise 0).", the claim, the step format);
* `options`: the option vocabulary and the "Thought: ... / Action: <Option .../>" syntax;
* `optionizer`: gold proofs -> steps (`optionize`, `optionized_target`);
* `verifier`: `verify_trace` (every step checked) and the PrOntoQA / FOLIO solvers behind `ftlab verify`;
* `logic`: PrOntoQA's facts, rules and negation; `folio_solver`: FOLIO's FOL annotations -> z3.

Index convention: premises are 0..P-1 in prompt order; each step but CONCLUDE derives one fact, which
gets the next index P, P+1, ... in step order.
"""
from ftlab.sokrates.optionizer import Proof, optionize, optionized_target
from ftlab.sokrates.options import (
    VOCABULARY,
    Action,
    ActionError,
    Step,
    format_steps,
    parse_action,
    parse_steps,
)
from ftlab.sokrates.problems import Problem, problem_from_example, render_problem
from ftlab.sokrates.verifier import TraceReport, verify_trace

__all__ = [
    "VOCABULARY",
    "Action",
    "ActionError",
    "Problem",
    "Proof",
    "Step",
    "TraceReport",
    "format_steps",
    "optionize",
    "optionized_target",
    "parse_action",
    "parse_steps",
    "problem_from_example",
    "render_problem",
    "verify_trace",
]
