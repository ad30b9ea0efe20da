"""`ftlab launch RECIPE --profile NAME --gpus N [--nodes M]`: one recipe on several processes, GPUs or nodes,
run by the usual engines (torchrun; `accelerate launch` for DeepSpeed), as a named profile says.

A profile is a YAML file: `profiles/<name>.yaml` next to this module, or a user's own file given by its path.

    description: one line (listed with the profiles)
    launcher: python | torchrun | accelerate    # python: one process, no launcher
    max_processes: 1                             # optional: the most processes in all
    multi_process_needs_cuda: true               # optional: several processes only on CUDA GPUs (DeepSpeed)
    sharding: fsdp2                              # optional, torchrun only: the loop shards (train.sharding)
    accelerate: {distributed_type: ..., ...}     # accelerate only: its config file, less what the launch sets

`launch_argv` builds the command one node runs (a scheduler's script calls it once per job: ftlab.launch.slurm);
`run_launch` checks this machine too, then runs the command with Ctrl-C and SIGTERM forwarded to it and its
exit code passed through.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from ftlab.errors import UserError, first_line

log = logging.getLogger("ftlab")

PROFILE_DIR = Path(__file__).with_name("profiles")
LAUNCHERS = ("python", "torchrun", "accelerate")
VERBS = ("train", "loop")  # the verbs whose work runs on the training loop
SHARDINGS = ("none", "fsdp2")  # train.sharding: what the loop itself shards (ftlab.train.fsdp)


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    launcher: str
    description: str = ""
    max_processes: int | None = None
    multi_process_needs_cuda: bool = False
    sharding: str = "none"
    accelerate: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """How --profile names it: a shipped profile by its name, a user's file by its path."""
        return self.name if self.path.parent == PROFILE_DIR else str(self.path)


@dataclass(frozen=True)
class Launch:
    """A checked launch: what runs, on how many processes, and the command one node runs."""

    profile: Profile
    cfg: DictConfig
    gpus_per_node: int
    nodes: int
    argv: list[str]
    plan_cfg: DictConfig | None = None  # `precision: auto` unresolved: the planner sizes it for the GPUs, not here

    @property
    def processes(self) -> int:
        return self.gpus_per_node * self.nodes


# -- profiles --------------------------------------------------------------------------------------------
def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> Profile:
    """A shipped profile by name, else a profile file by path; one line naming the file (and line) when wrong."""
    if name in profile_names():
        return parse_profile(PROFILE_DIR / f"{name}.yaml", name)
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or os.sep in name:
        if not path.is_file():
            raise UserError(f"--profile {name}: no such profile file")
        return parse_profile(path, path.stem)
    raise UserError(f"unknown profile {name!r}; the profiles are {', '.join(profile_names())} "
                    "(or the path of a profile file)")


def parse_profile(path: Path, name: str) -> Profile:
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a profile is a mapping with at least 'launcher: {' | '.join(LAUNCHERS)}'")
    lines = {key.value: key.start_mark.line + 1 for key, _ in root.value}
    keys = [f.name for f in fields(Profile) if f.name not in ("name", "path")]

    def bad(key: str, why: str) -> UserError:
        return UserError(f"{path}:{lines.get(key, 1)}: {why}")

    for key in data:
        if key not in keys:
            raise bad(key, f"unknown key '{key}' (the keys are {', '.join(keys)})")
    if data.get("launcher") not in LAUNCHERS:
        raise bad("launcher", f"launcher must be one of {', '.join(LAUNCHERS)}; got {data.get('launcher')!r}")
    limit = data.get("max_processes")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise bad("max_processes", f"max_processes must be an integer >= 1; got {limit!r}")
    if not isinstance(data.get("multi_process_needs_cuda", False), bool):
        raise bad("multi_process_needs_cuda", "multi_process_needs_cuda must be true or false")
    if data.get("sharding", "none") not in SHARDINGS:
        raise bad("sharding", f"sharding must be one of {', '.join(SHARDINGS)}; got {data.get('sharding')!r}")
    if data.get("sharding", "none") != "none" and data["launcher"] != "torchrun":
        raise bad("sharding", "sharding is applied by the training loop to torchrun's processes: launcher: torchrun")
    section = data.get("accelerate") or {}
    if data["launcher"] == "accelerate" and not (isinstance(section, dict) and section.get("distributed_type")):
        raise bad("accelerate", "an accelerate profile needs an 'accelerate' mapping with its distributed_type "
                                "(e.g. DEEPSPEED with a deepspeed_config)")
    if data["launcher"] != "accelerate" and section:
        raise bad("accelerate", f"an 'accelerate' section with launcher {data['launcher']} would be ignored")
    return Profile(name=name, path=path, launcher=data["launcher"], description=str(data.get("description", "")),
                   max_processes=limit, multi_process_needs_cuda=data.get("multi_process_needs_cuda", False),
                   sharding=data.get("sharding", "none"), accelerate=section)


# -- the command -----------------------------------------------------------------------------------------
def launch_argv(profile: Profile | str, gpus_per_node: int, nodes: int, rdzv_endpoint: str | None, verb: str,
                recipe: str, overrides: Sequence[str]) -> list[str]:
    """The command one node runs for this launch (every node of a multi-node job runs the same one).

    `rdzv_endpoint` (HOST:PORT of the first node) is needed with nodes > 1; with one node and None, the launcher
    picks a free local port. What does not depend on the machine is checked here (profile, processes, recipe,
    global batch); an accelerate profile's config file is written under <output_dir>/launch/."""
    return prepare_launch(profile, gpus_per_node, nodes, rdzv_endpoint, verb, recipe, overrides).argv


def prepare_launch(profile: Profile | str, gpus_per_node: int, nodes: int, rdzv_endpoint: str | None, verb: str,
                   recipe: str, overrides: Sequence[str]) -> Launch:
    from ftlab.config import load_recipe
    from ftlab.train.setup import check_distributed_type, global_batch_accum, resolve_resume

    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    check_layout(prof, gpus_per_node, nodes, rdzv_endpoint, verb)
    if prof.accelerate:
        try:
            check_distributed_type(str(prof.accelerate["distributed_type"]))
        except UserError as e:
            raise UserError(f"profile {prof.name}: {e}") from None
    # The profile's sharding goes last, so it is what runs (and what the recipe checks see).
    overrides = [*overrides, *([f"train.sharding={prof.sharding}"] if prof.sharding != "none" else [])]
    cfg = load_recipe(recipe, overrides)
    if verb == "train" and cfg.train.resume:  # a path that is not a checkpoint: one line here, not one per process
        resolve_resume(cfg)
    child = ["-m", "ftlab.cli", verb, str(recipe), *overrides]
    if cfg.train.global_batch is not None:
        # Each process computes the same accumulation from its WORLD_SIZE; passing it makes the command say it.
        child.append(f"train.grad_accum={global_batch_accum(cfg, gpus_per_node * nodes)}")
    if prof.launcher == "python":
        argv = [sys.executable, *child]
    elif prof.launcher == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(gpus_per_node, nodes, rdzv_endpoint),
                *child]
    else:
        config = write_accelerate_config(prof, cfg)
        argv = [sys.executable, "-m", "accelerate.commands.launch",
                *accelerate_flags(prof, config, gpus_per_node, nodes, rdzv_endpoint), *child]
    return Launch(prof, cfg, gpus_per_node, nodes, argv, load_recipe(recipe, overrides, resolve_hardware=False))


def check_layout(prof: Profile, gpus_per_node: int, nodes: int, rdzv_endpoint: str | None, verb: str) -> None:
    if verb not in VERBS:
        raise UserError(f"--verb {verb}: ftlab launch runs {' or '.join(VERBS)}")
    if gpus_per_node < 1 or nodes < 1:
        raise UserError(f"--gpus and --nodes must be >= 1; got --gpus {gpus_per_node} --nodes {nodes}")
    if prof.max_processes is not None and gpus_per_node * nodes > prof.max_processes:
        most = "one process" if prof.max_processes == 1 else f"at most {prof.max_processes} processes"
        raise UserError(f"profile {prof.name} runs {most}; got --gpus {gpus_per_node} x --nodes {nodes} "
                        "(use --profile ddp, zero2 or zero3 for several)")
    if nodes > 1 and not rdzv_endpoint:
        raise UserError(f"--nodes {nodes} needs --rdzv-endpoint HOST:PORT (the first node, where every node meets)")
    if rdzv_endpoint:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--rdzv-endpoint {rdzv_endpoint!r}: expected HOST:PORT, e.g. node001:29400")
        if prof.launcher == "python":
            raise UserError(f"profile {prof.name} runs one process without a launcher: no --rdzv-endpoint")


def torchrun_flags(gpus_per_node: int, nodes: int, rdzv_endpoint: str | None) -> list[str]:
    if rdzv_endpoint is None:  # one node: torchrun's own rendezvous on a free local port
        return ["--standalone", "--nproc_per_node", str(gpus_per_node)]
    return ["--nproc_per_node", str(gpus_per_node), "--nnodes", str(nodes), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", rdzv_endpoint]


def accelerate_flags(prof: Profile, config: Path, gpus_per_node: int, nodes: int,
                     rdzv_endpoint: str | None) -> list[str]:
    flags = ["--config_file", str(config), "--num_processes", str(gpus_per_node * nodes),
             "--num_machines", str(nodes)]
    if rdzv_endpoint is None:
        return flags + (["--main_process_port", "0"] if gpus_per_node > 1 else [])  # 0: a free port
    host, _, port = rdzv_endpoint.rpartition(":")
    flags += ["--rdzv_backend", "c10d", "--main_process_ip", host, "--main_process_port", port]
    if prof.accelerate.get("distributed_type") == "DEEPSPEED" and nodes > 1:
        # accelerate's default multi-node DeepSpeed launcher is pdsh (ssh into every node from one); each node
        # runs this command itself instead, meeting through torchrun's c10d rendezvous.
        flags += ["--deepspeed_multinode_launcher", "standard"]
    return flags


def write_accelerate_config(prof: Profile, cfg: DictConfig) -> Path:
    """The profile's accelerate config, with the recipe's precision, as a file under <output_dir>/launch/ named by
    its content (a later job, e.g. a queued Slurm script, still finds it). Written to a temp file, then renamed."""
    config = {"compute_environment": "LOCAL_MACHINE", **prof.accelerate,
              "mixed_precision": {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision],
              "use_cpu": False}
    text = f"# accelerate config of ftlab launch profile {prof.name} ({prof.path})\n" + yaml.safe_dump(config)
    out = Path(cfg.output_dir).resolve() / "launch" / f"{prof.name}_{hashlib.sha256(text.encode()).hexdigest()[:10]}.yaml"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return out


# -- running it here -------------------------------------------------------------------------------------
def check_this_machine(launch: Launch) -> str:
    """What this machine cannot run, in one line; else a description of the processes it will run."""
    import torch

    prof, n = launch.profile, launch.gpus_per_node
    if launch.cfg.lora.quantize and not torch.cuda.is_available():
        raise UserError(f"lora.quantize={launch.cfg.lora.quantize} (QLoRA) needs CUDA GPUs; this machine has none "
                        "(on CPU use plain LoRA: lora.quantize=null)")
    if prof.accelerate.get("distributed_type") == "DEEPSPEED" and not importlib.util.find_spec("deepspeed"):
        raise UserError(f"profile {prof.name} needs DeepSpeed: pip install 'ftlab[gpu]'")
    if not torch.cuda.is_available():
        if prof.multi_process_needs_cuda and launch.processes > 1:
            raise UserError(f"profile {prof.name} with {launch.processes} processes needs CUDA GPUs (on CPU accelerate "
                            f"forms no process group under DeepSpeed); use --gpus 1, or --profile ddp for data "
                            f"parallelism on CPU")
        return f"no CUDA here: --gpus {n} runs {processes(n)} on the CPU" + (" with gloo" if launch.processes > 1 else "")
    present = torch.cuda.device_count()
    if n > present:
        raise UserError(f"--gpus {n} but this machine has {present} CUDA GPU(s); use --gpus {present} or fewer")
    return f"{n} of {present} CUDA GPUs" + (f" on each of {launch.nodes} nodes" if launch.nodes > 1 else "")


def processes(n: int) -> str:
    return "1 process" if n == 1 else f"{n} processes"


def run_argv(argv: Sequence[str]) -> int:
    """Run the command in its own process group; Ctrl-C, SIGTERM and SIGUSR1 (Slurm's warning before a time limit)
    are passed on to the whole group: the launcher and every training process, whose loop stops at a step
    boundary. Returns the command's exit code (128 + N when a signal N ended it)."""
    child = subprocess.Popen(list(argv), start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # already gone
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def run_launch(launch: Launch, dry_run: bool = False) -> int:
    """Print the command (dry run), or check this machine, say what runs, and run it. The planner's estimate
    goes to the log first in both cases (stdout of a dry run is the command alone)."""
    from ftlab.launch.planner import estimate_for_launch

    log.info("%s", estimate_for_launch(launch.plan_cfg or launch.cfg, launch.profile.ref, launch.gpus_per_node,
                                       launch.nodes))
    if dry_run:
        print(shlex.join(launch.argv))
        return 0
    where = check_this_machine(launch)
    log.info("launch: profile %s (%s), %s; %s", launch.profile.name, launch.profile.launcher,
             processes(launch.processes), where)
    log.info("launch: %s", shlex.join(launch.argv))
    return run_argv(launch.argv)


# -- the command line ------------------------------------------------------------------------------------
def cmd_launch(args: argparse.Namespace) -> int:
    if args.preflight:  # a tiny model of the recipe's on 1 and N processes first; a disagreement stops here
        from ftlab.launch.preflight import preflight_launch

        preflight_launch(args)
    if args.slurm or args.submit:
        from ftlab.launch.slurm import cmd_slurm

        return cmd_slurm(args)
    launch = prepare_launch(args.profile, args.gpus, args.nodes, args.rdzv_endpoint, args.verb, args.recipe,
                            args.overrides)
    return run_launch(launch, dry_run=args.dry_run)


def add_launch_verbs(sub: argparse._SubParsersAction) -> None:
    """`ftlab launch`; scheduler options (Slurm) join its arguments here, after --dry-run."""
    what = "run a recipe on several processes, GPUs or nodes (torchrun, accelerate, DeepSpeed) as a named profile says"
    lp = sub.add_parser("launch", help=what, description=f"{what}; profiles: {', '.join(profile_names())} "
                                                         f"(files in {PROFILE_DIR}) or a profile file's path")
    lp.add_argument("recipe", help="recipe YAML file")
    lp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.global_batch=64")
    lp.add_argument("--profile", required=True, help=f"{', '.join(profile_names())}, or a profile file's path")
    lp.add_argument("--gpus", type=int, default=1, metavar="N",
                    help="processes per node, one per GPU (on a machine without CUDA: N CPU processes)")
    lp.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes (default 1)")
    lp.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="with --nodes > 1: the first node's address")
    lp.add_argument("--verb", choices=VERBS, default="train", help="what the processes run (default: train)")
    lp.add_argument("--dry-run", action="store_true", help="print the command and exit")
    lp.add_argument("--preflight", action="store_true",
                    help="first train a tiny random model of the recipe's architecture on 1 and N processes: same "
                         "losses and gradient norms, same logits after save and reload, same step after resume")
    from ftlab.launch.slurm import add_slurm_arguments

    add_slurm_arguments(lp)
    lp.set_defaults(fn=cmd_launch)
