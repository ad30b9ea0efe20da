"""The main job: teach the embedded SmolLM2-135M-Instruct multi-hop logic on a laptop CPU.

    generate PrOntoQA-style training data (ftlab's own generator)
    -> evaluate the base model zero-shot on held-out problems, one set per hop count (the authors' file for a
       hop count where there is one, else generated problems)
    -> SFT, LoRA by default (train.precision: auto; full fine-tuning with lora.enabled=false)
    -> evaluate the tuned model on the identical prompts
    -> report.md + plots (training loss, accuracy by hop count with intervals); see quickstart_report

Training and evaluation both use the recipe's task (`data.task`, `data.task_options`): with `sokrates` the
targets are Thought/Action proofs and every step of an output is checked by the verifier.
"""
from __future__ import annotations

import json
import logging
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab import quickstart_report as qr
from ftlab.data.jsonl import write_jsonl
from ftlab.errors import UserError
from ftlab.runs import report as rp
from ftlab.runs.rundir import RunDir, write_json

log = logging.getLogger("ftlab")


def make_training_set(cfg: DictConfig, out: Path) -> Path:
    from ftlab.tasks import generate_prontoqa

    q = cfg.quickstart
    records = generate_prontoqa(q.train_examples, hops=list(q.train_hops), seed=q.data_seed,
                                more_queries=q.more_queries, lookups=q.lookups)
    write_jsonl(out, records)
    return out


def heldout_sizes(cfg: DictConfig) -> dict[int, int]:
    q = cfg.quickstart
    if len(q.heldout_hops) != len(q.heldout_sizes):
        raise UserError(f"quickstart.heldout_hops has {len(q.heldout_hops)} entries but heldout_sizes has "
                        f"{len(q.heldout_sizes)}; give one size per hop count")
    return {int(h): int(n) for h, n in zip(q.heldout_hops, q.heldout_sizes)}


@dataclass(frozen=True)
class HeldoutSet:
    path: Path
    skip: int        # rows skipped at the start of the file (quickstart.heldout_offset, authors' files only)
    authors: bool    # the authors' generator test file, else ftlab-generated problems


def heldout_sets(cfg: DictConfig, data_dir: Path) -> tuple[dict[int, HeldoutSet], str]:
    """Per hop count, the authors' file `{heldout_dir}/generator_{h}hop_test.jsonl` where it exists, else
    ftlab-generated problems (a disjoint seed); and a sentence saying which hop count used which."""
    from ftlab.tasks import generate_prontoqa

    q = cfg.quickstart
    sizes = heldout_sizes(cfg)
    real = Path(q.heldout_dir)
    sets = {}
    for h, n in sizes.items():
        authors = real / f"generator_{h}hop_test.jsonl"
        if authors.is_file():
            sets[h] = HeldoutSet(authors, int(q.heldout_offset), True)
        else:
            sets[h] = HeldoutSet(data_dir / f"heldout_{h}hop.jsonl", 0, False)
            write_jsonl(sets[h].path, generate_prontoqa(n, hops=h, seed=q.heldout_seed + h))
    parts = []
    theirs = [h for h in sizes if sets[h].authors]
    ours = [h for h in sizes if not sets[h].authors]
    if theirs:
        parts.append(f"the authors' PrOntoQA generator test files in {real} for "
                     + ", ".join(f"{h}-hop (rows {q.heldout_offset + 1}-{q.heldout_offset + sizes[h]})"
                                 for h in theirs))
    if ours:
        parts.append("ftlab-generated held-out problems for "
                     + ", ".join(f"{h}-hop ({sizes[h]})" for h in ours)
                     + f" (no authors' file for that hop count in {real}; seed {q.heldout_seed}+hops)")
    return sets, "; ".join(parts)


def load_heldout(task: Any, held: HeldoutSet, n: int) -> list:
    """The set's examples: `n` rows after the skipped ones, in file order (skipped in the file, before the
    task leaves out problems it cannot read, so an offset always names the same rows)."""
    located = task.load_records(str(held.path), limit=held.skip + n)[held.skip:]
    if not located:
        raise UserError(f"{held.path} has no rows after the first {held.skip} (quickstart.heldout_offset)")
    return task.examples_from(located)


def evaluate_all(model: Any, tokenizer: Any, task: Any, examples: dict[int, list], cfg: DictConfig,
                 out_dir: Path, label: str) -> tuple[dict[int, list[dict]], dict[int, dict]]:
    """Every held-out set with one model: ({hops: rows}, {hops: metrics}); rows and metrics also on disk."""
    from ftlab.evaluate import evaluate_examples
    from ftlab.models.load import release_memory

    rows, metrics = {}, {}
    for hops, exs in examples.items():
        log.info("evaluating %s on %d %d-hop problems", label, len(exs), hops)
        rows[hops], metrics[hops] = evaluate_examples(model, tokenizer, task, exs, cfg.eval, cfg.seed)
        write_jsonl(out_dir / f"predictions_{label}_{hops}hop.jsonl", rows[hops])
        release_memory()  # the engine's KV slots of this set
    write_json(out_dir / f"metrics_{label}.json", {str(h): m for h, m in metrics.items()})
    return rows, metrics


def load_tuned(cfg: DictConfig, final: Path) -> tuple[Any, Any]:
    """The trained model: the LoRA adapter on its base, or the fully fine-tuned weights."""
    from ftlab.models.load import load_model_and_tokenizer

    if cfg.lora.enabled:
        return load_model_and_tokenizer(cfg.model, adapter=str(final))
    return load_model_and_tokenizer(OmegaConf.merge(cfg.model, {"name": str(final), "adapter": None}))


def method_sentence(cfg: DictConfig) -> str:
    detached = (", the prompt's keys and values computed without gradient (train.detach_prompt: an approximate "
                "gradient, see docs/BENCHMARKS.md)") if cfg.train.detach_prompt else ""
    if cfg.lora.enabled:
        where = f", last {cfg.lora.last_layers} layers" if cfg.lora.last_layers else ""
        return (f"LoRA (r={cfg.lora.r}, alpha={cfg.lora.alpha}, targets {list(cfg.lora.target_modules)}{where})"
                + detached)
    return "full fine-tuning (all weights)" + detached


@contextmanager
def timed(phases: dict[str, float], peaks: dict[str, float | None], name: str) -> Iterator[None]:
    """The phase's wall seconds into `phases[name]` and its own peak resident memory (MB) into `peaks[name]`."""
    started = time.time()
    sampler = PhasePeak()
    try:
        yield
    finally:
        peak = sampler.stop()  # also when the phase fails: the sampling thread ends with it
    phases[name] = round(time.time() - started, 2)
    peaks[name] = peak


class PhasePeak:
    """A phase's own peak resident memory (Linux), without touching the process's peak counter, so that
    `/usr/bin/time -v` still reports the whole job's peak. When the phase sets a new high for the process, the
    kernel's VmHWM is that peak exactly; otherwise (a later, smaller phase) the peak is the largest VmRSS a
    thread sampled every 20 ms. Elsewhere than Linux, stop() gives None."""

    def __init__(self) -> None:
        self.high_before = proc_status_kb("VmHWM")
        self.largest = proc_status_kb("VmRSS") or 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.high_before is not None:
            self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.largest = max(self.largest, proc_status_kb("VmRSS") or 0)

    def stop(self) -> float | None:
        if self.high_before is None:
            return None
        self._done.set()
        self._thread.join()
        high = proc_status_kb("VmHWM") or 0
        return round((high if high > self.high_before else self.largest) / 1024, 1)


def proc_status_kb(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), or None where there is none."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":")), None)


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and whether the flags that decide bf16 speed are present (None: unknown)."""
    info = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not info.is_file():
        return {"model": platform.processor() or "unknown", "avx512f": None, "avx512_bf16": None, "amx": None}
    fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name") or platform.processor() or "unknown",
            "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx": any(f.startswith("amx") for f in flags)}


def run_quickstart(cfg: DictConfig) -> RunDir:
    from ftlab.models.load import load_model_and_tokenizer, release_memory
    from ftlab.tasks import get_task
    from ftlab.train.sft import run_sft

    started = time.time()
    phases: dict[str, float] = {}
    peaks: dict[str, float | None] = {}  # each phase's own peak RSS, MB: where the job's memory goes
    run = RunDir.create(cfg.output_dir, "quickstart", cfg.name, cfg, cfg.seed)
    try:
        task = get_task(cfg.data.task, **cfg.data.task_options)
        with timed(phases, peaks, "data"):
            data_dir = run.path / "data"
            train_path = make_training_set(cfg, data_dir / "train.jsonl")
            sets, provenance = heldout_sets(cfg, data_dir)
            sizes = heldout_sizes(cfg)
            examples = {h: load_heldout(task, held, sizes[h]) for h, held in sets.items()}
        log.info("held-out evaluation uses %s", provenance)
        run.update_summary(heldout=provenance)

        with timed(phases, peaks, "base_eval"):
            base, tokenizer = load_model_and_tokenizer(cfg.model)
            rows, metrics = {}, {}
            rows["base"], metrics["base"] = evaluate_all(base, tokenizer, task, examples, cfg, run.path, "base")
            del base
            release_memory()  # each phase's peak then starts from what is alive, not from the last phase's peak

        with timed(phases, peaks, "sft"):
            sft_cfg = OmegaConf.merge(cfg, {"data": {"train": str(train_path)}, "output_dir": str(run.path),
                                            "kind": "sft"})
            sft_run = run_sft(sft_cfg)
            run.log_to_file()  # the SFT run had taken over the log file handler
            release_memory()
        with timed(phases, peaks, "tuned_eval"):
            tuned, tokenizer = load_tuned(cfg, sft_run.path / "final")
            rows["tuned"], metrics["tuned"] = evaluate_all(tuned, tokenizer, task, examples, cfg, run.path,
                                                           "tuned")

        with timed(phases, peaks, "report"):
            body, summary = build_report(cfg, run, sft_run, rows, metrics, examples, provenance)
        cpu = cpu_description()
        summary.update(phases=phases, phase_peak_rss_mb=peaks, cpu=cpu, minutes=round((time.time() - started) / 60, 2))
        (run.path / "report.md").write_text(
            f"{body}\n{qr.timing_line(phases, cpu, peaks)} Whole job: {summary['minutes']:.1f} min.\n",
            encoding="utf-8")
    except KeyboardInterrupt:
        run.finish("interrupted")
        raise
    except BaseException as e:
        run.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    run.finish("complete", **summary)
    print_summary(run, summary)
    return run


def build_report(cfg: DictConfig, run: RunDir, sft_run: RunDir, rows: dict, metrics: dict, examples: dict,
                 provenance: str) -> tuple[str, dict]:
    """report.md's text (all but the timings, measured around this) and the summary's per-hop metrics."""
    train_hops = list(cfg.quickstart.train_hops)
    per_hop = qr.hop_metrics(rows, metrics, train_hops)
    hops = list(per_hop)
    rp.plot_loss(sft_run.metrics_path, run.path / "training_loss.png",
                 f"{'LoRA' if cfg.lora.enabled else 'full'} SFT on generated PrOntoQA")
    qr.plot_hops(per_hop, run.path / "accuracy_by_hops.png")
    sft_summary = json.loads((sft_run.path / "summary.json").read_text())
    rule = metrics["base"][hops[0]].get("extraction_rule", "")
    ex_hops, middle = qr.example_set(per_hop, train_hops)
    text = f"""# ftlab quickstart: multi-hop logic on a laptop CPU

Model: `{cfg.model.name}`, {method_sentence(cfg)},
trained on {cfg.quickstart.train_examples} ftlab-generated PrOntoQA problems ({train_hops} hops),
{sft_summary.get('steps')} optimizer steps, batch {cfg.train.batch_size} x accumulation {cfg.train.grad_accum},
lr {cfg.optim.lr}, precision {cfg.train.precision}, {sft_summary.get('step_tokens_per_s') or 0:.0f} training tokens/s
(the steps alone; {sft_summary.get('tokens_per_s') or 0:.0f} by wall clock, evaluation and checkpoints included).

Task: `{cfg.data.task}` {dict(cfg.data.task_options)}. Training targets: {qr.proof_sentence(cfg)}

Held-out evaluation: {provenance}. Zero-shot prompts, identical before and after, chat template,
greedy decoding, at most {cfg.eval.max_new_tokens} new tokens.
Accuracy uses the extraction rule: {rule}
Step validity is valid steps over all steps of the set's outputs (its interval resamples problems); fully valid
means every step valid, ending in CONCLUDE, with the right verdict (n/a: no output had a step, or the task
checks no steps). Lifts are tuned minus base on the same rows, with a paired bootstrap 95% interval.
All intervals are 95%.
{qr.ood_sentence(per_hop, train_hops)}

{qr.hop_table(per_hop)}

![accuracy by hops](accuracy_by_hops.png)

![training loss](training_loss.png)

{qr.examples_section(rows["tuned"][ex_hops], examples[ex_hops], ex_hops, middle)}
{qr.first_problem_before_after(run.path, hops[len(hops) // 2])}

Training run: `{sft_run.path}`.
Predictions: `predictions_base_*hop.jsonl`, `predictions_tuned_*hop.jsonl`.
"""
    summary = {"accuracy_before": {str(h): m["base"]["accuracy"] for h, m in per_hop.items()},
               "accuracy_after": {str(h): m["tuned"]["accuracy"] for h, m in per_hop.items()},
               "hops": {str(h): m for h, m in per_hop.items()}, "extraction_rule": rule,
               "heldout": provenance, "sft_run": str(sft_run.path), "report": str(run.path / "report.md")}
    return text, summary


def print_summary(run: RunDir, s: dict) -> None:
    lines = ["", "=" * 72, "ftlab quickstart finished in %.1f min" % s["minutes"], "-" * 72,
             f"{'held-out set':<14}{'base acc':>10}{'tuned acc':>10}{'lift':>8}{'base fully valid':>17}"
             f"{'tuned':>8}"]
    for h, m in s["hops"].items():
        name = f"{h}-hop" + ("" if m["trained_on"] else " (OOD)")
        lines.append(f"{name:<14}{qr.pct(m['base']['accuracy']):>10}{qr.pct(m['tuned']['accuracy']):>10}"
                     f"{100 * m['lift_accuracy']['diff']:>+8.1f}{qr.pct(m['base']['fully_valid']):>17}"
                     f"{qr.pct(m['tuned']['fully_valid']):>8}")
    lines += ["-" * 72, f"data:    {s['heldout']}", f"report:  {s['report']}",
              f"plots:   {run.path / 'accuracy_by_hops.png'}", f"         {run.path / 'training_loss.png'}",
              f"model:   {s['sft_run']}/final", "=" * 72]
    print("\n".join(lines))
