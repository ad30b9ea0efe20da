"""`ftlab serve` end to end: a real server process on loopback, asked by the real `openai` client.

One server (the embedded SmolLM2-135M-Instruct, two random LoRA adapters saved with peft) runs for the
whole module. Expected answers come from `HFEngine.generate` in this process (the engine `ftlab infer`
uses), on prompts rendered here with the tokenizer's chat template; adapter answers from the adapter
loaded alone, folded into its base, as `ftlab infer model.name=ADAPTER_DIR` loads it.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

EMBEDDED = "smollm2-135m-instruct"
MAX_TOKENS = 10
QUESTIONS = ["What is 2+2?", "Name a color.", "What is the capital of France?", "Say hello.",
             "What is the largest planet?", "Give me a fruit.", "How many legs does a spider have?",
             "What color is the sky?", "Name a programming language.", "What is water made of?",
             "Who wrote Hamlet?", "What is 10 times 3?", "Name an ocean.", "What do bees make?",
             "What is the opposite of hot?", "Name a musical instrument."]
RAW_PROMPTS = ["The capital of France is", "Once upon a time"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # stable on a shared CPU


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    from ftlab.models.load import load_model_and_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server runs one thread too: the same matmul kernels, the same sums
    model, tokenizer = load_model_and_tokenizer(name=EMBEDDED)
    yield model, tokenizer
    torch.set_num_threads(threads)


def chat_text(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def engine_answers(model, tokenizer, prompts: list[str], **settings):
    from ftlab.generate import GenerationConfig, HFEngine

    cfg = GenerationConfig(**{"max_new_tokens": MAX_TOKENS, **settings})
    return HFEngine(model, tokenizer).generate_full(prompts, cfg, progress=False)


@pytest.fixture(scope="module")
def expected(base):
    """HFEngine's greedy completions of every chat question and raw prompt, on the base model."""
    model, tok = base
    return {"chat": [c[0] for c in engine_answers(model, tok, [chat_text(tok, q) for q in QUESTIONS])],
            "raw": [c[0] for c in engine_answers(model, tok, RAW_PROMPTS)]}


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters with random non-zero weights (peft initializes B to zero: no effect), saved by peft."""
    from peft import LoraConfig, get_peft_model

    from ftlab.models.adapters import peft_wrapping

    model, _ = base
    out = {}
    for name, seed, std in (("alpha", 1, 0.1), ("beta-lora", 2, 0.15)):
        with peft_wrapping():
            peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8,
                                                                          target_modules=["q_proj", "v_proj"]))
        rng = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, p in peft_model.named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=rng) * std)
        out[name] = tmp_path_factory.mktemp("adapters") / name
        peft_model.save_pretrained(out[name])
    return out


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])

    def stats(self) -> dict:
        return httpx.get(self.url.replace("/v1", "/stats")).json()

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=120)


def launch(args: list[str], log: Path) -> subprocess.Popen:
    """`ftlab serve ARGS --port 0` in a subprocess (port 0: the system picks a free one; the log line names it)."""
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-c", "import sys; from ftlab.cli import main; sys.exit(main())",
                                 "serve", *args, "--port", "0"], stdout=f, stderr=subprocess.STDOUT, env=ENV)


def wait_for_server(proc: subprocess.Popen, log: Path, timeout: float = 180) -> Server:
    """Its URL read from the one line it logs, then /v1/models polled until it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"(http://127\.0\.0\.1:\d+/v1)", log.read_text())
        if found:
            try:
                if httpx.get(found.group(1) + "/models").status_code == 200:
                    return Server(proc, found.group(1), log)
            except httpx.TransportError:
                pass
        if proc.poll() is not None:
            raise AssertionError(f"ftlab serve exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"ftlab serve did not come up in {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory, request):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = launch([EMBEDDED, "--adapter", f"alpha={adapters['alpha']}", "--adapter", str(adapters["beta-lora"]),
                   "--batch-size", "16"], log)
    try:
        request.getfixturevalue("expected")  # computed while the server loads (each process has one thread)
        yield wait_for_server(proc, log)
    finally:
        proc.terminate()
        proc.wait(30)


def ask(server: Server, question: str, model: str = EMBEDDED, **kw):
    return server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], **{"temperature": 0, "max_tokens": MAX_TOKENS, **kw})


def assert_still_serving(server: Server) -> None:
    assert ask(server, QUESTIONS[0], max_tokens=2).choices[0].message.content


# -- answers -----------------------------------------------------------------------------------------
def test_logs_one_line_with_url_and_models(server):
    lines = [line for line in server.log.read_text().splitlines() if server.url in line]
    assert len(lines) == 1 and all(name in lines[0] for name in (EMBEDDED, "alpha", "beta-lora"))


def test_models_lists_the_base_and_each_adapter(server, adapters):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {EMBEDDED, "alpha", "beta-lora"}  # beta-lora: named after its directory
    assert models["alpha"].model_extra["parent"] == EMBEDDED
    assert models["alpha"].model_extra["root"] == str(adapters["alpha"])


def test_chat_at_temperature_0_is_hfengines_answer_with_usage(server, base, expected):
    from ftlab.data.sft import prompt_ids

    _, tok = base
    for q, want in list(zip(QUESTIONS, expected["chat"]))[:3]:
        r = ask(server, q)
        assert r.choices[0].message.content == want.text
        assert r.choices[0].finish_reason == want.finish_reason
        assert r.usage.prompt_tokens == len(prompt_ids(tok, chat_text(tok, q)))
        assert r.usage.completion_tokens == len(want.token_ids)
    assert {c.finish_reason for c in expected["chat"][:3]} == {"stop", "length"}  # both kinds were checked


def test_chat_at_temperature_0_is_what_ftlab_infer_writes(server, base, tmp_path):
    """The literal promise: the same chat messages through `ftlab infer` (its own model load, prompt rendering and
    engine) and through the server give the same greedy answers."""
    import yaml

    from ftlab.cli import main

    recipe = tmp_path / "infer.yaml"
    recipe.write_text(yaml.safe_dump({"name": "infer", "output_dir": str(tmp_path / "runs"), "model": {"name": EMBEDDED},
                                      "eval": {"max_new_tokens": MAX_TOKENS, "temperature": 0.0}}))
    questions = QUESTIONS[:4]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in questions))
    assert main(["infer", str(recipe), "--input", str(inp), "--output", str(out)]) == 0
    written = {r["index"]: r["output"] for r in map(json.loads, out.read_text().splitlines())}
    served = [ask(server, q).choices[0].message.content for q in questions]
    assert [written[i] for i in range(len(questions))] == served


def test_completions_take_raw_text_several_prompts_and_n(server, base, expected):
    r = server.client().completions.create(model=EMBEDDED, prompt=RAW_PROMPTS, temperature=0,
                                           max_tokens=MAX_TOKENS, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [e.text for e in expected["raw"] for _ in range(2)]
    assert r.usage.completion_tokens == 2 * sum(len(e.token_ids) for e in expected["raw"])
    ids = base[1](RAW_PROMPTS[1], add_special_tokens=False)["input_ids"]  # a prompt given as token ids
    r = server.client().completions.create(model=EMBEDDED, prompt=ids, temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].text == expected["raw"][1].text


def test_streamed_text_concatenates_to_the_answer(server, expected):
    client = server.client()
    for q, want in list(zip(QUESTIONS, expected["chat"]))[3:5]:
        chunks = list(ask(server, q, stream=True, stream_options={"include_usage": True}))
        assert len(chunks) > 3  # piece by piece, not the whole answer at once
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model=EMBEDDED, prompt=RAW_PROMPTS[0], temperature=0,
                                            max_tokens=MAX_TOKENS, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected["raw"][0].text
    # the wire format: OpenAI chunks as server-sent events, the last one `data: [DONE]`
    with httpx.stream("POST", server.url + "/chat/completions", json={
            "model": EMBEDDED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_stop_string_and_seeded_sampling_match_the_engine(server, base, expected):
    model, tok = base
    want = expected["chat"][2].text  # "The capital of France is Paris."
    r = ask(server, QUESTIONS[2], stop=[" is"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want[: want.index(" is")], "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(server, QUESTIONS[2], stop=[" is"], stream=True))
    assert streamed == want[: want.index(" is")]
    # sampling: each row draws with the engine's per-row seed, so a seeded request samples what the engine does
    sampled = engine_answers(model, tok, [chat_text(tok, QUESTIONS[1])], temperature=0.9, n=2, seed=7)[0]
    r = ask(server, QUESTIONS[1], temperature=0.9, n=2, seed=7)
    assert [c.message.content for c in r.choices] == [c.text for c in sampled]
    assert sampled[0].text != sampled[1].text


def test_16_concurrent_clients_are_decoded_together(server, expected):
    before = server.stats()
    answers: dict[int, str] = {}
    start = threading.Barrier(len(QUESTIONS))

    def client(i: int) -> None:
        start.wait()
        answers[i] = ask(server, QUESTIONS[i]).choices[0].message.content

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = server.stats()
    assert [answers.get(i) for i in range(len(QUESTIONS))] == [e.text for e in expected["chat"]]
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["rows_decoded"] - before["rows_decoded"]
    assert after["completed_requests"] - before["completed_requests"] == len(QUESTIONS)
    # one request at a time would be one row per step; batched, the 16 share steps
    assert rows / steps >= 4, (rows, steps)
    assert after["max_rows_in_step"] >= 8 and after["active_rows"] == 0


# -- adapters ----------------------------------------------------------------------------------------
def test_adapters_answer_as_when_loaded_alone_while_sharing_steps(server, adapters, base, expected):
    from ftlab.models.load import load_model_and_tokenizer

    _, tok = base
    questions = QUESTIONS[:4]
    want = {}
    for name, path in adapters.items():
        merged, _ = load_model_and_tokenizer(name=str(path))  # the adapter alone, folded into its base
        want[name] = [c[0].text for c in engine_answers(merged, tok, [chat_text(tok, q) for q in questions])]
        del merged
    assert want["alpha"] != want["beta-lora"] != [e.text for e in expected["chat"][:4]]  # the adapters matter
    before = server.stats()
    jobs = [(m, q) for m in (EMBEDDED, *adapters) for q in questions]
    got: dict[tuple[str, str], str] = {}
    start = threading.Barrier(len(jobs))

    def client(model: str, q: str) -> None:
        start.wait()
        got[model, q] = ask(server, q, model=model).choices[0].message.content

    threads = [threading.Thread(target=client, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get((EMBEDDED, q)) for q in questions] == [e.text for e in expected["chat"][:4]]
    for name in adapters:
        assert [got.get((name, q)) for q in questions] == want[name]
    assert server.stats()["max_models_in_step"] == 3  # base and both adapters in one decoding step
    assert server.stats()["decode_steps"] - before["decode_steps"] < len(jobs) * MAX_TOKENS / 4


# -- bad input -----------------------------------------------------------------------------------------
def chat_body(**kw) -> dict:
    return {"model": EMBEDDED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


BAD = [
    ("malformed json", b'{"model": "x", "messages": [', 400, "not valid JSON", None),
    ("unknown model", chat_body(model="nope"), 404, "'nope' does not exist", "model"),
    ("beyond the context", chat_body(messages=[{"role": "user", "content": "hello " * 8300}], max_tokens=None),
     400, "maximum context length is 8192 tokens. However, your messages resulted in 8", "messages"),
    ("prompt + max_tokens beyond the context", chat_body(messages=[{"role": "user", "content": "hello " * 8000}],
                                                         max_tokens=500), 400, "in the messages, 500 in the completion",
     "messages"),
    ("n 0", chat_body(n=0), 400, "greater than or equal to 1", "n"),
    ("n above the batch", chat_body(n=17, temperature=1), 400, "n must be at most 16", "n"),
    ("max_tokens 0", chat_body(max_tokens=0), 400, "greater than or equal to 1", "max_tokens"),
    ("missing messages", {"model": EMBEDDED}, 400, "messages: Field required", "messages"),
    ("empty messages", chat_body(messages=[]), 400, "messages", "messages"),
    ("message without role", chat_body(messages=[{"content": "Hi"}]), 400, "messages[0].role", "messages"),
    ("temperature 5", chat_body(temperature=5), 400, "less than or equal to 2", "temperature"),
    ("unsupported logprobs", chat_body(logprobs=True), 400, "logprobs are not supported", "logprobs"),
]


@pytest.mark.parametrize("body, status, needle, param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_are_openai_errors_and_the_server_goes_on(server, body, status, needle, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/chat/completions", timeout=60, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"] and error["param"] == param
    assert_still_serving(server)


def test_the_openai_client_raises_on_them_too(server):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(server, "Hi", model="nope")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client().completions.create(model=EMBEDDED, prompt="hello " * 8200, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="token id 999999 is outside the vocabulary"):
        server.client().completions.create(model=EMBEDDED, prompt=[1, 999999], max_tokens=5)
    assert_still_serving(server)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = server.stats()
    body = chat_body(messages=[{"role": "user", "content": "Write a long story about a dragon."}],
                     max_tokens=4000, temperature=0)
    with httpx.stream("POST", server.url + "/chat/completions", json={**body, "stream": True}) as r:
        pieces = []
        for line in r.iter_lines():
            pieces += [line] if line else []
            if len(pieces) >= 3:  # the role chunk and two pieces of text: the row is being decoded
                break
    assert server.stats()["active_rows"] in (0, 1)
    deadline = time.monotonic() + 20  # 4000 tokens would take minutes
    while server.stats()["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = server.stats()
    assert after["active_rows"] == 0
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1
    assert after["completion_tokens"] == before["completion_tokens"]  # it never finished
    # without streaming: a client that gives up waiting closes the connection, which the server notices
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=3) as client:
        client.post(server.url + "/chat/completions", json=body)
    deadline = time.monotonic() + 20
    while server.stats()["active_rows"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.stats()["active_rows"] == 0
    assert server.stats()["cancelled_requests"] == before["cancelled_requests"] + 2
    assert_still_serving(server)


def test_a_busy_port_is_one_line_and_exit_2(server):
    r = subprocess.run([sys.executable, "-c", "import sys; from ftlab.cli import main; sys.exit(main())", "serve",
                        EMBEDDED, "--port", str(server.port)], capture_output=True, text=True, env=ENV, timeout=120, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [(f"ftlab: error: --port {server.port}: 127.0.0.1:{server.port} is already "
                                              "in use (another server?); pick another --port")]


@pytest.mark.parametrize("adapter_args, needle", [
    (["x=/nonexistent/adapter"], "--adapter x=/nonexistent/adapter: /nonexistent/adapter is not a directory"),
    (["{model_dir}"], "is not an adapter directory"),
    (["same={alpha}", "same={beta}"], "--adapter same={beta}: the model name 'same' is already taken"),
    ([EMBEDDED + "={alpha}"], f"the model name '{EMBEDDED}' is already taken"),
], ids=["missing", "full model", "same name twice", "the base's name"])
def test_bad_adapters_are_one_line_before_the_model_loads(adapters, adapter_args, needle, capsys):
    from ftlab.cli import main
    from ftlab.models.load import embedded_model_dir

    paths = {"alpha": adapters["alpha"], "beta": adapters["beta-lora"], "model_dir": embedded_model_dir(EMBEDDED)}
    argv = ["serve", EMBEDDED, "--port", "0"]
    for a in adapter_args:
        argv += ["--adapter", a.format(**paths)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle.format(**paths) in err[0]
