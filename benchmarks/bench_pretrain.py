"""Pretraining throughput: ftlab against a plain loop, side by side in one process.

    python benchmarks/bench_pretrain.py --threads 1                 # as in docs/BENCHMARKS.md (~4.5 CPU-min)
    python benchmarks/bench_pretrain.py --threads 1 --tok-docs 200 --tok-copies 1 --tok-repeats 1 \\
        --sample-steps 200 --steps 4 --repeats 1 --no-write       # quick look (~40 CPU-s)

Three measurements, each ftlab's real code next to a hand-written baseline on the same input:

1. Tokenization (tokens/s). ftlab: `prepare_corpus` (the code behind `ftlab prepare-corpus --full`) with
   --workers 0 (in this process), 1 and 2 (spawned worker processes), end to end: read the JSONL, hash every
   document into its split, encode in chunks of 64, write tokens.bin / index.jsonl / splits.json / meta.json.
   Baselines: a plain Python loop calling the same tokenizer (the embedded model's, which prepare-corpus uses)
   once per text, and once per batch of 64 texts, over the same texts already in memory (nothing read or
   written). Texts: the 2,000 arXiv abstracts of ../shared/data/arxiv (beside the checkout), `--tok-copies`
   times over (copies get their own ids); without that folder, a generated corpus of the same size.
   TOKENIZERS_PARALLELISM=false everywhere (prepare-corpus's workers set it too), so a process is one core.
   Every ftlab corpus must hold exactly the plain loop's token ids, in input order (checked, not just counted).
   A prepare-corpus call also has a fixed cost (load the tokenizer and hash it; spawn the workers, each of which
   rebuilds the Rust tokenizer from the main process's): measured as the same call on the first 64 texts per worker
   (one chunk each, so every worker is spawned), and reported apart ("beyond it" = the extra tokens over the
   extra wall time).
2. Window sampling (windows/s). ftlab's `WindowSampler` (the real class) over the training split of the
   abstracts corpus: drawing the (document, offset) of `--sample-steps` steps of batch-size windows; drawing and
   reading their tokens from the memmap; and `PretrainObjective.collate`, the training loop's batches.
   Baseline: nanoGPT's `torch.randint` offsets into the memmap (windows may cross documents there).
   Recoverability: every step's windows are drawn again by a fresh sampler from (seed, step) alone, in reverse
   order, and must match; every window must lie inside its document.
3. Training (tokens/s). The llama-tiny preset as recipes/arxiv/tiny.yaml (seq_len 64, batch 16, AdamW lr 3e-3
   betas 0.9/0.95 eps 1e-6 weight decay 0.1 on matrices, warmup 5 + cosine, clip 1.0, spike logging, fp32),
   on the abstracts corpus (--full, 10% val, 10% test, all categories), `--steps` optimizer steps (default: the
   recipe's token budget, 48). ftlab: `ftlab.train.pretrain.run_pretrain` (train.method: pretrain on the one
   training loop) with all its per-step work - finite checks, gradient norm before/after clipping, parameter
   norm, bits per byte, spike check and loss_history.jsonl, metrics.jsonl, progress bar; evaluation and
   checkpoints are off (the plain loop has neither). Plain: a nanoGPT-style loop written here: np.memmap of
   tokens.bin, a get_batch that slices x and y at global token offsets, the same transformers model built
   from the same config after torch.manual_seed(seed), AdamW with the same groups and settings, the same
   warmup + cosine lr set by hand each step, clip_grad_norm_, mean cross-entropy. Its offsets are the ones
   ftlab's sampler draws for each step (nanoGPT would draw its own with torch.randint), so both train on the
   same windows and their per-step losses can be compared; ftlab's windows are recorded from its batches and
   checked against them, and its initial weights against the plain model's.
   tokens/s = predicted tokens of steps 2..N-1 / the wall time from the start of step 2 to the start of step
   N (a step's period includes whatever the trainer does after it before the next); model building, corpus
   checks and the first step are excluded. Runs alternate in this process, plain, ftlab, ftlab, plain, ...
   (`--repeats` pairs, the order flipped in every other pair, so neither trainer is always the second one),
   so load from other jobs on shared cores hits both alike; medians are reported.
   `--plain-fused` adds, after each pair, the plain loop with `torch.optim.AdamW(..., fused=True)` (torch's
   single-kernel AdamW, on the CPU since torch 2.4): the setting a careful hand-written loop would turn on
   (nanoGPT's train.py turns it on only on CUDA; transformers' Trainer defaults to it, "adamw_torch_fused",
   from torch 2.8). ftlab itself builds the plain `torch.optim.AdamW` (src/ftlab/train/optim.py).

The markdown goes to stdout and, unless --no-write, replaces the section "## Pretraining: ftlab vs a plain loop"
of docs/BENCHMARKS.md (other sections stay).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchlib import cpu_model, quiet_run, write_section  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
ABSTRACTS = REPO.parent / "shared" / "data" / "arxiv" / "abstracts_2007_first2000.jsonl"  # ../shared beside the checkout
RECIPE = REPO / "recipes" / "arxiv" / "tiny.yaml"
TOKENIZER = "smollm2-135m-instruct"  # prepare-corpus's default: the embedded model's tokenizer
SECTION = "## Pretraining: ftlab vs a plain loop"
VAL_FRACTION = TEST_FRACTION = 0.1  # as recipes/arxiv/tiny.yaml prepares its corpus


# -- input texts -----------------------------------------------------------------------------------------------
def generated_rows(n: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """A stand-in for the abstracts on a machine without ../shared: n documents over 18 categories, ~120
    pseudo-words each (syllable words, Zipf-like frequencies, some digits and LaTeX), about the same size."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "tra", "qu", "an", "ti", "on", "er", "pho", "ge", "ri", "sta", "ble"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    rows = []
    for i in range(n):
        words = rng.choices(vocab, weights, k=rng.randint(60, 180))
        for j in range(0, len(words), 17):
            words[j] = rng.choice([f"${rng.choice('xyzk')}^{rng.randint(2, 9)}$", str(rng.randint(1, 2000)), "the"])
        rows.append({"id": f"gen{i:05d}", "category": f"cat{i % 18:02d}",
                     "text": " ".join(words).capitalize() + "."})
    return rows


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return [{"id": r["id"], "category": r["category"], "text": r["text"]} for r in map(json.loads, f)]


def write_jsonl(rows: list[dict[str, str]], path: Path, copies: int = 1) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for c in range(copies):
            for r in rows:
                f.write(json.dumps({**r, "id": r["id"] if c == 0 else f"{r['id']}~{c}"}, ensure_ascii=False) + "\n")
    return path


# -- 1. tokenization -------------------------------------------------------------------------------------------
def prepare(src: Path, out: Path, workers: int) -> tuple[float, dict[str, Any]]:
    from ftlab.data.corpus import PrepareSettings, prepare_corpus

    shutil.rmtree(out, ignore_errors=True)
    s = PrepareSettings(input=str(src), out=str(out), tokenizer=TOKENIZER, workers=workers,
                        max_examples_per_split=None, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION)
    start = time.perf_counter()
    meta = prepare_corpus(s)
    return time.perf_counter() - start, meta


def plain_tokenize(tok: Any, texts: list[str], batch: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    if batch == 1:
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        ids = []
        for i in range(0, len(texts), batch):
            ids.extend(tok(texts[i:i + batch], add_special_tokens=False)["input_ids"])
    return time.perf_counter() - start, ids


def bench_tokenize(rows: list[dict[str, str]], copies: int, repeats: int, tmp: Path) -> dict[str, Any]:
    from ftlab.data.corpus import CHUNK_DOCS
    from ftlab.models.load import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(TOKENIZER))
    src = write_jsonl(rows, tmp / "tok_input.jsonl", copies)
    # the fixed cost of a call: one chunk per worker (a worker is spawned per chunk submitted while none is idle)
    small = {w: write_jsonl(rows[:max(1, w) * CHUNK_DOCS], tmp / f"tok_small_w{w}.jsonl") for w in (0, 1, 2)}
    texts = [r["text"] for r in rows] * copies
    variants: dict[str, Callable[[], tuple[float, Any]]] = {
        "plain, one call per text": lambda: plain_tokenize(tok, texts, 1),
        "plain, batches of 64": lambda: plain_tokenize(tok, texts, 64),
        **{f"ftlab prepare-corpus --workers {w}": (lambda w=w: prepare(src, tmp / f"tok_w{w}", w)) for w in (0, 1, 2)},
    }
    reference = None
    runs: dict[str, dict[str, Any]] = {k: {"seconds": [], "startup": [], "startup_tokens": 0} for k in variants}
    for rep in range(repeats):
        order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
        for name in order:
            seconds, out = variants[name]()
            r = runs[name]
            r["seconds"].append(seconds)
            if name.startswith("plain"):
                flat = np.fromiter((t for ids in out for t in ids), dtype=np.int64)
                if reference is None:
                    reference = flat
                r["tokens"], r["same_ids"] = int(flat.size), bool(np.array_equal(flat, reference))
            else:
                w = int(name.rsplit(" ", 1)[1])
                stored = np.fromfile(tmp / f"tok_w{w}" / "tokens.bin", dtype=out["dtype"]).astype(np.int64)
                r["tokens"], r["same_ids"] = int(out["tokens"]), bool(np.array_equal(stored, reference))
                r["documents"], r["dtype"] = out["documents"], out["dtype"]
                shutil.rmtree(tmp / f"tok_w{w}")
                seconds_small, meta_small = prepare(small[w], tmp / f"tok_small_w{w}", w)
                r["startup"].append(seconds_small)
                r["startup_tokens"] = int(meta_small["tokens"])
                shutil.rmtree(tmp / f"tok_small_w{w}")
            print(f"  tokenize {name:35s} {seconds:6.2f} s  {r['tokens'] / seconds:9.0f} tok/s"
                  + (f"  (small-input call {r['startup'][-1]:.2f} s)" if r["startup"] else "")
                  + f"  same ids {r['same_ids']}", flush=True)
            gc.collect()
    for r in runs.values():
        r["median_s"] = statistics.median(r["seconds"])
        r["tokens_per_s"] = r["tokens"] / r["median_s"]
        if r["startup"]:
            r["startup_s"] = statistics.median(r["startup"])
            r["after_startup_tokens_per_s"] = ((r["tokens"] - r["startup_tokens"])
                                               / max(r["median_s"] - r["startup_s"], 1e-9))
    return {"documents": len(texts), "copies": copies, "texts": len(rows), "chars": sum(map(len, texts)),
            "tokens": int(reference.size), "runs": runs}


# -- 2. window sampling ----------------------------------------------------------------------------------------
def rate(fn: Callable[[int], Any], steps: int) -> float:
    start = time.perf_counter()
    for s in range(steps):
        fn(s)
    return time.perf_counter() - start


def bench_windows(cfg: Any, corpus_dir: Path, steps: int) -> dict[str, Any]:
    from ftlab.data.corpus import Corpus
    from ftlab.data.windows import TRAIN_STREAM, WindowSampler
    from ftlab.models.load import load_tokenizer, resolve_model_path
    from ftlab.train.pretrain import build_objective

    p, n = cfg.pretrain, cfg.train.batch_size
    corpus = Corpus.open(corpus_dir)
    sampler = WindowSampler(corpus, p.train_split, None, p.seq_len, cfg.seed, TRAIN_STREAM)
    drawn: list[tuple[np.ndarray, np.ndarray]] = []
    out: dict[str, Any] = {"steps": steps, "per_step": n, "windows": steps * n, "pool": len(sampler.pool),
                           "dropped_short": sampler.dropped_short}
    out["draw_s"] = rate(lambda s: drawn.append(sampler.windows(s, n)), steps)

    def draw_and_read(s: int) -> np.ndarray:
        docs, offsets = sampler.windows(s + steps, n)  # steps not drawn yet (not the cached one)
        return np.stack([sampler.tokens(d, o) for d, o in zip(docs.tolist(), offsets.tolist())])

    out["read_s"] = rate(draw_and_read, steps)
    objective = build_objective(cfg, load_tokenizer(resolve_model_path(TOKENIZER)))
    plan = objective.plan
    out["collate_s"] = rate(lambda s: objective.collate(plan.step_indices(s)[0]), steps)
    data = np.memmap(corpus_dir / "tokens.bin", dtype=corpus.tokens.dtype, mode="r")
    seq = p.seq_len

    def nanogpt_batch(_: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - seq, (n,))
        x = torch.stack([torch.from_numpy(data[i:i + seq].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + seq].astype(np.int64)) for i in ix])
        return x, y

    out["nanogpt_s"] = rate(nanogpt_batch, steps)
    # recoverable: a fresh sampler, steps in reverse order, nothing but (seed, step)
    fresh = WindowSampler(Corpus.open(corpus_dir), p.train_split, None, p.seq_len, cfg.seed, TRAIN_STREAM)
    pool = set(fresh.pool.tolist())
    ok = 0
    for s in reversed(range(steps)):
        docs, offsets = fresh.windows(s, n)
        a_docs, a_off = drawn[s]
        inside = (offsets >= 0) & (offsets + seq + 1 <= corpus.length[docs])
        same = (docs == a_docs) & (offsets == a_off) & inside & np.fromiter((d in pool for d in docs.tolist()), bool)
        ok += int(same.sum())
    out["recoverable"] = ok
    return out


# -- 3. training -----------------------------------------------------------------------------------------------
def recipe(corpus_dir: Path, workdir: Path, steps: int | None) -> Any:
    from ftlab.config import load_recipe

    overrides = [f"pretrain.corpus={corpus_dir}", f"output_dir={workdir}/runs", "name=bench",
                 "train.eval_every=null", "train.best_metric=null", "train.save_every=null", "train.save_final=false",
                 "train.log_every=1"]
    cfg = load_recipe(RECIPE, overrides)
    t = cfg.train
    if steps is None:  # the recipe's length: its token budget
        steps = math.ceil(t.token_budget / (t.batch_size * t.grad_accum * cfg.pretrain.seq_len))
    return load_recipe(RECIPE, overrides + [f"train.max_steps={steps}"])


def step_windows(cfg: Any, corpus_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(documents, offsets) of every step, as ftlab's sampler draws them (one process, no accumulation)."""
    from ftlab.data.corpus import Corpus
    from ftlab.data.windows import TRAIN_STREAM, WindowSampler

    p = cfg.pretrain
    sampler = WindowSampler(Corpus.open(corpus_dir), p.train_split, None, p.seq_len, cfg.seed, TRAIN_STREAM)
    return [tuple(a.copy() for a in sampler.windows(s, cfg.train.batch_size)) for s in range(cfg.train.max_steps)]


def timing(starts: list[tuple[float, float]], tokens_per_step: int) -> dict[str, Any]:
    """starts[i] = (wall, CPU) at the start of step i+1; the window is steps 2 .. N-1."""
    if len(starts) < 3:
        raise SystemExit("need at least 3 steps (the first is warm-up, the last only closes the window)")
    wall, cpu = starts[-1][0] - starts[1][0], starts[-1][1] - starts[1][1]
    tokens = (len(starts) - 2) * tokens_per_step
    return {"measured_steps": len(starts) - 2, "measured_s": wall, "measured_cpu_s": cpu,
            "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu,
            "step_ms": [1000 * (b[0] - a[0]) for a, b in zip(starts[1:], starts[2:])]}


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_ftlab(cfg: Any) -> dict[str, Any]:
    from ftlab.train.loop import Loop
    from ftlab.train.pretrain import PretrainObjective, run_pretrain

    starts: list[tuple[float, float]] = []
    losses: list[float] = []
    norms: list[float] = []
    windows: list[tuple[list[int], list[int]]] = []
    held: dict[str, Any] = {}
    original_step, original_collate = Loop.step, PretrainObjective.collate
    original_before = PretrainObjective.before_training

    def before(self: Any, loop: Any) -> None:
        model = loop.accelerator.unwrap_model(loop.model)
        held["model"] = model  # the loop gives its model back (Loop.release) when training ends
        held["initial"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        original_before(self, loop)

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        starts.append(clock())
        stats = original_step(self, *args, **kwargs)
        if stats is not None:
            losses.append(float(stats["loss"]))
            norms.append(float(stats["grad_norm"]))
        return stats

    def collate(self: Any, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = original_collate(self, indices)
        windows.append((batch["doc"].tolist(), batch["offset"].tolist()))
        return batch

    t0 = time.perf_counter()
    Loop.step, PretrainObjective.collate, PretrainObjective.before_training = step, collate, before
    try:
        run = run_pretrain(cfg)
    finally:
        Loop.step, PretrainObjective.collate, PretrainObjective.before_training = (original_step, original_collate,
                                                                                   original_before)
    final = {k: v.detach().clone() for k, v in held.pop("model").state_dict().items()}
    out = timing(starts, cfg.train.batch_size * cfg.pretrain.seq_len)
    out.update(setup_s=starts[0][0] - t0, losses=losses, grad_norms=norms, windows=windows,
               initial=held["initial"], final=final, run=str(run.path))
    return out


def lr_at(cfg: Any, it: int, total: int) -> float:
    """The recipe's schedule written out (warmup from 0, then cosine to 0 / constant / linear to 0)."""
    base, warmup, name = cfg.optim.lr, cfg.schedule.warmup_steps, cfg.schedule.name
    if it < warmup:
        return base * it / max(1, warmup)
    progress = (it - warmup) / max(1, total - warmup)
    if name == "cosine":
        return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if name == "linear":
        return base * max(0.0, 1.0 - progress)
    if name == "constant":
        return base
    raise SystemExit(f"the plain loop has no schedule {name!r}")


def run_plain(cfg: Any, corpus_dir: Path, windows: list[tuple[np.ndarray, np.ndarray]], vocab: int,
              special: dict[str, int | None], fused: bool = False) -> dict[str, Any]:
    """A nanoGPT-style loop: memmap, offsets, forward, mean cross-entropy, backward, clip, AdamW."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftlab.data.corpus import Corpus

    t0 = time.perf_counter()
    o, t, T = cfg.optim, cfg.train, cfg.pretrain.seq_len
    corpus = Corpus.open(corpus_dir)  # only for the documents' start offsets: window -> global token offset
    data = np.memmap(corpus_dir / "tokens.bin", dtype=corpus.tokens.dtype, mode="r")
    offsets = [corpus.offset[docs] + offs for docs, offs in windows]  # nanoGPT: ix = torch.randint(...)

    def get_batch(it: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix = offsets[it]
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    scratch = dict(cfg.model.scratch)
    model_type = scratch.pop("model_type")
    config = AutoConfig.for_model(model_type, **scratch, vocab_size=vocab, **special)
    config._attn_implementation = cfg.model.attn_implementation
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # fused=True: torch's one-kernel AdamW (CPU since torch 2.4), what a careful user turns on (--plain-fused)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **({"fused": True} if fused else {}))
    starts: list[tuple[float, float]] = []
    losses: list[float] = []
    norms: list[float] = []
    setup = time.perf_counter() - t0
    for it in range(t.max_steps):
        starts.append(clock())
        lr = lr_at(cfg, it, t.max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = get_batch(it)
        logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        norms.append(float(norm))
    out = timing(starts, t.batch_size * T)
    out.update(setup_s=setup, losses=losses, grad_norms=norms, initial=initial,
               final={k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return math.inf
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def bench_train(cfg: Any, corpus_dir: Path, repeats: int, plain_fused: bool = False) -> dict[str, Any]:
    from ftlab.models.load import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(cfg.model.tokenizer or TOKENIZER))
    special = {k: getattr(tok, k, None) for k in ("pad_token_id", "eos_token_id", "bos_token_id")}
    windows = step_windows(cfg, corpus_dir)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "ftlab": [], **({"plain_fused": []} if plain_fused else {})}
    for rep in range(repeats):
        order = ["plain", "ftlab"] if rep % 2 == 0 else ["ftlab", "plain"]  # ABBA: drift hits both alike
        order += ["plain_fused"] if plain_fused else []
        for who in order:
            t0 = time.perf_counter()
            r = (run_ftlab(cfg) if who == "ftlab" else
                 run_plain(cfg, corpus_dir, windows, len(tok), special, fused=who == "plain_fused"))
            runs[who].append(r)
            print(f"  train {who:5s} run {rep + 1}: {r['tokens_per_s']:7.1f} tok/s  {r['tokens_per_cpu_s']:7.1f} "
                  f"tok/CPU-s  median step {statistics.median(r['step_ms']):.0f} ms  setup {r['setup_s']:.1f} s  "
                  f"losses {[round(x, 4) for x in r['losses'][:3]]} .. {r['losses'][-1]:.4f}  "
                  f"load {os.getloadavg()[0]:.2f}  (run {time.perf_counter() - t0:.0f} s)", flush=True)
            gc.collect()
    p, f = runs["plain"][0], runs["ftlab"][0]
    want = [(d.tolist(), o.tolist()) for d, o in windows]
    checks = {
        "steps": cfg.train.max_steps, "tokens_per_step": cfg.train.batch_size * cfg.pretrain.seq_len,
        "same_windows": all(r["windows"] == want for r in runs["ftlab"]),
        "initial_weights_diff": max(max_diff(r["initial"], p["initial"]) for r in runs["ftlab"] + runs["plain"]),
        "max_loss_diff": max(abs(a - b) for a, b in zip(f["losses"], p["losses"])),
        "max_rel_grad_norm_diff": max(abs(a - b) / b for a, b in zip(f["grad_norms"], p["grad_norms"])),
        "final_weights_diff": max_diff(f["final"], p["final"]),
        "repeatable": all(r["losses"] == runs[w][0]["losses"] for w in runs for r in runs[w]),
        "loss_steps": len(f["losses"]) == len(p["losses"]) == cfg.train.max_steps,
    }
    summary: dict[str, Any] = {"checks": checks, "losses": {"plain": p["losses"], "ftlab": f["losses"]}}
    for who, rs in runs.items():
        summary[who] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                        "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in rs),
                        "step_ms": statistics.median(statistics.median(r["step_ms"]) for r in rs),
                        "setup_s": statistics.median(r["setup_s"] for r in rs),
                        "runs": [round(r["tokens_per_s"], 1) for r in rs]}
    summary["ratios"] = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["ftlab"], runs["plain"])]
    summary["ratio"] = summary["ftlab"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
    summary["ratio_cpu"] = summary["ftlab"]["tokens_per_cpu_s"] / summary["plain"]["tokens_per_cpu_s"]
    if plain_fused:
        q = runs["plain_fused"][0]
        summary["ratio_vs_fused"] = summary["ftlab"]["tokens_per_s"] / summary["plain_fused"]["tokens_per_s"]
        summary["fused_max_loss_diff"] = max(abs(a - b) for a, b in zip(q["losses"], p["losses"]))
    return summary


# -- report ----------------------------------------------------------------------------------------------------
def versions() -> str:
    import accelerate
    import tokenizers
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"tokenizers {tokenizers.__version__}, accelerate {accelerate.__version__}, numpy {np.__version__}")


def machine() -> str:
    return f"{os.cpu_count()}-CPU {cpu_model()} ({platform.machine()}), torch threads {torch.get_num_threads()}"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/ftlab"], check=False, cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return head + (" (src/ftlab modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def report(a: argparse.Namespace, meta: dict[str, Any], tok: dict[str, Any] | None, win: dict[str, Any] | None,
           tr: dict[str, Any] | None) -> str:
    L = [SECTION, "",
         "`benchmarks/bench_pretrain.py`: ftlab's pretraining code next to hand-written baselines, in one process "
         "(the script's docstring has every detail).", "",
         f"Command: `{meta['command']}`  ",
         f"Date: {meta['date']} ({meta['total_s']:.0f} s), ftlab at {meta['commit']}; {meta['versions']}.  ",
         f"Machine: {meta['machine']}; load average {meta['load_before']} before, {meta['load_after']} after.  ",
         f"Data: {meta['data']}.", ""]
    if tok:
        plain = tok["runs"]["plain, one call per text"]["tokens_per_s"]
        L += [f"**Tokenization** ({tok['documents']:,} documents = {tok['copies']} x {tok['texts']:,} texts, {tok['chars']:,} "
              f"characters, {tok['tokens']:,} tokens; embedded model's tokenizer, no special tokens; median of "
              f"{a.tok_repeats} alternating runs):", "",
              "| path | wall s | tokens/s | vs plain loop | small-input call s | tokens/s beyond it | same token ids |",
              "|---|---:|---:|---:|---:|---:|---|"]
        for name, r in tok["runs"].items():
            L.append(f"| {name} | {r['median_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / plain:.2f}x | "
                     + (f"{r['startup_s']:.2f} | {r['after_startup_tokens_per_s']:,.0f}" if r["startup"] else "- | -")
                     + f" | {'yes' if r['same_ids'] and r['tokens'] == tok['tokens'] else '**no**'} |")
        L += ["", "ftlab rows are whole `prepare_corpus` calls (read, split, encode, write the corpus files); plain "
              "rows only encode texts already in memory. Small-input call: the same call on the first 64 texts per "
              "worker (64 for --workers 0), i.e. its fixed cost (tokenizer load and hash; spawning each worker, "
              "which rebuilds the Rust tokenizer from the main process's); tokens/s beyond it = (tokens - its "
              "tokens) / (wall - its wall), the rate once the workers run.", ""]
    if win:
        n = win["windows"]
        rows = [("ftlab `WindowSampler.windows`: (document, offset) pairs", win["draw_s"]),
                ("ftlab `WindowSampler`: pairs + their tokens from the memmap", win["read_s"]),
                ("ftlab `PretrainObjective.collate`: the loop's batch tensors", win["collate_s"]),
                ("nanoGPT `torch.randint` offsets + x/y slices of the memmap", win["nanogpt_s"])]
        L += [f"**Window sampling** ({win['steps']:,} steps x {win['per_step']} windows of {meta['seq_len'] + 1} "
              f"tokens; training pool {win['pool']:,} documents, {win['dropped_short']} shorter than a window "
              f"dropped):", "", "| sampler | windows/s | us per window |", "|---|---:|---:|"]
        L += [f"| {name} | {n / s:,.0f} | {1e6 * s / n:.1f} |" for name, s in rows]
        L += ["", f"Recoverable from (seed, step) alone (a fresh sampler, steps in reverse order, window inside its "
              f"document): **{win['recoverable']:,} / {n:,}** windows.", ""]
    if tr:
        c = tr["checks"]
        L += [f"**Training** (llama-tiny as recipes/arxiv/tiny.yaml, fp32, {c['steps']} steps of "
              f"{c['tokens_per_step']:,} predicted tokens; tokens/s over steps 2..{c['steps'] - 1}; "
              f"{a.repeats} pairs of runs in the order plain, ftlab, ftlab, plain, ...; medians):", "",
              "| trainer | tokens/s | runs | tokens/CPU-s | ms per step | setup s | vs plain |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for who, label in (("plain", "plain nanoGPT-style loop"), ("ftlab", "ftlab `train.method: pretrain`"),
                           ("plain_fused", "plain loop, `torch.optim.AdamW(..., fused=True)`")):
            if who not in tr:
                continue
            r = tr[who]
            ratio = ("1.00x" if who == "plain" else f"**{tr['ratio']:.3f}x** (CPU {tr['ratio_cpu']:.3f}x)"
                     if who == "ftlab" else f"{r['tokens_per_s'] / tr['plain']['tokens_per_s']:.3f}x (ftlab / this: "
                     f"{tr['ratio_vs_fused']:.3f}x; max loss diff vs plain {tr['fused_max_loss_diff']:.1e})")
            L.append(f"| {label} | {r['tokens_per_s']:.1f} | {', '.join(map(str, r['runs']))} | "
                     f"{r['tokens_per_cpu_s']:.1f} | {r['step_ms']:.0f} | {r['setup_s']:.1f} | {ratio} |")
        verdict = "met" if tr["ratio"] >= 0.95 else "**not met**"
        same_init = "yes" if c["initial_weights_diff"] == 0 else f"**no** (max diff {c['initial_weights_diff']:.2g})"
        L += ["", f"- Target ftlab >= 0.95x the plain loop: {verdict} ({tr['ratio']:.3f}x; per pair "
              f"{', '.join(f'{x:.3f}x' for x in tr['ratios'])}).",
              f"- Same windows at every step (ftlab's batches vs the plain loop's offsets): "
              f"{'yes' if c['same_windows'] else '**no**'}; same initial weights: {same_init}; every run repeats "
              f"its losses bit for bit: {'yes' if c['repeatable'] else '**no**'}.",
              f"- Loss curves: max per-step difference **{c['max_loss_diff']:.2e}** over {c['steps']} steps "
              f"(first {tr['losses']['ftlab'][0]:.4f}, last ftlab {tr['losses']['ftlab'][-1]:.4f} / plain "
              f"{tr['losses']['plain'][-1]:.4f}); gradient norms within {c['max_rel_grad_norm_diff']:.1e} "
              f"(relative); final weights within {c['final_weights_diff']:.1e}. ftlab sums the loss and divides by "
              f"the step's tokens, the plain loop takes the mean: the same value up to float rounding"
              + (" (here bit for bit: the gradient scale 1/tokens is exact for a power of two)."
                 if c["max_loss_diff"] == 0 and c["final_weights_diff"] == 0 else "."), ""]
    return "\n".join(L).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--data", type=Path, default=ABSTRACTS, help="JSONL with id, category, text (default: the abstracts)")
    p.add_argument("--generated", action="store_true", help="use the generated corpus even where --data exists")
    p.add_argument("--tok-copies", type=int, default=3, help="tokenize the corpus this many times over")
    p.add_argument("--tok-docs", type=int, default=None, help="tokenize only the first N documents (quick looks)")
    p.add_argument("--tok-repeats", type=int, default=3, help="alternating runs of each tokenization path")
    p.add_argument("--sample-steps", type=int, default=5000, help="steps of windows drawn per sampling measurement")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's budget)")
    p.add_argument("--repeats", type=int, default=2, help="(plain, ftlab) training pairs")
    p.add_argument("--plain-fused", action="store_true",
                   help="also run the plain loop with fused AdamW (fused=True) after each training pair")
    p.add_argument("--skip", default="", help="comma list of parts to leave out: tokenize, windows, train")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help=f"print only; do not touch {SECTION!r} in --out")
    a = p.parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if skip - {"tokenize", "windows", "train"}:
        p.error(f"--skip: unknown part(s) {', '.join(sorted(skip - {'tokenize', 'windows', 'train'}))}")
    quiet_run(a.threads)

    real = a.data.is_file() and not a.generated
    rows = read_rows(a.data) if real else generated_rows()
    meta: dict[str, Any] = {
        "command": "python benchmarks/bench_pretrain.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit(), "versions": versions(), "machine": machine(),
        "load_before": load_average(),
        "data": (f"{a.data.name} ({len(rows):,} arXiv abstracts, {len({r['category'] for r in rows})} archives)" if real
                 else f"generated corpus ({len(rows):,} documents, 18 categories; {a.data} not found)")}
    print(f"# {meta['data']}; {meta['machine']}; load average {meta['load_before']}", flush=True)
    t_all = time.perf_counter()
    tok = win = tr = None
    with tempfile.TemporaryDirectory(prefix="bench_pretrain.") as tmp_name:
        tmp = Path(tmp_name)
        if "tokenize" not in skip:
            tok = bench_tokenize(rows[:a.tok_docs], a.tok_copies, a.tok_repeats, tmp)
        corpus_dir = tmp / "corpus"  # the training corpus: the texts once, as recipes/arxiv/tiny.yaml prepares it
        prepare(write_jsonl(rows, tmp / "corpus.jsonl"), corpus_dir, 0)
        cfg = recipe(corpus_dir, tmp, a.steps)
        meta["seq_len"] = cfg.pretrain.seq_len
        if "windows" not in skip:
            win = bench_windows(cfg, corpus_dir, a.sample_steps)
            print(f"  windows: {win['windows'] / win['draw_s']:,.0f}/s drawn, {win['windows'] / win['read_s']:,.0f}/s "
                  f"with tokens, {win['windows'] / win['collate_s']:,.0f}/s collated, nanoGPT "
                  f"{win['windows'] / win['nanogpt_s']:,.0f}/s; recoverable {win['recoverable']}/{win['windows']}",
                  flush=True)
        if "train" not in skip:
            tr = bench_train(cfg, corpus_dir, a.repeats, a.plain_fused)
    meta["total_s"], meta["load_after"] = time.perf_counter() - t_all, load_average()
    text = report(a, meta, tok, win, tr)
    print("\n" + text)
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "tokenize": tok, "windows": win, "train": tr}, indent=2,
                                     default=str))
    if not a.no_write:
        write_section(a.out, SECTION, text)
        print(f"wrote {SECTION!r} in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
