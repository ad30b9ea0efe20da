"""Tasks: extraction edge cases, hand-derived metrics, bad-input errors and (slow) real-data loading."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from ftlab.errors import UserError
from ftlab.tasks import TASKS, Example, get_task, parse_gsm8k_response, parse_logipt_conversation
from ftlab.tasks.folio import extract_folio_flexible, extract_folio_strict, premise_fol_pairs
from ftlab.tasks.gsm8k import parse_gsm8k_strict
from ftlab.tasks.prontoqa import extract_true_false_flexible, extract_true_false_strict, query_statement
from ftlab.tasks.scoring import bootstrap_ci, majority_class
from ftlab.tasks.socsci210 import (
    extract_response_flexible,
    extract_response_strict,
    question_key,
    question_scales,
    stated_scale,
    wasserstein_1d,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"   # ../shared/data beside the checkout


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# -- registry -------------------------------------------------------------------------------------
def test_registry_names_and_unknown_task():
    assert sorted(TASKS) == ["folio", "gsm8k", "prontoqa", "socsci210", "sokrates"]
    for name, cls in TASKS.items():
        assert get_task(name).name == name and isinstance(get_task(name), cls)
    with pytest.raises(UserError) as e:
        get_task("x")
    assert str(e.value) == "unknown task 'x'; known tasks: folio, gsm8k, prontoqa, socsci210, sokrates"


def test_registry_rejects_unknown_option():
    with pytest.raises(UserError, match="gsm8k"):
        get_task("gsm8k", no_such_option=1)
    assert get_task("gsm8k", socratic_subquestions=False).socratic_subquestions is False


# -- shared scoring ------------------------------------------------------------------------------
def test_bootstrap_ci_contains_the_mean_and_stays_in_the_unit_interval():
    hits = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]   # mean 0.7
    lo, hi = bootstrap_ci(hits)
    assert 0.0 <= lo < 0.7 < hi <= 1.0
    assert bootstrap_ci(hits) == [lo, hi]    # fixed seed: the same interval every time


def test_bootstrap_ci_degenerate_and_empty():
    assert bootstrap_ci([1] * 20) == [1.0, 1.0]
    assert bootstrap_ci([0, 0, 0]) == [0.0, 0.0]
    assert bootstrap_ci([]) is None


@pytest.mark.parametrize("ones, minus_ones, n", [(600, 0, 2000), (300, 100, 1000)])
def test_bootstrap_ci_width_matches_the_normal_approximation(ones, minus_ones, n):
    # Large n: the percentile interval is close to mean +- 1.96 * sd / sqrt(n).
    # 600/2000 ones: p = 0.3, sd = sqrt(0.21), width = 3.92 * sqrt(0.21 / 2000) = 0.0402.
    # 300 of +1, 100 of -1 in 1000 (a paired difference): mean 0.2, var = 0.4 - 0.04 = 0.36, width = 0.0744.
    values = [1] * ones + [-1] * minus_ones + [0] * (n - ones - minus_ones)
    mean = (ones - minus_ones) / n
    var = (ones + minus_ones) / n - mean ** 2
    lo, hi = bootstrap_ci(values)
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(var / n), rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(mean, abs=0.005)


def test_majority_class():
    assert majority_class(["True", "False", "True"]) == ("True", pytest.approx(2 / 3))
    assert majority_class(["Uncertain", "False"]) == ("False", 0.5)     # a tie: the alphabetically first
    label, rate = majority_class([])
    assert label is None and math.isnan(rate)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_states_its_extraction_rule_and_survives_junk_outputs(name):
    task = get_task(name)
    gold = {"gsm8k": "5", "prontoqa": "True", "folio": "True", "socsci210": "5", "sokrates": "True"}[name]
    meta = {"study_id": "s", "condition_num": 1, "question_key": "q", "gold_value": 5, "hops": 1}
    ex = Example(id="e", question="q", target="t", gold=gold, meta=meta)
    scores = [task.score(out, ex) for out in ["", "no answer here", None, "\x00\ufffd", "5 True"]]
    assert [s["extracted"] is None for s in scores[:4]] == [True] * 4
    assert not any(s["correct"] for s in scores[:4])
    metrics = task.aggregate(scores, [ex] * len(scores))
    assert isinstance(metrics["extraction_rule"], str) and "flexible" in metrics["extraction_rule"]
    assert metrics["parse_rate"] == pytest.approx(1 / 5)
    assert {"accuracy", "accuracy_strict", "accuracy_flexible", "parse_rate"} <= set(metrics)
    assert metrics["primary_rule"] == "strict, else flexible" and "strict, else flexible" in metrics["extraction_rule"]
    for key in ("accuracy", "accuracy_strict", "accuracy_flexible"):   # every accuracy has its interval
        lo, hi = metrics[f"{key}_ci95"]
        assert 0.0 <= lo <= metrics[key] <= hi <= 1.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_messages_and_shots(name):
    task = get_task(name)
    ex = Example(id="e", question="Q?", target="t", gold="True")
    msgs = task.messages(ex, shots=len(task.shot_examples))
    assert msgs[-1] == {"role": "user", "content": task.instruction("Q?")}
    assert len(msgs) == 2 * len(task.shot_examples) + 1
    for _, answer in task.shot_examples:  # our shots end in the strict answer form we ask for
        assert task.extract_answer(answer) is not None
    with pytest.raises(UserError):
        task.messages(ex, shots=len(task.shot_examples) + 1)


# -- GSM8K ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("72", "72"),
    ("She sold 1,080 clips.", "1080"),
    ("It costs $3.50", "3.5"),
    ("5.0", "5"),
    ("0.50", "0.5"),
    ("The temperature fell to -7 degrees.", "-7"),
    ("So the answer is 72.", "72"),
    ("He has 1,000,000 dollars.", "1000000"),
    ("first 12, then 15, finally 18.", "18"),
    ("pages 3-5", "5"),                    # a range, not a negative number
    ("x \u2212 4 gives \u22124", "-4"),   # unicode minus
    ("-0", "0"),
    ("no digits at all", None),
    ("", None),
])
def test_parse_gsm8k_response(text, expected):
    assert parse_gsm8k_response(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("step\n#### 1,080", "1080"),
    ("The answer is 72.", "72"),
    ("Final answer: $18", "18"),
    ("The answer is **42**", "42"),
    ("\\boxed{7}", "7"),
    ("#### 5\nbut the answer is 6", "6"),  # the last explicit form wins
    ("She has 72 apples.", None),          # a bare number is not an explicit answer
])
def test_parse_gsm8k_strict(text, expected):
    assert parse_gsm8k_strict(text) == expected


def test_gsm8k_example_main_and_socratic(tmp_path):
    rows = [
        {"question": "Q1", "answer": "A costs 2*3 = <<2*3=6>>6.\nTotal 6+1,074 = <<6+1074=1080>>1,080.\n#### 1,080"},
        {"question": "Q2", "answer": "How many? ** He has 5-3 = <<5-3=2>>2 left.\nAnd then? ** So 2*2 = <<2*2=4>>4.\n#### 4"},
    ]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    main, soc = get_task("gsm8k").load(path)
    assert main.gold == "1080" and main.meta["format"] == "main"
    assert main.target == "A costs 2*3 = 6.\nTotal 6+1,074 = 1,080.\n#### 1080"
    assert soc.gold == "4" and soc.meta["format"] == "socratic"
    assert soc.target == "How many? ** He has 5-3 = 2 left.\nAnd then? ** So 2*2 = 4.\n#### 4"
    (_, soc_steps) = get_task("gsm8k", socratic_subquestions=False).load(path)
    assert soc_steps.target == "He has 5-3 = 2 left.\nSo 2*2 = 4.\n#### 4"


def test_gsm8k_scores_and_metrics_by_hand():
    task = get_task("gsm8k")
    golds = ["18", "3", "1080", "5"]
    outputs = [
        "She makes 9 * 2 = 18 dollars.\n#### 18",   # strict 18 ok,  flexible 18 ok
        "The answer is 3. Check: 3 * 2 = 6",         # strict 3 ok,   flexible 6 wrong -> primary 3 ok
        "So the total is $1,080.",                   # strict none,   flexible 1080 ok -> primary 1080 ok
        "I am not sure.",                            # nothing parsed
    ]
    examples = [Example(id=str(i), question="q", target="t", gold=g) for i, g in enumerate(golds)]
    scores = [task.score(o, ex) for o, ex in zip(outputs, examples)]
    assert [s["extracted_strict"] for s in scores] == ["18", "3", None, None]
    assert [s["extracted_flexible"] for s in scores] == ["18", "6", "1080", None]
    assert [s["extracted"] for s in scores] == ["18", "3", "1080", None]   # strict, else flexible
    m = task.aggregate(scores, examples)
    assert m["accuracy"] == 0.75                            # outputs 1, 2 and 3
    assert m["accuracy_strict"] == 0.5                      # outputs 1 and 2
    assert m["accuracy_flexible"] == 0.5                    # outputs 1 and 3
    assert m["parse_rate"] == m["parse_rate_flexible"] == 0.75 and m["parse_rate_strict"] == 0.5
    assert m["primary_rule"] == "strict, else flexible" and "####" in m["extraction_rule"]
    assert "strict, else flexible" in m["extraction_rule"]
    assert m["metric_rules"]["accuracy_flexible"] == "flexible" and m["metric_rules"]["accuracy"] == m["primary_rule"]


def test_gsm8k_bad_inputs(tmp_path):
    task = get_task("gsm8k")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q"}])
    with pytest.raises(UserError, match=r"bad\.jsonl:2: missing field 'answer'"):
        task.load(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        task.load(str(empty))
    no_final = write_jsonl(tmp_path / "nofinal.jsonl", [{"question": "q", "answer": "just 5"}])
    with pytest.raises(UserError, match=r"nofinal\.jsonl: record 1: .*####"):
        task.load(no_final)
    with pytest.raises(UserError, match="not found"):
        task.load(str(tmp_path / "missing.jsonl"))


# -- PrOntoQA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, strict, flexible", [
    ("Sam is sour. The answer is True.", "True", "True"),
    ("The answer is: false", "False", "False"),
    ("The answer is **True**", "True", "True"),
    ("the answer is true. Wait, the answer is false.", "False", "False"),
    ("It is True that Sam is sour, so False.", None, "False"),
    ("Untrue and falsehood are not answers.", None, None),   # whole words only
    ("", None, None),
])
def test_prontoqa_extraction(text, strict, flexible):
    assert extract_true_false_strict(text) == strict
    assert extract_true_false_flexible(text) == flexible


def test_query_statement_wordings():
    assert query_statement("True or false: Max is sour.") == "Max is sour."
    assert query_statement("Is the following statement true or false? Max is sour.") == "Max is sour."
    assert query_statement("Max is sour.") == "Max is sour."


PRONTO_ROWS = [
    {"id": "a", "question": "Every wumpus is a yumpus. Yumpuses are sour. Sam is a wumpus.",
     "query": "True or false: Sam is sour.",
     "chain_of_thought": ["Sam is a wumpus.", "Every wumpus is a yumpus.", "Sam is a yumpus.",
                          "Yumpuses are sour.", "Sam is sour."], "answer": "True", "hops": 2},
    {"id": "b", "question": "Impuses are not hot. Rex is an impus.",
     "query": "Is the following statement true or false? Rex is hot.",
     "chain_of_thought": ["Rex is an impus.", "Impuses are not hot.", "Rex is not hot."], "answer": "False"},
]


def test_prontoqa_authors_format(tmp_path):
    a, b = get_task("prontoqa").load(write_jsonl(tmp_path / "p.jsonl", PRONTO_ROWS))
    assert a.question == ("Every wumpus is a yumpus. Yumpuses are sour. Sam is a wumpus.\n\n"
                          "True or false: Sam is sour.")
    assert a.target == ("Sam is a wumpus. Every wumpus is a yumpus. Sam is a yumpus. Yumpuses are sour. "
                        "Sam is sour. The answer is True.")
    assert (a.gold, a.meta["hops"], b.gold, b.meta["hops"]) == ("True", 2, "False", None)
    assert b.question.endswith("\n\nTrue or false: Rex is hot.")  # Logic-LM wording normalized
    assert b.target.endswith("Rex is not hot. The answer is False.")
    prompt = get_task("prontoqa").instruction(a.question)
    assert prompt.startswith(a.question) and prompt.endswith('"The answer is False."')


def test_prontoqa_raw_generator_json(tmp_path):
    raw = {"example1": {"in_context_example0": {"question": "x"}, "test_example": {
        k: PRONTO_ROWS[0][k] for k in ("question", "query", "chain_of_thought", "answer")}},
        "example2": {"test_example": {k: PRONTO_ROWS[1][k] for k in ("question", "query", "answer")}}}
    path = tmp_path / "5hop_0shot_random.json"
    path.write_text(json.dumps(raw))
    a, b = get_task("prontoqa").load(str(path))
    assert (a.id, a.gold, b.id, b.gold) == ("example1", "True", "example2", "False")
    assert b.target == "The answer is False."  # no chain in the record


# A hand-written record in the LoGiPT (Vicuna/FastChat) shape: task turn with the context, symbolic
# reasoning turn, question turn with options, answer turn.
LOGIPT_SAMPLE = {
    "id": "prontoqa_train_17",
    "conversations": [
        {"from": "human", "value": (
            "Task Description: Given a statement containing logical facts and rules in natural languages as "
            "context, the task is to:\n1. define all the predicates in logic forms with context\n2. parse the "
            "statement into known facts and rules based on the defined predicates\n3. begin reasoning to obtain "
            "all implied facts\n\nContext:\nEvery tumpus is a wumpus. Wumpuses are not sour. Alex is a tumpus.\n\n"
            "Reasoning:")},
        {"from": "gpt", "value": (
            "We first define following predicates and corresponding natural language explanations:\n"
            "Tumpus($x, bool) ::: Does x belong to Tumpus?\nWumpus($x, bool) ::: Does x belong to Wumpus?\n"
            "Sour($x, bool) ::: Is x sour?\n\nWe have following known facts from the context:\n"
            "Tumpus('Alex', True)\n\nWe have following known rules from the context:\n"
            "rule1: Tumpus($x, True) → Wumpus($x, True)\nrule2: Wumpus($x, True) → Sour($x, False)\n\n"
            "Now begin reasoning to obtain all implied facts:\nUse rule1: Tumpus($x, True) → Wumpus($x, True)\n"
            "Bind $x to 'Alex'\nObtain a new implied fact: Wumpus('Alex', True)\n"
            "Use rule2: Wumpus($x, True) → Sour($x, False)\nBind $x to 'Alex'\n"
            "Obtain a new implied fact: Sour('Alex', False)\nFinish reasoning")},
        {"from": "human", "value": (
            "Question: Based on the above information, is the following comment true, false, or unknown? "
            "Alex is sour.\n\nOptions:\nA) True\nB) False\nC) Unknown\n\nNow you should:\n1. reason first "
            "carefully with the above known facts and implied facts\n2. then output your answer strictly in the "
            "format of \"So, the correct option is: X\". The X should be replaced by \"A) True\", \"B) False\" "
            "or \"C) Unknown\"")},
        {"from": "gpt", "value": (
            "The comment can be parsed into: Sour('Alex', True)\nAccording to the implied fact: Sour('Alex', False)\n"
            "The comment contradicts the fact.\nSo, the correct option is: B) False")},
    ],
}


def test_parse_logipt_conversation():
    r = parse_logipt_conversation(LOGIPT_SAMPLE)
    assert r["id"] == "prontoqa_train_17"
    assert r["question"] == "Every tumpus is a wumpus. Wumpuses are not sour. Alex is a tumpus."
    assert r["query"] == "True or false: Alex is sour."
    assert r["answer"] == "False"
    assert "Obtain a new implied fact: Sour('Alex', False)" in r["chain_of_thought"]
    assert r["chain_of_thought"][-1] == "Finish reasoning"


def test_parse_logipt_messages_variant_single_turn():
    record = {"messages": [
        {"role": "system", "content": "You are a logician."},
        {"role": "user", "content": "Context: Each impus is hot. Sam is an impus.\nQuestion: True or false: Sam is hot."},
        {"role": "assistant", "content": "Sam is an impus.\nEach impus is hot.\nSam is hot.\nThe answer is True."},
    ]}
    r = parse_logipt_conversation(record)
    assert r["question"] == "Each impus is hot. Sam is an impus."
    assert r["query"] == "True or false: Sam is hot."
    assert r["answer"] == "True"
    assert r["chain_of_thought"] == ["Sam is an impus.", "Each impus is hot.", "Sam is hot."]
    with pytest.raises(ValueError):
        parse_logipt_conversation({"conversations": []})


def test_prontoqa_loads_logipt_files(tmp_path):
    json_list = tmp_path / "LoGiPT-data-PrOntoQA.json"
    json_list.write_text(json.dumps([LOGIPT_SAMPLE]))
    (ex,) = get_task("prontoqa").load(str(json_list))
    assert ex.gold == "False" and ex.meta["format"] == "logipt"
    assert ex.question.endswith("\n\nTrue or false: Alex is sour.")
    assert ex.target.endswith("Finish reasoning\nThe answer is False.")
    (ex2,) = get_task("prontoqa").load(write_jsonl(tmp_path / "l.jsonl", [LOGIPT_SAMPLE]))
    assert ex2 == ex


def test_prontoqa_metrics_by_hops_by_hand():
    task = get_task("prontoqa")
    hops, golds = [1, 1, 3, 3, 3], ["True", "False", "True", "False", "True"]
    outputs = ["The answer is True.", "The answer is True.", "so True", "The answer is False.", "hmm"]
    examples = [Example(id=str(i), question="q", target="t", gold=g, meta={"hops": h})
                for i, (h, g) in enumerate(zip(hops, golds))]
    m = task.aggregate([task.score(o, ex) for o, ex in zip(outputs, examples)], examples)
    assert m["accuracy"] == pytest.approx(3 / 5)          # outputs 1, 3, 4
    assert m["accuracy_strict"] == pytest.approx(2 / 5)   # output 3 has no "answer is"
    assert m["parse_rate"] == pytest.approx(4 / 5)
    assert m["accuracy_by_hops"] == {"1": 0.5, "3": pytest.approx(2 / 3)}
    assert m["n_by_hops"] == {"1": 2, "3": 3}
    assert m["majority_class"] == "True" and m["majority_class_rate"] == pytest.approx(3 / 5)  # golds: 3 True
    no_hops = [Example(id="x", question="q", target="t", gold="True")]
    assert "accuracy_by_hops" not in task.aggregate([task.score("True", no_hops[0])], no_hops)


def test_prontoqa_explicit_answer_wins_over_a_later_stray_word():
    task = get_task("prontoqa")
    output = "The answer is True. (Sam is not sour, so 'Sam is sour' is false.)"
    examples = [Example(id=str(i), question="q", target="t", gold=g) for i, g in enumerate(["True", "False"])]
    right, wrong = (task.score(output, ex) for ex in examples)
    # strict reads "True" (the explicit form); flexible reads the last bare word, "false"
    assert (right["extracted_strict"], right["extracted_flexible"], right["extracted"]) == ("True", "False", "True")
    assert right["correct"] and right["correct_strict"] and not right["correct_flexible"]
    assert not wrong["correct"] and wrong["correct_flexible"]
    assert task.extract_answer(output) == "True"
    m = task.aggregate([right, wrong], examples)
    # primary: row 1 right, row 2 wrong; flexible: the reverse; strict = primary here
    assert m["accuracy"] == m["accuracy_strict"] == m["accuracy_flexible"] == 0.5
    assert m["majority_class"] == "False" and m["majority_class_rate"] == 0.5   # a tie goes to the first name
    m_one = task.aggregate([right], examples[:1])
    assert (m_one["accuracy"], m_one["accuracy_strict"], m_one["accuracy_flexible"]) == (1.0, 1.0, 0.0)


def test_prontoqa_bad_inputs(tmp_path):
    task = get_task("prontoqa")
    missing = write_jsonl(tmp_path / "m.jsonl", [PRONTO_ROWS[0], {"question": "x", "answer": "True"}])
    with pytest.raises(UserError, match=r"m\.jsonl:2: missing field 'query'"):
        task.load(missing)
    bad_label = write_jsonl(tmp_path / "b.jsonl", [{**PRONTO_ROWS[0], "answer": "Maybe"}])
    with pytest.raises(UserError, match=r"b\.jsonl:1: cannot read as prontoqa: .*'Maybe'"):
        task.load(bad_label)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"question": ')
    with pytest.raises(UserError, match="broken.json.*malformed JSON"):
        task.load(str(broken))
    empty = tmp_path / "e.json"
    empty.write_text("[]")
    with pytest.raises(UserError, match="empty"):
        task.load(str(empty))


# -- FOLIO ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, strict, flexible", [
    ("The answer is Uncertain.", "Uncertain", "Uncertain"),
    ("The answer is unknown", "Uncertain", "Uncertain"),
    ("The answer is False", "False", "False"),
    ("It is uncertain whether... but it must be true", None, "True"),
    ("Unknowable truths", None, None),
])
def test_folio_extraction(text, strict, flexible):
    assert extract_folio_strict(text) == strict
    assert extract_folio_flexible(text) == flexible


FOLIO_TRAIN_ROW = {"story_id": 1, "example_id": 7, "premises": ["All cats purr.", "Tom is a cat."],
                   "premises-FOL": ["∀x (Cat(x) → Purr(x))", "Cat(tom)"], "conclusion": "Tom purrs.",
                   "label": "Unknown", "source": "wiki"}
FOLIO_VAL_ROW = {"premises": ["All cats purr.", "Tom is a cat.", "Tom is orange."],
                 "premises-FOL": ["∀x (Cat(x) → Purr(x))", "Cat(tom) ∧ Orange(tom)"],  # 3 vs 2: upstream quirk
                 "conclusion": "Tom purrs.", "conclusion-FOL": "Purr(tom)", "label": "Uncertain"}


def test_folio_examples(tmp_path):
    train, val = get_task("folio").load(write_jsonl(tmp_path / "f.jsonl", [FOLIO_TRAIN_ROW, FOLIO_VAL_ROW]))
    assert train.gold == val.gold == "Uncertain"          # Unknown and Uncertain are one class
    assert train.id == "folio-7" and val.id == "folio-1"
    assert train.question == "Premises:\n1. All cats purr.\n2. Tom is a cat.\nConclusion: Tom purrs."
    assert train.target == "The answer is Uncertain."
    assert train.meta["premises-FOL"] == FOLIO_TRAIN_ROW["premises-FOL"] and train.meta["conclusion-FOL"] is None
    assert val.meta["conclusion-FOL"] == "Purr(tom)" and val.meta["fol_aligned"] is False
    assert premise_fol_pairs(train) == list(zip(FOLIO_TRAIN_ROW["premises"], FOLIO_TRAIN_ROW["premises-FOL"]))
    assert premise_fol_pairs(val) is None                 # never zip mismatched lists


def test_folio_empty_premise_kept_for_fol_alignment(tmp_path):
    # Upstream story 129 has a premise "" whose FOL is also "": hide it in the prompt, keep the pairing.
    row = {**FOLIO_TRAIN_ROW, "premises": ["All cats purr.", "", "Tom is a cat."],
           "premises-FOL": ["∀x (Cat(x) → Purr(x))", "", "Cat(tom)"]}
    (ex,) = get_task("folio").load(write_jsonl(tmp_path / "f.jsonl", [row]))
    assert ex.question == "Premises:\n1. All cats purr.\n2. Tom is a cat.\nConclusion: Tom purrs."
    assert premise_fol_pairs(ex)[2] == ("Tom is a cat.", "Cat(tom)")


def test_folio_metrics_by_hand():
    task = get_task("folio")
    golds = ["True", "False", "Uncertain", "Uncertain"]
    outputs = ["The answer is True.", "so it is true", "The answer is Unknown.", "The answer is False."]
    examples = [Example(id=str(i), question="q", target="t", gold=g) for i, g in enumerate(golds)]
    m = task.aggregate([task.score(o, ex) for o, ex in zip(outputs, examples)], examples)
    assert m["accuracy"] == 0.5 and m["accuracy_strict"] == 0.5   # outputs 1 and 3
    assert m["parse_rate"] == 1.0 and m["parse_rate_strict"] == 0.75
    assert m["accuracy_by_label"] == {"True": 1.0, "False": 0.0, "Uncertain": 0.5}
    assert m["majority_class"] == "Uncertain" and m["majority_class_rate"] == 0.5   # 2 of the 4 golds


def test_folio_bad_inputs(tmp_path):
    with pytest.raises(UserError, match=r"f\.jsonl:1: missing field 'label'"):
        get_task("folio").load(write_jsonl(tmp_path / "f.jsonl", [{"premises": ["a"], "conclusion": "b"}]))
    with pytest.raises(UserError, match=r"g\.jsonl: record 1: .*'Maybe'"):
        get_task("folio").load(write_jsonl(tmp_path / "g.jsonl", [{**FOLIO_VAL_ROW, "label": "Maybe"}]))


# -- SocSci210 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, strict, flexible", [
    ("Response: 3", 3, 3),
    ("response:7", 7, 7),
    ("Response: -2", -2, -2),
    ("Response: $1,500", 1500, 1500),
    ("4", None, 4),
    ("I would say 5 out of 7", None, 7),
    ("Response: 3.5", 4, 4),           # decimals round half up
    ("Response: unsure", None, None),
    ("", None, None),
])
def test_socsci_extraction(text, strict, flexible):
    assert extract_response_strict(text) == strict
    assert extract_response_flexible(text) == flexible


def test_question_key_strips_demographics():
    a = "Demographics: Age: 30; Gender: Male\n\nScenario: Rate it. Only return an integer from 1 to 7."
    b = "Demographics: Age: 71; Gender: Female; Income: 10K\n\nScenario: Rate it. Only return an integer from 1 to 7."
    assert question_key(a) == question_key(b) == "Scenario: Rate it. Only return an integer from 1 to 7."


def test_wasserstein_by_hand():
    assert wasserstein_1d([1, 2], [2, 4]) == pytest.approx(1.5)   # (|1-2| + |2-4|) / 2
    assert wasserstein_1d([7], [5, 7]) == pytest.approx(1.0)      # CDFs differ by 1/2 on [5, 7)
    assert wasserstein_1d([3, 3, 3], [3]) == 0.0
    assert wasserstein_1d([0], [10]) == 10.0
    with pytest.raises(ValueError):
        wasserstein_1d([], [1])


def test_wasserstein_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    u, v = [1, 5, 2, 2, 9], [3, 3, 8]
    assert wasserstein_1d(u, v) == pytest.approx(stats.wasserstein_distance(u, v))


def _socsci_row(study, cond, age, scenario, gold):
    return {"instruction": "Predict.", "input": f"Demographics: Age: {age}\n\nScenario: {scenario}",
            "output": f"Response: {gold}", "study_id": study, "condition_num": cond}


LIKERT = "Rate it. Only return an integer from 1 to 5, nothing else."          # stated scale [1, 5]
DOLLARS = "Prices rose from 10 to 20. How much? Only return an integer representing dollars, nothing else."
YES_NO = "Agree? Only return 1 for Yes or 2 for No, nothing else."                # answer codes: [1, 2]


@pytest.mark.parametrize("question, scale", [
    ("Rose from 8 to 9 percent. Only return an integer from 1 to 7, where 1 means No.", (1, 7)),
    ("Only return an integer from 1 (Definitely not eligible) to 5 (Definitely eligible), nothing else.", (1, 5)),
    ("Only return an integer from 1 ($0-$20) to 7 (More than $120), nothing else.", (1, 7)),
    ("Only return a multiple of 100 between 0 and 1000, nothing else.", (0, 1000)),
    ("Only return 1 for $1-$10; 2 for $11-$25; 3 for $26-$50, nothing else.", (1, 3)),
    ("Only return 1 if you accept it as final, up to 4 if you strongly believe it should be challenged.", (1, 4)),
    (YES_NO, (1, 2)),
    (DOLLARS, None),                  # the scenario's "from 10 to 20" is not the answer scale
])
def test_socsci_stated_scale(question, scale):
    assert stated_scale(question) == scale


def test_socsci_explicit_response_wins_over_a_later_number():
    ex = Example(id="e", question="q", target="Response: 5", gold="5",
                 meta={"study_id": "s", "condition_num": 1, "question_key": LIKERT, "gold_value": 5})
    score = get_task("socsci210").score("Response: 5 (on a scale from 1 to 7)", ex)
    assert (score["extracted_strict"], score["extracted_flexible"], score["extracted"]) == ("5", "7", "5")
    assert score["value"] == 5 and score["correct"] and not score["correct_flexible"]


def test_socsci_metrics_by_hand(tmp_path):
    rows = [
        _socsci_row("A", 1, 30, LIKERT, 2),
        _socsci_row("A", 1, 50, LIKERT, 4),
        _socsci_row("A", 1, 40, DOLLARS, 100),   # no stated scale: the human answers span [100, 500]
        _socsci_row("A", 1, 45, DOLLARS, 500),
        _socsci_row("B", 2, 60, YES_NO, 1),
        _socsci_row("B", 2, 70, YES_NO, 2),
    ]
    task = get_task("socsci210")
    examples = task.load(write_jsonl(tmp_path / "s.jsonl", rows))
    assert examples[0].question == f"Predict.\n\nDemographics: Age: 30\n\nScenario: {LIKERT}"
    assert examples[0].target == "Response: 2" and examples[0].gold == "2"
    outputs = ["Response: 3", "4", "Response: 300", "Response: 500 (between 0 and 1000)", "Response: 2", "no idea"]
    scores = [task.score(o, ex) for o, ex in zip(outputs, examples)]
    # strict 3 - 300 500 2 -; flexible 3 4 300 1000 2 -; primary (strict, else flexible) 3 4 300 500 2 -
    assert [s["value"] for s in scores] == [3, 4, 300, 500, 2, None]
    m = task.aggregate(scores, examples)
    assert m["parse_rate"] == m["parse_rate_flexible"] == pytest.approx(5 / 6)
    assert m["parse_rate_strict"] == pytest.approx(4 / 6)
    assert m["accuracy"] == pytest.approx(2 / 6)            # 4 == 4 and 500 == 500
    assert m["accuracy_strict"] == pytest.approx(1 / 6)     # 500 only ("4" has no "Response:")
    assert m["accuracy_flexible"] == pytest.approx(1 / 6)   # 4 only (row 4 reads 1000)
    assert m["primary_rule"] == "strict, else flexible"
    # raw units, parsed pairs (3,2) (4,4) (300,100) (500,500) (2,1): errors 1 0 200 0 1
    assert m["mae_raw"] == pytest.approx(202 / 5)
    assert m["rmse_raw"] == pytest.approx(math.sqrt(40002 / 5))
    # normalised: Likert (v-1)/4, dollars (v-100)/400, yes/no (v-1)/1
    # pairs (0.5,0.25) (0.75,0.75) (0.5,0) (1,1) (1,0): |errors| .25 0 .5 0 1
    assert m["mae_norm"] == pytest.approx(1.75 / 5)
    # x mean 0.75, y mean 0.4: sum dxdy = 0.1875, sum dx^2 = 0.25, sum dy^2 = 0.825
    assert m["pearson_r"] == pytest.approx(0.1875 / math.sqrt(0.25 * 0.825))
    # W1 per study x condition on the normalised scale:
    # A/1: preds {.5 .5 .75 1} vs humans {0 .25 .75 1} -> (.5 + .25 + 0 + 0) / 4 = 0.1875
    # B/2: preds {1} vs humans {0, 1} -> CDFs differ by 1/2 on [0, 1) -> 0.5
    assert m["wasserstein"] == pytest.approx((0.1875 + 0.5) / 2)
    assert m["n_cells"] == 2 and m["n_cells_unparsed"] == 0
    assert (m["n_questions"], m["n_questions_scale_stated"], m["n_questions_scale_from_answers"]) == (3, 2, 1)
    assert m["n_questions_unscaled"] == 0 and m["n_questions_scale_widened"] == 0
    assert "from A to B" in m["scale_rule"]
    a, b = m["by_study"]["A"], m["by_study"]["B"]
    assert a["n"] == 4 and a["mae_raw"] == pytest.approx(201 / 4) and a["rmse_raw"] == pytest.approx(math.sqrt(40001 / 4))
    # study A normalised: x = [.5 .75 .5 1], y = [.25 .75 0 1]: sum dxdy = 0.3125, dx^2 = 0.171875, dy^2 = 0.625
    assert a["pearson_r"] == pytest.approx(0.3125 / math.sqrt(0.171875 * 0.625))
    assert a["wasserstein"] == pytest.approx(0.1875)
    # study B: one parsed pair (2,1); r undefined with a single point
    assert b["parse_rate"] == 0.5 and b["mae_raw"] == 1 and b["pearson_r"] is None
    assert b["wasserstein"] == pytest.approx(0.5)


def test_socsci_scale_widened_and_unscaled_questions(tmp_path):
    # A stated two-code scale answered 1 and 5 (as in the real data) widens to [1, 5]; a dollar
    # question with one distinct human answer has no scale and stays out of the normalised metrics.
    scenarios = "Only return 1 for the first scenario; 2 for the second scenario, nothing else."
    rows = [_socsci_row("A", 1, 30, scenarios, 1), _socsci_row("A", 1, 40, scenarios, 5),
            _socsci_row("A", 1, 50, DOLLARS, 70)]
    task = get_task("socsci210")
    examples = task.load(write_jsonl(tmp_path / "s.jsonl", rows))
    scales = question_scales(examples)
    assert [scales[k]["lo"] for k in scales] == [1, 70] and [scales[k]["hi"] for k in scales] == [5, 70]
    m = task.aggregate([task.score(o, ex) for o, ex in zip(["Response: 2", "Response: 5", "Response: 90"],
                                                            examples)], examples)
    assert m["n_questions_scale_widened"] == 1 and m["n_questions_unscaled"] == 1
    assert m["mae_raw"] == pytest.approx((1 + 0 + 20) / 3)            # raw errors include every parsed row
    assert m["mae_norm"] == pytest.approx((0.25 + 0) / 2)            # (2-1)/4 vs 0, 1 vs 1
    # A/1 on the normalised scale: preds {.25, 1} vs humans {0, 1}: (.25 + 0) / 2
    assert m["wasserstein"] == pytest.approx(0.125)


def test_socsci_question_with_no_parsed_prediction_is_skipped(tmp_path):
    task = get_task("socsci210")
    examples = task.load(write_jsonl(tmp_path / "s.jsonl", [_socsci_row("A", 1, 30, LIKERT, 2)]))
    m = task.aggregate([task.score("??", examples[0])], examples)
    assert m["parse_rate"] == 0.0 and m["mae_raw"] is None and m["wasserstein"] is None
    assert m["n_cells"] == 0 and m["n_cells_unparsed"] == 1


def test_socsci_bad_inputs(tmp_path):
    task = get_task("socsci210")
    row = _socsci_row("A", 1, 30, "Q1", 2)
    with pytest.raises(UserError, match=r"s\.jsonl:1: missing field 'study_id'"):
        task.load(write_jsonl(tmp_path / "s.jsonl", [{k: v for k, v in row.items() if k != "study_id"}]))
    with pytest.raises(UserError, match=r"t\.jsonl: record 1: .*Response: three"):
        task.load(write_jsonl(tmp_path / "t.jsonl", [{**row, "output": "Response: three"}]))


# -- real data (slow) -----------------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared data folder not available")


@pytest.mark.slow
@needs_data
def test_real_gsm8k():
    task = get_task("gsm8k")
    counts = {"train.jsonl": 7473, "test.jsonl": 1319, "test_socratic.jsonl": 1319}
    loaded = {}
    commas = negatives = 0
    for name, n in counts.items():
        raw = _rows(DATA / "gsm8k" / name)
        examples = task.load(str(DATA / "gsm8k" / name))
        assert len(examples) == n
        for r, ex in zip(raw, examples):
            final = r["answer"].rsplit("####", 1)[1].strip()
            assert ex.gold == final.replace(",", "") and int(ex.gold) == int(final.replace(",", ""))
            assert parse_gsm8k_response(r["answer"]) == ex.gold      # the flexible rule reads gold rows
            assert task.score(ex.target, ex)["correct_strict"]
            assert "<<" not in ex.target and ex.target.endswith(f"#### {ex.gold}")
            commas += name != "test_socratic.jsonl" and "," in final
            negatives += name != "test_socratic.jsonl" and ex.gold.startswith("-")
        loaded[name] = examples
    assert commas == 93 and negatives == 5                            # SOURCE.md: 79 + 14 and 3 + 2
    assert all(ex.meta["format"] == "socratic" for ex in loaded["test_socratic.jsonl"])
    assert [e.gold for e in loaded["test.jsonl"]] == [e.gold for e in loaded["test_socratic.jsonl"]]
    assert [e.question for e in loaded["test.jsonl"]] == [e.question for e in loaded["test_socratic.jsonl"]]


@pytest.mark.slow
@needs_data
def test_real_prontoqa():
    task = get_task("prontoqa")
    expected = {  # SOURCE.md: rows and label balance
        "coconut_5hop_test.jsonl": {"False": 403, "True": 397},
        "coconut_5hop_valid.jsonl": {"False": 111, "True": 89},
        "logiclm_5hop_dev.jsonl": {"True": 258, "False": 242},
        "generator_1hop_test.jsonl": {"True": 246, "False": 254},
        "generator_3hop_test.jsonl": {"True": 230, "False": 270},
        "generator_5hop_test.jsonl": {"True": 234, "False": 266},
    }
    for name, balance in expected.items():
        examples = task.load(str(DATA / "prontoqa" / name))
        assert Counter(ex.gold for ex in examples) == balance, name
        for ex in examples:
            chain = ex.meta["chain_of_thought"]
            # the authors' invariant, through our normalized statement
            assert (chain[-1] == ex.meta["statement"]) == (ex.gold == "True")
            assert ex.target.endswith(f" The answer is {ex.gold}.") and ex.question.count("True or false: ") == 1
        if name.startswith("generator_"):
            assert {ex.meta["hops"] for ex in examples} == {int(name.split("_")[1][0])}
            m = task.aggregate([task.score(ex.target, ex) for ex in examples], examples)
            assert m["accuracy_by_hops"] == {name.split("_")[1][0]: 1.0}


@pytest.mark.slow
@needs_data
def test_real_folio():
    task = get_task("folio")
    for name, n, balance, mismatched in [
        ("train.jsonl", 1004, {"True": 388, "False": 286, "Uncertain": 330}, 2),
        ("validation.jsonl", 204, {"True": 72, "False": 63, "Uncertain": 69}, 10),
    ]:
        examples = task.load(str(DATA / "folio" / name))
        assert len(examples) == n
        assert Counter(ex.gold for ex in examples) == balance
        assert sum(premise_fol_pairs(ex) is None for ex in examples) == mismatched


@pytest.mark.slow
@needs_data
def test_real_socsci210():
    task = get_task("socsci210")
    meta = json.loads((DATA / "socsci210" / "metadata.json").read_text())
    for name, n, studies in [("val.jsonl", 2780, meta["val_studies"]), ("test.jsonl", 3289, meta["test_studies"]),
                             ("smoke_train.jsonl", 10, None), ("smoke_val.jsonl", 10, None)]:
        examples = task.load(str(DATA / "socsci210" / name))
        assert len(examples) == n
        if studies is not None:
            assert {ex.meta["study_id"] for ex in examples} == set(studies)
        m = task.aggregate([task.score(ex.target, ex) for ex in examples], examples)
        assert m["parse_rate"] == m["parse_rate_strict"] == m["accuracy"] == 1.0
        assert m["mae_raw"] == 0 and m["mae_norm"] == 0 and m["wasserstein"] == 0
        # every human answer lies on its question's scale (stated scales are widened where the data exceeds them)
        scales = question_scales(examples)
        for ex in examples:
            sc = scales[(ex.meta["study_id"], ex.meta["condition_num"], ex.meta["question_key"])]
            assert sc["lo"] <= ex.meta["gold_value"] <= sc["hi"]
        if n > 10:   # perfect predictions correlate perfectly on the normalised scale
            assert m["pearson_r"] == pytest.approx(1.0)
