"""Run directories as a report reads them: training (SFT, DPO, GRPO, pretraining), evaluation and loop runs,
and sweep directories expanded to their runs. Nothing here fails on a damaged or half-written run: what
cannot be read becomes a line in `Run.problems` and the report says it.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ftlab.config.load import flatten
from ftlab.errors import UserError
from ftlab.runs.trackers import read_metrics

# Keys each training method logs as its loss units per step: the tokens the run has learned from.
TOKEN_UNITS = ("train/supervised_tokens", "train/predicted_tokens", "train/completion_tokens")
RUN_FILES = ("summary.json", "metrics.jsonl", "env.json")
MODEL_FOLDERS = ("final", "best", "merged")
EXAMPLES = re.compile(r"\bsteps? \(\d+ per epoch\), (\d+) examples")


@dataclass
class Run:
    """One run as read from its directory. `rows` are metric rows on the train_step / eval_step axes (a loop's
    iterations become eval steps); `result` holds an evaluation's metrics.json (a loop: its last row)."""

    path: Path
    kind: str
    status: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, Any] = field(default_factory=dict)  # config of the training run an evaluation scored
    origin_path: Path | None = None
    problems: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def last_step(self) -> int | None:
        steps = [r.get("train_step", r.get("eval_step")) for r in self.rows]
        steps = [s for s in steps if isinstance(s, (int, float))]
        return int(max(steps)) if steps else self.summary.get("steps")

    def setting(self, key: str) -> Any:
        """A config value; for an evaluation, the training run's value where it scored one (data.limit of the
        adapter it evaluated)."""
        if self.kind == "eval" and key in self.origin and key not in ("seed", "model.name", "model.adapter"):
            return self.origin[key]
        return self.config.get(key)


# -- finding runs ------------------------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (any((path / f).is_file() for f in RUN_FILES) or (path / "recipe.json").is_file())


def is_sweep_dir(path: Path) -> bool:
    if (path / "points.json").is_file():
        return True
    summary = read_json(path / "summary.json", [])
    return isinstance(summary, dict) and summary.get("kind") == "sweep"


def sweep_members(sweep: Path) -> list[tuple[Path, str | None]]:
    """(run path, status the sweep recorded) of every point: points.json ({"points": [...]} or a list of
    {"run", "status"}), else summary.json's `runs` list. A point that never started has no run path."""
    problems: list[str] = []
    if (sweep / "points.json").is_file():
        data = read_json(sweep / "points.json", problems)
        points = data.get("points", []) if isinstance(data, dict) else data
        found = [(p.get("run"), p.get("status")) for p in points if isinstance(p, dict)]
    else:
        found = [(r, None) for r in read_json(sweep / "summary.json", problems).get("runs") or []
                 if isinstance(r, str)]
    return [(locate(sweep, run) if run else sweep / f"(point {i + 1} not started)", status)
            for i, (run, status) in enumerate(found)]


def locate(sweep: Path, run: str) -> Path:
    """A sweep's run path as written: absolute, relative to the sweep directory (points.json), or relative to
    where the sweep ran (the older summary.json)."""
    path = Path(run)
    if path.is_absolute():
        return path
    for candidate in (sweep / path, path, *(base / path for base in sweep.parents)):
        if candidate.exists():
            return candidate
    return sweep / path


def discover(paths: Iterable[str | Path]) -> list[tuple[Path, str | None]]:
    """(run directory, status a sweep recorded for it) for every run under the given paths, in order, each once."""
    found: list[tuple[Path, str | None]] = []
    for given in map(Path, paths):
        if not given.exists():
            raise UserError(f"{given}: no such run or sweep directory")
        found += list(walk(given))
    seen: set[Path] = set()
    unique = []
    for path, status in found:
        key = path.resolve() if path.exists() else path
        if key not in seen:
            seen.add(key)
            unique.append((path, status))
    if not unique:
        raise UserError(f"{', '.join(map(str, paths))}: no run directory found (a run has summary.json, "
                        "metrics.jsonl or env.json; a sweep has points.json or a summary.json of kind sweep)")
    return unique


def walk(folder: Path) -> Iterable[tuple[Path, str | None]]:
    if is_sweep_dir(folder):
        yield from sweep_members(folder)
    elif is_run_dir(folder):
        yield folder, None
    elif folder.is_dir():
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.is_symlink() and not child.name.startswith("."):
                yield from walk(child)


# -- reading one run ---------------------------------------------------------------------------------
def read_json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable ({type(e).__name__})")
        return {}


def read_config(path: Path, problems: list[str]) -> dict[str, Any]:
    if (path / "config.yaml").is_file():
        try:
            return flatten(OmegaConf.to_container(OmegaConf.load(path / "config.yaml")))
        except Exception as e:  # a damaged YAML file of any kind: the report goes on without it
            problems.append(f"{path / 'config.yaml'}: unreadable ({type(e).__name__})")
            return {}
    if (path / "recipe.json").is_file():  # a loop directory stores its resolved recipe flat
        return dict(read_json(path / "recipe.json", problems).get("flat") or {})
    return {}


def load_run(path: Path, sweep_status: str | None = None) -> Run:
    problems: list[str] = []
    if not path.is_dir():
        return Run(path, "?", sweep_status or "not started", problems=[f"{path}: no run directory"])
    summary = read_json(path / "summary.json", problems)
    summary = summary if isinstance(summary, dict) else {}
    config = read_config(path, problems)
    is_loop = (path / "recipe.json").is_file()
    kind = "loop" if is_loop else summary.get("kind") or config.get("kind") or path.parent.name
    run = Run(path, str(kind), str(summary.get("status") or sweep_status or "unknown"), config, summary,
              problems=problems)
    if (path / "metrics.jsonl").is_file():
        rows = read_metrics(path / "metrics.jsonl", problems)
        run.rows = loop_rows(rows) if is_loop else rows
    if is_loop:
        run.result = dict(summary.get("last") or (run.rows[-1] if run.rows else {}))
        run.result.pop("eval_step", None)
    elif (path / "metrics.json").is_file():
        run.result = read_json(path / "metrics.json", problems)
        run.config.update({"model.name": run.result.get("model", config.get("model.name")),
                           "model.adapter": run.result.get("adapter", config.get("model.adapter"))})
        run.origin_path = origin_run(run.result.get("adapter") or run.result.get("model"))
        run.origin = read_config(run.origin_path, []) if run.origin_path else {}
    return run


def loop_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A loop's per-iteration rows as evaluation rows: iteration k is eval step k."""
    out = []
    for r in rows:
        if "iteration" in r:
            out.append({"eval_step": r["iteration"],
                        **{f"eval/{k}": v for k, v in r.items() if k != "iteration"}})
    return out


def origin_run(model: str | None) -> Path | None:
    """The training run whose final/, best/ or merged/ model an evaluation scored; None for any other model."""
    if not model:
        return None
    folder = Path(model)
    run = folder.parent if folder.name in MODEL_FOLDERS or folder.name.startswith("checkpoint") else folder
    return run if (run / "config.yaml").is_file() else None


# -- what a run records about itself -----------------------------------------------------------------
def tokens_by_step(run: Run) -> dict[int, float]:
    """Tokens learned from by the end of each logged training step. A logged step's count stands for the
    steps since the previous logged one (exact with train.log_every=1, an estimate otherwise)."""
    out: dict[int, float] = {}
    total, previous = 0.0, 0
    for r in run.rows:
        unit = next((r[k] for k in TOKEN_UNITS if isinstance(r.get(k), (int, float))), None)
        step = r.get("train_step")
        if unit is None or not isinstance(step, int):
            continue
        total += unit * max(step - previous, 1)
        previous = step
        out[step] = total
    return out


def tokens_seen(run: Run) -> float | None:
    by_step = tokens_by_step(run)
    return max(by_step.values()) if by_step else None


def wall_seconds(run: Run) -> float | None:
    """Start (env.json) to finish (summary.json), or to the last metrics row of a run that never finished;
    an evaluation's own timing; a loop's stages added up."""
    if run.kind == "eval" and isinstance(run.result.get("seconds"), (int, float)):
        return float(run.result["seconds"])
    if run.kind == "loop":
        stages = [read_json(p, []).get("seconds") for p in run.path.glob("iter_*/*/stage.json")]
        stages = [s for s in stages if isinstance(s, (int, float))]
        return float(sum(stages)) if stages else None
    env = read_json(run.path / "env.json", [])
    start = parse_time(env.get("started"))
    end = parse_time(run.summary.get("finished"))
    if end is None:
        times = [r["time"] for r in run.rows if isinstance(r.get("time"), (int, float))]
        end = max(times) if times else None
    return end - start if start is not None and end is not None else None


def parse_time(text: Any) -> float | None:
    try:
        return time.mktime(time.strptime(str(text), "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return None


def from_log(path: Path, pattern: re.Pattern) -> str | None:
    """The first match's group in a run's run.log."""
    log = path / "run.log"
    if not log.is_file():
        return None
    with log.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if m := pattern.search(line):
                return m.group(1)
    return None


def trainable_parameters(run: Run) -> str | None:
    """The trained weights the run saved, counted from the safetensors headers of final/ (or best/): a LoRA
    adapter's parameters, or the whole model's. (run.log's "trainable parameters" line is written before the
    run directory exists, so a run's own log does not hold it.)"""
    from safetensors import safe_open

    for folder in (run.path / f for f in MODEL_FOLDERS):
        adapter = sorted(folder.glob("adapter_model*.safetensors"))
        files = adapter or sorted(folder.glob("model*.safetensors"))
        if not files:
            continue
        count = 0
        for file in files:
            with safe_open(str(file), framework="numpy") as f:
                count += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - safe_open is no dict
        return f"{human_count(count)} ({'LoRA adapter' if adapter else 'full model'})"
    return None


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def training_examples(run: Run) -> int | None:
    """How many training examples the run (an evaluation: the run it scored) trained on, from its log."""
    found = from_log(run.origin_path or run.path, EXAMPLES)
    return int(found) if found else None


PEAK_MEMORY = re.compile(r"peak.*mem|mem.*peak|max_memory", re.IGNORECASE)


def peak_memory(run: Run) -> Any:
    """A peak-memory figure if the run recorded one (summary.json, else the last metrics row that has one, such
    as a GPU run's train/gpu/mem_peak_gib, a running maximum), else None."""
    for source in (run.summary, *reversed(run.rows)):
        for key, value in source.items():
            if PEAK_MEMORY.search(key) and isinstance(value, (int, float)):
                return f"{value:.2f} ({key.split('/')[-1]})" if isinstance(value, float) else value
    return None
