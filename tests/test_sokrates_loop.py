"""SOKRATES OaK loop (issue 13, items 4-9): constrained decoding, SFT on optionized traces, pairs, pass@k and
calibration by hand, the option head, and the loop itself: stages run, resume after SIGKILL without
recomputing finished stages, split across two processes, refuse another recipe's directory.

Models are tiny random Llamas with the embedded tokenizer: they write junk, so the loop tests either take the
optionized gold proof as chosen (`loop.gold_chosen`) or replace generation by hand-written traces.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ftlab.config import load_recipe
from ftlab.data.preference import encode_pair, rows_to_pairs
from ftlab.data.sft import answer_end_ids
from ftlab.errors import UserError
from ftlab.generate import Completion, GenerationConfig, HFEngine
from ftlab.sokrates import parse_steps, verify_trace
from ftlab.sokrates.constrain import OptionConstraint, tag_state
from ftlab.sokrates.metrics import (
    ece,
    mean_pass_at_k,
    pass_at_k,
    reliability,
    reliability_diagram,
)
from ftlab.sokrates.pairs import build_pairs
from ftlab.tasks import get_task
from tests.helpers import TINY_SCRATCH
from tests.test_sokrates import MP, STEP1, STEP2, STEP3, WREN, trace

pytestmark = pytest.mark.timeout(600)
ARITY = {"MODUS_PONENS": (2, 2), "MODUS_TOLLENS": (2, 2), "CONCLUDE": (1, 1)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(embedded_tokenizer):
    from ftlab.models.load import build_scratch_model

    torch.manual_seed(0)
    return build_scratch_model(TINY_SCRATCH, embedded_tokenizer).eval()


# -- constrained decoding ------------------------------------------------------------------------------
@pytest.mark.parametrize("rest, limit, state", [
    ("", 9, "prefix"), (' <Opt', 9, "prefix"), (' <Option type="MODUS_P', 9, "prefix"),
    (' <Option type="MODUS_PX', 9, "bad"), (' <Option type="FOO"', 9, "bad"), ('<Option', 9, "bad"),
    (' <Option type="MODUS_PONENS" args="[3, 8', 9, "prefix"), (' <Option type="MODUS_PONENS" args="[3, 9', 9, "bad"),
    (' <Option type="MODUS_PONENS" args="[3, 1', 12, "prefix"), (' <Option type="MODUS_PONENS" args="[03', 12, "bad"),
    (' <Option type="MODUS_PONENS" args="[3,8', 9, "bad"), (' <Option type="MODUS_PONENS" args="[3, 8, ', 9, "bad"),
    (' <Option type="MODUS_PONENS" args="[3]', 9, "bad"), (' <Option type="CONCLUDE" args="[]', 9, "bad"),
    (' <Option type="CONCLUDE" args="[4]" /', 9, "prefix"), (' <Option type="CONCLUDE" args="[4]" />', 9, "complete"),
    (' <Option type="CONCLUDE" args="[4]" /> ', 9, "bad"),
])
def test_tag_state_by_hand(rest, limit, state):
    assert tag_state(rest, ARITY, limit) == state


def test_the_constraint_never_bans_a_step_of_a_gold_proof(embedded_tokenizer):
    """Every token of optionized gold proofs (1-5 hops) stays allowed, EOS included at the end."""
    tok = embedded_tokenizer
    examples = get_task("sokrates").load("generate:10,hops=1-5,seed=5")
    hook = OptionConstraint(tok, [len(e.meta["problem"].premises) for e in examples], {tok.eos_token_id},
                            arity={"CONCLUDE": (1, 1)})
    for k, ex in enumerate(examples):
        ids = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for j in range(len(ids)):
            scores = hook(torch.zeros(1, len(tok)), [k], [ids[:j]])
            assert scores[0, ids[j]] > float("-inf"), (ex.id, tok.decode(ids[:j + 1])[-60:])
    assert hook.stats["constrained_rows"] > 0


def allowed_texts(hook, tok, text: str, request: int = 0) -> set[str]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    scores = hook(torch.zeros(1, len(tok)), [request], [ids])
    return {hook.strings[i] for i in (scores[0] > float("-inf")).nonzero()[:, 0].tolist()}


def test_the_constraint_by_hand(embedded_tokenizer):
    tok = embedded_tokenizer
    hook = OptionConstraint(tok, [5], {tok.eos_token_id}, arity={"CONCLUDE": (1, 1)})
    name = allowed_texts(hook, tok, 'Thought: x\nAction: <Option type="')
    assert "MOD" in name or "M" in name
    assert all(("MODUS_PONENS" + '"').startswith(s) or ("MODUS_TOLLENS" + '"').startswith(s) or
               ("CONCLUDE" + '"').startswith(s) for s in name)
    # no step yet: indices 0..4; after two derived facts 0..6 (premises 5 + 2)
    first = allowed_texts(hook, tok, 'Thought: x\nAction: <Option type="MODUS_PONENS" args="[')
    assert {"0", "4"} <= first and not {"5", "9", "]"} & first
    two_steps = trace(STEP1, STEP2) + '\nThought: y\nAction: <Option type="CONCLUDE" args="['
    later = allowed_texts(hook, tok, two_steps)
    assert {"6", "5"} <= later and "7" not in later
    inside = allowed_texts(hook, tok, 'Thought: x\nAction: <Option type="CONCLUDE" args="[4')
    assert "<|im_end|>" not in inside and '"' not in inside and "]" in inside
    closed = allowed_texts(hook, tok, 'Thought: x\nAction: <Option type="CONCLUDE" args="[4]" />')
    assert "<|im_end|>" in closed and all(s.startswith("\n") or s == "<|im_end|>" for s in closed)
    # outside Action lines nothing is masked, and an "Action:" line must start a tag
    assert hook(torch.zeros(1, len(tok)), [0], [tok("Thought: it is", add_special_tokens=False)["input_ids"]]).isfinite().all()
    assert ":" not in allowed_texts(hook, tok, "Thought: x\nAction: <")


class Forced:
    """A hook that first writes `text`, then hands over to `then` (to reach an Action line with random logits)."""

    def __init__(self, tok, text: str, then):
        self.ids, self.then = tok(text, add_special_tokens=False)["input_ids"], then

    def __call__(self, logits, requests, tokens):
        out = (self.then(logits, requests, tokens) if self.then else logits).clone()  # never the raw logits
        for row, done in enumerate(tokens):
            if len(done) < len(self.ids):
                out[row] = float("-inf")
                out[row, self.ids[len(done)]] = 0.0
        return out


@pytest.mark.parametrize("fallback", [False, True], ids=["slot-cache", "generate-fallback"])
def test_constrained_sampling_writes_valid_tags_and_raw_logprobs(tiny_model, embedded_tokenizer, monkeypatch, fallback):
    """A random model, forced to begin an Action line, then sampled at temperature 1: every tag is well formed
    and cites existing indices; without the constraint it is junk. Log-probs stay the raw model's."""
    tok = embedded_tokenizer
    if fallback:
        monkeypatch.setattr(HFEngine, "_supports_slot_cache", lambda self: False)
    engine = HFEngine(tiny_model, tok)
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, n=6, seed=3)
    prompts = ["Premise 0: a. Premise 1: b. Premise 2: c.", "Premise 0: x."]
    engine.logits_processor = Forced(tok, "Thought: so\nAction:", OptionConstraint(tok, [3, 1], engine.eos_ids))
    results = engine.generate_full(prompts, cfg, progress=False)
    for premises, completions in zip([3, 1], results):
        for c in completions:
            step = parse_steps(c.text)[0]
            assert step.action is not None, c.text
            assert all(a < premises for a in step.action.args), c.text
    engine.logits_processor = Forced(tok, "Thought: so\nAction:", None)
    junk = [c for cs in engine.generate_full(prompts, cfg, progress=False) for c in cs]
    assert sum(parse_steps(c.text)[0].action is not None for c in junk) < len(junk) / 2
    c = results[0][0]  # the reported log-probs: a teacher-forced pass of the raw model
    from ftlab.data.sft import prompt_ids

    p = prompt_ids(tok, prompts[0])
    with torch.no_grad():
        logits = tiny_model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1].float()
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)


# -- SFT on optionized traces ----------------------------------------------------------------------------
def test_sft_supervises_the_whole_option_trace(tmp_path, embedded_tokenizer):
    from ftlab.train.sft import build_objective

    cfg = load_recipe(loop_recipe(tmp_path))
    objective = build_objective(cfg, embedded_tokenizer)
    sample = objective.report.samples[0]
    supervised = sample[sample.index("«") + 1:sample.rindex("»")]
    assert supervised.startswith("Thought: ") and "(premise 0)." in sample[:sample.index("«")]
    assert supervised.count("Action: <Option") == supervised.count("Thought: ") >= 2
    assert 'type="MODUS_PONENS"' in supervised and 'type="CONCLUDE"' in supervised
    assert supervised.endswith("<|im_end|>")


# -- pairs, by hand ----------------------------------------------------------------------------------------
def record(text: str, sample: int, problem=WREN, index: int = 0) -> dict:
    return {"problem": problem.id, "index": index, "sample": sample, "text": text,
            **verify_trace(problem, text).to_dict()}


VALID = trace(STEP1, STEP2, STEP3)
WRONG_VERDICT = trace(STEP1, STEP2, (STEP3[0].replace("False", "True"), STEP3[1]))
REWORDED = ("As Wren is a jompus (premise 0) and each jompus is a zumpus (premise 1), Wren is a zumpus.", MP.format(0, 1))
BAD_SECOND_2 = (STEP2[0], MP.format(5, 3))
BAD_SECOND = trace(REWORDED, BAD_SECOND_2, STEP3)
BAD_FIRST = trace((STEP1[0], MP.format(1, 0)), STEP2, STEP3)
MALFORMED = 'Thought: hmm\nAction: <Option type="NOPE" args="[1, 2]"'


def test_pairs_by_hand():
    traces = [record(t, s) for s, t in enumerate([VALID, WRONG_VERDICT, BAD_SECOND, BAD_FIRST, MALFORMED, VALID])]
    assert [t["fully_valid"] for t in traces] == [True, False, False, False, False, True]
    rows, stats = build_pairs(traces, {WREN.id: WREN}, lambda pid: f"prompt of {pid}", max_per_problem=10)
    outcome = [r for r in rows if r["kind"] == "outcome"]
    prefix = [r for r in rows if r["kind"] == "prefix"]
    # the duplicate VALID is one chosen trace; each of the 4 rejected is paired with it
    assert [r["rejected_sample"] for r in outcome] == [1, 2, 3, 4] and {r["chosen"] for r in outcome} == {VALID}
    # WRONG_VERDICT's prefix partner is VALID itself (already an outcome pair); BAD_FIRST fails at step 0;
    # BAD_SECOND keeps its own reworded first step and takes VALID's steps 2-3
    assert [(r["rejected_sample"], r["shared_steps"]) for r in prefix] == [(2, 1)]
    assert prefix[0]["chosen"] == trace(REWORDED, STEP2, STEP3) and verify_trace(WREN, prefix[0]["chosen"]).fully_valid
    assert stats == {"problems": 1, "problems_with_chosen": 1, "problems_with_rejected": 1, "problems_with_both": 1,
                     "pairs_outcome": 4, "pairs_prefix": 1, "pairs": 5}
    assert rows[0]["prompt"] == "prompt of wren"
    capped, _ = build_pairs(traces, {WREN.id: WREN}, lambda pid: "p", max_per_problem=1)
    assert [r["kind"] for r in capped] == ["outcome"]  # the first rejected one has no prefix partner
    none, stats = build_pairs([record(BAD_FIRST, 0)], {WREN.id: WREN}, lambda pid: "p")
    assert none == [] and stats["problems_with_chosen"] == 0


def test_step_pairs_by_hand(embedded_tokenizer):
    traces = [record(t, s) for s, t in enumerate([VALID, WRONG_VERDICT, BAD_SECOND, BAD_FIRST, MALFORMED, VALID])]
    rows, stats = build_pairs(traces, {WREN.id: WREN}, lambda pid: "p", max_per_problem=10, outcome_pairs=False,
                              prefix_pairs=False, step_pairs=True)
    assert stats["pairs"] == stats["pairs_step"] == 4 and all(r["kind"] == "step" and r["partial"] for r in rows)
    by_sample = {r["rejected_sample"]: r for r in rows}
    # the first invalid step and what precedes it: WRONG_VERDICT's conclusion (step 2), BAD_SECOND's step 1 after
    # its own reworded step 0, BAD_FIRST's and MALFORMED's step 0; the chosen side is VALID's step there
    assert {s: r["shared_steps"] for s, r in by_sample.items()} == {1: 2, 2: 1, 3: 0, 4: 0}
    assert by_sample[1]["chosen"] == VALID and by_sample[1]["rejected"] == WRONG_VERDICT
    assert by_sample[2]["chosen"] == trace(REWORDED, STEP2) and by_sample[2]["rejected"] == trace(REWORDED, BAD_SECOND_2)
    assert by_sample[3]["chosen"] == by_sample[4]["chosen"] == trace(STEP1)
    assert by_sample[3]["rejected"] == trace((STEP1[0], MP.format(1, 0))) and by_sample[4]["rejected"] == MALFORMED
    # concluding at step 1, where the valid trace goes on: no step pair (whole-trace pairs still take it)
    premature = record(trace(STEP1, ("Wren is a zumpus (derived fact 5), which is the claim. The answer is True.",
                                     '<Option type="CONCLUDE" args="[5]" />')), 7)
    assert premature["step_valid"] == [True, False]
    rows_p, stats_p = build_pairs(traces[:1] + [premature], {WREN.id: WREN}, lambda pid: "p", step_pairs=True)
    assert stats_p.get("pairs_step", 0) == 0 and [r["kind"] for r in rows_p] == ["outcome"]
    # the DPO rows: no end-of-turn token after a step that the answer goes on from
    tok = embedded_tokenizer
    whole, part = (rows_to_pairs([("w", {**by_sample[2], "partial": flag})], tok, True)[0] for flag in (False, True))
    ends = answer_end_ids(tok, whole.terminator)
    enc_whole, enc_part = encode_pair(whole, tok, 4096), encode_pair(part, tok, 4096)
    assert enc_whole["chosen"][-len(ends):] == ends and enc_whole["chosen"][:-len(ends)] == enc_part["chosen"]
    with pytest.raises(UserError, match="'partial' must be true or false"):
        rows_to_pairs([("w:3", {**by_sample[2], "partial": "yes"})], tok, True)


# -- metrics, by hand ------------------------------------------------------------------------------------
def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)           # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)          # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 0, 2) == 0.0  # n - c < k; nothing correct
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert mean_pass_at_k([(4, 1), (4, 0), (2, 2)], 2) == pytest.approx((0.5 + 0 + 1) / 3)
    assert mean_pass_at_k([(1, 1)], 2) is None  # no problem has k samples
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)


def test_ece_and_reliability_by_hand(tmp_path):
    probs, outcomes = [0.1, 0.15, 0.8, 0.9, 0.95, 1.0], [False, True, True, True, False, True]
    # bins of 0.1: [0.1, 0.2): conf 0.125, freq 1/2; [0.8, 0.9): conf 0.8, freq 1; [0.9, 1.0]: conf 0.95, freq 2/3
    expected = 2 / 6 * 0.375 + 1 / 6 * 0.2 + 3 / 6 * abs(2 / 3 - 0.95)
    assert ece(probs, outcomes, 10) == pytest.approx(expected)
    # two bins: [0, 0.5): conf 0.125, freq 0.5; [0.5, 1]: conf 0.9125, freq 0.75
    assert ece(probs, outcomes, 2) == pytest.approx(2 / 6 * 0.375 + 4 / 6 * abs(0.75 - 0.9125))
    assert ece([], [], 10) is None
    table = reliability(probs, outcomes, 10)
    assert [r["n"] for r in table] == [0, 2, 0, 0, 0, 0, 0, 0, 1, 3]
    out = reliability_diagram(table, tmp_path / "r.png", "test")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        reliability([1.5], [True])


def test_answer_confidence_is_the_verdict_tokens_probability(embedded_tokenizer):
    from ftlab.sokrates.traces import answer_confidence

    tok = embedded_tokenizer
    text = VALID
    ids = tok(text, add_special_tokens=False)["input_ids"]
    verdict = [k for k in range(len(ids)) if "False" in tok.decode(ids[k:k + 1])]
    assert len(verdict) == 1  # one token spells the verdict word here
    logprobs = [-0.05] * len(ids)
    logprobs[verdict[0]] = math.log(0.7)
    rec = {**record(text, 0), "token_ids": ids, "logprobs": logprobs}
    assert answer_confidence(rec, tok) == pytest.approx(0.7)
    assert answer_confidence({**rec, "verdict": None}, tok) is None


# -- the option head ---------------------------------------------------------------------------------------
def test_option_head_features_sit_at_action_ends_and_the_head_learns(tiny_model, embedded_tokenizer):
    from ftlab.sokrates import head as H

    tok = embedded_tokenizer
    rec = {**record(BAD_SECOND, 0), "token_ids": tok(BAD_SECOND, add_special_tokens=False)["input_ids"]}
    positions = H.action_positions(rec, tok)
    assert [s for s, _ in positions] == [0, 1, 2]
    for _, t in positions:
        assert tok.decode(rec["token_ids"][:t + 1]).endswith("/>")
    other = {**record(VALID, 1), "token_ids": tok(VALID, add_special_tokens=False)["input_ids"]}
    prompt = [1, 2, 3]
    x, y, owners = H.collect_features(tiny_model, tok, {WREN.id: prompt}, [rec, other])
    assert x.shape == (6, TINY_SCRATCH["hidden_size"]) and owners == [WREN.id] * 6
    assert y.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    # the prompt run once for both samples: the same hidden states as each whole sequence run on its own
    with torch.no_grad():
        whole = [tiny_model(input_ids=torch.tensor([prompt + r["token_ids"]]), output_hidden_states=True)
                 .hidden_states[-1][0] for r in (rec, other)]
    expected = [whole[i][len(prompt) + t] for i, r in enumerate((rec, other)) for _, t in H.action_positions(r, tok)]
    torch.testing.assert_close(x, torch.stack(expected), atol=1e-4, rtol=1e-4)
    gen = torch.Generator().manual_seed(0)  # separable features: the head must get them right
    feats = torch.randn(200, 8, generator=gen)
    labels = (feats[:, 0] + 0.5 * feats[:, 1] > 0).float()
    head = H.train_head(feats[:150], labels[:150], epochs=200, lr=0.05)
    accuracy = ((H.predict(head, feats[150:]) >= 0.5).float() == labels[150:]).float().mean()
    assert accuracy > 0.9
    assert H.held_out("a", 1.0) and not H.held_out("a", 0.0) and H.held_out("a", 0.5) == H.held_out("a", 0.5)


# -- the loop ---------------------------------------------------------------------------------------------
def loop_recipe(tmp: Path, name: str = "recipe.yaml", **loop) -> Path:
    recipe = {
        "name": "oak", "output_dir": str(tmp / "runs"), "seed": 0,
        "model": {"scratch": TINY_SCRATCH},
        "data": {"task": "sokrates", "train": "generate:4,hops=2-3,seed=1", "val": "generate:4,hops=2-3,seed=2",
                 "max_length": 1024, "val_limit": 4},
        "optim": {"lr": 1e-3}, "train": {"max_steps": 2, "batch_size": 4}, "eval": {"batch_size": 16},
        "loop": {"iterations": 1, "samples": 2, "max_new_tokens": 12, "eval_samples": 2, "pass_k": [1, 2],
                 "gold_chosen": True, "dpo_overrides": {"train.max_steps": 2, "train.batch_size": 4}, **loop},
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def scripted(examples: list, tok):
    """A generate_full that answers from hand-written traces: samples cycle through [valid, wrong verdict,
    reworded first step + invalid second step, malformed]; greedy answers valid for even problems, malformed
    for odd ones."""
    by_question = {ex.question: (i, ex) for i, ex in enumerate(examples)}

    def variants(ex) -> list[str]:
        lines = ex.target.split("\n")  # Thought 0, Action 0, Thought 1, Action 1, ...
        assert len(lines) >= 6 and lines[0].startswith("Thought: Since")
        flip = {"True": "False", "False": "True"}[ex.gold]
        wrong = ex.target.replace(f"The answer is {ex.gold}", f"The answer is {flip}")
        bad_step = 'Action: <Option type="MODUS_PONENS" args="[99, 0]" />'  # index 99 does not exist
        bad = "\n".join([lines[0].replace("Since", "As", 1), lines[1], lines[2], bad_step] + lines[4:])
        return [ex.target, wrong, bad, MALFORMED]

    def generate_full(self, prompts, cfg, on_result=None, progress=True):
        out = []
        for prompt in prompts:
            i, ex = next(v for q, v in by_question.items() if q in prompt)
            texts = ([ex.target if i % 2 == 0 else MALFORMED] if cfg.greedy else
                     [variants(ex)[s % 4] for s in range(cfg.n)])
            out.append([Completion(t, tok(t, add_special_tokens=False)["input_ids"],
                                   [-0.1] * len(tok(t, add_special_tokens=False)["input_ids"]), "stop") for t in texts])
        return out
    return generate_full


def test_loop_on_hand_written_traces_builds_pairs_trains_and_measures(tmp_path, monkeypatch, embedded_tokenizer):
    from ftlab.loops.oak import run_loop
    from ftlab.sokrates.head import problem_hash

    task = get_task("sokrates")
    train, heldout = task.load("generate:4,hops=2-3,seed=1"), task.load("generate:4,hops=2-3,seed=2")
    cut = sorted(problem_hash(ex.id) for ex in train)
    monkeypatch.setattr(HFEngine, "generate_full", scripted(train + heldout, embedded_tokenizer))
    cfg = load_recipe(loop_recipe(tmp_path, samples=4, eval_samples=4, pass_k=[1, 2], option_head=True,
                                  head_holdout=(cut[0] + cut[1]) / 2, head_epochs=50, step_pairs=True))
    path = run_loop(cfg)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    valid_steps = sum(len(parse_steps(ex.target)) for ex in heldout[0::2])
    for r in rows:  # the scripted policy does not change: the same held-out numbers before and after DPO
        assert r["answer_accuracy"] == 0.5 and r["fully_valid"] == 0.5
        assert r["step_validity"] == pytest.approx(valid_steps / (valid_steps + 2))  # 1 malformed step each
        assert r["answer_pass@1"] == pytest.approx(0.5) and r["answer_pass@2"] == pytest.approx(1 - 1 / 6)
        assert r["proof_pass@1"] == pytest.approx(0.25) and r["proof_pass@2"] == pytest.approx(0.5)
        assert r["answer_calibration_n"] == 2
    last = rows[1]
    assert last["sampled_traces"] == 16 and last["sampled_fully_valid"] == 0.25
    # per problem: 3 rejected samples against the valid one; the reworded one's splice; 2 step pairs (the reworded
    # trace's step 1, the malformed step 0; the wrong verdict's step pair is its outcome pair, kept once), partial
    # rows through DPO
    assert (last["pairs_outcome"], last["pairs_prefix"], last["pairs_step"], last["pairs"]) == (12, 4, 8, 24)
    assert last["head_train_steps"] > 0 and last["head_heldout_steps"] > 0 and "head_ece" in last
    assert math.isfinite(last["dpo_final_loss"])
    assert (path / "metrics.png").is_file() and (path / "iter_1" / "head" / "reliability_head.png").is_file()
    assert (path / "iter_1" / "eval" / "reliability_answer.png").is_file()
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["iterations_evaluated"] == 1
    traces = [json.loads(line) for line in (path / "iter_1" / "traces" / "traces.jsonl").read_text().splitlines()]
    assert {"text", "token_ids", "logprobs", "step_valid", "reasons", "fully_valid"} <= set(traces[0])
    assert any("missing closing" in (reason or "") for t in traces for reason in t["reasons"])  # malformed: invalid


def stage_files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.glob("iter_*/*/**/*")
            if p.is_file() and ".tmp" not in str(p.relative_to(path))}


def test_sigkill_during_a_stage_then_rerun_recomputes_only_that_stage(tmp_path):
    """Killed inside the DPO stage after its step-2 checkpoint: the rerun skips the 4 finished stages (their
    files untouched), resumes DPO from that checkpoint, and finishes."""
    recipe = loop_recipe(tmp_path, dpo_overrides={"train.max_steps": 4, "train.batch_size": 2, "train.save_every": 1,
                                                  "train.keep_last": 5})
    loop_dir = tmp_path / "runs" / "loop" / "oak"
    proc = subprocess.Popen([sys.executable, "-m", "ftlab.cli", "loop", str(recipe)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline, pattern = time.time() + 300, "iter_1/.dpo.tmp/dpo/*/checkpoints/step_000002/state.json"
    while time.time() < deadline and not list(loop_dir.glob(pattern)) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(loop_dir.glob(pattern)), "the loop never reached DPO step 2"
    finished = ["iter_0/sft", "iter_0/eval", "iter_1/traces", "iter_1/pairs"]
    assert all((loop_dir / s / "DONE").is_file() for s in finished) and not (loop_dir / "iter_1" / "dpo").exists()
    before = stage_files(loop_dir)
    log_before = (loop_dir / "stages.log").read_text().splitlines()
    assert json.loads((loop_dir / "summary.json").read_text())["status"] == "running"

    from ftlab.loops.oak import run_loop

    run_loop(load_recipe(recipe))
    after = stage_files(loop_dir)
    assert {k: after[k] for k in before} == before  # nothing that was complete was written again
    new = (loop_dir / "stages.log").read_text().splitlines()[len(log_before):]
    assert [line.split(" ", 2)[2] for line in new[:4]] == [f"{s} skipped (complete)" for s in finished]
    assert [line.split(" ", 2)[2].split(" in ")[0] for line in new[4:]] == ["iter_1/dpo computed", "iter_1/eval computed"]
    dpo = json.loads((loop_dir / "iter_1" / "dpo" / "stage.json").read_text())
    assert "step_00000" in dpo["summary"]["resumed_from"] and dpo["summary"]["steps"] == 4
    assert not list(loop_dir.glob("iter_*/.*.tmp")) and json.loads((loop_dir / "summary.json").read_text())["status"] == "complete"


FLAKY_REWARD = """
import os

CALLS = []


def flaky(completions, **kwargs):
    \"\"\"0 for every completion; raises on its second round while the flag file exists (an interrupted stage).\"\"\"
    CALLS.append(len(completions))
    if len(CALLS) == 2 and os.path.exists({flag!r}):
        raise RuntimeError("stopped on purpose")
    return [0.0] * len(completions)
"""


def test_grpo_loop_rewards_steps_and_answers_then_resumes_and_skips(tmp_path, monkeypatch, embedded_tokenizer):
    """loop.optimizer=grpo, one iteration on hand-written traces (a valid proof, a wrong verdict, an invalid step,
    a malformed step per group): the GRPO stage trains the SFT policy with reward = the verdict + 0.5 x step
    validity (verified_answer + 0.5 x step_validity, the weights from loop.grpo_overrides), sampling under the Action-line constraint; a stage stopped
    after its step-1 checkpoint resumes from it, and a third run skips every stage."""
    from ftlab.loops.oak import run_loop
    from ftlab.runs.trackers import read_metrics
    from ftlab.sokrates.constrain import OptionConstraint

    task = get_task("sokrates")
    train, heldout = task.load("generate:4,hops=2-3,seed=1"), task.load("generate:4,hops=2-3,seed=2")
    answer = scripted(train + heldout, embedded_tokenizer)
    rounds = []

    def generate_full(self, prompts, cfg, on_result=None, progress=True):
        if cfg.n == 4:  # a GRPO round (evaluation samples 1 and 2)
            rounds.append((list(prompts), self.logits_processor))
        return answer(self, prompts, cfg, on_result, progress)

    monkeypatch.setattr(HFEngine, "generate_full", generate_full)
    flag = tmp_path / "stop"
    flag.write_text("")
    (tmp_path / "flaky.py").write_text(FLAKY_REWARD.format(flag=str(flag)))
    rewards = [{"fn": "verified_answer", "weight": 1.0}, {"fn": "step_validity", "weight": 0.5},
               {"fn": f"{tmp_path / 'flaky.py'}:flaky", "weight": 0.0}]
    recipe = loop_recipe(tmp_path, optimizer="grpo", constrained=True, grpo_overrides={
        "train.max_steps": 2, "train.batch_size": 4, "train.save_every": 1, "grpo.num_generations": 4,
        "grpo.max_completion_length": 256, "grpo.rewards": rewards, "optim.lr": 0.05})
    with pytest.raises(UserError, match="reward 'flaky'.*stopped on purpose"):
        run_loop(load_recipe(recipe))
    path = tmp_path / "runs" / "loop" / "oak"
    assert json.loads((path / "summary.json").read_text())["status"] == "failed"
    assert list(path.glob("iter_1/.grpo.tmp/grpo/*/checkpoints/step_000001/state.json"))
    assert not (path / "iter_1" / "grpo").exists()
    flag.unlink()
    run_loop(load_recipe(recipe))

    lines = [line.split(" ", 2)[2].split(" in ")[0] for line in (path / "stages.log").read_text().splitlines()]
    assert lines == ["iter_0/sft computed", "iter_0/eval computed", "iter_0/sft skipped (complete)",
                     "iter_0/eval skipped (complete)", "iter_1/grpo computed", "iter_1/eval computed"]
    assert not (path / "iter_1" / "traces").exists() and not (path / "iter_1" / "dpo").exists()
    stage = json.loads((path / "iter_1" / "grpo" / "stage.json").read_text())
    assert "step_000001" in stage["summary"]["resumed_from"] and stage["summary"]["steps"] == 2
    run = path / stage["model"]
    assert (run / "model.safetensors").is_file()  # the SFT stage's full model, trained further
    assert (path / "iter_1" / "grpo") in run.parents

    # every group: the four hand-written traces; reward = the verdict + 0.5 x the verifier's share of valid steps
    by_id = {ex.id: ex for ex in train}
    run_dir = run.parent
    written = sorted(path.glob("iter_1/grpo/grpo/2*/completions/step_*.jsonl"))  # step 1: the interrupted run's
    assert [p.name for p in written] == ["step_000001.jsonl", "step_000002.jsonl"]
    assert written[1].parents[1] == run_dir
    for file in written:
        rows = [json.loads(x) for x in file.read_text().splitlines()]
        assert len(rows) == 4 and len({r["id"] for r in rows}) == 1
        problem = by_id[rows[0]["id"]].meta["problem"]
        for r in rows:
            report = verify_trace(problem, r["completion"])
            share = sum(report.step_valid) / len(report.step_valid) if report.step_valid else 0.0
            assert r["reward"] == pytest.approx(float(report.answer_correct) + 0.5 * share)
        assert rows[0]["reward"] == 1.5 and rows[0]["advantage"] == max(r["advantage"] for r in rows)
    metrics = {r["train_step"]: r for file in (written[0].parents[1], run_dir)
               for r in read_metrics(file / "metrics.jsonl") if "train/loss" in r}
    assert metrics[2]["train/grad_norm"] > 0 and metrics[2]["train/frac_reward_zero_std"] == 0.0
    # the rounds were sampled under the Action-line constraint of their own problem
    assert rounds and all(isinstance(hook, OptionConstraint) for _, hook in rounds)
    for prompts, hook in rounds:
        ex = next(e for e in train if e.question in prompts[0])
        assert hook.premises == [len(ex.meta["problem"].premises)]

    row = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()][1]
    assert row["iteration"] == 1 and row["grpo_steps"] == 2 and "answer_accuracy" in row
    assert row["grpo_reward_first"] == pytest.approx(metrics[1]["train/reward"])  # the interrupted attempt's step
    assert row["grpo_reward_last"] == pytest.approx(metrics[2]["train/reward"])
    assert row["grpo_verified_answer_last"] == pytest.approx(0.5)  # valid + invalid-step traces answer right
    before = stage_files(path)
    run_loop(load_recipe(recipe))  # complete: every stage is skipped, nothing is written again
    assert stage_files(path) == before
    assert (path / "stages.log").read_text().splitlines()[-4:][0].endswith("iter_0/sft skipped (complete)")
    assert all(line.endswith("skipped (complete)") for line in (path / "stages.log").read_text().splitlines()[-4:])


def test_another_recipes_loop_directory_is_refused_in_one_line(tmp_path, capsys):
    from ftlab.cli import main
    from ftlab.loops.stages import LoopDir

    recipe = loop_recipe(tmp_path)
    LoopDir.open(tmp_path / "runs" / "loop" / "oak", load_recipe(recipe))
    assert main(["loop", str(recipe), "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was made by another recipe" in err[0] and "first difference: optim.lr" in err[0]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    assert main(["loop", str(recipe), f"loop.dir={tmp_path / 'other'}"]) == 2
    assert "is not a loop directory" in capsys.readouterr().err
    assert main(["loop", str(recipe), "data.task=prontoqa"]) == 2
    assert "data.task: sokrates" in capsys.readouterr().err
    assert main(["loop", str(recipe), "loop.dpo_overrides={optim.lrr: 1}"]) == 2
    assert "loop.dpo_overrides" in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob("summary.json"))


def test_grpo_stage_recipe_defaults_and_forced_keys(tmp_path):
    """The stage trains on the loop's problems (loop.problems, the first loop.max_problems), without a val set,
    rewarded by the verdict and step validity unless told otherwise; a LoRA policy's adapter keeps training."""
    from ftlab.loops.oak_stages import grpo_stage_config

    recipe = loop_recipe(tmp_path, optimizer="grpo", problems="generate:6,hops=2,seed=9", max_problems=3,
                         grpo_overrides={"optim.lr": 0.5})
    cfg = load_recipe(recipe, ["lora.enabled=true"])
    stage = grpo_stage_config(cfg, {"adapter": "/x/final"}, 2, tmp_path)
    assert [r.fn for r in stage.grpo.rewards] == ["verified_answer", "step_validity"]
    assert (stage.train.method, stage.kind, stage.name, stage.output_dir) == ("grpo", "grpo", "iter2", str(tmp_path))
    assert (stage.data.train, stage.data.limit, stage.data.val) == ("generate:6,hops=2,seed=9", 3, None)
    assert stage.model.adapter == "/x/final" and not stage.lora.enabled and stage.optim.lr == 0.5
    assert stage.grpo.engine == "hf" and stage.train.resume is None
    mine = load_recipe(recipe, ["grpo.rewards=[{fn: fully_valid}]", "loop.engine=vllm"])
    stage = grpo_stage_config(mine, {}, 1, None)
    assert [r.fn for r in stage.grpo.rewards] == ["fully_valid"] and stage.grpo.engine == "vllm"


@pytest.mark.parametrize("override, needle", [
    ("loop.grpo_overrides={grpo.rewards: [{fn: correctness, wieght: 2}]}",
     "loop.grpo_overrides: grpo.rewards[0]: unknown key 'wieght'; did you mean 'weight'?"),
    ("loop.grpo_overrides={train.batch_size: 3}", "loop.optimizer=grpo: train.batch_size x train.grad_accum x processes"),
    ("loop.grpo_overrides={grpo.rewards: [{fn: 'no_such_module_xyz:f'}]}",
     "loop.optimizer=grpo: grpo.rewards[0].fn='no_such_module_xyz:f': cannot import"),
    ("grpo.max_completion_length=1024", "loop.optimizer=grpo: grpo.max_completion_length=1024 leaves no room"),
    ("loop.grpo_overrides={grpo.engine: vllm}", "grpo.engine=vllm with loop.constrained"),
])
def test_grpo_loop_settings_are_refused_before_any_stage(tmp_path, capsys, override, needle):
    from ftlab.cli import main

    recipe = loop_recipe(tmp_path, optimizer="grpo", constrained=True,
                         grpo_overrides={"train.batch_size": 4, "grpo.num_generations": 4})
    assert main(["loop", str(recipe), override]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ftlab: error:")]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "runs").exists()


def test_two_processes_split_the_problems_and_gather_the_same_traces(tmp_path):
    """torchrun with 2 gloo processes: sampling and evaluation split across ranks give the traces one process
    gives (per-prompt seeds), the head's features are gathered, DPO trains data-parallel."""
    from ftlab.loops.oak import run_loop

    recipe = loop_recipe(tmp_path, sft=False, option_head=True)
    one = run_loop(load_recipe(recipe, [f"loop.dir={tmp_path / 'one'}"]))
    proc = torchrun_loop(recipe, f"loop.dir={tmp_path / 'two'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    for stage, name in (("iter_1/traces", "traces.jsonl"), ("iter_0/eval", "greedy.jsonl"), ("iter_1/pairs", "pairs.jsonl")):
        a, b = ([json.loads(line) for line in (d / stage / name).read_text().splitlines()] for d in (one, two))
        assert len(a) == len(b) > 0, stage
        for x, y in zip(a, b):  # the same tokens; log-probs to float noise (rows batched differently)
            assert {k: v for k, v in x.items() if k != "logprobs"} == {k: v for k, v in y.items() if k != "logprobs"}
            assert x.get("logprobs") == pytest.approx(y.get("logprobs"), abs=1e-5)
    dpo = next((two / "iter_1" / "dpo" / "dpo").glob("*_iter1"))
    assert json.loads((dpo / "summary.json").read_text())["world_size"] == 2
    assert json.loads((two / "summary.json").read_text())["status"] == "complete"


def torchrun_loop(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ftlab.cli",
           "loop", str(recipe), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env)
