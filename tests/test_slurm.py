"""`ftlab launch --slurm/--submit` and preemption.

The batch script's text (directives, rendezvous, the warning trap, valid bash); `--submit` where no Slurm answers;
and a real one-node Slurm cluster (tests/slurm_cluster.py): a 2-process CPU training job submitted by `ftlab
launch --submit` is warned the way `sbatch --signal=B:USR1@S` warns it, checkpoints at a step every rank agreed
on, requeues itself, resumes from that checkpoint and finishes with the per-step losses of an uninterrupted
2-process run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from ftlab.cli import main
from ftlab.runs.trackers import read_metrics
from tests.helpers import tiny_recipe
from tests.slurm_cluster import cluster, slurm_conf  # noqa: F401 (cluster: a fixture)

pytestmark = pytest.mark.timeout(300)
T = TypeVar("T")

STEPS = 24
ENDED = ("", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")  # squeue's last words
TRAIN = {"max_steps": STEPS, "save_every": 5, "keep_last": 10, "batch_size": 2, "log_every": 1}


def launch(*args: str) -> int:
    return main(["launch", *args])


def dry_script(capsys, recipe: Path, *args: str) -> str:
    capsys.readouterr()
    assert launch(str(recipe), "--slurm", "--dry-run", *args) == 0
    return capsys.readouterr().out


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def steps_of(run: Path) -> dict[int, dict]:
    return {r["train_step"]: r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}


def wait_for(what: str, ready: Callable[[], T | None], timeout: float = 180) -> T:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = ready()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def two_processes(recipe: Path, out: Path, name: str) -> subprocess.Popen:
    """The recipe on 2 processes with plain torchrun, started in the background."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ftlab.cli",
           "train", str(recipe), f"output_dir={out}", f"name={name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """torchrun's training processes by LOCAL_RANK (read from their environment)."""
    found = {}
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        env = dict(item.split("=", 1) for item in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in item)
        if "LOCAL_RANK" in env:
            found[int(env["LOCAL_RANK"])] = int(child)
    return found


def test_script_for_two_gpu_nodes_meets_at_the_first_node(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    script = dry_script(capsys, recipe, "--profile", "ddp", "--gpus", "4", "--nodes", "2", "--time", "1-00:00:00",
                        "--partition", "gpu", "--account", "lab", "--signal-seconds", "120", "--env", "HF_HOME=/a b")
    d = directives(script)
    for want in ("--nodes=2", "--ntasks-per-node=1", "--gres=gpu:4", "--time=1-00:00:00", "--partition=gpu",
                 "--account=lab", "--requeue", "--signal=B:USR1@120", "--open-mode=append", "--job-name=tiny"):
        assert want in d, (want, d)
    assert not any(x.startswith("--cpus-per-task") for x in d)  # only when asked, or with --cpu
    job_dir = Path(next(x for x in d if x.startswith("--output=")).removeprefix("--output=")).parent
    assert job_dir.parent == tmp_path / "runs" / "slurm" and job_dir.name.endswith("_tiny")
    assert not job_dir.exists()  # a dry run writes nothing
    lines = script.splitlines()
    assert 'RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert "export HF_HOME='/a b'" in lines
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120" in lines  # torchrun waits the warning time for the save
    (run,) = [line for line in lines if line.startswith("srun ")]
    assert "--gres gpu:4" in run and "--nodes 2" in run and run.endswith('"${RESUME[@]}" &')
    assert ('-m torch.distributed.run --nproc_per_node 4 --nnodes 2 --rdzv_backend c10d '
            '--rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" -m ftlab.cli train') in run
    assert f"{recipe} output_dir={job_dir} " in run  # the job's runs (and checkpoints) live in its directory
    assert "trap warned USR1" in lines and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0


def test_accelerate_profile_meets_at_the_first_node_and_a_dry_run_leaves_nothing(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    script = dry_script(capsys, recipe, "--profile", "zero2", "--gpus", "4", "--nodes", "2")
    (run,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert '-m accelerate.commands.launch --config_file ' in run and "--num_processes 8 --num_machines 2" in run
    assert '--rdzv_backend c10d --main_process_ip "$RDZV_HOST" --main_process_port "$RDZV_PORT"' in run
    assert not (tmp_path / "runs" / "slurm").exists() or not any((tmp_path / "runs" / "slurm").iterdir())


def test_script_for_cpu_nodes_asks_for_cores_not_gpus(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    d = directives(dry_script(capsys, recipe, "--profile", "ddp", "--gpus", "3", "--cpu"))
    assert "--cpus-per-task=3" in d and "--ntasks-per-node=1" in d
    assert not any(x.startswith("--gres") for x in d) and not any(x.startswith("--time") for x in d)


@pytest.mark.parametrize("args, says", [
    (["--time", "10:00", "--signal-seconds", "600"], "--time 10:00 (600 s) leaves no training"),
    (["--time", "1:2:3:4"], "--time '1:2:3:4': expected MM"),
    (["--env", "1X=2"], "--env '1X=2': expected NAME=VALUE"),
    (["--rdzv-endpoint", "n1:29400"], "--rdzv-endpoint with --slurm"),
    (["--profile", "nope"], "unknown profile 'nope'"),
])
def test_bad_slurm_options_are_one_line(tmp_path, capsys, args, says):
    recipe = tiny_recipe(tmp_path)
    profile = [] if "--profile" in args else ["--profile", "ddp"]
    capsys.readouterr()
    assert launch(str(recipe), *profile, "--gpus", "2", "--cpu", "--slurm", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftlab: error: ") and says in err[0], err
    assert not (tmp_path / "runs" / "slurm").exists()


def test_submit_where_no_slurm_answers_submits_nothing(tmp_path, capsys, monkeypatch):
    conf = tmp_path / "slurm.conf"  # a cluster whose controller is not running: nothing listens on its port
    conf.write_text(slurm_conf(tmp_path))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    recipe = tiny_recipe(tmp_path)
    capsys.readouterr()
    assert launch(str(recipe), "--profile", "ddp", "--gpus", "2", "--cpu", "--submit") == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftlab: error: --submit: no Slurm") and "nothing submitted" in err[0]
    assert captured.out == "" and not (tmp_path / "runs" / "slurm").exists()
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch at all
    assert launch(str(recipe), "--profile", "ddp", "--gpus", "2", "--cpu", "--submit") == 2
    assert "sbatch/scontrol not on PATH" in capsys.readouterr().err


# -- preemption in the loop -----------------------------------------------------------------------------------
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_checkpointed_step(tmp_path):
    """Only rank 1 is signalled; rank 0 learns it from the reduced flag and stops at the same step, and the
    checkpoint of that step has both ranks' state (train.save_every never comes due: the signal saves it)."""
    recipe = tiny_recipe(tmp_path, train={**TRAIN, "max_steps": 100000, "save_every": 100000})
    proc = two_processes(recipe, tmp_path / "runs", "one_rank")
    run = wait_for("the first logged step", lambda: next(
        (m.parent for m in (tmp_path / "runs" / "sft").glob("*_one_rank/metrics.jsonl") if steps_of(m.parent)), None))
    os.kill(worker_pids(proc)[1], signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    summary = json.loads((run / "summary.json").read_text())
    k = summary["steps"]
    assert summary["status"] == "interrupted", err[-3000:]
    assert summary["stopped_by"] == "a stop signal on another process"  # rank 0 writes the summary
    assert err.count("ftlab: terminated by") == 2, err[-3000:]  # both ranks raised at the agreed step
    (ckpt,) = (run / "checkpoints").glob("step_*")
    assert ckpt.name == f"step_{k:06d}" and summary["checkpoint"] == str(ckpt)
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert sorted(steps_of(run)) == list(range(1, k + 1))


# -- a real cluster (the `cluster` fixture: tests/slurm_cluster.py) ----------------------------------------


def test_warned_job_checkpoints_requeues_resumes_and_matches_an_uninterrupted_run(tmp_path, capsys, monkeypatch,
                                                                                 cluster):
    recipe = tiny_recipe(tmp_path, train=TRAIN)
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    capsys.readouterr()
    assert launch(str(recipe), "--profile", "ddp", "--gpus", "2", "--cpu", "--submit") == 0, capsys.readouterr().err
    job = capsys.readouterr().out.strip()
    assert job.isdigit(), job
    reference = two_processes(recipe, tmp_path / "reference", "reference")  # uninterrupted, beside the job
    (job_dir,) = (tmp_path / "runs" / "slurm").iterdir()
    first = wait_for("the job's first logged step", lambda: next(
        (r.parent for r in job_dir.glob("sft/*_tiny/metrics.jsonl") if steps_of(r.parent)), None))
    # What `sbatch --signal=B:USR1@S` does S seconds before the time limit: signal the batch shell alone.
    signalled = cluster.run("scancel", "--signal=USR1", "--batch", job)
    assert signalled.returncode == 0, signalled.stderr
    log = job_dir / f"slurm-{job}.out"
    wait_for("the requeued job to end", lambda: cluster.job_state(job) in ENDED, timeout=240)
    text = log.read_text()
    assert reference.wait(timeout=240) == 0, reference.stderr.read()[-3000:]

    stopped = json.loads((first / "summary.json").read_text())
    k = stopped["steps"]
    assert stopped["status"] == "interrupted" and stopped["stopped_by"] == "SIGUSR1", (stopped, text[-3000:])
    assert 1 <= k < STEPS and stopped["checkpoint"] == str(first / "checkpoints" / f"step_{k:06d}")
    assert sorted(steps_of(first)) == list(range(1, k + 1))
    assert "(start 1)" in text and "requeueing job" in text and "(start 2)" in text and "train.resume=latest" in text
    (resumed,) = [r for r in job_dir.glob("sft/*_tiny") if r != first]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["resumed_from"] == stopped["checkpoint"]
    assert sorted(steps_of(resumed)) == list(range(k + 1, STEPS + 1))
    # Same processes, same data order, the RNG and optimizer restored: the losses are the same numbers, bit for bit.
    (ref,) = (tmp_path / "reference" / "sft").glob("*_reference")
    want, got = steps_of(ref), {**steps_of(first), **steps_of(resumed)}
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step]["train/loss"] == want[step]["train/loss"], step
        assert got[step]["train/grad_norm"] == want[step]["train/grad_norm"], step
