"""`ftlab launch`: a real 2-process gloo training through the ddp profile equals one process at the same global
batch; each profile's command; the process-group time-out reaching torch; signals and exit codes passed
through; bad input in one line (more GPUs than present: tests/gpu/test_launch_cuda.py)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from ftlab.cli import main
from ftlab.launch.launcher import launch_argv, profile_names, run_argv
from ftlab.runs.trackers import read_metrics
from tests.helpers import tiny_recipe

pytestmark = pytest.mark.timeout(300)
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA refuses")


def launch(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["launch", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def train_rows(run: Path) -> dict[int, dict]:
    return {r["train_step"]: r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}


def test_two_processes_through_the_ddp_profile_match_one_process_at_the_same_global_batch(tmp_path):
    """Global batch 8: one process takes batch 4 x accumulation 2, two processes batch 2 x accumulation 2 (each
    computes 8 / (2 x 2) from its world size); the per-step losses and gradient norms agree."""
    from ftlab.config import load_recipe
    from ftlab.train import run_training

    recipe = tiny_recipe(tmp_path, data={"group_by_length": False})
    common = ["train.max_steps=3", "train.grad_clip=1000", "schedule.name=constant", "train.global_batch=8"]
    one = run_training(load_recipe(recipe, ["name=one", "train.batch_size=4", *common])).path
    cmd = [sys.executable, "-m", "ftlab.cli", "launch", str(recipe), "--profile", "ddp", "--gpus", "2",
           "name=two", "train.batch_size=2", *common]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "no CUDA here: --gpus 2 runs 2 processes on the CPU with gloo" in proc.stderr
    [two] = (tmp_path / "runs" / "sft").glob("*_two")
    assert yaml.safe_load((one / "config.yaml").read_text())["train"]["grad_accum"] == 2
    assert yaml.safe_load((two / "config.yaml").read_text())["train"]["grad_accum"] == 2
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    a, b = train_rows(one), train_rows(two)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-5)
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-5)
        assert b[step]["train/supervised_tokens"] == a[step]["train/supervised_tokens"]


def test_plain_torchrun_gets_the_time_out_and_the_global_batch_from_the_recipe(tmp_path):
    """Without `ftlab launch`: the time-out is read back from the default group of a real 2-process gloo run
    (torch's own default is 30 minutes), formed as `ftlab loop` forms it (then kept by the accelerator), and
    global batch 16 at batch 2 x 2 processes is accumulation 4."""
    script = tmp_path / "each_rank.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from ftlab.config import load_recipe\n"
        "from ftlab.train.setup import make_accelerator\n"
        f"cfg = load_recipe({str(tiny_recipe(tmp_path))!r}, ['train.dist_timeout=7.5', 'train.global_batch=16',\n"
        "                  'train.batch_size=2'])\n"
        "from ftlab.loops.oak import process_state\n"
        "process_state(cfg)  # as `ftlab loop` forms the group, before any stage\n"
        "make_accelerator(cfg)\n"
        "backend = dist.group.WORLD._get_backend(torch.device('cpu'))\n"
        f"out = {str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.txt'\n"
        "open(out, 'w').write(f'{dist.get_world_size()} {backend.options._timeout.total_seconds()} '\n"
        "                     f'{cfg.train.grad_accum}')\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["2 7.5 4", "2 7.5 4"]


def dry_run(tmp_path: Path, capsys, *argv: str) -> list[str]:
    code, out, err = launch([*argv, "--dry-run"], capsys)
    assert code == 0, err
    assert "ftlab plan:" in err  # the planner's estimate comes first, on stderr; stdout is the command alone
    return shlex.split(out.strip())


def test_dry_run_of_each_profile(tmp_path, capsys):
    """batch 4 (tiny_recipe), global batch 16: accumulation 16 / (4 x processes) is passed to the processes.
    `launch_argv` is what --dry-run prints (the planner's estimate takes a while, so it is called once here)."""
    recipe = str(tiny_recipe(tmp_path))
    assert {"single", "ddp", "zero2", "zero3", "fsdp2"} <= set(profile_names())
    child = ["-m", "ftlab.cli", "train", recipe, "train.global_batch=16"]

    argv = dry_run(tmp_path, capsys, recipe, "--profile", "single", "train.global_batch=16")
    assert argv == [sys.executable, *child, "train.grad_accum=4"]

    argv = dry_run(tmp_path, capsys, recipe, "--profile", "ddp", "--gpus", "2", "train.global_batch=16")
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *child,
                    "train.grad_accum=2"]

    argv = launch_argv("ddp", 2, 2, "node001:29400", "loop", recipe, ["train.global_batch=16"])
    assert argv[3:13] == ["--nproc_per_node", "2", "--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                          "node001:29400", "-m", "ftlab.cli"]
    assert argv[13:] == ["loop", recipe, "train.global_batch=16", "train.grad_accum=1"]

    for stage in (2, 3):
        argv = launch_argv(f"zero{stage}", 4, 1, None, "train", recipe, ["train.precision=bf16"])
        assert argv[1:3] == ["-m", "accelerate.commands.launch"]
        flags = dict(zip(argv[3:11:2], argv[4:11:2]))
        assert flags == {"--config_file": flags["--config_file"], "--num_processes": "4", "--num_machines": "1",
                         "--main_process_port": "0"}
        assert argv[11:] == ["-m", "ftlab.cli", "train", recipe, "train.precision=bf16"]
        assert Path(flags["--config_file"]).parent == tmp_path / "runs" / "launch"  # <output_dir>/launch
        config = yaml.safe_load(Path(flags["--config_file"]).read_text())
        assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == stage
        assert config["mixed_precision"] == "bf16"

    # the function a scheduler's script calls: two nodes of DeepSpeed meet through c10d, no pdsh
    argv = launch_argv("zero2", 8, 2, "node001:29400", "train", recipe, ["train.global_batch=64"])
    assert argv[argv.index("--num_processes") + 1] == "16"
    assert argv[argv.index("--main_process_ip") + 1] == "node001"
    assert argv[argv.index("--deepspeed_multinode_launcher") + 1] == "standard"
    assert argv[-1] == "train.grad_accum=1"  # 64 / (4 x 16)


def test_a_users_own_profile_file(tmp_path, capsys):
    recipe = str(tiny_recipe(tmp_path))
    mine = tmp_path / "mine.yaml"
    mine.write_text("description: my data parallel\nlauncher: torchrun\nmax_processes: 4\n")
    argv = dry_run(tmp_path, capsys, recipe, "--profile", str(mine), "--gpus", "3")
    assert argv[3:6] == ["--standalone", "--nproc_per_node", "3"]
    code, _, err = launch([recipe, "--profile", str(mine), "--gpus", "5", "--dry-run"], capsys)
    assert code == 2 and "profile mine runs at most 4 processes" in err
    mine.write_text("launcher: torchrun\nmax_procs: 4\n")
    code, _, err = launch([recipe, "--profile", str(mine), "--dry-run"], capsys)
    assert code == 2 and f"ftlab: error: {mine}:2: unknown key 'max_procs'" in err


def test_forwarded_sigterm_ends_the_whole_process_group_and_the_exit_code_passes_through(tmp_path):
    assert run_argv([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    ready = tmp_path / "pids"
    # the child starts a grandchild (as torchrun starts the training processes) and both wait
    child = ("import subprocess, sys, time, pathlib\n"
             "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             f"pathlib.Path({str(ready)!r}).write_text(str(g.pid))\n"
             "time.sleep(60)\n")

    def terminate_when_ready() -> None:
        while not ready.exists() or not ready.read_text():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as Slurm signals the job step

    threading.Thread(target=terminate_when_ready, daemon=True).start()
    started = time.time()
    assert run_argv([sys.executable, "-c", child]) == 128 + signal.SIGTERM
    assert time.time() - started < 30
    stat = Path(f"/proc/{int(ready.read_text())}/stat")
    for _ in range(100):  # the grandchild got the signal too: gone, or a zombie waiting to be reaped
        if not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail("the grandchild outlived the forwarded SIGTERM")


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (["--profile", "ddpp"], "unknown profile 'ddpp'; the profiles are ddp, fsdp2, single, zero2, zero3"),
    (["--profile", "nosuch/profile.yaml"], "--profile nosuch/profile.yaml: no such profile file"),
    # 20 over batch 4 x 2 processes: 16 and 24 divide; at 2 processes, batch sizes dividing 20 / 2 = 10 do
    (["--profile", "ddp", "--gpus", "2", "train.global_batch=20"],
     ("train.global_batch=20 is not a multiple of train.batch_size x processes = 4 x 2 = 8: global batches that "
      "would are 16 or 24; or train.batch_size in {1, 2, 5, 10}")),
    (["--profile", "ddp", "--gpus", "3", "train.global_batch=20"], "no train.batch_size divides it over 3 processes"),
    (["--profile", "ddp", "--gpus", "2", "train.method=grpo", "grpo.num_generations=3", "grpo.max_completion_length=16",
      "grpo.rewards=[{fn: format}]", "train.global_batch=16", "train.batch_size=2"],
     "train.global_batch=16 completions per step is not a multiple of grpo.num_generations=3"),
    (["--profile", "single", "--gpus", "2"], "profile single runs one process"),
    (["--profile", "ddp", "--nodes", "2"], "--nodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--profile", "ddp", "--nodes", "2", "--rdzv-endpoint", "node001"], "expected HOST:PORT"),
    (["--profile", "ddp", "--gpus", "0"], "--gpus and --nodes must be >= 1"),
    (["--profile", "ddp", "train.resume=runs/no_such_run"], "train.resume: no complete checkpoint under"),
], ids=["unknown-profile", "missing-profile-file", "global-batch", "global-batch-world", "grpo-groups",
        "single-several", "nodes-without-endpoint", "bad-endpoint", "zero-gpus", "resume-not-a-checkpoint"])
def test_bad_launches_are_one_line(tmp_path, capsys, args, needle):
    recipe = str(tiny_recipe(tmp_path))
    code, out, err = launch([recipe, *args, "--dry-run"], capsys)
    assert_one_line_error(code, err, needle)
    assert out == ""


@cpu_only
@pytest.mark.parametrize("args, needle", [
    (["--profile", "ddp", "lora.enabled=true", "lora.quantize=nf4"], "lora.quantize=nf4 (QLoRA) needs CUDA GPUs"),
    (["--profile", "zero2", "--gpus", "2"], "profile zero2 with 2 processes needs CUDA GPUs"),
    (["--profile", "zero3", "--gpus", "2"], "profile zero3 with 2 processes needs CUDA GPUs"),
], ids=["qlora", "zero2", "zero3"])
def test_what_this_machine_cannot_run_is_refused_before_anything_starts(tmp_path, capsys, args, needle):
    recipe = str(tiny_recipe(tmp_path))
    code, _, err = launch([recipe, *args], capsys)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "runs" / "sft").exists()
