"""Sampling from a LoRA policy with the adapter folded into the base (`ftlab.models.adapters.lora_folded`, what
GRPO's rounds and the in-training evaluation do) against sampling through peft's unmerged layers, side by side.

    python benchmarks/bench_lora_fold.py --rounds 3 --write     # the measurement (docs/BENCHMARKS.md)
    python benchmarks/bench_lora_fold.py --rounds 1 --prompts 1 --n 2 --max-new-tokens 8   # a smoke run

Both arms: the embedded SmolLM2-135M-Instruct in fp32 with a fresh trainable LoRA adapter of the quickstart's
shape (r=32, alpha=64, every projection: q/k/v/o/gate/up/down, 210 adapted layers; its B matrices set to small
random values so the adapter changes the logits), ftlab's HF engine (one shared prefill per prompt, G rows per
prompt decoded together), the same PrOntoQA prompts rendered by the SOKRATES task as GRPO renders them, the same
seeds, temperature 1. The arms alternate round by round (folded first in odd rounds, unfolded first in even ones)
so that a machine slowing down hurts both. Reported: completion tokens per second of each arm over all rounds,
and the largest |logit difference| between the arms on one prompt (folding adds in float32 what peft adds at
every call, so the samples can part at a near-tie; the base weights are checked bit-identical afterwards).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import cpu_model, quiet_run, write_section  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Sampling from a LoRA policy: folded into the base vs peft's unmerged layers"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def policy() -> tuple[torch.nn.Module, object]:
    from peft import LoraConfig, get_peft_model

    from ftlab.config.schema import ModelConfig
    from ftlab.models.load import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer(ModelConfig())
    model = get_peft_model(base, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    return model.eval(), tok


def prompts(tok: object, n: int) -> list[str]:
    from ftlab.tasks import generate_prontoqa, get_task

    task = get_task("sokrates", source="prontoqa", backward_plan=True)
    examples = task.examples_from([("generated", r) for r in generate_prontoqa(n, hops=3, seed=7)])
    return [task.render_prompt(ex, shots=0, tokenizer=tok, chat_template=True) for ex in examples]


def sample(model: torch.nn.Module, tok: object, texts: list[str], a: argparse.Namespace, seed: int,
           fold: bool) -> tuple[int, float]:
    from ftlab.generate import GenerationConfig, HFEngine
    from ftlab.models.adapters import lora_folded

    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=1.0, n=a.n, batch_size=len(texts) * a.n,
                           seed=seed)
    began = time.perf_counter()
    with torch.no_grad(), (lora_folded(model) if fold else nullcontext()):
        out = HFEngine(model, tok).generate_full(texts, cfg, progress=False)
    return sum(len(c.token_ids) for per in out for c in per), time.perf_counter() - began


def largest_logit_gap(model: torch.nn.Module, tok: object, text: str) -> float:
    from ftlab.models.adapters import lora_folded

    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        plain = model(ids).logits
        with lora_folded(model):
            folded = model(ids).logits
    return float((plain - folded).abs().max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4, help="prompts per round")
    p.add_argument("--n", type=int, default=4, help="samples per prompt (GRPO's G)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write", action="store_true", help="write the section of docs/BENCHMARKS.md")
    a = p.parse_args(argv)
    quiet_run(a.threads)
    t_all = time.perf_counter()
    model, tok = policy()
    texts = prompts(tok, a.prompts)
    before = [w.detach().clone() for n, w in model.named_parameters() if "base_layer.weight" in n]
    totals = {True: [0, 0.0], False: [0, 0.0]}
    load = os.getloadavg()[0]
    for r in range(a.rounds):
        for fold in ((True, False) if r % 2 == 0 else (False, True)):
            tokens, seconds = sample(model, tok, texts, a, seed=100 + r, fold=fold)
            totals[fold][0] += tokens
            totals[fold][1] += seconds
            print(f"round {r + 1} {'folded  ' if fold else 'unfolded'} {tokens} tokens {seconds:.1f} s "
                  f"({tokens / seconds:.1f} tok/s)", flush=True)
    after = [w for n, w in model.named_parameters() if "base_layer.weight" in n]
    same_base = all(torch.equal(x, y) for x, y in zip(before, after))
    gap = largest_logit_gap(model, tok, texts[0])
    rate = {fold: totals[fold][0] / totals[fold][1] for fold in totals}
    settings = (f"{a.rounds} rounds x {a.prompts} prompts x {a.n} samples, up to {a.max_new_tokens} new tokens, "
                f"temperature 1, fp32, torch threads {torch.get_num_threads()}")
    table = "\n".join([
        "| sampling | completion tokens | seconds | tokens/s |", "|---|---:|---:|---:|",
        *(f"| {'folded (lora_folded)' if fold else 'unfolded (peft layers)'} | {totals[fold][0]} | "
          f"{totals[fold][1]:.1f} | {rate[fold]:.1f} |" for fold in (True, False)),
        f"| ratio folded / unfolded | | | **{rate[True] / rate[False]:.2f}x** |"])
    text = (f"{SECTION}\n\n`benchmarks/bench_lora_fold.py` (its docstring says what is equal in both arms).\n\n"
            f"Command: `python benchmarks/bench_lora_fold.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f"  \nDate: {time.strftime('%Y-%m-%d %H:%M')} ({time.perf_counter() - t_all:.0f} s); machine: "
            f"{os.cpu_count()}-CPU {cpu_model()} ({platform.machine()}), load average {load:.2f} before.  \n"
            f"Settings: {settings}.\n\n{table}\n\n"
            f"- Base weights bit-identical after every folded round: {'yes' if same_base else 'NO'}.\n"
            f"- Largest |logit difference| folded vs unfolded on one ~{len(tok(texts[0]).input_ids)}-token prompt: "
            f"{gap:.1e}.\n")
    print("\n" + text)
    if a.write:
        write_section(REPO / "docs" / "BENCHMARKS.md", SECTION, text)
    return 0 if same_base else 1


if __name__ == "__main__":
    sys.exit(main())
