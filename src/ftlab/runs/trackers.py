"""Metric trackers: metrics.jsonl always; wandb and tensorboard when enabled and installed.

Train and eval metrics live on their own step axes (seed 002): keys are prefixed `train/` or
`eval/`, and wandb is told that `train/*` uses `train_step` and `eval/*` uses `eval_step`.
A W&B run is tagged with the settings that differ from the schema's defaults (`key=value`, the rule of
`ftlab report`'s configuration diff) and gets a final summary when it closes: every metric's last value
(`final/...`), each evaluation metric's best by its own direction (`best/...`), the steps and the status.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("ftlab")


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep it visible as a string
    return v


class Trackers:
    def __init__(self, run: Any, track_cfg: Any = None, config: dict | None = None):
        self.run = run
        self.wandb = None
        self.tb = None
        self.final: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self.steps: dict[str, int] = {}
        if track_cfg is not None and track_cfg.wandb:
            self._init_wandb(track_cfg, config)
        if track_cfg is not None and track_cfg.tensorboard:
            self._init_tensorboard()

    def _init_wandb(self, track_cfg: Any, config: dict | None) -> None:
        try:
            import wandb
        except ImportError:
            log.warning("track.wandb is on but wandb is not installed (pip install 'ftlab[track]'); skipping")
            return
        self.wandb = wandb.init(project=track_cfg.project, name=self.run.path.name, dir=str(self.run.path),
                                config=config or {}, tags=config_tags(config or {}))
        for axis in ("train", "eval"):
            self.wandb.define_metric(f"{axis}_step")
            self.wandb.define_metric(f"{axis}/*", step_metric=f"{axis}_step")

    def _init_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("track.tensorboard is on but tensorboard is not installed; skipping")
            return
        self.tb = SummaryWriter(log_dir=str(self.run.path / "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int, axis: str = "train") -> None:
        """Log metrics (keys without prefix) on the `axis` step axis."""
        row = {f"{axis}/{k}": _clean(v) for k, v in metrics.items()}
        record = {f"{axis}_step": step, "time": round(time.time(), 3), **row}
        with open(self.run.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{axis}_step": step, **row})
            self._remember(row, step, axis)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def _remember(self, row: dict[str, Any], step: int, axis: str) -> None:
        """Last and best values for the final summary (W&B's own summary keeps only the last value)."""
        from ftlab.config.schema import metric_direction

        self.steps[f"{axis}_steps"] = step
        for key, value in row.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            self.final[key] = value
            direction = metric_direction(key) if axis == "eval" else None
            if direction is not None:
                pick = max if direction == "higher" else min
                self.best[key] = pick(self.best.get(key, value), value)

    def close(self, status: str = "complete") -> None:
        """Close every tracker; W&B gets the final summary first (`status`: how the run ended)."""
        if self.wandb is not None:
            self.wandb.summary.update({**{f"final/{k}": v for k, v in self.final.items()},
                                       **{f"best/{k}": v for k, v in self.best.items()},
                                       **self.steps, "status": status})
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def config_tags(config: dict[str, Any]) -> list[str]:
    """`key=value` for every setting that differs from the schema's defaults (names and output folders left
    out, as in `ftlab report`), sorted, each cut to W&B's 64-character limit for a tag."""
    from omegaconf import OmegaConf

    from ftlab.config.schema import Recipe
    from ftlab.report.compare import differing_keys
    from ftlab.config.load import flatten

    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(Recipe)))
    mine = flatten(config)
    return [f"{k}={mine[k]}"[:64] for k in differing_keys([defaults, mine]) if k in mine]


def read_metrics(path: Any, damaged: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A last line cut short (the run was killed mid-write) is left out;
    any other unreadable line is an error naming it, or, when a `damaged` list is given (a report that
    must still be made), named there ("file:line: ...") and skipped."""
    from ftlab.errors import UserError

    lines = Path(path).read_bytes().split(b"\n")
    rows = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            row = None
        if isinstance(row, dict):
            rows.append(row)
            continue
        if lineno == len(lines):  # no newline after it: a write that never finished
            break
        problem = f"{path}:{lineno}: damaged metrics line"
        if damaged is None:
            raise UserError(problem)
        damaged.append(problem)
    return rows
