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

    if args.resume:
        if args.recipe or args.overrides or args.grid or args.seeds is not None or args.verb or args.dry_run:
            raise UserError("--resume takes the sweep directory alone (its points.json holds the recipe, overrides "
                            "and grid)")
        print(resume_sweep(Path(args.resume)))
        return 0
    if not args.recipe:
        raise UserError("give a recipe (ftlab sweep RECIPE --grid key=[v1,v2]) or --resume SWEEP_DIR")
    overrides = list(args.overrides) + ([f"sweep.verb={args.verb}"] if args.verb else [])
    cfg = load_recipe(args.recipe, overrides)
    if args.dry_run:
        for command in dry_run(args.recipe, overrides, cfg, args.grid, args.seeds):
            print(shlex.join(command))
        return 0
    print(run_sweep(args.recipe, overrides, cfg, args.grid, args.seeds))
    return 0


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
    sw.add_argument("--dry-run", action="store_true", help="check every point and print its command line; run nothing")
    sw.set_defaults(fn=cmd_sweep)
