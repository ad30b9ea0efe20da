"""A real one-node Slurm cluster on loopback for tests: munged, slurmctld and slurmd (Debian's `slurm-wlm` and
`munge`) started in the foreground under a temp directory, with their own key, ports, state and logs.

    with SlurmCluster.start() as cluster:       # raises ClusterUnavailable (with the daemons' words) if it can't
        subprocess.run(["sbatch", ...], env=cluster.env)

The node is this machine under the name `localhost` with 2 CPUs. What differs from a production cluster, on
purpose: no cgroups (proctrack/linuxproc, task/none: containers rarely allow them), no accounting, the main
scheduler every second, and job credentials valid 5 s, which is also how long Slurm holds a requeued job back
(it waits cred_expire + 1 s; 121 s by default).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest

NODE_CPUS = 2
DAEMONS = ("munged", "slurmctld", "slurmd")


class ClusterUnavailable(RuntimeError):
    """The daemons are not installed or did not come up; the message says why (for a skip reason)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path) -> str:
    # A random first job id: `ftlab launch` derives a job's rendezvous port from its id, so two clusters started by
    # two test workers at once must not both number their jobs from 1 (a sweep failed to reach its rendezvous
    # store when both Slurm test files ran side by side: most likely two jobs on one port).
    first_job = random.SystemRandom().randrange(1, 9900)
    return f"""\
ClusterName=ftlabtest
FirstJobId={first_job}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs={NODE_CPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self.procs: list[subprocess.Popen] = []
        self.outputs: list = []  # the daemons' stdout/stderr files

    @classmethod
    def start(cls, timeout: float = 30.0) -> SlurmCluster:
        missing = [d for d in (*DAEMONS, "sbatch", "sinfo") if not shutil.which(d)]
        if missing:
            raise ClusterUnavailable(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
        # a short path: the munge socket's path must fit a Unix socket name (108 bytes)
        cluster = cls(Path(tempfile.mkdtemp(prefix="ftlab-slurm-")))
        try:
            cluster.launch_daemons()
            cluster.wait_until_idle(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def launch_daemons(self) -> None:
        root = self.root
        for d in ("state", "spool"):
            (root / d).mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (root / "slurm.conf").write_text(slurm_conf(root))
        conf = str(root / "slurm.conf")
        self.spawn("munged", ["munged", "--foreground", "--force", f"--socket={root}/munge.sock",
                              f"--key-file={key}", f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                              f"--seed-file={root}/munged.seed"])
        self.wait_for(lambda: (root / "munge.sock").exists(), 10, "munged made no socket")
        self.spawn("slurmctld", ["slurmctld", "-D", "-f", conf])
        self.spawn("slurmd", ["slurmd", "-D", "-f", conf, "-N", "localhost"])

    def spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / f"{name}.stderr", "w")  # noqa: SIM115 - closed in stop()
        self.outputs.append(out)
        self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise ClusterUnavailable(f"{dead[0].args[0]} exited ({dead[0].returncode}): {self.log_tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise ClusterUnavailable(f"{what} within {timeout:.0f} s: {self.log_tail()}")

    def wait_until_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env,
                                 timeout=10, check=False)
            return out.stdout.strip() == "idle"

        self.wait_for(idle, timeout, "sinfo did not report the node idle")

    def log_tail(self) -> str:
        """The last error lines of the daemons' logs, on one line."""
        lines = []
        for log in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stderr")):
            lines += [f"{log.name}: {line.strip()}" for line in log.read_text(errors="replace").splitlines()
                      if "error" in line.lower() or "fatal" in line.lower()][-2:]
        return " | ".join(lines[-4:]) or "no error logged"

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env, timeout=30, check=False)

    def job_state(self, job_id: str) -> str:
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip()

    def stop(self) -> None:
        """Cancel what still runs, stop the daemons (slurmd first), remove the directory."""
        if shutil.which("scancel") and all(p.poll() is None for p in self.procs[1:]):
            self.run("scancel", "--user", "root")
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for out in self.outputs:
            out.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def cluster() -> Iterator[SlurmCluster]:
    """A running one-node cluster for one test (skipped, with the daemons' own words, where none can start)."""
    try:
        c = SlurmCluster.start()
    except ClusterUnavailable as e:
        pytest.skip(f"no Slurm cluster could start here: {e}")
    yield c
    c.stop()
