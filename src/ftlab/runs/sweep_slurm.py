"""`ftlab sweep ... --slurm [--submit]`: a sweep as one Slurm array job, array task i running point i.

    ftlab sweep RECIPE --grid ... [--seeds ...] --slurm [--submit] [--profile P --gpus N --nodes M] [--cpu]
                [--time T --partition P --account A --cpus-per-task C --signal-seconds S --env N=V] [--max-parallel K]
    ftlab sweep --resume SWEEP_DIR --slurm --submit [...]     # again: an array of the points not yet complete
    ftlab sweep --resume SWEEP_DIR --point I [--profile ...]   # what array task I runs (also usable by hand)

The sweep directory is made and checked as `ftlab sweep` makes it (points.json, config.yaml); the script is
<sweep dir>/slurm/<stamp>_array/job.sbatch, with `#SBATCH --array=<indices>[%K]` (the points that are pending,
failed or interrupted: a re-submission skips complete points and those still running) and one log per task,
slurm-<array job>_<task>.out. Each task is a job of its own to Slurm (its own SLURM_JOB_ID, so tasks sharing a
node get their own rendezvous port) and runs, on every node of its allocation,

    srun ... python -m ftlab.cli sweep --resume SWEEP_DIR --point $SLURM_ARRAY_TASK_ID --profile P ...

The point runner marks the point running, runs the command line `ftlab launch --profile P` builds for it
(ftlab.launch.launcher.prepare_launch; without --profile: the point in the runner's own process, any verb), then
marks it complete, failed or interrupted; the first node of the task keeps the state. Array tasks finish at the
same time, so every change to points.json is read-change-write under an exclusive lock (fcntl.flock on
.points.lock beside it: points.json itself is replaced, not rewritten, by each save).

Preemption and time limits as in ftlab.launch.slurm: the warning (SIGUSR1) reaches the training processes, which
checkpoint at a step boundary; the point is marked interrupted and the task requeues itself
(`scontrol requeue <array job>_<task>`). A task that starts again resumes the point from the newest complete
checkpoint of its attempts, as a sequential re-run does.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from ftlab.config.load import load_recipe
from ftlab.errors import UserError, first_line
from ftlab.launch.launcher import VERBS as LAUNCH_VERBS
from ftlab.launch.launcher import Launch, load_profile, prepare_launch, run_argv
from ftlab.launch.planner import estimate_for_launch
from ftlab.launch.slurm import (
    HOST_MARK,
    PORT_MARK,
    RENDEZVOUS_LINES,
    SlurmOptions,
    check_options,
    check_slurm_answers,
    environment_lines,
    job_directory,
    job_name,
    job_resources,
    placement_directives,
    requeue_directives,
    script_text,
    submit,
    warned_step_lines,
    write_script,
)
from ftlab.runs.rundir import read_status
from ftlab.runs.sweep import (
    check_same_config,
    create_sweep_dir,
    read_sweep,
    record_attempts,
    resume_from,
    run_verb,
    save,
)
from ftlab.runs.sweep_plan import (
    K_KEY,
    Point,
    Sweep,
    command_lines,
    override_text,
    point_overrides,
)
from ftlab.runs.sweep_table import plot_k_sweep, write_tables

log = logging.getLogger("ftlab")

LOCK_NAME = ".points.lock"
TO_SUBMIT = ("pending", "failed", "interrupted")  # a running point's task is still in the queue or running


@dataclass(frozen=True)
class PointLaunch:
    """How a task runs its point: through an `ftlab launch` profile, or (profile None) in the task's own process."""

    profile: str | None = None
    gpus_per_node: int = 1
    nodes: int = 1

    def endpoint_needed(self) -> bool:
        """Whether the launch meets at a rendezvous (every launcher but the plain python one)."""
        return self.profile is not None and load_profile(self.profile).launcher != "python"

    def describe(self) -> str:
        if self.profile is None:
            return "each point in its task's own process"
        return f"profile {self.profile}, {self.nodes} node(s) x {self.gpus_per_node} process(es)"


# -- points.json under a lock ------------------------------------------------------------------------------
@contextmanager
def points_lock(sweep_dir: Path) -> Iterator[None]:
    """One process at a time reads, changes and writes points.json. flock works across the nodes of a shared
    filesystem that supports it (NFS v4 and most cluster filesystems); it is released when the file closes."""
    with open(sweep_dir / LOCK_NAME, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextmanager
def locked_sweep(sweep_dir: Path) -> Iterator[Sweep]:
    """The sweep as points.json holds it now; what the body changes is saved before the lock is released (an
    exception saves nothing)."""
    with points_lock(sweep_dir):
        sweep = read_sweep(sweep_dir)
        yield sweep
        save(sweep, sweep_dir, sweep_status(sweep))


def update_point(sweep_dir: Path, index: int, change: Callable[[Point], None]) -> Sweep:
    """Apply `change` to point `index` of the sweep in `sweep_dir`, the other points as other processes left them;
    the sweep as saved."""
    with locked_sweep(sweep_dir) as sweep:
        change(sweep.points[index])
    return sweep


def sweep_status(sweep: Sweep) -> str:
    """summary.json's status: running while a point waits or runs, then failed, interrupted or complete."""
    states = {p.status for p in sweep.points}
    if states & {"running", "pending"}:
        return "running"
    return next((s for s in ("failed", "interrupted") if s in states), "complete")


# -- submitting ------------------------------------------------------------------------------------------------
def array_spec(indices: list[int], max_parallel: int | None = None) -> str:
    """sbatch --array's value: runs of consecutive indices as ranges (0-3,7,9-10), then %K."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
    return text + (f"%{max_parallel}" if max_parallel else "")


def point_launch(sweep: Sweep, sweep_dir: Path, point: Point, how: PointLaunch, endpoint: str | None,
                 extra: list[str] = ()) -> Launch:
    """The launch `ftlab launch --profile ...` would make of the point's command line (plus `extra` overrides)."""
    return prepare_launch(how.profile, how.gpus_per_node, how.nodes, endpoint, sweep.verb, sweep.recipe,
                          [*point_overrides(sweep, point, sweep_dir), *extra])


def check_launches(sweep: Sweep, sweep_dir: Path, cfgs: dict[int, DictConfig], how: PointLaunch,
                   opts: SlurmOptions) -> Launch | None:
    """Every point's launch checked as `ftlab launch --slurm` checks it (profile, processes, global batch, the
    job's options), before anything is written; the first point's launch (None without a profile)."""
    if how.profile is None:
        if how.gpus_per_node != 1 or how.nodes != 1:
            raise UserError("--gpus and --nodes go with --profile (without it each point runs in one process)")
        single = load_profile("single")  # what a task runs without a profile: one process, no launcher
        for point in sweep.points:
            check_options(opts, Launch(single, cfgs[point.index], 1, 1, []))
        return None
    if sweep.verb not in LAUNCH_VERBS:
        raise UserError(f"--profile: ftlab launch runs {' or '.join(LAUNCH_VERBS)}, not {sweep.verb}; without "
                        "--profile each point of an eval sweep runs in its array task's own process")
    endpoint = f"{HOST_MARK}:{PORT_MARK}" if how.endpoint_needed() else None
    launches = []
    for point in sweep.points:
        try:
            launch = point_launch(sweep, sweep_dir, point, how, endpoint)
            check_options(opts, launch)
        except UserError as e:
            raise UserError(f"sweep point {point.label}: {e}") from None
        launches.append(launch)
    return launches[0]


def array_script(sweep: Sweep, sweep_dir: Path, job_dir: Path, indices: list[int], how: PointLaunch,
                 opts: SlurmOptions, max_parallel: int | None) -> str:
    """The array job's script: the launch script's resources, environment, rendezvous and warning trap, with
    the point runner as the job step and the task (not the whole array) requeued after the warning."""
    resources, step = job_resources(how.nodes, how.gpus_per_node, opts)
    directives = [f"--job-name={job_name(sweep.name)}", f"--array={array_spec(indices, max_parallel)}",
                  *resources, *placement_directives(opts), f"--output={job_dir}/slurm-%A_%a.out",
                  *requeue_directives(opts)]
    runner = [sys.executable, "-m", "ftlab.cli", "sweep", "--resume", str(sweep_dir), "--point"]
    flags = []
    if how.profile:
        flags = ["--profile", how.profile, "--gpus", str(how.gpus_per_node), "--nodes", str(how.nodes)]
    rdzv = ['--rdzv-endpoint "$RDZV_HOST:$RDZV_PORT"'] if how.endpoint_needed() else []
    run_line = " ".join([shlex.join(step), shlex.join(runner), '"$SLURM_ARRAY_TASK_ID"', *map(shlex.quote, flags),
                         *rdzv, "&"])
    script = shlex.quote(str(job_dir / "job.sbatch"))
    lines = [
        "#!/bin/bash",
        (f"# ftlab sweep --slurm: {sweep.name}, {len(indices)} of {len(sweep.points)} point(s) as array tasks, "
         f"{how.describe()}, written {time.strftime('%Y-%m-%d %H:%M:%S')}"),
        f"# task i runs point i of {sweep_dir}/points.json and records its state there; submit: sbatch {script}",
        f"# after failures: ftlab sweep --resume {shlex.quote(str(sweep_dir))} --submit ... (the points not complete)",
        *(f"#SBATCH {d}" for d in directives),
        "",
        *environment_lines(opts),
        "",
        *RENDEZVOUS_LINES,  # SLURM_JOB_ID is the task's own: tasks sharing a node get different ports
        ('echo "ftlab: sweep point $SLURM_ARRAY_TASK_ID, job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (start '
         '$((${SLURM_RESTART_COUNT:-0} + 1))) on $SLURM_JOB_NODELIST"'),
        "",
        *warned_step_lines(run_line, '"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
                           "the point saves a checkpoint, then its task requeues"),
    ]
    return script_text(lines)


def slurm_sweep(sweep: Sweep, sweep_dir: Path, cfgs: dict[int, DictConfig], recipe_cfg: DictConfig,
                how: PointLaunch, opts: SlurmOptions, max_parallel: int | None, submit_it: bool,
                dry_run: bool) -> str:
    """Write the array script for the points not complete (and, for a new sweep, its directory); with
    `submit_it` submit it. Returns what to print: the script (dry run), its path, or the array's job id. A
    refusal, a dry run or a failed submission leaves nothing new behind."""
    if max_parallel is not None and max_parallel < 1:
        raise UserError(f"--max-parallel must be >= 1; got {max_parallel}")
    sweep_dir = sweep_dir.resolve()  # the tasks run wherever Slurm starts them
    indices = [p.index for p in sweep.points if p.status in TO_SUBMIT]
    if not indices:
        running = sum(p.status == "running" for p in sweep.points)
        raise UserError(f"{sweep_dir}: nothing to submit: {len(sweep.points) - running} point(s) complete, "
                        f"{running} running")
    new, existed = not (sweep_dir / "points.json").is_file(), sweep_dir.exists()
    job_dir = job_directory(str(sweep_dir), "array")
    try:
        first = check_launches(sweep, sweep_dir, cfgs, how, opts)  # an accelerate profile writes a config file
        text = array_script(sweep, sweep_dir, job_dir, indices, how, opts, max_parallel)
        if submit_it and not dry_run:
            check_slurm_answers()
        if first is not None:  # the planner's figures for one point, as ftlab launch prints them
            log.info("each of %d points: %s", len(sweep.points), estimate_for_launch(
                first.plan_cfg or first.cfg, first.profile.ref, how.gpus_per_node, how.nodes))
        if dry_run:
            return text.removesuffix("\n")
        if new:
            create_sweep_dir(sweep_dir, recipe_cfg)
            for point, command in zip(sweep.points, command_lines(sweep, sweep_dir)):
                point.command = command
            with points_lock(sweep_dir):
                save(sweep, sweep_dir, sweep_status(sweep))
        script = write_script(job_dir, text)
        if not submit_it:
            log.info("slurm: wrote %s (%d array tasks); submit with: sbatch %s", script, len(indices), script)
            return str(script)
        job_id = submit(script)
    except BaseException:
        if new:
            discard(sweep_dir, existed)
        else:
            shutil.rmtree(job_dir, ignore_errors=True)
        raise
    finally:
        if dry_run and new:
            discard(sweep_dir, existed)
    log.info("slurm: submitted array job %s (points %s) of %s; task logs under %s", job_id, array_spec(indices),
             sweep_dir, job_dir)
    return job_id


def discard(sweep_dir: Path, existed: bool) -> None:
    """Remove what this submission put into a new sweep directory (an empty one given as sweep.dir stays)."""
    if not existed:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        return
    for child in sweep_dir.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


# -- one array task --------------------------------------------------------------------------------------------
def run_point_task(sweep_dir: Path, index: int, how: PointLaunch, rdzv_endpoint: str | None = None) -> int:
    """Run point `index` of the sweep in `sweep_dir` (skipped when complete), its state kept in points.json;
    returns the exit code of its run. Only the first node of a multi-node task (SLURM_NODEID 0) records the
    state: every node runs the same launch."""
    sweep = read_sweep(sweep_dir)
    check_same_config(sweep_dir, load_recipe(sweep.recipe, sweep.overrides))
    if not 0 <= index < len(sweep.points):
        raise UserError(f"--point {index}: {sweep_dir} has points 0 to {len(sweep.points) - 1}")
    if sweep.points[index].status == "complete":
        log.info("sweep point %s is complete: nothing to run", sweep.points[index].label)
        return 0
    keeper = os.environ.get("SLURM_NODEID", "0") == "0"
    if keeper:
        sweep = update_point(sweep_dir, index, lambda p: mark_running(sweep_dir, p))
    point = sweep.points[index]
    if point.status == "complete":  # by a task of another submission, since the first look
        return 0
    record_attempts(sweep_dir, point)
    resume = resume_from(sweep, sweep_dir, point)
    extra = [override_text("train.resume", str(resume))] if resume else []
    log.info("sweep point %d of %d: %s%s", index + 1, len(sweep.points), point.label,
             f", resuming from {resume}" if resume else "")
    if how.profile is None:
        return run_here(sweep, sweep_dir, point, extra, keeper)
    try:
        launch = point_launch(sweep, sweep_dir, point, how, rdzv_endpoint, extra)
    except UserError as e:  # e.g. a profile file changed since the submission: the point must not stay running
        if keeper:
            finish(sweep_dir, index, "failed", first_line(e))
        raise
    log.info("launch: %s", shlex.join(launch.argv))
    code = run_argv(launch.argv)
    if keeper:
        finish(sweep_dir, index, *outcome(sweep_dir, point, code))
    return code


def mark_running(sweep_dir: Path, point: Point) -> None:
    if point.status != "complete":
        record_attempts(sweep_dir, point)  # runs of an attempt that was killed before it could record them
        point.status, point.error = "running", None


def run_here(sweep: Sweep, sweep_dir: Path, point: Point, extra: list[str], keeper: bool) -> int:
    """The point in this process, as a sequential sweep runs it: a failure is recorded and ends the task with
    one line (exit 2); Ctrl-C, SIGTERM or the warning marks it interrupted and goes up."""
    state = ("failed", None)
    try:
        run_verb(sweep.verb, load_recipe(sweep.recipe, point_overrides(sweep, point, sweep_dir) + extra))
        state = ("complete", None)
    except KeyboardInterrupt:
        state = ("interrupted", None)
        raise
    except Exception as e:
        state = ("failed", f"{type(e).__name__}: {first_line(e)}")
        log.error("sweep point %s failed: %s", point.label, state[1], exc_info=not isinstance(e, UserError))
        raise UserError(f"sweep point {point.label} failed: {state[1]}") from None
    finally:
        if keeper:
            finish(sweep_dir, point.index, *state)
    return 0


def outcome(sweep_dir: Path, point: Point, code: int) -> tuple[str, str | None]:
    """A launched point's state from its exit code and the status its newest run wrote."""
    if code == 0:
        return "complete", None
    record_attempts(sweep_dir, point)
    run_status = read_status(sweep_dir / point.run) if point.run else None
    if run_status == "interrupted":
        return "interrupted", None
    return "failed", f"exit code {code}" + (f" (its run {point.run} is {run_status})" if run_status else "")


def finish(sweep_dir: Path, index: int, status: str, error: str | None) -> None:
    """Record the point's end and rewrite the sweep's tables (and the K-sweep's plot once every point is done)."""
    def end(point: Point) -> None:
        record_attempts(sweep_dir, point)
        point.status, point.error = status, error

    with locked_sweep(sweep_dir) as sweep:
        end(sweep.points[index])
        rows = write_tables(sweep, sweep_dir)
        if K_KEY in sweep.grid and sweep_status(sweep) == "complete":
            plot_k_sweep(rows, sweep_dir / "val_loss_vs_k.png", sweep.name)
    log.info("sweep point %s: %s%s", sweep.points[index].label, status, f" ({error})" if error else "")
