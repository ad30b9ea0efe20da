"""Recipe loading: YAML with `base:` inheritance, dotted command-line overrides, typed validation.

    recipe = load_recipe("recipes/x.yaml", ["optim.lr=1e-5", "train.max_steps=10"])

A variant recipe holds only its overrides and names its parent with `base: parent.yaml` (a path
relative to the variant, or a list of them merged in order). Every error a user can cause is a
one-line UserError naming the file:line or the key, with the closest valid key where one exists.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ftlab.config.schema import CHOICES, Recipe
from ftlab.errors import UserError


def read_yaml(path: Path) -> dict:
    """Parse one YAML file; syntax errors name file:line."""
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def resolve_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Merge a recipe over its `base:` chain (parents first), as plain dicts."""
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: circular base: chain ({' -> '.join(p.name for p in seen + (path,))})")
    data = read_yaml(path)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create()
    for b in bases:
        parent = (path.parent / b) if not os.path.isabs(b) else Path(b)
        merged = OmegaConf.merge(merged, OmegaConf.create(resolve_bases(parent, seen + (path,))))
    merged = OmegaConf.merge(merged, OmegaConf.create(data))
    return OmegaConf.to_container(merged)  # type: ignore[return-value]


def valid_keys(cls: Any = Recipe, prefix: str = "") -> list[str]:
    """All dotted keys of the schema, for 'did you mean' hints."""
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys += valid_keys(type(default), key + ".")
    return keys


def closest_key(key: str) -> str:
    match = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    if not match:  # try the last component alone, e.g. "lerning_rate" -> optim.lr is too far; "lr"
        leaf = key.rsplit(".", 1)[-1]
        match = [k for k in valid_keys() if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [v.rsplit(".", 1)[-1] for v in valid_keys()], n=1, cutoff=0.6)][:1]
    return f"; did you mean '{match[0]}'?" if match else ""


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    items = list(overrides)
    for o in items:
        if "=" not in o or o.startswith("="):
            raise UserError(f"override {o!r} must look like key=value (e.g. optim.lr=1e-5)")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as e:
        raise UserError(f"bad override: {str(e).splitlines()[0]}") from None


def load_recipe(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> DictConfig:
    """Load, merge and validate a recipe; returns a typed, fully resolved DictConfig."""
    schema = OmegaConf.structured(Recipe)
    layers = [OmegaConf.create(resolve_bases(Path(path)))] if path else []
    layers.append(parse_overrides(overrides))
    cfg = schema
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ConfigKeyError as e:
            key = _full_key(e)
            raise UserError(f"{_where(path)}unknown key '{key}'{closest_key(key)}") from None
        except ValidationError as e:
            key = _full_key(e)
            raise UserError(f"{_where(path)}wrong type for '{key}': {_first_line(e)}") from None
    try:
        OmegaConf.resolve(cfg)  # interpolations such as ${train.batch_size}
    except OmegaConfBaseException as e:
        raise UserError(f"{_where(path)}cannot resolve '{_full_key(e)}': {_first_line(e)}") from None
    check_choices(cfg, path)
    return cfg


def check_choices(cfg: DictConfig, path: Any = None) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed)
            raise UserError(f"{_where(path)}'{key}' must be one of {shown}; got {value!r}")
    for key in ("train.batch_size", "train.grad_accum", "data.max_length"):
        if OmegaConf.select(cfg, key) < 1:
            raise UserError(f"{_where(path)}'{key}' must be >= 1; got {OmegaConf.select(cfg, key)}")


def _full_key(e: OmegaConfBaseException) -> str:
    full = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    return str(full)


def _first_line(e: Exception) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return str(msg).splitlines()[0]


def _where(path: Any) -> str:
    return f"{path}: " if path else ""


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
