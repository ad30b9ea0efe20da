"""Peak resident memory (RSS) of the main job's phases, measured one phase at a time.

The kernel's high-water mark (VmHWM in /proc/self/status) is reset before each phase (writing 5 to
/proc/self/clear_refs) and read after it, so each phase's peak is exact (no sampling interval) and
comparable with `/usr/bin/time -v`'s "Maximum resident set size", which is the largest of them.

    python benchmarks/bench_memory.py eval --hops 3 --n 100                 # base evaluation, recipe settings
    python benchmarks/bench_memory.py eval --hops 3 --n 100 eval.batch_size=16
    python benchmarks/bench_memory.py train --steps 10                      # LoRA SFT, recipe settings
    python benchmarks/bench_memory.py train --steps 10 train.batch_size=2 train.grad_accum=4
    python benchmarks/bench_memory.py sequence --steps 10                   # load, eval, train, load tuned, eval

Overrides (`key=value`) apply to recipes/quickstart.yaml as on the command line of `ftlab quickstart`.
Timings are wall seconds on a shared machine; the peaks do not depend on the load.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

ROWS: list[dict[str, Any]] = []
TRIM = False  # --trim: gc.collect() + malloc_trim(0) after every phase


def status_kb(field: str) -> int:
    from ftlab.quickstart import proc_status_kb

    kb = proc_status_kb(field)
    if kb is None:
        raise KeyError(field)
    return kb


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def phase(name: str, setting: str = "") -> Iterator[None]:
    """Record RSS before, the phase's peak RSS, RSS after (and after gc + malloc_trim), seconds."""
    before = status_kb("VmRSS")
    exact = reset_peak()
    started, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    yield
    seconds, r1 = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    peak, after = status_kb("VmHWM"), status_kb("VmRSS")
    if TRIM:  # what the job would hold if freed memory went back to the OS at once
        from ftlab.models.load import release_memory

        release_memory()
    row = {"phase": name, "setting": setting, "rss_before_mb": before / 1024, "peak_mb": peak / 1024,
           "rss_after_mb": after / 1024, "rss_after_trim_mb": status_kb("VmRSS") / 1024 if TRIM else None,
           "seconds": round(seconds, 1), "user_s": round(r1.ru_utime - r0.ru_utime, 1),
           "sys_s": round(r1.ru_stime - r0.ru_stime, 1), "minor_faults": r1.ru_minflt - r0.ru_minflt,
           "exact_peak": exact}
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def recipe(overrides: list[str]) -> Any:
    from ftlab.config.load import load_recipe

    return load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)


def heldout(cfg: Any, hops: int, data_dir: Path) -> Path:
    """The authors' file when present (as the quickstart uses it), else a generated set."""
    from ftlab.quickstart import heldout_sets

    sets, _ = heldout_sets(cfg, data_dir)
    return sets[hops]


def run_eval(cfg: Any, model: Any, tok: Any, path: Path, n: int, label: str) -> dict:
    from ftlab.evaluate import evaluate_examples
    from ftlab.tasks import get_task

    task = get_task(cfg.data.task, **cfg.data.task_options)  # the quickstart's prompts, as the job renders them
    examples = task.load(str(path), limit=n)
    with phase(f"eval {label}", f"{n} problems, {cfg.eval.max_new_tokens} new tokens, {cfg.eval.batch_size} slots"):
        rows, metrics = evaluate_examples(model, tok, task, examples, cfg.eval, cfg.seed, progress=False)
    print(f"accuracy {label}: {metrics['accuracy']:.3f}", flush=True)
    return {"accuracy": metrics["accuracy"], "outputs": [r["output"] for r in rows]}


def run_train(cfg: Any, steps: int, out: Path) -> Any:
    from omegaconf import OmegaConf

    from ftlab.quickstart import make_training_set
    from ftlab.train.sft import run_sft

    train_path = make_training_set(cfg, out / "data" / "train.jsonl")
    sft_cfg = OmegaConf.merge(cfg, {"data": {"train": str(train_path)}, "output_dir": str(out),
                                    "kind": "sft", "train": {"max_steps": steps}})
    t = cfg.train
    with phase("train", f"{steps} steps, batch {t.batch_size} x accum {t.grad_accum}, {t.precision}, "
                        f"checkpointing {t.gradient_checkpointing}"):
        run = run_sft(sft_cfg)
    losses = [json.loads(line)["train/loss"] for line in (run.path / "metrics.jsonl").read_text().splitlines()
              if '"train/loss"' in line]
    print("losses:", json.dumps(losses), flush=True)
    return run


def worst_step(plan: Any, steps: int) -> int:
    """The step (of the first `steps`) whose largest micro-batch has the most padded tokens: the activation peak."""
    def padded(step: int) -> int:
        return max(len(m) * max(plan.lengths[i] for i in m) for m in plan.step_indices(step) if m)
    return max(range(steps), key=padded)


def run_step(cfg: Any, total_steps: int, out: Path, saved: bool, reps: int) -> None:
    """The training loop's own `Loop.step`: first the worst step of the plan (largest micro-batch), then
    steps 0, 1, ... (other shapes, as in a run: what the allocator makes of them), `reps` steps in all."""
    from omegaconf import OmegaConf

    from ftlab.quickstart import make_training_set
    from ftlab.train.loop import Loop, make_accelerator, prepare_model
    from ftlab.train.sft import build_objective

    train_path = make_training_set(cfg, out / "data" / "train.jsonl")
    cfg = OmegaConf.merge(cfg, {"data": {"train": str(train_path)}, "output_dir": str(out),
                                "kind": "sft"})
    t = cfg.train
    with phase("prepare model", "LoRA" if cfg.lora.enabled else "full"):
        accelerator = make_accelerator(cfg)
        model, tok = prepare_model(cfg)
        objective = build_objective(cfg, tok)
        loop = Loop(cfg, accelerator, model, tok, objective, None, out, total_steps)
        loop.model.train()
    worst = worst_step(objective.plan, total_steps)
    if saved:
        count_saved(loop, objective, worst)
    for k in [worst] + [s for s in range(total_steps) if s != worst][: reps - 1]:
        widths = [(len(m), max(objective.plan.lengths[i] for i in m)) for m in objective.plan.step_indices(k) if m]
        setting = (f"step {k}: micro-batches (rows, width) {widths}; batch {t.batch_size} x accum {t.grad_accum}, "
                   f"{t.precision}, checkpointing {t.gradient_checkpointing}")
        with phase("train step", setting):
            stats = loop.step(k)
        print(f"loss {stats['loss']:.6f}", flush=True)


def count_saved(loop: Any, objective: Any, k: int) -> None:
    """Bytes autograd saves for backward in the largest micro-batch of step k, by dtype (storages counted once)."""
    import torch

    micro = max((m for m in objective.plan.step_indices(k) if m), key=len)
    m = objective.collate(micro)
    seen: dict[int, tuple[int, str]] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not isinstance(x, torch.nn.Parameter):
            st = x.untyped_storage()
            seen.setdefault(st.data_ptr(), (st.nbytes(), str(x.dtype)))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), loop.autocast():
        loss, _ = objective.loss(loop.model, m)
    params = {p.untyped_storage().data_ptr() for p in loop.model.parameters()}
    by_dtype: dict[str, float] = {}
    for ptr, (nbytes, dtype) in seen.items():
        key = dtype + (" (parameter)" if ptr in params else "")
        by_dtype[key] = by_dtype.get(key, 0) + nbytes / 2**20
    print("saved for backward (MB):", json.dumps({k: round(v) for k, v in sorted(by_dtype.items())}), flush=True)
    del loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["eval", "train", "step", "sequence"])
    ap.add_argument("--hops", type=int, default=3)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--saved", action="store_true", help="step: count the bytes saved for backward")
    ap.add_argument("--reps", type=int, default=2, help="step: steps to run (the worst, then 0, 1, ...)")
    ap.add_argument("--total-steps", type=int, default=100, help="step: the plan's length (worst step among them)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--trim", action="store_true", help="gc.collect() + malloc_trim(0) after every phase")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    global TRIM
    TRIM = args.trim
    cfg = recipe(args.overrides)

    import torch

    from ftlab.models.load import load_model_and_tokenizer

    torch.manual_seed(cfg.seed)
    out = Path(tempfile.mkdtemp(prefix="bench_memory."))
    with phase("imports + start"):
        pass
    if args.what == "step":
        run_step(cfg, args.total_steps, out, args.saved, args.reps)
        return finish(args)
    if args.what in ("eval", "sequence"):
        with phase("load base", "fp32"):
            model, tok = load_model_and_tokenizer(cfg.model)
        run_eval(cfg, model, tok, heldout(cfg, args.hops, out), args.n, "base")
        if args.what == "eval":
            return finish(args)
        with phase("free base"):
            del model
    if args.what in ("train", "sequence"):
        run = run_train(cfg, args.steps, out)
    if args.what == "sequence":
        from ftlab.quickstart import load_tuned

        with phase("load tuned"):
            model, tok = load_tuned(cfg, run.path / "final")
        run_eval(cfg, model, tok, heldout(cfg, args.hops, out), args.n, "tuned")
    finish(args)


def finish(args: argparse.Namespace) -> None:
    print(f"process peak (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print("| phase | setting | RSS before (MB) | peak RSS (MB) | RSS after (MB) | wall s | user s | sys s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['phase']} | {r['setting']} | {r['rss_before_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['rss_after_mb']:.0f} | {r['seconds']} | {r['user_s']} | {r['sys_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
