"""A sweep's plan: the grid, its points and their command lines, checked before the first run (see ftlab.runs.sweep).

`Sweep` is what points.json holds; `plan_sweep` builds it from a recipe and the command line, `validate` loads
every point's recipe so that a bad key or value fails in seconds, not after hours of earlier runs.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from ftlab.config.load import load_recipe, parse_overrides
from ftlab.errors import UserError

VERBS = ("train", "eval", "loop")
STATES = ("pending", "running", "complete", "failed", "interrupted")
K_KEY = "pretrain.num_categories"  # the K-sweep's key (sweep.num_categories is shorthand for it)
# Set by the sweep for every point (name, output_dir, loop.dir) or by its resume (train.resume): not sweepable.
RESERVED = ("name", "output_dir", "loop.dir", "train.resume", "sweep")


@dataclass
class Point:
    index: int
    label: str                            # unique within the sweep: its name suffix and its directory
    values: dict[str, Any]                # grid key -> value, and "seed" when seeds are swept
    command: list[str] = field(default_factory=list)
    status: str = "pending"
    run: str | None = None                # its newest run directory
    attempts: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Sweep:
    name: str
    recipe: str
    verb: str
    overrides: list[str]                  # applied to every point, before the point's own values
    grid: dict[str, list[Any]]
    seeds: list[int] | None
    points: list[Point] = field(default_factory=list)
    version: int = 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sweep:
        points = [Point(**p) for p in data["points"]]
        return cls(**{**data, "points": points})


def plan_sweep(recipe: str, overrides: list[str], cfg: DictConfig, grid_args: list[str],
               seeds_arg: str | None) -> Sweep:
    """The sweep of `recipe`: its sweep section, with --grid keys replacing the section's and --seeds its seeds."""
    grid = recipe_grid(cfg)
    grid.update(parse_grid_args(grid_args))
    check_grid(grid)
    seeds = parse_seeds(seeds_arg) if seeds_arg is not None else cfg.sweep.seeds
    seeds = None if seeds is None else [int(s) for s in seeds]
    if not grid and not seeds:
        raise UserError("nothing to sweep: give --grid key=[v1,v2,...] and/or --seeds 0,1,2 (or a sweep: section "
                        "with grid, seeds or num_categories)")
    if seeds is not None and "seed" in grid:
        raise UserError("the seed is swept twice: by the grid key 'seed' and by the seeds; keep one")
    # sweep.* overrides shape the plan, not a run: the points (and a re-run's comparison) leave them out
    runs_overrides = [o for o in overrides if o.split("=", 1)[0].split(".")[0] != "sweep"]
    sweep = Sweep(name=cfg.name, recipe=str(recipe), verb=cfg.sweep.verb, overrides=runs_overrides, grid=grid,
                  seeds=seeds)
    sweep.points = [Point(i, label, values) for i, (label, values) in enumerate(point_values(grid, seeds))]
    return sweep


def recipe_grid(cfg: DictConfig) -> dict[str, list[Any]]:
    """sweep.grid as flat dotted keys (nested mappings are walked: a leaf is a list of values), plus the K-sweep
    shorthand sweep.num_categories."""
    grid: dict[str, list[Any]] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, DictConfig):
                walk(value, dotted + ".")
            else:
                grid[dotted] = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value

    walk(cfg.sweep.grid, "")
    if cfg.sweep.num_categories:
        if K_KEY in grid:
            raise UserError(f"sweep.num_categories is shorthand for grid {K_KEY}: set one of them, not both")
        grid[K_KEY] = list(cfg.sweep.num_categories)
    return grid


def parse_grid_args(items: list[str]) -> dict[str, list[Any]]:
    """`--grid key=[v1,v2]` arguments, values parsed as overrides are (YAML, 1e-5 a number)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key = item.split("=", 1)[0].strip()
        parsed = parse_overrides([item])
        value = OmegaConf.select(parsed, key)
        grid[key] = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise UserError(f"--seeds must be integers separated by commas, e.g. 0,1,2; got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds must list seeds >= 0, e.g. 0,1,2; got {text!r}")
    return seeds


def check_grid(grid: dict[str, list[Any]]) -> None:
    for key, values in grid.items():
        if key.split(".")[0] == "sweep" or key in RESERVED:
            raise UserError(f"grid key '{key}' cannot be swept: the sweep sets it for each point")
        if not isinstance(values, list) or not values:
            raise UserError(f"grid key '{key}' must list its values, e.g. {key}=[v1,v2]; got {values!r}")


def point_values(grid: dict[str, list[Any]], seeds: list[int] | None) -> list[tuple[str, dict[str, Any]]]:
    """(label, values) of every point: seeds outermost (each seed's whole grid in turn), the grid's last key
    varying fastest."""
    combos = list(itertools.product(*grid.values()))
    points = []
    for seed in seeds if seeds is not None else [None]:
        for combo in combos:
            values = dict(zip(grid, combo))
            if seed is not None:
                values["seed"] = seed
            points.append(values)
    labels = unique([label_of(v, grid) for v in points])
    return list(zip(labels, points))


def label_of(values: dict[str, Any], grid: dict[str, list[Any]]) -> str:
    """e.g. limit128_s0, k4_s1: each key's last part (K for the K-sweep's) and its value (a list or mapping value:
    its position in the grid)."""
    parts = []
    for key, value in values.items():
        if key == "seed":
            parts.append(f"s{value}")
            continue
        shown = (json.dumps(value) if isinstance(value, bool) or value is None else value
                 if isinstance(value, (str, int, float)) else grid[key].index(value))
        parts.append(f"{'k' if key == K_KEY else key.rsplit('.', 1)[-1]}{shown}")
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts)).strip("-.")[:80] or "point"


def unique(labels: list[str]) -> list[str]:
    """Labels made unique by their position where two points would share one (e.g. train.lr and eval.lr)."""
    return [f"{label}_{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def override_text(key: str, value: Any) -> str:
    """`key=value` that parses back to exactly `value` (a string such as '1e-5' or 'true' is quoted)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n").strip()
    if OmegaConf.select(parse_overrides([f"v={text}"]), "v") != value:
        text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{key}={text}"


def point_dir(sweep_dir: Path, point: Point) -> Path:
    return sweep_dir / point.label


def point_overrides(sweep: Sweep, point: Point, sweep_dir: Path) -> list[str]:
    """What makes `point` out of the recipe: the sweep's overrides, the point's values, its name and directories."""
    name = f"{sweep.name}_{point.label}"
    out = point_dir(sweep_dir, point)
    items = list(sweep.overrides) + [override_text(k, v) for k, v in point.values.items()]
    items += [override_text("name", name), override_text("output_dir", str(out))]
    if sweep.verb == "loop":  # its own loop directory, whatever the recipe's loop.dir says
        items.append(override_text("loop.dir", str(out / "loop" / name)))
    return items


def command_lines(sweep: Sweep, sweep_dir: Path) -> list[list[str]]:
    """Every point as one `ftlab VERB RECIPE key=value...` command line: the seam for launchers that run points
    elsewhere (ftlab.runs.sweep_slurm runs each through `ftlab launch` as a task of a Slurm array)."""
    return [["ftlab", sweep.verb, sweep.recipe, *point_overrides(sweep, p, sweep_dir)] for p in sweep.points]


def validate(sweep: Sweep, sweep_dir: Path) -> dict[int, DictConfig]:
    """Every grid value, then every point, loaded as its run would load it; then checked as its verb checks it.
    Nothing is written here: a bad key or value is one line naming it."""
    for key, values in sweep.grid.items():
        for value in values:
            try:
                load_recipe(sweep.recipe, sweep.overrides + [override_text(key, value)])
            except UserError as e:
                raise UserError(f"sweep grid: {e}") from None
    cfgs = {}
    for point in sweep.points:
        try:
            cfgs[point.index] = load_recipe(sweep.recipe, point_overrides(sweep, point, sweep_dir))
        except UserError as e:
            raise UserError(f"sweep point {point.label}: {e}") from None
    check_points(sweep, cfgs)
    return cfgs


def check_points(sweep: Sweep, cfgs: dict[int, DictConfig]) -> None:
    """The checks each verb makes before writing anything, made for every point before the first run."""
    labels = {p.index: p.label for p in sweep.points}
    for index, cfg in cfgs.items():
        try:
            if sweep.verb == "loop":
                from ftlab.loops.oak import check_recipe

                check_recipe(cfg)
            elif sweep.verb == "eval":
                from ftlab.evaluate import eval_source

                eval_source(cfg)
        except UserError as e:
            raise UserError(f"sweep point {labels[index]}: {e}") from None
    if sweep.verb == "train":
        check_pretraining(sweep, cfgs)


def check_pretraining(sweep: Sweep, cfgs: dict[int, DictConfig]) -> None:
    """Every pretraining point can choose its K categories (one corpus open per corpus); a K-sweep's plot needs
    each run's final validation loss."""
    from ftlab.data.corpus import Corpus
    from ftlab.train.pretrain import select_categories

    corpora: dict[str, Corpus] = {}
    for cfg in cfgs.values():
        if cfg.train.method != "pretrain":
            continue
        if K_KEY in sweep.grid and not cfg.train.eval_every:
            raise UserError("a K-sweep compares final validation losses: set train.eval_every (the last step is "
                            "always evaluated)")
        path = cfg.pretrain.corpus
        if not path:
            raise UserError("pretrain.corpus is not set (a directory made by: ftlab prepare-corpus INPUT --out DIR)")
        corpora.setdefault(path, Corpus.open(path))
        select_categories(cfg, corpora[path])
