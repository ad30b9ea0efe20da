"""`ftlab sweep`: one run per point of a grid, for every method, in sequence; a re-run resumes it point by point.

    ftlab sweep RECIPE [key=value ...] [--grid key=[v1,v2,...] ...] [--seeds 0,1,2] [--verb train|eval|loop]
    ftlab sweep --resume SWEEP_DIR
    ftlab sweep RECIPE ... --dry-run            # check every point and print its command line; run nothing
    ftlab sweep RECIPE ... --slurm [--submit] [--profile P --gpus N]   # a Slurm array job (ftlab.runs.sweep_slurm)

or a `sweep:` section in the recipe (--grid replaces the section's value of that key, --seeds its seeds):

    sweep: {grid: {data.limit: [128, 256, 512]}, seeds: [0, 1]}
    sweep: {seeds: [0, 1], num_categories: [1, 2, 4]}      # the K-sweep: shorthand for grid pretrain.num_categories

Points are the product of the grid's values (the last key varying fastest), each once per seed (seeds
outermost). A point is `ftlab VERB RECIPE <the sweep's overrides> <its values> name=<name>_<label>
output_dir=<sweep dir>/<label>`. VERB is sweep.verb (--verb): train (SFT, DPO, GRPO, pretraining: whatever
train.method says), eval, or loop; it is train unless set, never guessed from the recipe. Before anything is
written, every grid value and every point is loaded as its run would load it and checked as its verb checks
it (a K the corpus lacks, a loop setting): an unknown key or a wrong value is one line naming it, exit 2.

The sweep directory, runs/sweep/<stamp>_<name>/ (or sweep.dir):

    points.json        the plan and each point's state (format below), rewritten atomically after every change
    summary.json       the sweep's status (running | complete | failed | interrupted) and counts
    config.yaml        the recipe with the sweep's overrides, before any point's own (a resume must match it)
    summary.csv, .md   one row per point: its values, status, final metrics and run (rewritten after each point)
    val_loss_vs_k.png  K-sweeps: final validation loss and bits per byte against K, a line per seed, their mean
    <label>/           the point's output_dir: its runs, <label>/<kind>/<stamp>_<name>/ (training),
                       <label>/eval/<stamp>_<...>/ (evaluation), <label>/loop/<name>_<label>/ (the loop)

points.json, version 1 (paths relative to the sweep directory):

    {"version": 1, "name": str, "recipe": str (as given), "verb": "train" | "eval" | "loop",
     "overrides": [str] (applied to every point, before its own values),
     "grid": {dotted key: [values]}, "seeds": [int] | null,
     "points": [{"index": int, "label": str, "values": {dotted key: value, ..., "seed": int (when swept)},
                 "command": [str] (the point as one command line), "status": "pending" | "running" | "complete"
                 | "failed" | "interrupted", "run": str | null (its newest run directory),
                 "attempts": [str] (every run directory it made, oldest first), "error": str | null}]}

A re-run (`--resume SWEEP_DIR`, or the same command with the same sweep.dir) skips complete points and runs
the rest: a training point resumes from the newest complete checkpoint of its attempts (train.resume; from the
start when it saved none), a loop point continues its loop directory stage by stage, an evaluation point
starts over (ftlab eval keeps no partial state). A point that fails is recorded and the sweep goes on; it
then ends in one line naming the failures (exit 2). Ctrl-C or SIGTERM marks the point and the sweep interrupted.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftlab.config.load import load_recipe
from ftlab.errors import UserError, first_line
from ftlab.runs.rundir import RunDir, environment, redact, write_json
from ftlab.runs.sweep_plan import (
    K_KEY,
    Point,
    Sweep,
    command_lines,
    override_text,
    plan_sweep,
    point_dir,
    point_overrides,
    validate,
)
from ftlab.runs.sweep_table import plot_k_sweep, write_tables

log = logging.getLogger("ftlab")


def run_sweep(recipe: str, overrides: list[str], cfg: DictConfig, grid_args: Sequence[str] = (),
              seeds_arg: str | None = None) -> Path:
    """Plan, check and run the sweep of `recipe` (or continue it, when sweep.dir holds it); returns its directory."""
    sweep, sweep_dir, cfgs = prepare_sweep(recipe, overrides, cfg, grid_args, seeds_arg)
    if not (sweep_dir / "points.json").is_file():
        create_sweep_dir(sweep_dir, cfg)
    return execute(sweep, sweep_dir, cfgs)


def prepare_sweep(recipe: str, overrides: list[str], cfg: DictConfig, grid_args: Sequence[str] = (),
                  seeds_arg: str | None = None) -> tuple[Sweep, Path, dict[int, DictConfig]]:
    """The sweep of `recipe` (the stored one, with its points' states, when sweep.dir holds it), its directory and
    every point's checked recipe; nothing is written."""
    sweep = plan_sweep(recipe, list(overrides), cfg, list(grid_args), seeds_arg)
    sweep_dir = Path(cfg.sweep.dir) if cfg.sweep.dir else new_sweep_dir(cfg)
    if (sweep_dir / "points.json").is_file():
        sweep = same_sweep(read_sweep(sweep_dir), sweep, sweep_dir)
        check_same_config(sweep_dir, cfg)
    elif sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise UserError(f"sweep.dir {sweep_dir} is not empty and holds no points.json: not a sweep directory")
    return sweep, sweep_dir, validate(sweep, sweep_dir)


def resume_sweep(sweep_dir: Path) -> Path:
    """Continue the sweep in `sweep_dir` from its points.json: complete points are skipped."""
    return execute(*reopen_sweep(sweep_dir))


def reopen_sweep(sweep_dir: Path) -> tuple[Sweep, Path, dict[int, DictConfig]]:
    """The stored sweep, its recipe unchanged since it started, every point checked again."""
    sweep = read_sweep(sweep_dir)
    check_same_config(sweep_dir, load_recipe(sweep.recipe, sweep.overrides))
    return sweep, sweep_dir, validate(sweep, sweep_dir)


def dry_run(recipe: str, overrides: list[str], cfg: DictConfig, grid_args: Sequence[str] = (),
            seeds_arg: str | None = None) -> list[list[str]]:
    """Every point checked as a run would check it, and its command line; nothing is written."""
    sweep = plan_sweep(recipe, list(overrides), cfg, list(grid_args), seeds_arg)
    sweep_dir = Path(cfg.sweep.dir) if cfg.sweep.dir else new_sweep_dir(cfg)
    validate(sweep, sweep_dir)
    return command_lines(sweep, sweep_dir)


# -- the sweep directory -----------------------------------------------------------------------------------
def new_sweep_dir(cfg: DictConfig) -> Path:
    """runs/sweep/<stamp>_<name>, not yet created (a second sweep in the same second gets a suffix)."""
    parent = Path(cfg.output_dir) / "sweep"
    base = f"{time.strftime('%Y%m%d_%H%M%S')}_{re.sub(r'[^A-Za-z0-9._+-]+', '-', cfg.name).strip('-') or 'sweep'}"
    return next(p for i in range(1000) if not (p := parent / (base + (f"_{i + 1}" if i else ""))).exists())


def create_sweep_dir(sweep_dir: Path, cfg: DictConfig) -> None:
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the sweep directory {sweep_dir} ({e.strerror or e})") from None
    (sweep_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config_dict(cfg))), encoding="utf-8")
    write_json(sweep_dir / "env.json", environment(cfg.seed))


def config_dict(cfg: DictConfig) -> dict:
    return redact(OmegaConf.to_container(cfg, resolve=True))


def read_sweep(sweep_dir: Path) -> Sweep:
    path = sweep_dir / "points.json"
    if not path.is_file():
        raise UserError(f"{sweep_dir}: no points.json (not a sweep directory made by ftlab sweep)")
    try:
        return Sweep.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: not a points.json of ftlab sweep ({first_line(e)})") from None


def same_sweep(stored: Sweep, planned: Sweep, sweep_dir: Path) -> Sweep:
    """The stored sweep (with its points' states) when it plans the same points; else a one-line refusal."""
    for what in ("verb", "overrides", "grid", "seeds"):
        if getattr(stored, what) != getattr(planned, what):
            raise UserError(f"{sweep_dir} holds another sweep (its {what}: {getattr(stored, what)!r}, now "
                            f"{getattr(planned, what)!r}); use another sweep.dir, or ftlab sweep --resume {sweep_dir}")
    return stored


def check_same_config(sweep_dir: Path, cfg: DictConfig) -> None:
    """A resumed sweep runs the recipe it started with: a changed recipe would mix two studies in one table (the
    sweep section aside: the plan's own comparison is `same_sweep`)."""
    import yaml

    path = sweep_dir / "config.yaml"
    if not path.is_file():
        return
    before, now = flat(yaml.safe_load(path.read_text(encoding="utf-8")) or {}), flat(config_dict(cfg))
    differ = [k for k in sorted(set(before) | set(now))
              if before.get(k, "<unset>") != now.get(k, "<unset>") and not k.startswith("sweep.")]
    if differ:
        raise UserError(f"{sweep_dir}: the recipe changed since the sweep started (first difference: {differ[0]}: "
                        f"{before.get(differ[0], '<unset>')!r} then, {now.get(differ[0], '<unset>')!r} now); "
                        "start a new sweep")


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def save(sweep: Sweep, sweep_dir: Path, status: str = "running") -> None:
    """points.json and summary.json, each written atomically."""
    write_json(sweep_dir / "points.json", sweep.to_json())
    counts = {s: sum(p.status == s for p in sweep.points) for s in ("complete", "failed", "interrupted", "pending")}
    write_json(sweep_dir / "summary.json", {"status": status, "kind": "sweep", "name": sweep.name,
                                            "verb": sweep.verb, "points": len(sweep.points), **counts,
                                            "updated": time.strftime("%Y-%m-%d %H:%M:%S")})


# -- running ------------------------------------------------------------------------------------------------
def execute(sweep: Sweep, sweep_dir: Path, cfgs: dict[int, DictConfig]) -> Path:
    from tqdm.auto import tqdm

    for point, command in zip(sweep.points, command_lines(sweep, sweep_dir)):
        point.command = command
    todo = [p for p in sweep.points if p.status != "complete"]
    save(sweep, sweep_dir)
    RunDir(sweep_dir).log_to_file()
    log.info("sweep %s: %d points, %d to run (%s)", sweep_dir, len(sweep.points), len(todo), sweep.verb)
    bar = tqdm(total=len(sweep.points), initial=len(sweep.points) - len(todo), desc="sweep", unit="point",
               disable=not sys.stderr.isatty())
    try:
        for point in todo:
            run_point(sweep, sweep_dir, point, cfgs[point.index])
            write_tables(sweep, sweep_dir)
            bar.update(1)
    except KeyboardInterrupt:
        save(sweep, sweep_dir, "interrupted")
        write_tables(sweep, sweep_dir)
        raise
    finally:
        bar.close()
    rows = write_tables(sweep, sweep_dir)
    if K_KEY in sweep.grid:
        plot_k_sweep(rows, sweep_dir / "val_loss_vs_k.png", sweep.name)
    failed = [p for p in sweep.points if p.status == "failed"]
    save(sweep, sweep_dir, "failed" if failed else "complete")
    if failed:
        raise UserError(f"sweep {sweep_dir}: {len(failed)} of {len(sweep.points)} points failed (first: "
                        f"{failed[0].label}: {failed[0].error}); each error is in points.json, re-running resumes")
    log.info("sweep complete: %s", sweep_dir)
    return sweep_dir


def run_point(sweep: Sweep, sweep_dir: Path, point: Point, cfg: DictConfig) -> None:
    """One point's run, its state saved before and after; a failure is recorded, Ctrl-C goes up."""
    record_attempts(sweep_dir, point)  # runs of an attempt that was killed before it could record them
    resume = resume_from(sweep, sweep_dir, point)
    if point.status != "pending":
        log.info("sweep point %s was %s: %s", point.label, point.status,
                 f"resuming from {resume}" if resume else "running it again")
    if resume:
        cfg = load_recipe(sweep.recipe, point_overrides(sweep, point, sweep_dir) +
                          [override_text("train.resume", str(resume))])
    log.info("sweep point %d of %d: %s", point.index + 1, len(sweep.points), point.label)
    point.status, point.error = "running", None
    save(sweep, sweep_dir)
    try:
        run_verb(sweep.verb, cfg)
        point.status = "complete"
    except KeyboardInterrupt:
        point.status = "interrupted"
        raise
    except Exception as e:  # recorded; the sweep goes on with the next point
        point.status, point.error = "failed", f"{type(e).__name__}: {first_line(e)}"
        log.error("sweep point %s failed: %s", point.label, point.error, exc_info=not isinstance(e, UserError))
    finally:
        record_attempts(sweep_dir, point)
        save(sweep, sweep_dir)
        RunDir(sweep_dir).log_to_file()  # each run attached its own run.log


def run_verb(verb: str, cfg: DictConfig) -> None:
    if verb == "train":
        from ftlab.train import run_training

        run_training(cfg)
    elif verb == "eval":
        from ftlab.evaluate import run_eval

        run_eval(cfg)
    else:
        from ftlab.loops.oak import run_loop

        run_loop(cfg)


def record_attempts(sweep_dir: Path, point: Point) -> None:
    """Add the run directories under the point's directory that it has not listed yet (a loop's is one)."""
    found = sorted(p.parent for p in point_dir(sweep_dir, point).glob("*/*/summary.json") if not p.parent.is_symlink())
    for run in found:
        rel = str(run.relative_to(sweep_dir))
        if rel not in point.attempts:
            point.attempts.append(rel)
    point.run = point.attempts[-1] if point.attempts else None


def resume_from(sweep: Sweep, sweep_dir: Path, point: Point) -> Path | None:
    """A training point's newest attempt with a complete checkpoint (None: start over)."""
    from ftlab.train.checkpoint import complete_checkpoints

    if sweep.verb != "train":
        return None
    return next((sweep_dir / a for a in reversed(point.attempts)
                 if complete_checkpoints(sweep_dir / a / "checkpoints")), None)
