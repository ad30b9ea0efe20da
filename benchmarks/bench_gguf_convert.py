"""The embedded model's one-time conversion from GGUF, with and without `gguf_parsed_once`, side by side.

Every new user pays this conversion on their first command, and the test suite pays it three times (a cold
cache, the first-use test, the damaged-cache test). `convert_gguf` parses the file once and builds gguf's
tensor-name table once; the baseline lets transformers parse it three times and build the table per module.
Both write the same files (checked here byte for byte). Interleaved rounds, each in a fresh process, so that
import caches favour neither side.

    python benchmarks/bench_gguf_convert.py --rounds 3 --write
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SECTION = "## Embedded model conversion from GGUF"


def convert_once(parsed_once: bool) -> dict:
    """One conversion in this process; the baseline swaps the parse-once block for a no-op."""
    import ftlab.models.load as load

    if not parsed_once:
        load.gguf_parsed_once = contextlib.nullcontext
    out = Path(tempfile.mkdtemp()) / "model"
    with load.progress_bars_only_on_a_terminal():
        started = time.perf_counter()
        load.convert_gguf(load.embedded_gguf(load.EMBEDDED_MODEL), out)
        seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for f in sorted(out.iterdir()):
        digest.update(f.name.encode() + f.read_bytes())
    return {"seconds": seconds, "files_sha256": digest.hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="write the section of docs/BENCHMARKS.md")
    ap.add_argument("--one", choices=["baseline", "parsed-once"], help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(convert_once(args.one == "parsed-once")))
        return
    from benchlib import cpu_model, write_section

    runs: dict[str, list[dict]] = {"baseline": [], "parsed-once": []}
    for _ in range(args.rounds):
        for name in runs:
            out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(name, round(runs[name][-1]["seconds"], 2), flush=True)
    same = len({r["files_sha256"] for rs in runs.values() for r in rs}) == 1
    med = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    rounds = {name: ", ".join(f"{r['seconds']:.1f}" for r in rs) for name, rs in runs.items()}
    table = "\n".join(["| conversion | median s | each round (s) |", "|---|---:|---|",
                       *[f"| {name} | {med[name]:.1f} | {rounds[name]} |" for name in runs]])
    text = (f"{SECTION}\n\nCommand: `python benchmarks/bench_gguf_convert.py --rounds {args.rounds} --write` "
            f"({time.strftime('%Y-%m-%d')}, {cpu_model()}, alone on the machine). `convert_gguf` on the embedded "
            "SmolLM2-135M-Instruct GGUF, each round a fresh process, the two interleaved. The baseline lets "
            "transformers parse the file three times (config, weights, tokenizer) and build gguf's tensor-name "
            "table once per module (397 times); `gguf_parsed_once` does each once.\n\n"
            f"{table}\n\nSpeed-up of the median: **{med['baseline'] / med['parsed-once']:.2f}x**. The written files "
            f"are byte-identical across all rounds: {'yes' if same else 'NO'}.\n")
    print(text)
    if args.write:
        write_section(REPO / "docs" / "BENCHMARKS.md", SECTION, text)


if __name__ == "__main__":
    main()
