"""`ftlab serve` under load: 16 concurrent clients against the same requests one after another, and against
the server loop a user would write with plain transformers.

The same requests (the first N GSM8K test questions as chat messages, temperature 0, the same max_tokens),
sent with the `openai` client over loopback:

  (a) ftlab serve, N concurrent clients (one thread each): requests join the running batch
  (b) ftlab serve, one request after another (the next sent when the previous answer is back)
  (c) a plain server: a minimal FastAPI endpoint running `model.generate` for one request at a time (a lock;
      the usual single-model server), asked by the same N concurrent clients as (a)

Both servers run as subprocesses of this script (`--plain-server PORT` is (c)'s entry point) with the same
number of torch threads; each is warmed up by one request first. Throughput = completion tokens (the
servers' `usage`, counted up to and including the end-of-turn token) / wall-clock seconds from the first
request sent to the last answer received. Latency = per request, from sending to the full answer.
(a) and (b) are run alternately `--repeats` times (the CPU may be shared); medians are reported.

    python benchmarks/bench_serve.py --threads 1 --max-tokens 128 --repeats 2   # as in docs/BENCHMARKS.md
    python benchmarks/bench_serve.py --requests 4 --max-tokens 8 --no-write     # smoke run
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import cpu_model, write_section

EMBEDDED = "smollm2-135m-instruct"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"  # ../shared beside the checkout
SECTION = "## ftlab serve: 16 concurrent clients vs sequential"
FALLBACK_QUESTIONS = ["What is 12 times 7?", "Name three primary colors.", "Explain what a prime number is.",
                      "Write a short poem about rain.", "What is the capital of Japan?", "How do plants make food?",
                      "Give two uses of a magnet.", "What is 144 divided by 12?"]


# -- (c): the plain server a user would write --------------------------------------------------------
def plain_server(port: int, threads: int) -> None:
    """One model, one lock, `model.generate` per request; answers in OpenAI's chat shape so the same client works."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftlab.models.load import embedded_model_dir

    torch.set_num_threads(threads)
    path = embedded_model_dir(EMBEDDED)  # the converted HF directory: what a user would load
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:  # a plain `def`: FastAPI runs it in a worker thread; the lock serializes them
        enc = tok.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        with lock, torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=body.get("max_tokens") or 256, do_sample=False)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        end = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        new = new[:end]
        return {"id": "plain", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": tok.decode(new, skip_special_tokens=True)},
                             "finish_reason": "stop" if new and new[-1] in eos else "length"}],
                "usage": {"prompt_tokens": enc["input_ids"].shape[1], "completion_tokens": len(new),
                          "total_tokens": enc["input_ids"].shape[1] + len(new)}}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": EMBEDDED, "object": "model", "created": 0, "owned_by": "me"}]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- starting the servers ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict[str, str], url: str | None = None, timeout: float = 300) -> tuple[Any, str]:
    """Start a server; its URL is `url` or read from ftlab serve's log line. Returns (process, base URL)."""
    import httpx

    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = url or (m.group(1) if (m := re.search(r"(http://127\.0\.0\.1:\d+/v1)", log.read_text())) else None)
        if found:
            try:
                if httpx.get(found + "/models").status_code == 200:
                    return proc, found
            except httpx.TransportError:
                pass
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"server not up after {timeout}s: {log.read_text()[-2000:]}")


# -- clients ------------------------------------------------------------------------------------
def ask(url: str, question: str, max_tokens: int) -> dict[str, Any]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    start = time.perf_counter()
    r = client.chat.completions.create(model=EMBEDDED, messages=[{"role": "user", "content": question}],
                                       temperature=0, max_tokens=max_tokens)
    return {"latency": time.perf_counter() - start, "text": r.choices[0].message.content,
            "tokens": r.usage.completion_tokens}


def run_variant(url: str, questions: list[str], max_tokens: int, concurrent: bool) -> dict[str, Any]:
    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(questions)) as pool:
            answers = list(pool.map(lambda q: ask(url, q, max_tokens), questions))
    else:
        answers = [ask(url, q, max_tokens) for q in questions]
    wall = time.perf_counter() - start
    tokens = sum(a["tokens"] for a in answers)
    latencies = [a["latency"] for a in answers]
    return {"wall": wall, "tokens": tokens, "tok_s": tokens / wall, "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95), "texts": [a["text"] for a in answers]}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def stats(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(url.replace("/v1", "/stats")).json()


# -- report -------------------------------------------------------------------------------------
def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], batching: dict[str, float],
           load_before: str, source: str) -> str:
    import torch
    import transformers

    n, base = len(runs["a"][0]["texts"]), median_of(runs["b"], "tok_s")
    labels = {"a": f"(a) ftlab serve, {n} concurrent clients",
              "b": "(b) ftlab serve, one request after another",
              "c": f"(c) plain FastAPI + `model.generate`, one request at a time ({n} concurrent clients)"}
    rows = ["| variant | completion tokens | wall s | completion tok/s | p50 latency s | p95 latency s | vs (b) |",
            "|---|---|---|---|---|---|---|"]
    for key in ("a", "b", "c"):
        v = runs[key]
        tps = median_of(v, "tok_s")
        ratio = f"**{tps / base:.2f}x**" if key == "a" else f"{tps / base:.2f}x"
        rows.append(f"| {labels[key]} | {v[0]['tokens']} | {median_of(v, 'wall'):.1f} | {tps:.1f} | "
                    f"{median_of(v, 'p50'):.1f} | {median_of(v, 'p95'):.1f} | {ratio} |")
    same_ab = sum(x == y for x, y in zip(runs["a"][0]["texts"], runs["b"][0]["texts"]))
    same_ac = sum(x == y for x, y in zip(runs["a"][0]["texts"], runs["c"][0]["texts"]))
    stable = all(r["texts"] == runs["a"][0]["texts"] for r in runs["a"] + runs["b"])
    cmd = ("python benchmarks/bench_serve.py " + " ".join(a for a in sys.argv[1:] if a != "--no-write")).strip()
    per_run = ", ".join(f"{a['tok_s'] / b['tok_s']:.2f}x" for a, b in zip(runs["a"], runs["b"]))
    machine = (f"Date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; machine: {cpu_model()}, {os.cpu_count()} "
               f"cores ({platform.machine()}; load average {load_before} before, {load_average()} after); torch "
               f"{torch.__version__}, transformers {transformers.__version__}, {args.threads} torch thread(s) in each "
               "server.  ")
    workload = (f"Workload: {n} {source} as chat messages, temperature 0, max_tokens {args.max_tokens}, sent with the "
                f"`openai` client over loopback; `ftlab serve --batch-size {args.batch_size}`. Completion tokens are "
                "the servers' `usage` (up to and including the end-of-turn token); throughput = completion tokens / "
                "wall seconds from the first request sent to the last answer back; latency per request, sent to "
                f"answered. Medians of {args.repeats} alternating run(s) of (a) and (b); (c) once.")
    identical = (f"- Identical answers: (a) vs (b) {same_ab}/{n}, (a) vs (c) {same_ac}/{n}; every run of (a) and (b) "
                 f"gave the same answers: {'yes' if stable else 'no'}.")
    batched = (f"- Batching during (a), from the server's `/stats`: {batching['rows_per_step']:.1f} rows per decoding "
               f"step on average, {batching['max_rows']} at most; during (b) {batching['rows_per_step_b']:.2f}.")
    plain = ("- (c) answers one request at a time, so concurrent clients wait in line: its throughput is the "
             "sequential one, and a client's latency includes the requests ahead of it.")
    lines = [SECTION, "", f"Command: `{cmd}`  ", machine, workload, "", *rows, "",
             f"- Throughput (a)/(b) per run: {per_run}. Target: at least 3x.", identical, batched, plain]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16, help="requests (and concurrent clients); default 16")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="ftlab serve --batch-size")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each server (1: stable on a shared CPU)")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of (a) and (b)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print the section, do not write it")
    p.add_argument("--plain-server", type=int, metavar="PORT", help=argparse.SUPPRESS)  # (c)'s process
    return p.parse_args()


def questions(n: int) -> tuple[list[str], str]:
    if GSM8K.is_file():
        with GSM8K.open() as f:
            return [json.loads(line)["question"] for line, _ in zip(f, range(n))], "first GSM8K test questions"
    return [FALLBACK_QUESTIONS[i % len(FALLBACK_QUESTIONS)] for i in range(n)], "short built-in questions"


def main() -> None:
    args = parse_args()
    if args.plain_server:
        return plain_server(args.plain_server, args.threads)
    qs, source = questions(args.requests)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    load_before = load_average()
    ftlab, ftlab_url = start([sys.executable, "-c", "import sys; from ftlab.cli import main; sys.exit(main())", "serve",
                              EMBEDDED, "--port", "0", "--batch-size", str(args.batch_size)], logs / "bench_serve_ftlab.log", env)
    port = free_port()
    plain, plain_url = start([sys.executable, __file__, "--plain-server", str(port), "--threads", str(args.threads)],
                             logs / "bench_serve_plain.log", env, url=f"http://127.0.0.1:{port}/v1")
    try:
        for url in (ftlab_url, plain_url):
            ask(url, "Hi", 4)  # warm-up: first-call allocations
        runs: dict[str, list[dict[str, Any]]] = {"a": [], "b": [], "c": []}
        batching = {"rows_per_step": 0.0, "max_rows": 0, "rows_per_step_b": 0.0}
        for r in range(args.repeats):
            for key, concurrent in (("a", True), ("b", False)):
                before = stats(ftlab_url)
                runs[key].append(run_variant(ftlab_url, qs, args.max_tokens, concurrent))
                after = stats(ftlab_url)
                steps = max(1, after["decode_steps"] - before["decode_steps"])
                per_step = (after["rows_decoded"] - before["rows_decoded"]) / steps
                batching["rows_per_step" if key == "a" else "rows_per_step_b"] = per_step
                batching["max_rows"] = after["max_rows_in_step"]
                print(f"run {r + 1} ({key}): {runs[key][-1]['tok_s']:.1f} tok/s, {per_step:.1f} rows/step", flush=True)
        runs["c"].append(run_variant(plain_url, qs, args.max_tokens, concurrent=True))
        print(f"(c): {runs['c'][-1]['tok_s']:.1f} tok/s", flush=True)
    finally:
        for proc in (ftlab, plain):
            proc.terminate()
            proc.wait(30)
    text = report(args, runs, batching, load_before, source)
    print("\n" + text)
    if not args.no_write:
        write_section(args.out, SECTION, text)
        print(f"wrote the section to {args.out}")


if __name__ == "__main__":
    main()
