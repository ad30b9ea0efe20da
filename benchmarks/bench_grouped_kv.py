"""Decoding the quickstart's long prompts with grouped K/V heads read in place, against transformers' copy of
every K/V head per query head (`HFEngine(grouped_kv=...)`), side by side in one run, same prompts and settings.

    python benchmarks/bench_grouped_kv.py [--problems 20] [--max-new-tokens 256] [--batch 20]

The prompts are recipes/quickstart.yaml's (the SOKRATES layout with the conclusion index, ~650 tokens at 3 hops);
the model is the embedded SmolLM2-135M-Instruct, fp32, greedy. Prints seconds, generated tokens per second and
whether both runs produced the same tokens.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=20)
    args = ap.parse_args()

    from ftlab.config import load_recipe
    from ftlab.generate import GenerationConfig, HFEngine
    from ftlab.models.load import load_model_and_tokenizer
    from ftlab.tasks import get_task

    cfg = load_recipe(str(REPO / "recipes" / "quickstart.yaml"))
    task = get_task(cfg.data.task, **cfg.data.task_options)
    examples = task.load(f"generate:{args.problems},hops=3,seed=7003", limit=args.problems)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    prompts = [task.render_prompt(ex, shots=0, tokenizer=tokenizer, chat_template=True) for ex in examples]
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    results = {}
    for grouped in (False, True):
        engine = HFEngine(model, tokenizer, grouped_kv=grouped)
        started = time.perf_counter()
        tokens = engine.generate_tokens(prompts, gen, progress=False)
        seconds = time.perf_counter() - started
        results[grouped] = tokens
        stats = engine.stats
        print(f"grouped_kv={grouped}: {seconds:.1f} s, {stats['new_tokens']} new tokens, "
              f"{stats['new_tokens'] / seconds:.1f} tokens/s, prefill {stats.get('prefill_seconds', 0):.1f} s, "
              f"decode {stats.get('decode_seconds', 0):.1f} s")
    print("identical tokens:", results[False] == results[True])


if __name__ == "__main__":
    main()
