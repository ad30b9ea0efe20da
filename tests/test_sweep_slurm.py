"""`ftlab sweep --slurm [--submit]`: a sweep as one Slurm array job.

The array script's text (the points still to run as array indices, the point runner as the job step, the task
requeued after the warning, valid bash); points.json updated by two processes at once with no update lost; a
point run in its own process by `--point`; `--submit` where no Slurm answers; and a real one-node cluster
(tests/slurm_cluster.py) running a 2-point SFT sweep as array tasks through `ftlab launch`'s ddp profile, whose
points end complete with the per-step losses of the same points run in sequence by `ftlab sweep`.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftlab.cli import main
from ftlab.launch.launcher import launch_argv
from ftlab.runs.sweep import read_sweep
from ftlab.runs.sweep_plan import point_overrides
from ftlab.runs.sweep_slurm import array_spec, update_point
from ftlab.runs.sweep_table import stitched_metrics
from tests.helpers import tiny_recipe
from tests.slurm_cluster import cluster, slurm_conf  # noqa: F401 (cluster: a fixture)

pytestmark = pytest.mark.timeout(300)

TRAIN = {"max_steps": 3, "batch_size": 2, "log_every": 1}
GRID = ["--grid", "optim.lr=[1e-3,3e-3]"]
ENDED = ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def sweep(*args: str) -> int:
    return main(["sweep", *args])


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def statuses(sweep_dir: Path) -> list[str]:
    return [p.status for p in read_sweep(sweep_dir).points]


def losses(run_dirs: list[Path]) -> dict[int, float]:
    return {r["train_step"]: r["train/loss"] for r in stitched_metrics(run_dirs) if "train/loss" in r}


def test_array_indices_are_ranges_then_the_limit():
    assert array_spec([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"
    assert array_spec([3], 2) == "3%2"


def test_array_script_runs_point_i_in_task_i_and_requeues_the_task(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    sweep_dir = tmp_path / "sw"
    capsys.readouterr()
    assert sweep(str(recipe), "--grid", "optim.lr=[1e-3,2e-3,3e-3]", f"sweep.dir={sweep_dir}", "--slurm",
                 "--dry-run", "--profile", "ddp", "--gpus", "2", "--nodes", "2", "--time", "2:00:00",
                 "--max-parallel", "2") == 0
    script = capsys.readouterr().out
    d = directives(script)
    for want in ("--array=0-2%2", "--nodes=2", "--ntasks-per-node=1", "--gres=gpu:2", "--time=2:00:00",
                 "--requeue", "--signal=B:USR1@300", "--open-mode=append", "--job-name=tiny"):
        assert want in d, (want, d)
    log_path = Path(next(x for x in d if x.startswith("--output=")).removeprefix("--output="))
    assert log_path.name == "slurm-%A_%a.out" and log_path.parent.parent == sweep_dir / "slurm"
    (run,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert "--nodes 2 --ntasks-per-node=1 --kill-on-bad-exit=1 --gres gpu:2" in run
    assert run.endswith(f"-m ftlab.cli sweep --resume {sweep_dir} --point \"$SLURM_ARRAY_TASK_ID\" --profile ddp "
                        '--gpus 2 --nodes 2 --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" &')
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in script
    assert "trap warned USR1" in script and "RDZV_PORT=$((20000 + SLURM_JOB_ID % 10000))" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    assert not sweep_dir.exists()  # a dry run writes nothing

    # Written for real: the sweep directory as ftlab sweep makes it, then a re-submission of what is not complete.
    assert sweep(str(recipe), "--grid", "optim.lr=[1e-3,2e-3,3e-3,4e-3]", f"sweep.dir={sweep_dir}",
                 "--slurm", "--cpu") == 0
    written = Path(capsys.readouterr().out.strip())
    assert written.name == "job.sbatch" and written.parent.parent == sweep_dir / "slurm"
    assert "--array=0-3" in directives(written.read_text()) and statuses(sweep_dir) == ["pending"] * 4
    assert read_sweep(sweep_dir).points[1].command[:2] == ["ftlab", "train"]
    for index, state in enumerate(["complete", "failed", "running", "pending"]):
        update_point(sweep_dir, index, lambda p, s=state: setattr(p, "status", s))
    assert sweep("--resume", str(sweep_dir), "--slurm", "--dry-run", "--cpu") == 0
    assert "--array=1,3" in directives(capsys.readouterr().out)  # neither complete points nor a running one


UPDATES = 40
WRITER = """
import sys
from pathlib import Path
from ftlab.runs.sweep_slurm import update_point
for i in range({n}):
    update_point(Path(sys.argv[1]), int(sys.argv[2]), lambda p: p.attempts.append(f"{{p.label}}/{{i}}"))
"""


def test_two_processes_updating_different_points_lose_no_update(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    sweep_dir = tmp_path / "sw"
    assert sweep(str(recipe), *GRID, f"sweep.dir={sweep_dir}", "--slurm", "--cpu") == 0
    code = WRITER.format(n=UPDATES)
    writers = [subprocess.Popen([sys.executable, "-c", code, str(sweep_dir), str(i)]) for i in (0, 1)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    for point in read_sweep(sweep_dir).points:  # each read-change-write saw the other process's last write
        assert point.attempts == [f"{point.label}/{i}" for i in range(UPDATES)]


def test_a_point_runs_alone_in_its_own_process_and_records_its_state(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, train=TRAIN)
    sweep_dir = tmp_path / "sw"
    assert sweep(str(recipe), *GRID, f"sweep.dir={sweep_dir}", "--slurm", "--cpu") == 0
    assert sweep("--resume", str(sweep_dir), "--point", "1") == 0
    assert statuses(sweep_dir) == ["pending", "complete"]
    assert json.loads((sweep_dir / "summary.json").read_text())["status"] == "running"  # point 0 still to run
    point = read_sweep(sweep_dir).points[1]
    assert sorted(losses([sweep_dir / point.run])) == [1, 2, 3]
    assert sweep("--resume", str(sweep_dir), "--point", "1") == 0  # complete: skipped, its run untouched
    assert read_sweep(sweep_dir).points[1].attempts == point.attempts
    capsys.readouterr()
    assert sweep("--resume", str(sweep_dir), "--point", "2") == 2
    err = capsys.readouterr().err
    assert f"--point 2: {sweep_dir} has points 0 to 1" in err


@pytest.mark.parametrize("args, says", [
    (["--profile", "ddp"], "--profile goes with --slurm or --submit"),
    (["--slurm", "--gpus", "2"], "--gpus and --nodes go with --profile"),
    (["--slurm", "--verb", "eval", "eval.task=gsm8k", "eval.source={gsm}", "--profile", "ddp"],
     "--profile: ftlab launch runs train or loop, not eval"),
    (["--slurm", "--max-parallel", "0"], "--max-parallel must be >= 1"),
])
def test_bad_array_options_are_one_line_and_write_nothing(tmp_path, capsys, args, says):
    from tests.test_eval_infer import gsm_file

    recipe = tiny_recipe(tmp_path)
    args = [a.format(gsm=gsm_file(tmp_path)) for a in args]
    capsys.readouterr()
    assert sweep(str(recipe), *GRID, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftlab: error: ") and says in err[0], err
    assert not (tmp_path / "runs").exists()


def test_submit_where_no_slurm_answers_writes_nothing(tmp_path, capsys, monkeypatch):
    conf = tmp_path / "slurm.conf"  # a cluster whose controller is not running: nothing listens on its port
    conf.write_text(slurm_conf(tmp_path))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    recipe = tiny_recipe(tmp_path)
    capsys.readouterr()
    assert sweep(str(recipe), *GRID, "--submit", "--profile", "ddp", "--cpu") == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftlab: error: --submit: no Slurm") and "nothing submitted" in err[0]
    assert captured.out == "" and not (tmp_path / "runs").exists()


# -- a real cluster (the `cluster` fixture: tests/slurm_cluster.py) ----------------------------------------


def test_array_tasks_run_every_point_through_launch_with_the_losses_of_a_sequential_sweep(tmp_path, capsys,
                                                                                         monkeypatch, cluster):
    recipe = tiny_recipe(tmp_path, train=TRAIN)
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    array_dir = tmp_path / "array"
    capsys.readouterr()
    assert sweep(str(recipe), *GRID, f"sweep.dir={array_dir}", "--submit", "--profile", "ddp", "--cpu") == 0, \
        capsys.readouterr().err
    job = capsys.readouterr().out.strip()
    assert job.isdigit(), job
    # the same points in sequence, in this process, while the array runs
    assert sweep(str(recipe), *GRID, f"sweep.dir={tmp_path / 'sequence'}") == 0
    deadline = time.time() + 240
    while cluster.job_state(job) not in ENDED and time.time() < deadline:
        time.sleep(0.2)
    (job_dir,) = (array_dir / "slurm").iterdir()
    logs = {int(p.stem.rsplit("_", 1)[1]): p.read_text() for p in job_dir.glob("slurm-*_*.out")}
    assert sorted(logs) == [0, 1], list(job_dir.iterdir())

    swept, sequential = read_sweep(array_dir), read_sweep(tmp_path / "sequence")
    assert [p.status for p in swept.points] == ["complete", "complete"], "\n".join(logs.values())[-3000:]
    assert json.loads((array_dir / "summary.json").read_text())["status"] == "complete"
    assert "complete" in (array_dir / "summary.md").read_text()
    for point, ref in zip(swept.points, sequential.points):
        assert point.label == ref.label and len(point.attempts) == 1
        # task i ran point i through the command line `ftlab launch --profile ddp --gpus 1` builds for it
        (line,) = [x.split("launch: ", 1)[1] for x in logs[point.index].splitlines() if " launch: " in x]
        endpoint = shlex.split(line)[shlex.split(line).index("--rdzv_endpoint") + 1]
        assert endpoint.startswith("localhost:")
        assert line == shlex.join(launch_argv("ddp", 1, 1, endpoint, "train", str(recipe),
                                              point_overrides(swept, point, array_dir)))
        got, want = losses([array_dir / point.run]), losses([tmp_path / "sequence" / ref.run])
        assert sorted(got) == [1, 2, 3] and got == pytest.approx(want, rel=1e-6, abs=1e-7)
