"""What differs between runs: configuration keys, seed groups, and the comparability flags that say when two
numbers were not measured the same way (another evaluation set, tokenizer or chat template, extraction rule,
shots, generation length, training tokens, number of seeds)."""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ftlab.report import fingerprint
from ftlab.report.runs import MODEL_FOLDERS, Run, human_count, tokens_seen

# Keys that name or place a run, or only steer tools around it: never a difference between two experiments.
NOT_SETTINGS = ("name", "output_dir", "loop.dir", "train.resume", "kind")
NOT_SETTINGS_PREFIXES = ("track.", "sweep.")


def is_setting(key: str) -> bool:
    return key not in NOT_SETTINGS and not key.startswith(NOT_SETTINGS_PREFIXES)


def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Keys whose value is not the same in every config (a key one config lacks counts as different), sorted."""
    keys = sorted({k for c in configs for k in c if is_setting(k)})
    missing = object()
    return [k for k in keys if len({repr(c.get(k, missing)) for c in configs}) > 1]


# -- seed groups -------------------------------------------------------------------------------------
@dataclass
class Group:
    """Runs whose configurations differ only in `seed` (a group of one is a single run)."""

    runs: list[Run]
    label: str = ""

    @property
    def size(self) -> int:
        return len(self.runs)


def seed_groups(runs: Iterable[Run]) -> list[Group]:
    """Runs of one kind with equal settings apart from `seed`, in order of first appearance. A run without a
    readable config, or one that did not finish, stays on its own: a mean must not mix in a cut-short run."""
    groups: dict[Any, Group] = {}
    for run in runs:
        key: Any = (run.kind, tuple(sorted((k, repr(v)) for k, v in run.config.items()
                                           if is_setting(k) and k != "seed")))
        if not run.config or run.status != "complete":
            key = ("alone", str(run.path))
        groups.setdefault(key, Group([])).runs.append(run)
    for g in groups.values():
        g.label = g.runs[0].label if g.size == 1 else f"{group_name(g.runs)} ({g.size} seeds)"
    return list(groups.values())


def group_name(runs: Sequence[Run]) -> str:
    """What the runs' labels share once each one's seed is taken out (`tiny_limit16_s0`, `tiny_limit16_s1` ->
    `tiny_limit16`; `lr3`, `lr3#2` -> `lr3`); the first label where they share nothing."""
    names = [re.sub(rf"[_-]s(eed)?{r.config.get('seed')}(?=$|[_-])", "", r.label) for r in runs]
    common = os.path.commonprefix(names).rstrip("_-#")
    return common or runs[0].label


# -- comparability -----------------------------------------------------------------------------------
@dataclass
class Flag:
    """One way the runs of a comparison were measured differently."""

    what: str
    values: dict[str, str] = field(default_factory=dict)   # run label -> its value

    def line(self) -> str:
        by_value: dict[str, list[str]] = {}
        for label, value in self.values.items():
            by_value.setdefault(value, []).append(label)
        parts = [f"{value} ({', '.join(labels)})" for value, labels in by_value.items()]
        return f"{self.what} differs: " + " vs ".join(parts)


def saved_model_folder(run: Run) -> Any:
    return next((run.path / f for f in MODEL_FOLDERS if (run.path / f / "tokenizer.json").is_file()), None)


_TOKENIZERS: dict[str, dict[str, str]] = {}


def tokenizer_hashes(run: Run) -> dict[str, str]:
    """An evaluation's recorded hashes, or those of the tokenizer a training run saved (cached per run)."""
    if run.kind == "eval":
        return {k: run.result[k] for k in ("tokenizer_hash", "chat_template_hash") if k in run.result}
    key = str(run.path)
    if key not in _TOKENIZERS:
        folder = saved_model_folder(run)
        # pretraining reads raw text windows: no template takes part, whatever data.chat_template says
        template = bool(run.config.get("data.chat_template", True)) and run.config.get("train.method") != "pretrain"
        _TOKENIZERS[key] = fingerprint.saved_tokenizer_fingerprint(folder, template) if folder else {}
    return _TOKENIZERS[key]


def eval_set(run: Run) -> str | None:
    if run.kind == "eval":
        if "eval_set_hash" in run.result:
            return str(run.result["eval_set_hash"])
        c = run.config  # an evaluation from before the hash was recorded: its source and slice
        return f"{c.get('eval.source')}:{c.get('eval.split')}[{c.get('eval.offset')}:+{c.get('eval.limit')}]"
    c = run.config
    if c.get("train.method") == "pretrain":
        # validation windows are drawn from the run's own categories with its seed: another K or another seed
        # is measured on other text
        categories = "+".join(sorted(run.summary.get("categories") or [])) or "?"
        return (f"{c.get('pretrain.corpus')}:{c.get('pretrain.val_split')}[{categories}, seed {c.get('seed')}, "
                f"{c.get('pretrain.val_windows')} x {c.get('pretrain.seq_len')}]")
    source = c.get("loop.heldout") or c.get("data.val") if run.kind == "loop" else c.get("data.val")
    limit = c.get("loop.heldout_limit") if run.kind == "loop" else c.get("data.val_limit")
    return f"{source}:{c.get('data.val_split')}[:{limit}]" if source else None


def extraction_rule(run: Run) -> str | None:
    rule = run.result.get("extraction_rule")
    if not rule:
        return None
    return f"{run.result.get('primary_rule', 'rule')} #{fingerprint.digest(rule)[:6]}"


def shots(run: Run) -> Any:
    return run.result.get("shots") if run.kind == "eval" else run.config.get("data.shots")


def max_new_tokens(run: Run) -> Any:
    if run.kind == "eval":
        return run.result.get("max_new_tokens")
    return run.config.get("loop.max_new_tokens" if run.kind == "loop" else "eval.max_new_tokens")


def human(n: float | None) -> str:
    return "—" if n is None else human_count(n)


PROPERTIES: dict[str, Callable[[Run], Any]] = {
    "eval set": eval_set,
    "tokenizer": lambda r: tokenizer_hashes(r).get("tokenizer_hash"),
    "chat template": lambda r: tokenizer_hashes(r).get("chat_template_hash"),
    "extraction rule": extraction_rule,
    "shots": shots,
    "max new tokens": max_new_tokens,
    "tokens seen": lambda r: tokens_seen(r),
}
# Which properties spoil which comparison: an accuracy depends on how answers were generated and read; a
# loss on the tokens it is averaged over and, at the end of training, on how many were learned from.
SPOILS = {
    "accuracy": ("eval set", "tokenizer", "chat template", "extraction rule", "shots", "max new tokens"),
    "eval": ("eval set", "tokenizer", "chat template", "tokens seen"),
    "train": ("tokenizer", "chat template", "tokens seen"),
    "table": tuple(PROPERTIES),
}


TOKENS_TOLERANCE = 1.05


def property_values(runs: Sequence[Run], what: str) -> dict[str, Any]:
    return {r.label: v for r in runs if (v := PROPERTIES[what](r)) is not None}


def differs(what: str, values: Iterable[Any]) -> bool:
    values = list(values)
    if what == "tokens seen":  # seeds of one SFT recipe draw batches of other lengths: a few % is no difference
        numbers = [float(v) for v in values]
        return bool(numbers) and max(numbers) > TOKENS_TOLERANCE * min(numbers)
    return len({repr(v) for v in values}) > 1


def flags(runs: Sequence[Run], groups: Sequence[Group], comparison: str) -> list[Flag]:
    """The flags that spoil `comparison` ("accuracy", "eval", "train" or "table") between these runs. A property
    a run does not record is not counted as a difference (the table shows it as not recorded)."""
    out = []
    for what in SPOILS[comparison]:
        values = property_values(runs, what)
        if differs(what, values.values()):
            shown = {k: human(v) if what == "tokens seen" else str(v) for k, v in values.items()}
            out.append(Flag(what, shown))
    sizes = {g.label: g.size for g in groups if any(r in runs for r in g.runs)}
    if len(set(sizes.values())) > 1:
        out.append(Flag("number of seeds", {label: str(n) for label, n in sizes.items()}))
    return out


def odd_ones(runs: Sequence[Run], what: str) -> set[str]:
    """Labels of runs whose value of a property differs from the most common one."""
    values = {label: repr(v) for label, v in property_values(runs, what).items()}
    if what == "tokens seen" or not values:
        return set()
    common, _ = Counter(values.values()).most_common(1)[0]
    return {label for label, v in values.items() if v != common}
