"""Cost of constrained decoding (`ftlab.sokrates.constrain.OptionConstraint`) per generated token.

Two measurements, printed as markdown rows and written as JSON (--json):

* replay (no model): the optionized gold proofs of --problems generated PrOntoQA problems, fed token by token
  through the hook in batches of --rows rows, as the engine calls it once per decoding step; microseconds of
  hook time per row-token, first pass (empty caches) and second pass (warm caches). This is the cost on text
  that is mostly proof steps (about a third of the tokens sit inside Action lines), what a tuned policy writes.
* engine (the embedded SmolLM2-135M-Instruct, skipped with --no-model): the same prompts sampled with and
  without the hook (--samples per prompt, --max-new-tokens, temperature 0.7, one seed), new tokens/s of each,
  and the hook's own seconds per generated token. The untuned model rarely writes Action lines, so this
  mostly prices the per-row line tracking outside tags.

    python benchmarks/bench_constrained.py --threads 1 --problems 8 --samples 4 --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def replay(tok, examples, rows: int) -> dict:
    from ftlab.sokrates.constrain import OptionConstraint

    hook = OptionConstraint(tok, [len(e.meta["problem"].premises) for e in examples], {tok.eos_token_id},
                            arity={"CONCLUDE": (1, 1)})
    traces = [tok(e.target, add_special_tokens=False)["input_ids"] for e in examples]
    longest = max(len(t) for t in traces)
    logits = torch.zeros(rows, len(tok))
    out = {}
    for label in ("cold", "warm"):
        hook.stats.update(calls=0, rows=0, seconds=0.0, constrained_rows=0)
        for step in range(longest):  # rows whose trace has ended leave the batch, as the engine evicts them
            picked = [k for k in (r % len(traces) for r in range(rows)) if step < len(traces[k])]
            hook(logits[:len(picked)], picked, [traces[k][:step] for k in picked])
        out[label] = {"us_per_row_token": 1e6 * hook.stats["seconds"] / hook.stats["rows"],
                      "ms_per_call": 1e3 * hook.stats["seconds"] / hook.stats["calls"],
                      "constrained_share": hook.stats["constrained_rows"] / hook.stats["rows"]}
    return out


def engine_run(model, tok, prompts, problems, args, constrained: bool) -> dict:
    from ftlab.evaluate import autocast_for
    from ftlab.generate import GenerationConfig, HFEngine
    from ftlab.sokrates.constrain import OptionConstraint
    from ftlab.sokrates.options import parse_steps

    engine = HFEngine(model, tok)
    hook = None
    if constrained:
        hook = OptionConstraint(tok, [len(p.premises) for p in problems], engine.eos_ids, arity={"CONCLUDE": (1, 1)})
        engine.logits_processor = hook
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.7, n=args.samples, seed=1,
                           batch_size=64)
    start = time.perf_counter()
    with autocast_for(model, args.precision):
        results = engine.generate_full(prompts, cfg, progress=False)
    wall = time.perf_counter() - start
    new = engine.stats["new_tokens"]
    steps = [s for cs in results for c in cs for s in parse_steps(c.text) if s.action_text is not None]
    out = {"new_tokens": new, "wall_s": wall, "decode_s": engine.stats["decode_seconds"], "tok_per_s": new / wall,
           "action_lines": len(steps), "action_lines_parsed": sum(s.action is not None for s in steps)}
    if hook:
        out.update(hook_s=hook.stats["seconds"], hook_us_per_token=1e6 * hook.stats["seconds"] / max(new, 1),
                   constrained_share=hook.stats["constrained_rows"] / max(hook.stats["rows"], 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])  # bf16 autocast slows CPU decoding
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ftlab.models.load import EMBEDDED_MODEL, load_model_and_tokenizer, load_tokenizer, resolve_model_path
    from ftlab.tasks import get_task

    task = get_task("sokrates")
    examples = task.load(f"generate:{args.problems},hops=1-5,seed=11")
    result = {"args": vars(args), "replay": replay(load_tokenizer(resolve_model_path(EMBEDDED_MODEL)), examples,
                                                   args.rows)}
    for label, r in result["replay"].items():
        print(f"| replay, {args.rows} rows, {label} caches | {r['us_per_row_token']:.0f} us per row-token | "
              f"{r['ms_per_call']:.1f} ms per step | {r['constrained_share']:.0%} of row-steps inside a tag |")
    if not args.no_model:
        model, tok = load_model_and_tokenizer(name=EMBEDDED_MODEL)
        prompts = [task.render_prompt(e, 0, tok, True) for e in examples]
        problems = [e.meta["problem"] for e in examples]
        for constrained in (False, True):
            r = engine_run(model, tok, prompts, problems, args, constrained)
            result.setdefault("engine_constrained" if constrained else "engine_plain", []).append(r)
            print(f"| engine {'constrained' if constrained else 'plain'} | {r['tok_per_s']:.1f} new tok/s | "
                  f"{r['new_tokens']} tokens, {r['wall_s']:.1f} s | "
                  + (f"hook {r['hook_us_per_token']:.0f} us/token ({r['constrained_share']:.1%} in tags) | "
                     if constrained else "") + f"Action lines parsed {r['action_lines_parsed']}/{r['action_lines']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
