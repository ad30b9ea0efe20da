"""`ftlab launch ... --slurm [--submit]`: the launch as a Slurm batch script, written and (with --submit) submitted.

One submission, one directory: <output_dir>/slurm/<stamp>_<name>/ holds the script (job.sbatch), the job's log
(slurm-<jobid>.out, appended across requeues) and the job's runs (the script passes output_dir=<that directory>).

    #SBATCH --nodes=M --ntasks-per-node=1 --gres=gpu:N       (--cpu: --cpus-per-task, no --gres)
    #SBATCH --requeue --signal=B:USR1@300 --open-mode=append
    RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    srun ... torchrun --nnodes M --rdzv_backend c10d --rdzv_endpoint $RDZV_HOST:$RDZV_PORT -m ftlab.cli train ...

Preemption and time limits, as Slurm signals them:

* `--signal=B:USR1@S` warns the batch shell S seconds before the time limit (`scancel --signal=USR1 --batch`
  does the same by hand). Its trap passes SIGUSR1 to the job step; torchrun is told to pass it on to the training
  processes (PET_SIGNALS_TO_HANDLE) and to give them S seconds to stop (TORCH_ELASTIC_SHUTDOWN_TIMEOUT). The
  loop finishes its optimizer step, the ranks agree to stop at that step, and a checkpoint is written. The shell
  then requeues the job (`scontrol requeue`; the job keeps its id).
* A preemption (PreemptMode=REQUEUE) or a time limit sends SIGTERM to every process: the loop does the same, and
  Slurm requeues a preempted job itself. The batch shell traps SIGTERM only to wait for the step.
* A job that starts again (requeued, or the script submitted again) finds a complete checkpoint in its own
  directory and adds `train.resume=latest`, which looks only there. Before the first checkpoint it starts over.
"""
from __future__ import annotations

import argparse
import logging
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ftlab.errors import UserError
from ftlab.launch.launcher import Launch, load_profile, prepare_launch

log = logging.getLogger("ftlab")

# launch_argv checks a rendezvous endpoint as HOST:PORT; the script's run-time values replace these markers.
HOST_MARK, PORT_MARK = "ftlab-first-node", "1"
PORT_BASE, PORT_SPAN = 20000, 10000  # the rendezvous port: PORT_BASE + job id mod PORT_SPAN (jobs sharing a node differ)
TIME_FORMATS = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SLURM_ANSWER_TIMEOUT_S = 60


@dataclass(frozen=True)
class SlurmOptions:
    """What the batch script asks Slurm for, beyond the launch itself."""

    time: str | None = None           # sbatch --time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)
    partition: str | None = None
    account: str | None = None
    cpu: bool = False                 # nodes without GPUs: N CPU processes per node (gloo), no --gres
    cpus_per_task: int | None = None  # cores for one node's processes (--cpu default: one per process)
    signal_seconds: int = 300         # the warning (SIGUSR1) this long before the time limit
    env: tuple[str, ...] = ()         # NAME=VALUE exported in the script


# -- checks ----------------------------------------------------------------------------------------------
def time_limit_seconds(value: str) -> int:
    """Seconds of an sbatch --time value, or one line saying the accepted forms."""
    m = TIME_FORMATS.match(value)
    if not m:
        raise UserError(f"--time {value!r}: expected MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # MM or MM:SS


def check_options(opts: SlurmOptions, launch: Launch) -> None:
    if not 0 < opts.signal_seconds <= 65535:  # sbatch's limit for --signal's time
        raise UserError(f"--signal-seconds must be between 1 and 65535; got {opts.signal_seconds}")
    if opts.time is not None:
        limit = time_limit_seconds(opts.time)
        if limit <= opts.signal_seconds:
            raise UserError(f"--time {opts.time} ({limit} s) leaves no training before the warning "
                            f"--signal-seconds {opts.signal_seconds}; lower --signal-seconds or raise --time")
    if opts.cpus_per_task is not None and opts.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task must be >= 1; got {opts.cpus_per_task}")
    for item in opts.env:
        name, eq, _ = item.partition("=")
        if not eq or not ENV_NAME.match(name):
            raise UserError(f"--env {item!r}: expected NAME=VALUE")
    if opts.cpu and launch.cfg.lora.quantize:
        raise UserError(f"lora.quantize={launch.cfg.lora.quantize} (QLoRA) needs CUDA GPUs; --cpu nodes have none "
                        "(use plain LoRA: lora.quantize=null)")
    if opts.cpu and launch.profile.multi_process_needs_cuda and launch.processes > 1:
        raise UserError(f"profile {launch.profile.name} with {launch.processes} processes needs CUDA GPUs; "
                        "--cpu jobs use --profile ddp for data parallelism")


# -- the script --------------------------------------------------------------------------------------------
def job_name(name: str) -> str:
    """The recipe's name as a job and directory name (what RunDir makes of it too)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or "run"


def job_directory(output_dir: str, name: str) -> Path:
    """<output_dir>/slurm/<stamp>_<name>, a suffix added when a script of that name is already there."""
    base = Path(output_dir).resolve() / "slurm" / f"{time.strftime('%Y%m%d_%H%M%S')}_{job_name(name)}"
    return next(p for p in (base.with_name(f"{base.name}_{i}") if i else base for i in range(1000))
                if not (p / "job.sbatch").exists())


@dataclass(frozen=True)
class SlurmJob:
    """A launch to run as a batch job."""

    launch: Launch
    job_dir: Path   # the submission's directory: script, log and runs (created when the script is written)
    verb: str


def prepare_slurm_job(profile: str, gpus_per_node: int, nodes: int, verb: str, recipe: str,
                      overrides: list[str]) -> SlurmJob:
    """The checked launch, its runs sent to a fresh job directory, its rendezvous left to the script."""
    from ftlab.config import load_recipe

    cfg = load_recipe(recipe, overrides)  # errors name the recipe or override, before anything is written
    job_dir = job_directory(cfg.output_dir, cfg.name)
    endpoint = f"{HOST_MARK}:{PORT_MARK}" if load_profile(profile).launcher != "python" else None
    launch = prepare_launch(profile, gpus_per_node, nodes, endpoint, verb, str(Path(recipe).resolve()),
                            [*overrides, f"output_dir={job_dir}"])  # the job runs wherever Slurm starts it
    return SlurmJob(launch, job_dir, verb)


def node_command(argv: list[str]) -> str:
    """The launch command as shell words, the marked rendezvous host and port replaced by the script's variables."""
    words = []
    for i, arg in enumerate(argv):
        if arg == f"{HOST_MARK}:{PORT_MARK}":  # torchrun --rdzv_endpoint
            words.append('"$RDZV_HOST:$RDZV_PORT"')
        elif arg == HOST_MARK:  # accelerate --main_process_ip
            words.append('"$RDZV_HOST"')
        elif arg == PORT_MARK and i and argv[i - 1] == "--main_process_port":
            words.append('"$RDZV_PORT"')
        else:
            words.append(shlex.quote(arg))
    return " ".join(words)


def batch_script(job: SlurmJob, opts: SlurmOptions) -> str:
    """The sbatch script: directives, environment, rendezvous through the first node, one srun task per node,
    and the warning trap that checkpoints and requeues."""
    launch, job_dir = job.launch, job.job_dir
    n = launch.gpus_per_node
    resources, step = job_resources(launch.nodes, n, opts)
    directives = [f"--job-name={job_name(launch.cfg.name)}", *resources, *placement_directives(opts),
                  f"--output={job_dir}/slurm-%j.out", *requeue_directives(opts)]
    # `ftlab loop` resumes by itself (its directory follows from output_dir and name); training is told to
    resume = ['"${RESUME[@]}"'] if job.verb == "train" else []
    run_line = " ".join([shlex.join(step), node_command(launch.argv), *resume, "&"])
    checkpoints = shlex.quote(str(job_dir)) + "/*/*/checkpoints/step_*/state.json"
    per_node = f"{n} CPU process(es)" if opts.cpu else f"{n} GPU(s)"
    lines = [
        "#!/bin/bash",
        (f"# ftlab launch --slurm: {launch.cfg.name}, profile {launch.profile.ref}, {launch.nodes} node(s) x "
         f"{per_node}, written {time.strftime('%Y-%m-%d %H:%M:%S')}"),
        f"# submit: sbatch {shlex.quote(str(job_dir / 'job.sbatch'))}   (again after a failure: it resumes)",
        *(f"#SBATCH {d}" for d in directives),
        "",
        *environment_lines(opts),
        "",
        *RENDEZVOUS_LINES,
        "# a requeued (or resubmitted) job continues from the newest checkpoint of its own runs",
        "RESUME=()",
        f"if compgen -G {checkpoints} > /dev/null; then RESUME=(train.resume=latest); fi",
        ('echo "ftlab: job $SLURM_JOB_ID (start $((${SLURM_RESTART_COUNT:-0} + 1))) on $SLURM_JOB_NODELIST,'
         ' rendezvous $RDZV_HOST:$RDZV_PORT ${RESUME[*]}"'),
        "",
        *warned_step_lines(run_line, '"$SLURM_JOB_ID"', "the training saves a checkpoint, then requeues"),
    ]
    return script_text(lines)


# The pieces of a batch script that `ftlab sweep --slurm` (ftlab.runs.sweep_slurm) shares.
def job_resources(nodes: int, per_node: int, opts: SlurmOptions) -> tuple[list[str], list[str]]:
    """The resource directives, and the srun words of the job step that uses them: one launcher per node starts
    its `per_node` processes."""
    cpus = opts.cpus_per_task if opts.cpus_per_task is not None else (per_node if opts.cpu else None)
    resources = [f"--nodes={nodes}", "--ntasks-per-node=1"]
    if not opts.cpu:
        resources.append(f"--gres=gpu:{per_node}")
    if cpus is not None:
        resources.append(f"--cpus-per-task={cpus}")
    # srun does not pass the job's --cpus-per-task and GPUs on to its step by itself (Slurm >= 22.05): say them.
    step = ["srun", "--nodes", str(nodes), "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            *(["--gres", f"gpu:{per_node}"] if not opts.cpu else []), *(["--cpus-per-task", str(cpus)] if cpus else [])]
    return resources, step


def placement_directives(opts: SlurmOptions) -> list[str]:
    return [*([f"--time={opts.time}"] if opts.time else []),
            *([f"--partition={opts.partition}"] if opts.partition else []),
            *([f"--account={opts.account}"] if opts.account else []),
            f"--chdir={Path.cwd()}"]


def requeue_directives(opts: SlurmOptions) -> list[str]:
    return ["--open-mode=append", "--requeue", f"--signal=B:USR1@{opts.signal_seconds}"]


def environment_lines(opts: SlurmOptions) -> list[str]:
    exports = [f"export {name}={shlex.quote(value)}" for name, _, value in (e.partition("=") for e in opts.env)]
    return [
        *exports,
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" if opts.cpu else "",
        "# torchrun passes SIGUSR1 on to the training processes and gives them the warning time to save",
        "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={opts.signal_seconds}",
    ]


RENDEZVOUS_LINES = [
    "# every node meets at the first node of the allocation (c10d rendezvous)",
    'RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
    f"RDZV_PORT=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))",
]


def warned_step_lines(run_line: str, job_ref: str, what_then: str) -> list[str]:
    """Run the step (`run_line` ends in &) under the warning trap; a step that the warning stopped requeues
    `job_ref` (the job, or one task of an array job); the script exits with the step's code."""
    shown = job_ref.strip('"')
    return [
        "WARNED=0",
        "warned() {",
        f'    echo "ftlab: SIGUSR1 (time limit or preemption ahead): {what_then}"',
        '    WARNED=1',
        '    kill -USR1 "$STEP" 2> /dev/null',
        "}",
        "trap warned USR1",
        "trap 'echo \"ftlab: SIGTERM: waiting for the training processes to save and stop\"' TERM",
        run_line,
        "STEP=$!",
        "# wait returns early whenever a trapped signal arrives: wait until the step has really ended",
        'while true; do wait "$STEP"; CODE=$?; kill -0 "$STEP" 2> /dev/null || break; done',
        'if [ "$WARNED" = 1 ] && [ "$CODE" != 0 ]; then',
        f'    echo "ftlab: step ended with code $CODE after the warning: requeueing job {shown}"',
        f'    scontrol requeue {job_ref}',
        "fi",
        'exit "$CODE"',
    ]


def script_text(lines: list[str]) -> str:
    """The lines as a script, empty lines kept only where they separate two parts."""
    return "\n".join(line for i, line in enumerate(lines) if line or lines[i - 1]) + "\n"


# -- submitting ------------------------------------------------------------------------------------------
def check_slurm_answers() -> None:
    """sbatch is here and a controller answers; else one line (nothing has been written or submitted)."""
    if not shutil.which("sbatch") or not shutil.which("scontrol"):
        raise UserError("--submit: no Slurm here (sbatch/scontrol not on PATH); use --slurm to write the script "
                        "and submit it where Slurm runs")
    out = run_slurm_command(["scontrol", "ping"])
    if out.returncode != 0 or "UP" not in out.stdout:
        said = (out.stdout + out.stderr).strip().splitlines()
        raise UserError(f"--submit: no Slurm controller answers (scontrol ping: {said[-1] if said else out.returncode})"
                        "; nothing submitted")


def run_slurm_command(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=SLURM_ANSWER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"--submit: {argv[0]} got no answer from Slurm in {SLURM_ANSWER_TIMEOUT_S} s; "
                        "nothing submitted") from None


def submit(script: Path) -> str:
    """sbatch the script; the job id (one line naming sbatch's error otherwise)."""
    out = run_slurm_command(["sbatch", "--parsable", str(script)])
    if out.returncode != 0:
        said = [line for line in out.stderr.strip().splitlines() if line.strip()]
        raise UserError(f"--submit: sbatch refused the job ({said[-1] if said else f'exit {out.returncode}'}); "
                        "nothing submitted")
    return out.stdout.strip().split(";")[0]


def write_script(job_dir: Path, text: str) -> Path:
    job_dir.mkdir(parents=True, exist_ok=True)  # an accelerate profile's config may be there already
    path = job_dir / "job.sbatch"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)
    return path


def run_slurm(job: SlurmJob, opts: SlurmOptions, submit_it: bool, dry_run: bool) -> int:
    """--slurm: write the script and print its path; --submit: also submit and print the job id; with
    --dry-run: print the script, write nothing."""
    from ftlab.launch.planner import estimate_for_launch

    launch = job.launch
    check_options(opts, launch)
    text = batch_script(job, opts)
    if submit_it and not dry_run:
        check_slurm_answers()
    log.info("%s", estimate_for_launch(launch.plan_cfg or launch.cfg, launch.profile.ref, launch.gpus_per_node,
                                       launch.nodes))
    if dry_run:
        print(text, end="")
        return 0
    script = write_script(job.job_dir, text)
    if not submit_it:
        log.info("slurm: wrote %s; submit with: sbatch %s", script, script)
        print(script)
        return 0
    job_id = submit(script)
    log.info("slurm: submitted job %s; its runs and log (slurm-%s.out) are under %s", job_id, job_id, job.job_dir)
    print(job_id)
    return 0


# -- the command line ------------------------------------------------------------------------------------
def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """`ftlab launch`'s Slurm options."""
    g = parser.add_argument_group("Slurm", "write (--slurm) or submit (--submit) the launch as a batch job")
    g.add_argument("--slurm", action="store_true",
                   help="write a batch script under <output_dir>/slurm/ and print its path (with --dry-run: print "
                        "the script)")
    g.add_argument("--submit", action="store_true", help="write the batch script and submit it; prints the job id")
    add_job_options(g)


def add_job_options(g: argparse._ArgumentGroup) -> None:
    """What a batch job asks Slurm for (`slurm_options` reads them back)."""
    g.add_argument("--time", help="time limit (sbatch --time, e.g. 24:00:00 or 1-12)")
    g.add_argument("--partition", help="sbatch --partition")
    g.add_argument("--account", help="sbatch --account")
    g.add_argument("--cpu", action="store_true",
                   help="the nodes have no GPUs: --gpus N runs N CPU processes per node (gloo), no --gres")
    g.add_argument("--cpus-per-task", type=int, metavar="C",
                   help="CPU cores for each node's processes (default with --cpu: one per process)")
    g.add_argument("--signal-seconds", type=int, default=300, metavar="S",
                   help="SIGUSR1 this long before the time limit: checkpoint and requeue (default 300)")
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable the job exports (repeatable)")


def slurm_options(args: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(time=args.time, partition=args.partition, account=args.account, cpu=args.cpu,
                        cpus_per_task=args.cpus_per_task, signal_seconds=args.signal_seconds, env=tuple(args.env))


def cmd_slurm(args: argparse.Namespace) -> int:
    """`ftlab launch ... --slurm | --submit`."""
    if args.rdzv_endpoint:
        raise UserError("--rdzv-endpoint with --slurm: the batch script meets at the first node of its allocation")
    opts = slurm_options(args)
    job = prepare_slurm_job(args.profile, args.gpus, args.nodes, args.verb, args.recipe, list(args.overrides))
    kept = False
    try:
        code = run_slurm(job, opts, submit_it=args.submit, dry_run=args.dry_run)
        kept = not args.dry_run
        return code
    finally:
        # A dry run, a refusal or a failed submission leaves nothing behind (an accelerate profile's config is
        # written into the fresh job directory while the launch is prepared).
        if not kept:
            shutil.rmtree(job.job_dir, ignore_errors=True)
