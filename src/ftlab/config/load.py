"""Recipe loading: YAML with `base:` inheritance, dotted command-line overrides, typed validation.

    recipe = load_recipe("recipes/x.yaml", ["optim.lr=1e-5", "train.max_steps=10"])

A variant recipe holds only its overrides and names its parent with `base: parent.yaml` (a path
relative to the variant, or a list of them merged in order). Every error a user can cause is a
one-line UserError naming the file:line or the key, with the closest valid key where one exists.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ftlab.config.schema import CHOICES, METRIC_DIRECTIONS, NULL_MEANS, RANGES, Recipe, metric_direction
from ftlab.errors import UserError, first_line, not_utf8


def read_yaml(path: Path) -> dict:
    """Parse one YAML file; syntax errors name file:line."""
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, raw, e) from None
    try:
        data = yaml.safe_load(text)
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
    merged = OmegaConf.create()
    for parent in base_paths(path, data.pop("base", None)):
        merged = OmegaConf.merge(merged, _as_config(resolve_bases(parent, seen + (path,)), parent))
    merged = OmegaConf.merge(merged, _as_config(data, path))
    return OmegaConf.to_container(merged)  # type: ignore[return-value]


def base_paths(path: Path, bases: Any) -> list[Path]:
    """The parents a recipe's `base:` names; a missing one is an error naming the referring file:line."""
    if bases is None:
        return []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise UserError(f"{path}:{_line_of(path, 'base')}: base: must be a recipe path or a list of them; "
                        f"got {bases!r}")
    found = []
    for b in bases:
        parent = Path(b).expanduser()
        parent = parent if parent.is_absolute() else path.parent / parent
        if not parent.is_file():
            raise UserError(f"{path}:{_line_of(path, b)}: base recipe {b!r} not found ({parent})")
        found.append(parent)
    return found


def _line_of(path: Path, needle: str) -> int:
    """1-based line of the `base:` entry naming `needle` (only called on the error path)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("base")), 0)
    return next((i + 1 for i in range(start, len(lines)) if needle in lines[i]), start + 1)


def _as_config(data: dict, path: Path) -> DictConfig:
    """OmegaConf of one file's keys; values YAML allows but a recipe cannot hold (dates, ...) name the file."""
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as e:
        raise UserError(f"{path}: bad value for '{_full_key(e)}': {first_line(e)}") from None


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
        raise UserError(f"bad override: {first_line(e)}") from None
    except yaml.YAMLError as e:  # a value that is not YAML, e.g. an unclosed list: name the override
        bad = next((o for o in items if not _parses_as_yaml(o.split("=", 1)[1])), ", ".join(items))
        problem = getattr(e, "problem", None) or first_line(e)
        raise UserError(f"override {bad!r}: the value is not valid YAML ({problem})") from None


def _parses_as_yaml(text: str) -> bool:
    try:
        yaml.safe_load(text)
        return True
    except yaml.YAMLError:
        return False


def load_recipe(path: str | os.PathLike | None, overrides: Iterable[str] = (),
                resolve_hardware: bool = True) -> DictConfig:
    """Load, merge and validate a recipe; returns a typed, fully resolved DictConfig. `resolve_hardware=False`
    keeps `precision: auto` as written, for a plan made on another machine than the one that will train.

    Every check runs here, before any model or data loads, so every verb gets it; an error names the
    override that caused it (`override 'train.log_every=0': ...`) or else the recipe file.
    """
    items = list(overrides)
    override_layer = parse_overrides(items)
    layers = [(_where(path), OmegaConf.create(resolve_bases(Path(path))))] if path else []
    layers.append(("", override_layer))
    cfg = OmegaConf.structured(Recipe)
    for where, layer in layers:
        check_reward_entries(layer, where or _override_of("grpo.rewards", items))
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ConfigKeyError as e:
            key = _full_key(e)
            raise UserError(f"{where or _override_of(key, items)}unknown key '{key}'{closest_key(key)}") from None
        except ValidationError as e:
            key = _full_key(e)
            raise UserError(f"{where or _override_of(key, items)}wrong type for '{key}': {first_line(e)}") from None
    try:
        OmegaConf.resolve(cfg)  # interpolations such as ${train.batch_size}
    except OmegaConfBaseException as e:
        raise UserError(f"{_where(path)}cannot resolve '{_full_key(e)}': {first_line(e)}") from None

    def origin(key: str) -> str:
        return _override_of(key, items) if OmegaConf.select(override_layer, key) is not None else _where(path)

    check_choices(cfg, origin)
    check_ranges(cfg, origin)
    check_best_metric(cfg, origin)
    check_grpo(cfg, origin)
    apply_model_preset(cfg, origin)
    if resolve_hardware:
        resolve_precision(cfg)
    return cfg


def check_reward_entries(layer: Any, where: str) -> None:
    """`grpo.rewards` entries one by one, so that an error names the entry (`grpo.rewards[1]: unknown key 'wieght';
    did you mean 'weight'?`): merged as a whole, OmegaConf reports the key inside an entry without its path, and the
    closest recipe key would be suggested."""
    from ftlab.config.schema import RewardConfig

    try:
        entries = OmegaConf.select(layer, "grpo.rewards")
    except OmegaConfBaseException:
        return  # `grpo` is not a section here: the merge names that
    if entries is None:
        return
    if not isinstance(entries, ListConfig):
        raise UserError(f"{where}'grpo.rewards' must be a list of {{fn, weight, name}} entries; got {entries!r}")
    allowed = [f.name for f in fields(RewardConfig)]
    for i, entry in enumerate(entries):
        key = f"grpo.rewards[{i}]"
        if not isinstance(entry, DictConfig):
            raise UserError(f"{where}{key} must be a mapping such as {{fn: correctness, weight: 1.0}}; got {entry!r}")
        for name in entry:
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.5)
                hint = f"; did you mean '{close[0]}'?" if close else f" (the keys are {', '.join(allowed)})"
                raise UserError(f"{where}{key}: unknown key '{name}'{hint}")
        try:
            OmegaConf.merge(OmegaConf.structured(RewardConfig), entry)
        except ValidationError as e:
            raise UserError(f"{where}{key}: wrong type for '{_full_key(e)}': {first_line(e)}") from None


def native_bf16() -> bool:
    """Whether this machine computes bf16 matmuls in hardware (CUDA with bf16, or a CPU with AVX512-BF16 or
    AMX). Without it, CPU bf16 autocast is emulated: measured 4x slower than fp32 per matmul on an AVX-512 CPU
    without BF16, while with AMX it trains ~1.8x faster than fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    return bool(cpu and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()))


def resolve_precision(cfg: DictConfig) -> None:
    """`train.precision: auto` -> bf16 where the hardware has it, else fp16 on a GPU and fp32 on a CPU.
    `eval.precision: auto` -> bf16 on a GPU with bf16, else fp32 (CPU decoding is faster in fp32 even with
    AMX: autocast re-casts every weight at every step). Resolved here so config.yaml records what ran."""
    import torch

    for section in ("train", "eval"):
        node = cfg.get(section)
        if node is None or node.get("precision") != "auto":
            continue
        if section == "train":
            node.precision = "bf16" if native_bf16() else ("fp16" if torch.cuda.is_available() else "fp32")
        else:
            node.precision = "bf16" if torch.cuda.is_available() and native_bf16() else "fp32"


def apply_model_preset(cfg: DictConfig, origin: Callable[[str], str] = lambda key: "") -> None:
    """model.preset fills model.scratch: the preset's keys, then the recipe's own scratch keys on top (so the
    resolved config.yaml shows the whole architecture, and loading it again gives the same model)."""
    if cfg.model.preset is None:
        return
    from ftlab.models.presets import PRESETS

    if cfg.model.preset not in PRESETS:
        raise UserError(f"{origin('model.preset')}'model.preset' must be one of {', '.join(PRESETS)}; "
                        f"got {cfg.model.preset!r}")
    own = OmegaConf.to_container(cfg.model.scratch) if cfg.model.scratch else {}
    cfg.model.scratch = {**PRESETS[cfg.model.preset], **own}


def check_choices(cfg: DictConfig, origin: Callable[[str], str] = lambda key: "") -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed)
            raise UserError(f"{origin(key)}'{key}' must be one of {shown}; got {value!r}")


def check_ranges(cfg: DictConfig, origin: Callable[[str], str] = lambda key: "") -> None:
    """Every numeric setting within its range (schema.RANGES): expected vs got, naming the key."""
    for key, spec in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        values = list(value) if isinstance(value, ListConfig) else [value]
        for i, v in enumerate(values):
            if not in_range(v, spec):
                shown = f"{key}[{i}]" if isinstance(value, ListConfig) else key
                null = f" (or null: {NULL_MEANS[key]})" if key in NULL_MEANS else ""
                expected = spec if spec.startswith(">") else f"in {spec}"
                raise UserError(f"{origin(key)}'{shown}' must be {expected}{null}; got {v!r}")
    if len(cfg.optim.betas) != 2:
        raise UserError(f"{origin('optim.betas')}'optim.betas' must be two numbers [beta1, beta2]; "
                        f"got {list(cfg.optim.betas)!r}")
    check_hops(cfg, origin)
    check_detach_prompt(cfg, origin)


def check_best_metric(cfg: DictConfig, origin: Callable[[str], str]) -> None:
    """A best/ checkpoint kept by a metric whose direction is unknown could keep the worst one: refuse it."""
    name = cfg.train.best_metric
    if name is not None and metric_direction(name) is None:
        known = ", ".join(f"eval/{k}" for k in METRIC_DIRECTIONS)
        raise UserError(f"{origin('train.best_metric')}'train.best_metric' must be one of {known} (or a variant "
                        f"such as eval/accuracy_strict); got {name!r}")


def check_grpo(cfg: DictConfig, origin: Callable[[str], str]) -> None:
    """train.method=grpo: settings it cannot run with, refused before any model loads (ftlab.train.grpo)."""
    if cfg.train.method == "grpo":
        from ftlab.train.grpo import check_recipe

        check_recipe(cfg, origin)


def in_range(value: Any, spec: str) -> bool:
    """`value` satisfies a RANGES spec; NaN and infinities never do (a finite setting is always meant)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if spec.startswith((">=", ">")):
        bound = float(spec.lstrip(">= "))
        return value >= bound if spec.startswith(">=") else value > bound
    low, high = (float(x) for x in spec[1:-1].split(","))
    above = value >= low if spec[0] == "[" else value > low
    below = value <= high if spec[-1] == "]" else value < high
    return above and below


def check_hops(cfg: DictConfig, origin: Callable[[str], str]) -> None:
    """The quickstart's hop counts exist in the PrOntoQA generator, and there is one size per held-out hop."""
    from ftlab.tasks.prontoqa_gen import max_supported_hops

    q = cfg.quickstart
    for key in ("quickstart.train_hops", "quickstart.heldout_hops"):
        hops = list(OmegaConf.select(cfg, key))
        if not hops or max(hops) > max_supported_hops():
            raise UserError(f"{origin(key)}'{key}' must list hop counts from 1 to {max_supported_hops()}; "
                            f"got {hops}")
    if len(q.heldout_hops) != len(q.heldout_sizes):
        raise UserError(f"{origin('quickstart.heldout_sizes')}'quickstart.heldout_sizes' must give one size per "
                        f"entry of quickstart.heldout_hops ({len(q.heldout_hops)}); got {len(q.heldout_sizes)}")


def check_detach_prompt(cfg: DictConfig, origin: Callable[[str], str]) -> None:
    """`train.detach_prompt` cuts each row at its prompt: one example per row, an SFT objective, and a
    KV cache through the layers (gradient checkpointing drops it)."""
    if not cfg.train.detach_prompt:
        return
    clash = {"data.packing": cfg.data.packing and "packed rows hold several prompts",
             "train.gradient_checkpointing": cfg.train.gradient_checkpointing
             and "checkpointed layers drop the prompt's KV cache",
             "train.method": cfg.train.method != "sft" and f"it applies to SFT only, not {cfg.train.method}"}
    for key, why in clash.items():
        if why:
            raise UserError(f"{origin('train.detach_prompt')}'train.detach_prompt' cannot be combined with "
                            f"'{key}={OmegaConf.select(cfg, key)}': {why}")


def _override_of(key: str, items: list[str]) -> str:
    """'override 'k=v': ' for the command-line override that set `key` (or a section above/below it)."""
    for item in reversed(items):  # the last one wins, as in the merge
        k = item.split("=", 1)[0]
        if k == key or key.startswith(k + ".") or k.startswith(key + "."):
            return f"override {item!r}: "
    return "override: "


def _full_key(e: OmegaConfBaseException) -> str:
    full = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    return str(full)


def _where(path: Any) -> str:
    return f"{path}: " if path else ""


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of nested dicts (a config as plain containers); lists stay values."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}
