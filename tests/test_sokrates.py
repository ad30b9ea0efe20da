"""SOKRATES option traces: hand-written step validity, the optionizer on an authors' row checked by
hand, every PrOntoQA file (solver and gold proofs 100%), FOLIO against z3, and `ftlab verify`."""
import json
import re
from pathlib import Path

import pytest

from ftlab.cli import main
from ftlab.sokrates import (
    optionize,
    optionized_target,
    parse_action,
    render_problem,
    verify_trace,
)
from ftlab.sokrates.logic import LogicParseError
from ftlab.sokrates.options import ActionError, parse_steps
from ftlab.sokrates.problems import Problem, problem_from_example
from ftlab.sokrates.verifier import solve_problem
from ftlab.tasks import generate_prontoqa, get_task

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PRONTOQA_FILES = sorted((DATA / "prontoqa").glob("*.jsonl")) if DATA.is_dir() else []

# premises 0..4; derived facts from 5 on
WREN = Problem(id="wren", task="prontoqa", premises=[
    "Wren is a jompus.", "Each jompus is a zumpus.", "Zumpuses are not nervous.", "Every jompus is shy.",
    "Yumpuses are nervous."], claim="Wren is nervous.", gold="False")
MP = '<Option type="MODUS_PONENS" args="[{}, {}]" />'


def trace(*steps: tuple[str, str]) -> str:
    return "\n".join(f"Thought: {t}\nAction: {a}" for t, a in steps)


STEP1 = ("Since Wren is a jompus (premise 0) and each jompus is a zumpus (premise 1), Wren is a zumpus.", MP.format(0, 1))
STEP2 = ("Since Wren is a zumpus (derived fact 5) and zumpuses are not nervous (premise 2), Wren is not nervous.",
         MP.format(5, 2))
STEP3 = ("Wren is not nervous (derived fact 6), which contradicts the claim. The answer is False.",
         '<Option type="CONCLUDE" args="[6]" />')


def test_valid_proof():
    report = verify_trace(WREN, trace(STEP1, STEP2, STEP3))
    assert report.step_valid == [True, True, True] and report.reasons == [None, None, None]
    assert report.verdict == "False" and report.answer_correct and report.fully_valid


@pytest.mark.parametrize("case, steps, valid, reason", [
    ("wrong premise index", [STEP1, (STEP2[0], MP.format(5, 3)), STEP3], [True, False, False],
     "MODUS_PONENS does not apply to 'Wren is a zumpus' (index 5) and premise 3"),
    ("a rule cited as the fact", [(STEP1[0], MP.format(1, 0)), STEP2, STEP3], [False, False, False],
     "premise 1 is a rule, not a fact"),
    ("out-of-range arg", [(STEP1[0], MP.format(0, 9)), STEP2, STEP3], [False, False, False],
     "index 9 does not exist (premises 0-4, no derived facts yet)"),
    ("negative arg", [(STEP1[0], MP.format(-1, 1)), STEP2, STEP3], [False, False, False], "index -1 does not exist"),
    ("citing a later step", [(STEP1[0], MP.format(5, 1)), STEP2, STEP3], [False, False, False],
     "index 5 does not exist"),
    ("unknown option", [(STEP1[0], '<Option type="MAGIC" args="[0, 1]" />'), STEP2, STEP3], [False, False, False],
     "unknown option 'MAGIC'"),
    ("non-integer args", [(STEP1[0], '<Option type="MODUS_PONENS" args="[0, one]" />'), STEP2, STEP3],
     [False, False, False], "args '[0, one]' is not a list of integers"),
    ("wrong arity", [(STEP1[0], '<Option type="MODUS_PONENS" args="[0]" />'), STEP2, STEP3], [False, False, False],
     "MODUS_PONENS takes 2 args, got 1"),
    ("missing closing tag", [STEP1, STEP2, (STEP3[0], '<Option type="CONCLUDE" args="[6]"')], [True, True, False],
     "missing closing '/>'"),
    ("wrong conclusion in the thought", [(STEP1[0].replace("Wren is a zumpus.", "Wren is a yumpus."), STEP1[1]),
                                         STEP2, STEP3], [False, False, False],
     "the thought concludes 'Wren is a yumpus', but MODUS_PONENS [0, 1] gives 'Wren is a zumpus'"),
    ("no conclusion in the thought", [("Premises 0 and 1 fit together.", STEP1[1]), STEP2, STEP3],
     [False, False, False], "the thought states no conclusion"),
    ("wrong verdict", [STEP1, STEP2, (STEP3[0].replace("False.", "True."), STEP3[1])], [True, True, False],
     "fact 6 shows the claim is False, the thought says True"),
    ("CONCLUDE on an unrelated fact", [STEP1, STEP2, (STEP3[0], '<Option type="CONCLUDE" args="[5]" />')],
     [True, True, False], "fact 5 ('Wren is a zumpus') is neither the claim nor its negation"),
    ("step after CONCLUDE", [STEP1, STEP2, STEP3, STEP1], [True, True, True, False], "step after CONCLUDE"),
])
def test_invalid_steps(case, steps, valid, reason):
    report = verify_trace(WREN, trace(*steps))
    assert report.step_valid == valid, (case, report.reasons)
    first_bad = valid.index(False)
    assert reason in report.reasons[first_bad], (case, report.reasons)
    assert not report.fully_valid
    # what builds on an invalid step is invalid too, and says why
    later = [r for r in report.reasons[first_bad + 1:] if r and "derived fact" in r]
    assert all("comes from an invalid step" in r for r in later)


def test_wrong_verdict_is_a_wrong_answer_and_trace_level_errors():
    report = verify_trace(WREN, trace(STEP1, STEP2, (STEP3[0].replace("False.", "True."), STEP3[1])))
    assert report.verdict == "True" and not report.answer_correct
    assert verify_trace(WREN, trace(STEP1, STEP2)).errors == ["no CONCLUDE step"]
    empty = verify_trace(WREN, "The answer is False.")
    assert empty.step_valid == [] and "no Thought/Action steps" in empty.errors and not empty.fully_valid
    orphan = verify_trace(WREN, f"Thought: {STEP1[0]}\n" + trace(STEP2, STEP3))
    assert orphan.reasons[0] == "the thought has no Action line"


def test_modus_tollens_and_negated_facts():
    problem = Problem(id="mt", task="prontoqa", premises=["Rex is not nervous.", "Yumpuses are nervous."],
                      claim="Rex is a yumpus.", gold="False")
    text = trace(("Since Rex is not nervous (premise 0) and yumpuses are nervous (premise 1), Rex is not a yumpus.",
                  '<Option type="MODUS_TOLLENS" args="[0, 1]" />'),
                 ("Rex is not a yumpus (derived fact 2). The answer is False.", '<Option type="CONCLUDE" args="[2]" />'))
    assert verify_trace(problem, text).fully_valid
    assert solve_problem(problem) == "False"
    bad = verify_trace(problem, text.replace("MODUS_TOLLENS", "MODUS_PONENS"))
    assert bad.step_valid[0] is False and "MODUS_PONENS does not apply" in bad.reasons[0]


def test_action_syntax():
    assert parse_action('<Option type="MODUS_PONENS" args="[0, 8]" />').args == (0, 8)
    assert parse_action(' <Option type="CONCLUDE" args="[]"/> ').args == ()
    for text, reason in [('<Option type="X" args="[0]" />', "unknown option 'X'"),
                         ('<Option type="CONCLUDE" args="[1.5]" />', "not a list of integers"),
                         ('<Option type="CONCLUDE" args="[1]">', "missing closing '/>'"),
                         ('<Option type="CONCLUDE" args="[1]" /> and more', "text after the closing"),
                         ("MODUS_PONENS(0, 8)", "not an <Option .../> tag")]:
        with pytest.raises(ActionError, match=re.escape(reason)):
            parse_action(text)
    steps = parse_steps("Thought: a\nspans lines\nAction: <Option type=\"CONCLUDE\" args=\"[0]\" />")
    assert steps[0].thought == "a spans lines" and steps[0].action.option == "CONCLUDE"


# -- optionizer ------------------------------------------------------------------------------------
AUTHORS_ROW = {  # coconut_5hop_test.jsonl, first row (fields as in the authors' layout)
    "id": "coconut_test_0000",
    "question": "Brimpuses are not luminous. Shumpuses are amenable. Each yumpus is a lorpus. Gorpuses are shumpuses. "
                "Each zumpus is a grimpus. Gorpuses are rompuses. Dumpuses are not floral. Lempuses are cold. "
                "Brimpuses are impuses. Every lorpus is floral. Every rompus is transparent. Grimpuses are muffled. "
                "Rompuses are yumpuses. Rompuses are wumpuses. Zumpuses are fast. Wumpuses are bitter. Every sterpus "
                "is orange. Each lorpus is a vumpus. Yumpuses are feisty. Each yumpus is a lempus. Gorpuses are snowy. "
                "Zumpuses are gorpuses. Every lorpus is a sterpus. Stella is a brimpus. Stella is a zumpus.",
    "query": "True or false: Stella is not floral.",
    "chain_of_thought": ["Stella is a zumpus.", "Zumpuses are gorpuses.", "Stella is a gorpus.",
                         "Gorpuses are rompuses.", "Stella is a rompus.", "Rompuses are yumpuses.", "Stella is a yumpus.",
                         "Each yumpus is a lorpus.", "Stella is a lorpus.", "Every lorpus is floral.", "Stella is floral."],
    "answer": "False",
}


def test_optionizer_on_an_authors_row_by_hand():
    example = get_task("prontoqa").to_example(AUTHORS_ROW, 0)
    prompt = render_problem(example)
    # each number after its sentence, as the thoughts cite it
    assert prompt.startswith("Brimpuses are not luminous (premise 0).\n") and "\nStella is a zumpus (premise 24).\n" in prompt
    assert "\nClaim: Stella is not floral.\n" in prompt
    proof = optionize(example)
    assert proof.source == "gold" and proof.verdict == "False"
    # by hand: 24 Stella is a zumpus, 21 Zumpuses are gorpuses, 5 Gorpuses are rompuses, 12 Rompuses are yumpuses,
    # 2 Each yumpus is a lorpus, 9 Every lorpus is floral; derived facts 25..29 in step order
    assert [(s.action.option, s.action.args) for s in proof.steps] == [
        ("MODUS_PONENS", (24, 21)), ("MODUS_PONENS", (25, 5)), ("MODUS_PONENS", (26, 12)),
        ("MODUS_PONENS", (27, 2)), ("MODUS_PONENS", (28, 9)), ("CONCLUDE", (29,))]
    assert proof.steps[0].thought == ("Since Stella is a zumpus (premise 24) and zumpuses are gorpuses (premise 21), "
                                      "Stella is a gorpus (derived fact 25).")
    assert proof.steps[4].thought == ("Since Stella is a lorpus (derived fact 28) and every lorpus is floral "
                                      "(premise 9), Stella is floral (derived fact 29).")
    target = optionized_target(example)
    assert target.splitlines()[-1] == 'Action: <Option type="CONCLUDE" args="[29]" />'
    assert "('" not in target and "True)" not in target  # no predicate-style thoughts
    assert get_task("prontoqa").extract_answer(target) == "False"
    assert verify_trace(example, target).fully_valid


def test_backward_plan_and_conclusion_index_on_an_authors_row_by_hand():
    task = get_task("sokrates", source="prontoqa", backward_plan=True)
    example = task.to_example(AUTHORS_ROW, 0)
    # the index lists each premise under what it concludes, in premise order; 'not' marks a negation
    assert "\nfloral: dumpus (6, not), lorpus (9).\n" in example.question
    assert "\nzumpus: Stella (24).\n" in example.question and "\ngorpus: zumpus (21).\n" in example.question
    assert example.question.index("Stella is a zumpus (premise 24).") < example.question.index("luminous: ")
    # by hand: rules concluding floral in premise order: 6 (dumpus; nothing concludes dumpus: a dead end), 9
    # (lorpus); then the one rule concluding each concept back to Stella's fact 24
    first = example.target.splitlines()[0]
    assert first.startswith(
        "Thought: Back from the claim: floral: dumpus (6, not); dumpus: nothing. floral: lorpus (9), each lorpus is "
        "floral (premise 9); lorpus: yumpus (2), each yumpus is a lorpus (premise 2); yumpus: rompus (12), each rompus "
        "is a yumpus (premise 12); rompus: gorpus (5), each gorpus is a rompus (premise 5); gorpus: zumpus (21), each "
        "zumpus is a gorpus (premise 21); zumpus: Stella (24), Stella is a zumpus (premise 24). Since Stella is a "
        "zumpus (premise 24) and each zumpus is a gorpus (premise 21), Stella is a gorpus (derived fact 25).")
    # the steps cite each rule as the plan spells it; their actions are the plain proof's
    plain = optionize(example.meta["problem"])
    assert [s.action for s in optionize(example.meta["problem"], backward_plan=True).steps] == [
        s.action for s in plain.steps]
    assert example.target.splitlines()[2] == ("Thought: Since Stella is a gorpus (derived fact 25) and each gorpus is "
                                              "a rompus (premise 5), Stella is a rompus (derived fact 26).")
    # the claim beside the derived fact, then the verdict
    assert example.target.splitlines()[-2] == ("Thought: Stella is floral (derived fact 29); the claim says Stella is "
                                               "not floral: the opposite, so the answer is False.")
    assert task.extract_answer(example.target) == "False"
    assert verify_trace(example.meta["problem"], example.target).fully_valid
    assert "Premises by what they conclude" not in render_problem(example.meta["problem"])


def test_backward_plan_verifies_on_generated_problems_and_refuses_folio():
    from ftlab.errors import UserError

    task = get_task("sokrates", source="prontoqa", backward_plan=True)
    for i, record in enumerate(generate_prontoqa(40, [1, 2, 3, 5], seed=11)):
        example = task.to_example(record, i)
        assert example.target.startswith("Thought: Back from the claim: ")
        assert verify_trace(example.meta["problem"], example.target).fully_valid
    with pytest.raises(UserError, match="PrOntoQA problems only"):
        get_task("sokrates", source="folio", backward_plan=True)
    with pytest.raises(UserError, match="must be true or false"):
        get_task("sokrates", backward_plan="yes")


def test_optionizer_falls_back_to_the_solver():
    row = {**AUTHORS_ROW, "chain_of_thought": ["Stella is a zumpus.", "Stella is a lorpus.", "Stella is floral."]}
    proof = optionize(get_task("prontoqa").to_example(row, 0))
    assert proof.source == "solver" and "does not follow in one step" in proof.notes[0]
    assert verify_trace(get_task("prontoqa").to_example(row, 0), proof.text()).fully_valid


def test_logipt_and_generator_problems():
    from tests.test_tasks import LOGIPT_SAMPLE

    example = get_task("prontoqa").to_example(LOGIPT_SAMPLE, 0)
    proof = optionize(example)
    assert proof.source == "gold"
    assert [s.action.args for s in proof.steps] == [(2, 0), (3, 1), (4,)]
    assert verify_trace(example, proof.text()).fully_valid
    for i, record in enumerate(generate_prontoqa(60, [1, 2, 3, 5, 8], seed=7)):
        problem = problem_from_example(get_task("prontoqa").to_example(record, i))
        assert solve_problem(problem) == problem.gold
        proof = optionize(problem)
        assert proof.source == "gold" and verify_trace(problem, proof.text()).fully_valid


def test_unreadable_premises_are_an_error_not_a_crash():
    problem = Problem(id="odd", task="prontoqa", premises=["Everything that is a cat is furry.", "Tom is a cat."],
                      claim="Tom is furry.", gold="True")
    with pytest.raises(LogicParseError, match="Everything that is a cat"):
        solve_problem(problem)


@pytest.mark.parametrize("path", PRONTOQA_FILES, ids=lambda p: p.name)
def test_every_prontoqa_file_solver_and_gold_proofs(path):
    from ftlab.sokrates.verify_cmd import verify_file

    summary, rows, _ = verify_file("prontoqa", str(path))
    assert summary["rows"] > 0 and summary["unparsed"] == 0
    assert summary["solver_agrees"] == summary["rows"], [r["id"] for r in rows if not r["solver_agrees"]][:5]
    assert summary["gold_proofs_valid"] == summary["rows"], [r for r in rows if not r["gold_proof_valid"]][:2]


def test_prontoqa_data_present_or_skipped():
    if not PRONTOQA_FILES:
        pytest.skip("shared data folder not available")
    assert len(PRONTOQA_FILES) == 6


# -- FOLIO -----------------------------------------------------------------------------------------
def test_fol_parser():
    pytest.importorskip("z3")
    from ftlab.sokrates.folio_solver import FolError, parse_fol

    assert parse_fol("A(a) ∧ B(a) ∨ C(a)")[0] == "or"                      # ∧ binds tighter than ∨
    assert parse_fol("A(a) ⊕ B(a) → C(a)")[0] == "imp"
    assert parse_fol("∀x A(x) → B(x)") == parse_fol("∀x (A(x) → B(x))")    # x would be left free otherwise
    assert parse_fol("¬(A(a) ^ B(a)).") == parse_fol("¬(A(a) ∧ B(a))")     # '^' and a final '.' in the data
    assert parse_fol("ComeFrom(captain america, dc universe)")[2][0] == ("const", "captain_america")
    with pytest.raises(FolError, match="unexpected"):
        parse_fol("(A(a) ∧ B(a)) ∨ ¬A(a) ∧ ¬B(a))")


def _folio(premises_fol, conclusion_fol, gold, premises=None):
    premises = premises or [f"p{i}" for i in range(len(premises_fol))]
    return Problem(id="f", task="folio", premises=premises, claim="c", gold=gold, premises_fol=premises_fol,
                   conclusion_fol=conclusion_fol, fol_aligned=True)


def test_folio_labels_support_and_conclude_checks():
    pytest.importorskip("z3")
    fol = ["∀x (Drinks(x) → Dependent(x))", "Drinks(rina)", "∀x (Jokes(x) → ¬Unaware(x))"]
    assert solve_problem(_folio(fol, "Dependent(rina)", "True")) == "True"
    assert solve_problem(_folio(fol, "¬Dependent(rina)", "False")) == "False"
    assert solve_problem(_folio(fol, "Jokes(rina)", "Uncertain")) == "Uncertain"
    proof = optionize(_folio(fol, "Dependent(rina)", "True"))
    assert [s.action.args for s in proof.steps] == [(0, 1)]                 # premise 2 is not needed
    assert proof.steps[0].thought == "Premises 0 and 1 together imply the conclusion. The answer is True."
    problem = _folio(fol, "Dependent(rina)", "True")
    conclude = 'Thought: {}\nAction: <Option type="CONCLUDE" args="{}" />'
    assert verify_trace(problem, conclude.format("The answer is True.", "[0, 1]")).fully_valid
    too_few = verify_trace(problem, conclude.format("The answer is True.", "[0]"))
    assert too_few.reasons == ["premises [0] do not imply the conclusion"]
    assert "settle the conclusion (True)" in verify_trace(problem, conclude.format("The answer is Uncertain.", "[]")).reasons[0]
    assert "does not exist" in verify_trace(problem, conclude.format("The answer is True.", "[0, 7]")).reasons[0]
    mp = verify_trace(problem, 'Thought: x\nAction: <Option type="MODUS_PONENS" args="[1, 0]" />')
    assert "not checkable on FOLIO" in mp.reasons[0]


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "folio").is_dir(), reason="shared data folder not available")
def test_folio_validation_agreement_with_gold_labels():
    pytest.importorskip("z3")
    from ftlab.sokrates.verify_cmd import verify_file

    summary, _, unparsed = verify_file("folio", str(DATA / "folio" / "validation.jsonl"))
    print("FOLIO validation:", json.dumps({k: summary[k] for k in (
        "rows", "unparsed", "solver_agrees", "disagreeing_stories", "disagreeing_ids")}))
    # measured: 204 rows, 5 with unreadable formulas, z3 agrees on 191 (8 disagreements, all traced to
    # the annotations: docs/BENCHMARKS.md); every agreeing row with aligned premises has a valid proof
    assert summary["rows"] == 204 and summary["unparsed"] <= 5
    assert summary["solver_agrees"] >= 190
    assert summary["gold_proofs_valid"] >= 183
    assert {u["id"] for u in unparsed} and all(u["reason"] for u in unparsed)


def test_folio_without_z3_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "z3", None)  # import z3 -> ImportError
    path = _write(tmp_path / "f.jsonl", [{"premises": ["A."], "premises-FOL": ["A(a)"], "conclusion": "A.",
                                          "conclusion-FOL": "A(a)", "label": "True"}])
    assert main(["verify", "folio", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("ftlab: error:") == 1 and "pip install 'ftlab[sokrates]'" in err
    assert not (tmp_path / "runs").exists()


# -- ftlab verify ----------------------------------------------------------------------------------
def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_verify_small_file(tmp_path, capsys):
    odd = {**AUTHORS_ROW, "id": "odd", "question": "Everything that is a cat is furry. Tom is a cat.",
           "query": "True or false: Tom is furry.", "chain_of_thought": [], "answer": "True"}
    rows = [{**r, "id": f"gen{i}"} for i, r in enumerate(generate_prontoqa(4, [1, 3], seed=1))] + [AUTHORS_ROW, odd]
    path = _write(tmp_path / "small.jsonl", rows)
    assert main(["verify", "prontoqa", str(path), "--output-dir", str(tmp_path / "runs")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 6 and summary["unparsed"] == 1
    assert summary["solver_agrees"] == 5 and summary["gold_proofs_valid"] == 5
    run = Path(summary["run_dir"])
    assert [json.loads(line)["id"] for line in (run / "unparsed.jsonl").read_text().splitlines()] == ["odd"]
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    assert len((run / "rows.jsonl").read_text().splitlines()) == 5


def test_cli_verify_traces(tmp_path, capsys):
    example = get_task("prontoqa").to_example(AUTHORS_ROW, 0)
    good = optionized_target(example)
    bad = good.replace('args="[25, 5]"', 'args="[25, 6]"')
    path = _write(tmp_path / "traces.jsonl", [{**AUTHORS_ROW, "response": good}, {**AUTHORS_ROW, "response": bad}])
    assert main(["verify", "prontoqa", str(path), "--traces", "--output-dir", str(tmp_path / "runs")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["traces"] == 2 and summary["steps"] == 12 and summary["steps_valid"] == 6 + 1
    assert summary["traces_fully_valid"] == 1 and summary["answers_correct"] == 2


@pytest.mark.parametrize("content, argv_extra, needle", [
    ('{"question": "Tom is a cat.", "query": "True or false: Tom is a cat.", "answer": "True"}\n{"question": \n',
     [], ":2: malformed JSON"),
    ('{"question": "Tom is a cat.", "answer": "True"}\n', [], "missing field 'query'"),
    ('{"question": "Tom is a cat.", "query": "True or false: Tom is a cat.", "answer": "True"}\n', ["--traces"],
     "--traces needs a model trace"),
])
def test_cli_verify_bad_file(tmp_path, capsys, content, argv_extra, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    code = main(["verify", "prontoqa", str(path), "--output-dir", str(tmp_path / "runs"), *argv_extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
