"""`ftlab chat`: SFT's encoding of every turn, the KV cache across turns, streaming, commands, context overflow,
Ctrl-C, and the real thing in a terminal (tmux).

Expected answers come from `model.generate` on the prompt ids SFT's own encoder builds for the same messages
(`chat_turns` + `encode_sft_turns`), never from the session under test. A tiny random Llama (with the
embedded tokenizer and its ChatML template) covers what needs no real weights; the embedded
SmolLM2-135M-Instruct covers answers that end on their own and the terminal sessions.
"""
from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from ftlab.cli import main
from ftlab.config.schema import ModelConfig
from ftlab.data.sft import Conversation, encode_sft_turns, preflight, prompt_ids, stop_token_ids
from ftlab.data.sources import chat_turns, generic_conversations, render_chat, task_turns
from ftlab.errors import UserError
from ftlab.models.load import load_model_and_tokenizer
from ftlab.tasks.base import Example, Task
from ftlab.use.chat import ChatREPL, parse_overrides, run_chat
from ftlab.use.conversation import ChatSession, ChatSettings, StreamDecoder

from helpers import TINY_SCRATCH, tiny_recipe

Q1, Q2 = "What is the capital of France?", "And of Germany?"
STORY = "Write a very long story about a dragon who learns to fly."


# -- independent references -----------------------------------------------------------------------
def sft_prompt(tokenizer, messages, chat_template=True) -> list[int]:
    """What SFT trains the model to continue for the answer to `messages` (ending with a user message): the
    conversation with a placeholder answer, through SFT's encoder, cut where that answer's supervision starts."""
    msgs = messages + [{"role": "assistant", "content": "placeholder"}]
    if chat_template:
        turns = chat_turns(tokenizer, msgs, "test")
    else:
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        pairs = [(m["content"], msgs[i + 1]["content"]) for i, m in enumerate(msgs) if m["role"] == "user"]
        task = Task()
        task.system_prompt = system
        example = Example(id="0", question=pairs[0][0], target=pairs[0][1], gold="", followups=pairs[1:])
        turns = Conversation(task_turns(task, example, tokenizer, 0, chat_template=False), None)
    enc = encode_sft_turns(turns, tokenizer, 100_000)
    full = enc["input_ids"] + enc["labels"][-1:]
    mask = enc["response_mask"]
    last = len(mask) - 1
    while mask[last]:  # back to the start of the last supervised run: the placeholder answer
        last -= 1
    return full[: last + 2]


def from_scratch(model, tokenizer, messages, max_new_tokens, chat_template=True) -> list[int]:
    """Greedy answer ids (stop token included) from `model.generate` on a fresh cache."""
    ids = torch.tensor([sft_prompt(tokenizer, messages, chat_template)])
    eos = sorted(stop_token_ids(tokenizer) | {int(model.generation_config.eos_token_id)})
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos[0])
    return out[0, ids.shape[1]:].tolist()


def model_view(model) -> tuple[dict[int, int], object]:
    """position -> the id the model last ran at that position (what its KV cache was computed from), and the
    hook's handle (remove it when done)."""
    seen: dict[int, int] = {}

    def record(module, args, kwargs):
        for pos, tok in zip(kwargs["position_ids"][0].tolist(), kwargs["input_ids"][0].tolist()):
            seen[pos] = tok

    return seen, model.register_forward_pre_hook(record, with_kwargs=True)


# -- models ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model_and_tokenizer(ModelConfig(scratch=TINY_SCRATCH))


@pytest.fixture(scope="module")
def embedded():
    return load_model_and_tokenizer(ModelConfig(name="smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def reference(embedded):
    """Greedy answers of the embedded model to Q1, then to Q2 after Q1's answer, computed from scratch."""
    model, tok = embedded
    a1 = from_scratch(model, tok, [{"role": "user", "content": Q1}], 24)
    text1 = tok.decode(a1[:-1], skip_special_tokens=True)
    msgs = [{"role": "user", "content": Q1}, {"role": "assistant", "content": text1}, {"role": "user", "content": Q2}]
    a2 = from_scratch(model, tok, msgs, 24)
    return a1, text1, a2, tok.decode(a2[:-1], skip_special_tokens=True)


# -- rendering -------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "plain"])
def test_the_model_sees_sfts_encoding_of_every_turn(tiny, template):
    model, tok = tiny
    seen, hook = model_view(model)
    session = ChatSession(model, tok, ChatSettings(max_new_tokens=3, system="Be brief."), chat_template=template)
    try:
        session.ask("Hi 🙂 there")
        session.ask("  and a second\n\nquestion?")
    finally:
        hook.remove()
    for k in (2, 4):  # the prompt of each answer, as the cache holds it now
        expected = sft_prompt(tok, session.messages[: k], template)
        assert [seen[p] for p in range(len(expected))] == expected
    assert session.last.prompt_tokens == len(sft_prompt(tok, session.messages[:4], template))
    if template:  # and what `ftlab infer` feeds for the same messages
        assert prompt_ids(tok, render_chat(tok, session.messages[:4], "t")) == expected


# ChatML, but earlier answers are shown upper-cased: a template that rewrites past turns (as some drop past reasoning)
REWRITING = ("{% for m in messages %}{% set c = m['content'] %}"
             "{% if m['role'] == 'assistant' and not loop.last %}{% set c = c | upper %}{% endif %}"
             "{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_template_that_rewrites_past_turns_gets_the_whole_conversation_as_infer_renders_it(tiny):
    import copy

    model, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = REWRITING
    seen, hook = model_view(model)
    session = ChatSession(model, tok, ChatSettings(max_new_tokens=3))
    try:
        session.ask("hello")
        session.ask("the cat")
    finally:
        hook.remove()
    with pytest.raises(UserError, match="renders earlier turns differently"):
        chat_turns(tok, session.messages, "t")  # SFT cannot split it into turns
    expected = prompt_ids(tok, render_chat(tok, session.messages[:3], "t"))
    assert session.messages[1]["content"].upper() != session.messages[1]["content"]
    assert [seen[p] for p in range(len(expected))] == expected


@pytest.mark.slow
def test_cache_reuse_gives_the_answers_from_scratch_and_runs_only_new_tokens(embedded, reference):
    model, tok = embedded
    a1, text1, a2, text2 = reference
    session = ChatSession(model, tok, ChatSettings(max_new_tokens=24))
    r1 = session.ask(Q1)
    assert r1.token_ids == a1 and r1.text == text1 and r1.finish_reason == "stop"
    assert a1[-1] in stop_token_ids(tok)  # the answer ended on the template's end of turn, not on the limit
    p1 = sft_prompt(tok, [{"role": "user", "content": Q1}])
    r2 = session.ask(Q2)
    assert r2.token_ids == a2 and r2.text == text2
    p2 = sft_prompt(tok, session.messages[:3])
    assert p2[: len(p1) + len(a1)] == p1 + a1  # the answer re-tokenizes as generated: all of it is reusable
    # the cache holds prompt 1 and every answer token but the last (generated, never run): the rest is new
    assert session.last.prefill_positions == len(p2) - (len(p1) + len(a1) - 1)
    assert session.last.reused_tokens == len(p1) + len(a1) - 1
    assert session.last.decode_positions == len(a2) - 1


def test_undo_retry_and_a_new_system_prompt_crop_the_cache_and_match_from_scratch(tiny):
    model, tok = tiny
    n = 4
    session = ChatSession(model, tok, ChatSettings(max_new_tokens=n))

    def check(reply):
        assert reply.token_ids == from_scratch(model, tok, session.messages[:-1], n)

    check(session.ask("hello"))
    check(session.ask("the cat sat"))
    first = session.history[-1]["content"]
    check(session.retry())
    assert session.history[-1]["content"] == first  # greedy: the same answer again
    assert session.last.prefill_positions == 1       # only the prompt's last id runs again (for its logits)
    before = sft_prompt(tok, session.messages[:-1])
    session.set_system("You are a cat.")
    check(session.retry())
    after = sft_prompt(tok, session.messages[:-1])
    shared = next(i for i, (x, y) in enumerate(zip(before, after)) if x != y)
    assert session.last.reused_tokens == shared and session.last.prefill_positions == len(after) - shared
    session.undo()
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    check(session.ask("on the mat"))


def test_sampling_retry_draws_again_and_the_seed_repeats_a_session(tiny):
    model, tok = tiny
    settings = {"max_new_tokens": 6, "temperature": 1.5, "top_p": 0.95, "seed": 7}
    one = ChatSession(model, tok, ChatSettings(**settings))
    first = one.ask("hello").token_ids
    again = one.retry().token_ids
    assert again != first
    assert ChatSession(model, tok, ChatSettings(**settings)).ask("hello").token_ids == first


# -- stopping and streaming ------------------------------------------------------------------------
def test_stops_on_max_new_tokens_and_on_the_generation_configs_eos(tiny):
    model, tok = tiny
    free = ChatSession(model, tok, ChatSettings(max_new_tokens=5)).ask("hello")
    assert len(free.token_ids) == 5 and free.finish_reason == "length"
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = free.token_ids[2]  # a model whose config ends answers on that id
    try:
        stopped = ChatSession(model, tok, ChatSettings(max_new_tokens=5)).ask("hello")
    finally:
        model.generation_config.eos_token_id = eos
    assert stopped.token_ids == free.token_ids[:3] and stopped.finish_reason == "stop"
    assert stopped.text == tok.decode(free.token_ids[:2], skip_special_tokens=True)


def test_streaming_never_prints_half_a_character(embedded_tokenizer):
    tok = embedded_tokenizer
    text = "Grüße 🙂 from 東京 — naïve café 🇫🇷 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # some characters do span several tokens
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) >= len(text.split())  # it streams, not all at the end
    k = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    decoder = StreamDecoder(tok)  # an answer cut inside a character (max_new_tokens, Ctrl-C) ends before it
    shown = "".join([decoder.push(i) for i in ids[:k]] + [decoder.flush()])
    assert shown == tok.decode(ids[:k]).rstrip("\ufffd") and "\ufffd" not in shown


# -- context, interrupts ---------------------------------------------------------------------------
def test_a_full_context_drops_the_oldest_exchanges_and_keeps_the_system_prompt(tiny):
    model, tok = tiny
    notices: list[str] = []
    session = ChatSession(model, tok, ChatSettings(max_new_tokens=4, system="Keep me."), context_window=72,
                          notice=notices.append)
    questions = ["the cat sat on the mat", "hello world the cat", "a b c d the mat", "the end of it"]
    for q in questions:
        reply = session.ask(q)
        assert session.last.prompt_tokens + 4 <= 72
        assert reply.token_ids == from_scratch(model, tok, session.messages[:-1], 4)
    assert notices and all("\n" not in n and "dropped the oldest" in n for n in notices)
    assert session.messages[0] == {"role": "system", "content": "Keep me."}
    assert session.messages[1]["content"] != questions[0] and session.messages[-2]["content"] == questions[-1]
    history = list(session.history)
    with pytest.raises(UserError, match="does not fit the model's context of 72 tokens"):
        session.ask("the cat " * 40)
    assert session.history == history


def test_ctrl_c_inside_a_forward_pass_keeps_the_partial_answer_and_the_next_turn_is_exact(tiny):
    model, tok = tiny
    calls = {"n": 0}

    def interrupt(module, args):
        calls["n"] += 1
        if calls["n"] == 6:  # the 6th pass: prefill + 4 decode steps done; layer 0 already appended to the cache
            signal.raise_signal(signal.SIGINT)

    hook = model.model.layers[1].register_forward_pre_hook(interrupt)
    # Ctrl-C as in a terminal: a shell starts background jobs (CI scripts, `&`) with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    session = ChatSession(model, tok, ChatSettings(max_new_tokens=50))
    try:
        reply = session.ask("hello")
    finally:
        hook.remove()
        signal.signal(signal.SIGINT, previous)
    assert reply.finish_reason == "interrupted" and len(reply.token_ids) == 5
    kept = tok.decode(reply.token_ids, skip_special_tokens=True).rstrip("\ufffd")  # no half character at the end
    assert session.history[-1] == {"role": "assistant", "content": kept}
    assert session.interrupted
    session.update("max_new_tokens", "4")
    following = session.ask("the cat")
    assert following.token_ids == from_scratch(model, tok, session.messages[:-1], 4)


# -- commands --------------------------------------------------------------------------------------
def test_save_appends_rows_that_generic_sft_data_loading_reads(tiny, tmp_path):
    model, tok = tiny
    session = ChatSession(model, tok, ChatSettings(max_new_tokens=3, system="Be kind."))
    out = tmp_path / "chats.jsonl"
    session.ask("hello")
    session.save(out)
    session.ask("the cat")
    assert session.save(out) == 5
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows[1] == {"messages": session.messages}
    samples = generic_conversations(str(out), tok, chat_template=True)
    assert [list(s) for s in samples] == [list(chat_turns(tok, r["messages"], "t")) for r in rows]
    assert [len(s) for s in samples] == [1, 2]
    report = preflight([encode_sft_turns(s, tok, 512) for s in samples], tok)
    assert report.dropped == 0 and report.truncated == 0
    with pytest.raises(UserError, match="is a directory"):
        session.save(tmp_path)


def test_the_repl_survives_mistakes_and_ends_on_end_of_input(tiny, monkeypatch, capsys):
    model, tok = tiny
    lines = ["hello", "/set temperature -1", "/set top_p 2", "/set max_new_tokens abc", "/set max_new_tokens 5000",
             "/set seed 3", "/set temperature 0.5", "/set", "/frobnicate", "/sav x", "/undo", "/undo", "/retry",
             "/save", "//slashed", "/system Be terse.", "/help"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    session = ChatSession(model, tok, ChatSettings(max_new_tokens=2))
    ChatREPL(session).run()  # returns at the end of input (Ctrl-D)
    out = capsys.readouterr().out
    for needle in ["error: temperature must be >= 0", "error: top_p must be in (0, 1]",
                   "error: max_new_tokens must be an integer; got 'abc'",
                   "error: max_new_tokens must be below the model's context window of 2048",
                   "error: cannot set 'seed'", "(temperature=0.5)", "temperature=0.5 top_p=1.0 max_new_tokens=2",
                   "unknown command /frobnicate; /help lists", "did you mean /save?", "(dropped the last exchange)",
                   "error: nothing to undo", "error: nothing to retry yet", "error: /save needs a file name",
                   "(system prompt set)", "/retry ", "[max_new_tokens=2 reached]"]:
        assert needle in out
    assert session.messages == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "/slashed"},
                                {"role": "assistant", "content": session.history[-1]["content"]}]


def test_command_line_settings(capsys):
    s = parse_overrides(["temperature=0.7", "top_p=0.9", "max_new_tokens=12", "seed=3", "system=Be terse."])
    assert (s.temperature, s.top_p, s.max_new_tokens, s.seed, s.system) == (0.7, 0.9, 12, 3, "Be terse.")
    for argv, needle in [(["temprature=0.5"], "unknown setting 'temprature'; did you mean 'temperature'?"),
                         (["max_tokens=5"], "did you mean 'max_new_tokens'?"),
                         (["max_new_tokens=abc"], "max_new_tokens must be an integer; got 'abc'"),
                         (["top_p=0"], "top_p must be in (0, 1]")]:
        assert main(["chat", "smollm2-135m-instruct", *argv]) == 2  # before any model loads
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished tiny SFT runs: one trained through the chat template, one on plain text."""
    out = {}
    for template in (True, False):
        tmp = tmp_path_factory.mktemp(f"run_template_{template}")
        assert main(["train", str(tiny_recipe(tmp, data={"chat_template": template})), "train.max_steps=1"]) == 0
        out[template] = tmp / "runs" / "sft" / "latest"
    return out


def test_a_run_trained_on_plain_text_chats_in_plain_text(runs, monkeypatch, capsys):
    from ftlab.use.source import load_source, resolve_source

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\n/exit\nnever read\n"))
    run_chat(str(runs[False]), overrides=["max_new_tokens=4"])
    out = capsys.readouterr().out
    assert "plain text (the run trained without the chat template)" in out
    model, tok = load_source(resolve_source(str(runs[False])))
    expected = from_scratch(model, tok, [{"role": "user", "content": "hello world"}], 4, chat_template=False)
    assert tok.decode(expected, skip_special_tokens=True) in out


# -- in a real terminal ----------------------------------------------------------------------------
class Terminal:
    """`ftlab chat` in a detached tmux session of fixed size, on a private server; keys in, the pane out."""

    def __init__(self, argv: list[str], tmp: Path):
        self.socket = f"ftlab-chat-{uuid.uuid4().hex[:8]}"
        cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "ftlab.cli", "chat", *argv])
        env = [arg for k in ("FTLAB_CACHE", "HOME") if k in os.environ for arg in ("-e", f"{k}={os.environ[k]}")]
        self.tmux("new-session", "-d", "-s", "chat", "-x", "200", "-y", "50", *env,
                  f"cd {shlex.quote(str(tmp))} && {cmd}; echo \"[exit $?]\"; sleep 60")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def pane(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "chat")

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "chat", *keys)

    def wait(self, check, what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            pane = self.pane()
            if check(pane):
                return pane
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the pane:\n{pane}")
            time.sleep(0.2)

    def wait_prompt(self, after: str, timeout: float = 60) -> str:
        """The pane once `after` was shown and the prompt is back below it."""
        def ready(pane: str) -> bool:
            return after in pane and pane.rsplit(after, 1)[1].rstrip().endswith("\n>>>")
        return self.wait(ready, f"the prompt after {after!r}", timeout)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], check=False, capture_output=True)


def answer_in(pane: str, question: str) -> str:
    """The text shown between the question's line and the next prompt, with runs of whitespace as one space."""
    text = pane.rsplit(f">>> {question}\n", 1)[1].split("\n>>>", 1)[0]
    return " ".join(text.split())


@pytest.mark.slow
def test_chat_in_a_terminal_with_the_embedded_model(tmp_path, request):
    term = Terminal(["smollm2-135m-instruct", "max_new_tokens=24"], tmp_path)
    try:
        _, text1, _, text2 = request.getfixturevalue("reference")  # while the terminal's process loads
        term.wait(lambda p: p.rstrip().endswith(">>>"), "the first prompt", timeout=90)
        term.send(Q1, "Enter")
        assert answer_in(term.wait_prompt(f">>> {Q1}"), Q1) == " ".join(text1.split())
        term.send("/set max_new_tokens 400", "Enter")
        term.wait_prompt("(max_new_tokens=400)")
        term.send(STORY, "Enter")
        term.wait(lambda p: STORY in p and len(p.rsplit(STORY, 1)[1].split()) >= 3, "the story to start")
        term.send("C-c")
        term.wait_prompt("[interrupted]")
        term.send("/undo", "Enter")
        term.wait_prompt("(dropped the last exchange)")
        term.send("/set max_new_tokens 24", "Enter")
        term.wait_prompt("(max_new_tokens=24)")
        term.send(Q2, "Enter")  # the conversation is Q1, its answer, Q2 again: the reference's
        assert answer_in(term.wait_prompt(f">>> {Q2}"), Q2) == " ".join(text2.split())
        term.send("/save chats.jsonl", "Enter")
        term.wait_prompt("(saved 4 messages to chats.jsonl)")
        term.send("/exit", "Enter")
        term.wait(lambda p: "[exit 0]" in p, "a clean exit")
    finally:
        term.close()
    row = json.loads((tmp_path / "chats.jsonl").read_text(encoding="utf-8"))
    assert row == {"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": text1},
                                {"role": "user", "content": Q2}, {"role": "assistant", "content": text2}]}


def test_chat_in_a_terminal_with_a_trained_run(tmp_path, runs):
    from ftlab.use.source import load_source, resolve_source

    run = runs[True]
    term = Terminal([str(run), "max_new_tokens=6", "system=You are a calculator."], tmp_path)
    try:
        model, tok = load_source(resolve_source(str(run)))  # while the terminal's process loads
        msgs = [{"role": "system", "content": "You are a calculator."}, {"role": "user", "content": "hello"}]
        expected = tok.decode(from_scratch(model, tok, msgs, 6), skip_special_tokens=True)
        pane = term.wait(lambda p: p.rstrip().endswith(">>>"), "the first prompt", timeout=90)
        assert "the run's chat template" in pane
        term.send("hello", "Enter")
        shown = answer_in(term.wait_prompt(">>> hello"), "hello").removesuffix("[max_new_tokens=6 reached]")
        assert shown.strip() == " ".join(expected.split())
        term.send("C-d")
        term.wait(lambda p: "[exit 0]" in p, "a clean exit on Ctrl-D")
    finally:
        term.close()
