"""`ftlab sweep`, added to the command line by `add_sweep_verbs` (the work is in ftlab.runs.sweep)."""
from __future__ import annotations

import argparse
import shlex
from typing import Any

from ftlab.errors import UserError


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ftlab.config import load_recipe
    from ftlab.runs.sweep import dry_run, resume_sweep, run_sweep

    slurm = args.slurm or args.submit
    check_launch_flags(args, slurm)
    if args.point is not None:
        from ftlab.runs.sweep_slurm import run_point_task

        if not args.resume or args.recipe or args.overrides or args.grid or args.seeds is not None or args.verb:
            raise UserError("--point runs one point of an existing sweep: ftlab sweep --resume SWEEP_DIR --point I")
        return run_point_task(Path(args.resume), args.point, point_launch(args), args.rdzv_endpoint)
    if args.resume:
        if args.recipe or args.overrides or args.grid or args.seeds is not None or args.verb or \
                (args.dry_run and not slurm):
            raise UserError("--resume takes the sweep directory alone (its points.json holds the recipe, overrides "
                            "and grid)")
        if slurm:
            from ftlab.runs.sweep import reopen_sweep

            sweep, sweep_dir, cfgs = reopen_sweep(Path(args.resume))
            return submit_array(args, sweep, sweep_dir, cfgs, load_recipe(sweep.recipe, sweep.overrides))
        print(resume_sweep(Path(args.resume)))
        return 0
    if not args.recipe:
        raise UserError("give a recipe (ftlab sweep RECIPE --grid key=[v1,v2]) or --resume SWEEP_DIR")
    overrides = list(args.overrides) + ([f"sweep.verb={args.verb}"] if args.verb else [])
    cfg = load_recipe(args.recipe, overrides)
    if slurm:
        from ftlab.runs.sweep import prepare_sweep

        return submit_array(args, *prepare_sweep(args.recipe, overrides, cfg, args.grid, args.seeds), cfg)
    if args.dry_run:
        for command in dry_run(args.recipe, overrides, cfg, args.grid, args.seeds):
            print(shlex.join(command))
        return 0
    print(run_sweep(args.recipe, overrides, cfg, args.grid, args.seeds))
    return 0


def submit_array(args: argparse.Namespace, sweep: Any, sweep_dir: Any, cfgs: dict, cfg: Any) -> int:
    """--slurm / --submit: the array script written (printed with --dry-run) and, with --submit, submitted."""
    from ftlab.launch.slurm import slurm_options
    from ftlab.runs.sweep_slurm import slurm_sweep

    print(slurm_sweep(sweep, sweep_dir, cfgs, cfg, point_launch(args), slurm_options(args), args.max_parallel,
                      submit_it=args.submit, dry_run=args.dry_run))
    return 0


def point_launch(args: argparse.Namespace) -> Any:
    from ftlab.runs.sweep_slurm import PointLaunch

    return PointLaunch(args.profile, args.gpus, args.nodes)


def check_launch_flags(args: argparse.Namespace, slurm: bool) -> None:
    """Launch and Slurm options only where they act: a flag that would be ignored is refused."""
    launch = {"--profile": args.profile is not None, "--gpus": args.gpus != 1, "--nodes": args.nodes != 1}
    job = {"--max-parallel": args.max_parallel is not None, "--time": args.time is not None,
           "--partition": args.partition is not None, "--account": args.account is not None, "--cpu": args.cpu,
           "--cpus-per-task": args.cpus_per_task is not None, "--signal-seconds": args.signal_seconds != 300,
           "--env": bool(args.env)}
    if args.point is not None and slurm:
        raise UserError("--point runs one point here (what an array task runs); it does not go with --slurm/--submit")
    if args.rdzv_endpoint and args.point is None:
        raise UserError("--rdzv-endpoint goes with --point (an array task's launch); the script sets it itself")
    if slurm:
        return
    # --point takes the launch's flags (the script passes them); the job's options are the script's own
    given = job if args.point is not None else {**launch, **job}
    stray = [flag for flag, on in given.items() if on]
    if stray:
        raise UserError(f"{stray[0]} goes with --slurm or --submit (a sweep run as a Slurm array job)")


def add_sweep_verbs(sub: Any) -> None:
    from ftlab.runs.sweep_plan import VERBS

    sw = sub.add_parser("sweep", help="one run per point of a grid (x seeds) of any recipe, in sequence, resumable",
                        description="one run per point of --grid (or the recipe's sweep: section) x seeds, for "
                                    "ftlab train, eval or loop; runs/sweep/<stamp>_<name>/ gets points.json (each "
                                    "point's state), summary.csv/md and, for K-sweeps, val_loss_vs_k.png")
    sw.add_argument("recipe", nargs="?", help="recipe YAML file")
    sw.add_argument("overrides", nargs="*", help="dotted overrides applied to every point, e.g. train.max_steps=100")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]",
                    help="a key and its values (repeatable; the points are the product); replaces the recipe's "
                         "sweep.grid value of that key")
    sw.add_argument("--seeds", default=None, metavar="0,1,2", help="run every grid point once per seed "
                    "(default: sweep.seeds, else the recipe's seed)")
    sw.add_argument("--verb", choices=VERBS, default=None,
                    help="what each point runs: train (SFT, DPO, GRPO, pretraining), eval or loop "
                         "(default: sweep.verb, else train)")
    sw.add_argument("--resume", metavar="SWEEP_DIR", help="continue a sweep: skip complete points, resume the others")
    sw.add_argument("--dry-run", action="store_true", help="check every point and print its command line (with "
                    "--slurm: the array script); run nothing")
    g = sw.add_argument_group("Slurm", "run the points as one Slurm array job, task i running point i through "
                                       "ftlab launch (without --profile: in the task's own process)")
    g.add_argument("--slurm", action="store_true", help="write the array script under <sweep dir>/slurm/ and print "
                   "its path; with --resume SWEEP_DIR: an array of the points not complete")
    g.add_argument("--submit", action="store_true", help="write the array script and submit it; prints the job id")
    g.add_argument("--max-parallel", type=int, metavar="K", help="at most K array tasks at a time (--array=...%%K)")
    g.add_argument("--profile", help="ftlab launch's profile for each point (single, ddp, zero2, ... or a file)")
    g.add_argument("--gpus", type=int, default=1, metavar="N", help="with --profile: processes per node")
    g.add_argument("--nodes", type=int, default=1, metavar="M", help="with --profile: nodes per point")
    g.add_argument("--point", type=int, metavar="I", help="with --resume SWEEP_DIR: run point I alone, its state "
                   "locked in points.json (what array task I runs)")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="with --point: where the launch's nodes meet")
    from ftlab.launch.slurm import add_job_options

    add_job_options(g)
    sw.set_defaults(fn=cmd_sweep)
