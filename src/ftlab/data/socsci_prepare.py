"""`ftlab prepare-socsci`: SocSci210 at full size -> train/val/test JSONL for the `socsci210` task.

    ftlab prepare-socsci SOURCE --out DIR [--split study|condition|participant] [--val-fraction F]
                         [--test-fraction F] [--seed S]

SOURCE is the hub id (`socratesft/SocSci210`, streamed with `datasets`) or a local `.jsonl` / `.jsonl.gz`.
Rows may have the hub's shape (`stimuli`, `response`, `demographic`, `study_id`, `condition_num`,
`participant`, ...) or be already in the training format (`instruction`, `input`, `output`, `study_id`,
`condition_num`); hub rows are rendered into the training format exactly as the published 1% files are.

Memory does not grow with the input, and the input is read once:

* The split of a row is decided by a hash of (seed, key) alone, with key the study, the study and condition,
  or the study and participant (participant numbers repeat across studies). Nothing has to be counted
  first, so every row goes straight to its split file. The fractions are fractions of keys: with ~210
  studies, a study split's row shares differ from them by the studies' sizes (the report has the shares).
* Duplicates and conflicting answers need every row compared with every other. Each row leaves 17 bytes
  (prompt hash, answer, split) in one of 256 ledger files chosen by the hash; after the pass the ledger is
  read one file at a time (1/256 of the rows), never the input again.
* Everything is written into a temp directory beside DIR and renamed when complete (report.json is written
  last), so an error or Ctrl-C leaves no DIR, or the previous one untouched.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ftlab.data.corpus import publish, split_of
from ftlab.data.jsonl import json_type, read_records
from ftlab.errors import UserError

log = logging.getLogger("ftlab")

SPLIT_KINDS = ("study", "condition", "participant")
SPLITS = ("train", "val", "test")
HUB_ID = "socratesft/SocSci210"
# The instruction and demographic fields of the published 1% files (SOCRATES replication), so a model
# trained on prepared rows sees the prompts those files evaluate. A field is shown when it is set.
INSTRUCTION = ("You are a behavioral prediction model. Given demographic information about a participant and "
               "an experimental scenario, predict how they would respond.")
DEMOGRAPHIC_FIELDS = (("age", "Age"), ("gender", "Gender"), ("education", "Education"), ("income", "Income"),
                      ("employment", "Employment"), ("party_id", "Political affiliation"), ("ideology", "Ideology"))
NO_DEMOGRAPHICS = "No demographic information"
HUB_FIELDS = ("stimuli", "response", "study_id", "condition_num")
PREPARED_FIELDS = ("input", "output", "study_id", "condition_num")
PASSTHROUGH = ("participant", "sample_id", "task_num")  # kept when present: they name the row in the hub
_OUTPUT_RE = re.compile(r"^Response: (-?\d+)$")
INT64 = 2 ** 63


@dataclass
class SocsciSettings:
    source: str
    out: str
    split: str = "study"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    hf_split: str = "train"
    overwrite: bool = False


def check_settings(s: SocsciSettings) -> None:
    if s.split not in SPLIT_KINDS:
        raise UserError(f"--split {s.split!r}: unknown; choose one of {', '.join(SPLIT_KINDS)}")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(s, name)
        if not 0 <= value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1); got {value}")
    if s.val_fraction + s.test_fraction >= 1:
        raise UserError("--val-fraction + --test-fraction must be below 1 (something must be left to train on); "
                        f"got {s.val_fraction + s.test_fraction:g}")
    out = Path(s.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file")
    if out.exists() and not s.overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")


# -- reading rows ---------------------------------------------------------------------------------------
@dataclass
class Source:
    """Where rows come from: `rows` yields (row number, record); errors name `label` + the row number."""

    label: str
    rows: Iterator[tuple[int, dict]]
    total: int | None
    identity: dict[str, Any]


def open_source(s: SocsciSettings) -> Source:
    path = Path(s.source).expanduser()
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a JSONL file")
    if path.exists():  # a file, or a pipe (`<(zcat part-*.jsonl.gz)`)
        return Source(f"{path}:", jsonl_rows(path), None, {"file": str(path), "bytes": path.stat().st_size})
    looks_like_a_path = s.source.endswith((".jsonl", ".json", ".gz")) or s.source.startswith((".", "/", "~"))
    if looks_like_a_path or s.source.count("/") != 1:  # hub ids are owner/name
        raise UserError(f"{s.source}: file not found (give a local .jsonl / .jsonl.gz or a hub id like {HUB_ID})")
    return hub_source(s)


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Records of a JSONL file, gzip-compressed when its name ends in .gz, read line by line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            yield from read_records(path, f)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a complete gzip file ({e or type(e).__name__})") from None
    except OSError as e:  # unreadable: permissions, a vanished network mount
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None


def hub_source(s: SocsciSettings) -> Source:
    """The dataset streamed from the hub (`datasets`, streaming=True): rows arrive as they are read."""
    from ftlab.hub import require_hub

    require_hub(s.source, hint="pass a local .jsonl or .jsonl.gz file instead")
    import datasets

    try:
        ds = datasets.load_dataset(s.source, split=s.hf_split, streaming=True)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"{s.source}: cannot stream split {s.hf_split!r}: {str(e).splitlines()[0]}") from None
    info = (ds.info.splits or {}).get(s.hf_split) if ds.info is not None else None
    return Source(f"{s.source}[{s.hf_split}] row ", enumerate(ds, start=1), getattr(info, "num_examples", None),
                  {"hub_id": s.source, "split": s.hf_split})


# -- one row into the training format -------------------------------------------------------------------------
def demographics_text(demographic: Any, where: str) -> str:
    if demographic is None:
        return NO_DEMOGRAPHICS
    if not isinstance(demographic, dict):
        raise UserError(f"{where}: field 'demographic' must be an object; got {json_type(demographic)}")
    parts = [f"{label}: {demographic[key]}" for key, label in DEMOGRAPHIC_FIELDS if demographic.get(key)]
    return "; ".join(parts) if parts else NO_DEMOGRAPHICS


def _require(row: dict, fields: tuple[str, ...], where: str, shape: str) -> None:
    missing = [f for f in fields if row.get(f) is None]
    if missing:
        raise UserError(f"{where}: missing field {missing[0]!r} ({shape} rows need {', '.join(fields)})")


def _string(row: dict, field: str, where: str) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {field!r} must be a string; got {json_type(value)}")
    return value


def _id(row: dict, field: str, where: str) -> str | int:
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        got = "an empty string" if value == "" else json_type(value)
        raise UserError(f"{where}: field {field!r} must be a non-empty string or an integer; got {got}")
    return value


def _answer(value: Any, where: str) -> int:
    """The hub's `response` as an integer: an int, or a float with no fractional part."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: field 'response' must be an integer; got {value!r}")
    if not -INT64 <= value < INT64:
        raise UserError(f"{where}: field 'response' {value} is outside the 64-bit integer range")
    return value


def training_row(row: dict, where: str) -> tuple[dict, int]:
    """(the row in the training format, its answer as an integer); a row of another shape is one line."""
    if "stimuli" in row:
        _require(row, HUB_FIELDS, where, "hub")
        answer = _answer(row["response"], where)
        out = {"instruction": INSTRUCTION,
               "input": f"Demographics: {demographics_text(row.get('demographic'), where)}\n\n"
                        f"Scenario: {_string(row, 'stimuli', where).strip()}",
               "output": f"Response: {answer}"}
    elif "input" in row:
        _require(row, PREPARED_FIELDS, where, "prepared")
        output = _string(row, "output", where)
        m = _OUTPUT_RE.match(output)
        if m is None:
            raise UserError(f"{where}: field 'output' must be 'Response: <integer>'; got {output[:40]!r}")
        answer = int(m.group(1))
        instruction = row.get("instruction", INSTRUCTION)
        if not isinstance(instruction, str):
            raise UserError(f"{where}: field 'instruction' must be a string; got {json_type(instruction)}")
        out = {"instruction": instruction, "input": _string(row, "input", where), "output": output}
    else:
        raise UserError(f"{where}: not a SocSci210 row: hub rows have {', '.join(HUB_FIELDS)}; prepared rows "
                        f"have {', '.join(PREPARED_FIELDS)}")
    out["study_id"] = str(_id(row, "study_id", where))
    out["condition_num"] = _id(row, "condition_num", where)
    for field in PASSTHROUGH:
        if row.get(field) is not None:
            out[field] = row[field]
    return out, answer


def split_key(row: dict, kind: str, where: str) -> str:
    """What the split is decided by; a participant is a participant of one study."""
    if kind == "study":
        return row["study_id"]
    if kind == "condition":
        return f"{row['study_id']}\0{row['condition_num']}"
    if "participant" not in row:
        raise UserError(f"{where}: no 'participant' field, which --split participant needs (the hub's rows have "
                        "it; rows prepared without it cannot be split by participant)")
    return f"{row['study_id']}\0{_id(row, 'participant', where)}"


def to_hub_row(prepared: dict, participant: int | str, sample_id: int | str) -> dict:
    """A training-format row back in the hub's shape (its demographics parsed from the text): builds
    synthetic hub-shaped inputs from real rows, for benchmarks and tests."""
    demo_text, scenario = prepared["input"].split("\n\n", 1)
    labels = {label: key for key, label in DEMOGRAPHIC_FIELDS}
    demographic: dict[str, Any] = {key: None for key, _ in DEMOGRAPHIC_FIELDS}
    body = demo_text.removeprefix("Demographics: ")
    if body != NO_DEMOGRAPHICS:
        for part in body.split("; "):
            label, value = part.split(": ", 1)
            demographic[labels[label]] = int(value) if label == "Age" and value.isdigit() else value
    return {"sample_id": sample_id, "participant": participant, "demographic": demographic,
            "stimuli": scenario.removeprefix("Scenario: "), "response": int(prepared["output"].split(":")[1]),
            "condition_num": prepared["condition_num"], "task_num": 0, "study_id": prepared["study_id"]}


# -- duplicates and conflicting answers ----------------------------------------------------------------------------
LEDGER_DTYPE = np.dtype([("prompt", "<u8"), ("answer", "<i8"), ("split", "u1")])


def prompt_hash(row: dict) -> int:
    """64 bits of the prompt the model sees (instruction + input); equal prompts, equal hashes."""
    text = f"{row['instruction']}\0{row['input']}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class AnswerLedger:
    """(prompt hash, answer, split) of every row, on disk in 256 bucket files by the hash's top byte, so
    that the duplicate report holds 1/256 of the rows at a time. With 64-bit hashes two different prompts
    collide with probability ~n^2 / 2^65 (~2e-7 for 2.9M rows)."""

    BUFFER_ROWS = 1 << 16

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        self.files = [(folder / f"{b:02x}.bin").open("wb") for b in range(256)]
        self.buffer: list[tuple[int, int, int]] = []

    def add(self, prompt: int, answer: int, split: int) -> None:
        self.buffer.append((prompt, answer, split))
        if len(self.buffer) >= self.BUFFER_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        records = np.array(self.buffer, dtype=LEDGER_DTYPE)
        self.buffer = []
        buckets = (records["prompt"] >> np.uint64(56)).astype(np.int64)
        order = np.argsort(buckets, kind="stable")
        records, buckets = records[order], buckets[order]
        bounds = np.searchsorted(buckets, np.arange(257))
        for b in np.flatnonzero(np.diff(bounds)):
            self.files[b].write(records[bounds[b]:bounds[b + 1]].tobytes())

    def close(self) -> None:
        self.flush()
        for f in self.files:
            f.close()

    def summary(self) -> dict[str, Any]:
        totals = defaultdict(int)
        within = np.zeros(len(SPLITS), dtype=np.int64)
        for b in range(256):
            records = np.fromfile(self.folder / f"{b:02x}.bin", dtype=LEDGER_DTYPE)
            if records.size:
                counts, per_split = bucket_counts(records)
                for key, value in counts.items():
                    totals[key] += value
                within += per_split
        return {**totals, "duplicates_within_split": dict(zip(SPLITS, within.tolist()))}


def bucket_counts(records: np.ndarray) -> tuple[dict[str, int], np.ndarray]:
    """Counts over one bucket: rows sorted by prompt, then answer, then split, so equal rows are adjacent."""
    r = records[np.lexsort((records["split"], records["answer"], records["prompt"]))]
    same_prompt = r["prompt"][1:] == r["prompt"][:-1]
    same_pair = same_prompt & (r["answer"][1:] == r["answer"][:-1])
    same_split = same_pair & (r["split"][1:] == r["split"][:-1])
    starts = np.flatnonzero(np.r_[True, ~same_prompt])           # first row of each distinct prompt
    rows_per_prompt = np.diff(np.r_[starts, len(r)])
    answers_per_prompt = np.add.reduceat(np.r_[True, ~same_pair].astype(np.int64), starts)
    split_masks = np.bitwise_or.reduceat(np.left_shift(1, r["split"].astype(np.int64)), starts)
    conflicting = answers_per_prompt > 1
    counts = {
        "prompts": int(starts.size),
        "duplicate_rows": int(same_pair.sum()),                  # rows equal to an earlier row (prompt + answer)
        "conflicting_prompts": int(conflicting.sum()),
        "conflicting_rows": int(rows_per_prompt[conflicting].sum()),
        "prompts_in_several_splits": int(np.count_nonzero(split_masks & (split_masks - 1))),
    }
    return counts, np.bincount(r["split"][1:][same_split], minlength=len(SPLITS))


# -- the pass over the input ----------------------------------------------------------------------------------------
KEY_RULE = {"study": "study_id", "condition": "study_id + condition_num",
            "participant": "study_id + participant (participant numbers repeat across studies)"}


class SplitStats:
    """Rows per split, and which splits each study and condition reached (bounded by the studies' design,
    not by the number of rows)."""

    def __init__(self) -> None:
        self.rows = [0] * len(SPLITS)
        self.study_splits: dict[str, int] = defaultdict(int)  # study -> bit mask of the splits it reached
        self.conditions: list[set[tuple[str, Any]]] = [set() for _ in SPLITS]

    def add(self, row: dict, split: int) -> None:
        self.rows[split] += 1
        self.study_splits[row["study_id"]] |= 1 << split
        self.conditions[split].add((row["study_id"], row["condition_num"]))

    def studies_in(self, split: int) -> int:
        return sum(1 for mask in self.study_splits.values() if mask >> split & 1)

    def studies_on_both_sides(self) -> int:
        """Studies with rows in train and in val or test."""
        return sum(1 for mask in self.study_splits.values() if mask & 1 and mask & 0b110)


def prepare_socsci(s: SocsciSettings) -> dict[str, Any]:
    """Write DIR/{train,val,test}.jsonl and DIR/report.json (temp dir, renamed when complete); returns the report."""
    check_settings(s)
    source = open_source(s)
    out = Path(s.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        report = write_splits(s, source, tmp)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def write_splits(s: SocsciSettings, source: Source, tmp: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    @lru_cache(maxsize=1 << 16)
    def split_index(key: str) -> int:
        return SPLITS.index(split_of(s.seed, key, s.val_fraction, s.test_fraction))

    stats = SplitStats()
    ledger = AnswerLedger(tmp / ".ledger")
    files = [(tmp / f"{name}.jsonl").open("w", encoding="utf-8", buffering=1 << 20) for name in SPLITS]
    # A bar on a terminal; elsewhere (CI, Slurm logs) a log line every 30 s instead of redraws.
    bar = tqdm(total=source.total, unit="row", unit_scale=True, desc="prepare-socsci", mininterval=1.0,
               disable=None)
    started = last_log = time.time()
    try:
        for number, record in source.rows:
            where = f"{source.label}{number}"
            row, answer = training_row(record, where)
            split = split_index(split_key(row, s.split, where))
            files[split].write(json.dumps(row) + "\n")
            ledger.add(prompt_hash(row), answer, split)
            stats.add(row, split)
            bar.update(1)
            if bar.disable and number % 65536 == 0 and time.time() - last_log > 30:
                last_log = time.time()
                log.info("prepare-socsci: %d rows read", sum(stats.rows))
    finally:
        bar.close()
        ledger.close()
        for f in files:
            f.close()
    if not sum(stats.rows):
        raise UserError(f"{s.source}: no rows")
    counts = ledger.summary()
    shutil.rmtree(ledger.folder)
    report = build_report(s, source, stats, counts, time.time() - started)
    from ftlab.runs.rundir import write_json

    write_json(tmp / "report.json", report)  # last: its presence marks a complete preparation
    return report


def build_report(s: SocsciSettings, source: Source, stats: SplitStats, counts: dict[str, Any],
                 seconds: float) -> dict[str, Any]:
    rows, studies, both = sum(stats.rows), len(stats.study_splits), stats.studies_on_both_sides()
    splits = {name: {"rows": stats.rows[i], "share": stats.rows[i] / rows, "studies": stats.studies_in(i),
                     "conditions": len(stats.conditions[i]),
                     "duplicates": counts["duplicates_within_split"][name]} for i, name in enumerate(SPLITS)}
    report = {
        "format": 1, "source": source.identity, "split_by": s.split, "split_key": KEY_RULE[s.split],
        "seed": s.seed, "val_fraction": s.val_fraction, "test_fraction": s.test_fraction,
        "fractions_are_of": "split keys (hash of seed and key), not rows",
        "rows": rows, "passes_over_input": 1, "splits": splits, "studies": studies,
        "conditions": len(set().union(*stats.conditions)),
        "studies_on_both_sides": both, "studies_on_both_sides_share": both / studies,
        "prompts": counts["prompts"],
        "duplicates": {"rows": counts["duplicate_rows"], "rule": "same prompt (instruction + input) and same "
                       "answer as an earlier row; kept (different participants with the same demographics)"},
        "conflicting_answers": {"prompts": counts["conflicting_prompts"], "rows": counts["conflicting_rows"],
                                "rule": "same prompt, different answers (human response variance); kept"},
        "prompts_in_several_splits": counts["prompts_in_several_splits"],
        "seconds": round(seconds, 2), "rows_per_s": round(rows / max(seconds, 1e-9), 1),
    }
    report["warnings"] = split_warnings(s, report)
    return report


def split_warnings(s: SocsciSettings, report: dict[str, Any]) -> list[str]:
    warnings = []
    if s.split == "participant":
        warnings.append(f"split by participant: {report['studies_on_both_sides']} of {report['studies']} studies "
                        f"({report['studies_on_both_sides_share']:.0%}) have rows in train and in val/test, so "
                        "val/test measure new participants of studies the model trained on, not new studies "
                        "(--split study does that)")
    wanted = {"val": s.val_fraction, "test": s.test_fraction}
    for name, fraction in wanted.items():
        if fraction > 0 and report["splits"][name]["rows"] == 0:
            warnings.append(f"{name} is empty: no {s.split} key hashed into it (fraction {fraction:g} of "
                            f"{report['studies']} studies); raise --{name}-fraction or change --seed")
    return warnings


def report_table(report: dict[str, Any]) -> str:
    """The report as printed: one row per split, then duplicates, conflicts, overlap and warnings."""
    header = f"{'split':<6} {'rows':>12} {'share':>7} {'studies':>8} {'conditions':>11} {'duplicates':>11}"
    lines = [f"split by {report['split_by']} ({report['split_key']}), seed {report['seed']}", header]
    for name, sp in report["splits"].items():
        lines.append(f"{name:<6} {sp['rows']:>12,} {sp['share']:>7.1%} {sp['studies']:>8,} {sp['conditions']:>11,} "
                     f"{sp['duplicates']:>11,}")
    lines.append(f"{'all':<6} {report['rows']:>12,} {1:>7.1%} {report['studies']:>8,} {report['conditions']:>11,} "
                 f"{report['duplicates']['rows']:>11,}")
    conflicts = report["conflicting_answers"]
    both = report["studies_on_both_sides"]
    lines += [f"duplicates (same prompt and answer): {report['duplicates']['rows']:,} rows of {report['rows']:,}",
              (f"conflicting answers (same prompt, different answers): {conflicts['prompts']:,} prompts, "
               f"{conflicts['rows']:,} rows"),
              f"prompts in more than one split: {report['prompts_in_several_splits']:,} of {report['prompts']:,}",
              (f"studies with rows in train and in val/test: {both} of {report['studies']} "
               f"({report['studies_on_both_sides_share']:.0%})"),
              f"{report['rows_per_s']:,.0f} rows/s ({report['seconds']} s, one pass over the input)"]
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------------------------
def cmd_prepare_socsci(args: argparse.Namespace) -> int:
    s = SocsciSettings(source=args.source, out=args.out, split=args.split, val_fraction=args.val_fraction,
                       test_fraction=args.test_fraction, seed=args.seed, hf_split=args.hf_split,
                       overwrite=args.overwrite)
    report = prepare_socsci(s)
    print(report_table(report))
    print(f"{args.out}: train.jsonl, val.jsonl, test.jsonl, report.json")
    return 0


def add_socsci_verbs(sub: Any) -> None:
    """`prepare-socsci`: SocSci210 -> training splits for the socsci210 task; `compare-socsci`: base vs tuned on
    the test file of each split kind."""
    from ftlab.tasks.socsci210_splits import add_compare_socsci_verb

    add_compare_socsci_verb(sub)
    p = sub.add_parser("prepare-socsci", help="SocSci210 (hub id or local JSONL) -> train/val/test JSONL for the "
                       "socsci210 task, split by study, condition or participant",
                       description="stream SocSci210 once, in constant memory, into DIR/train.jsonl, val.jsonl, "
                                   "test.jsonl and report.json (rows, studies, duplicates, conflicting answers); "
                                   "built in a temp dir and renamed when complete")
    p.add_argument("source", help=f"hub id ({HUB_ID}, streamed) or a local .jsonl / .jsonl.gz file")
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--split", choices=SPLIT_KINDS, default="study",
                   help="what is held out: whole studies (default), study x condition cells, or participants")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of split keys for val (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of split keys for test (default 0.1)")
    p.add_argument("--seed", type=int, default=42, help="split seed (keys are hashed with it; default 42)")
    p.add_argument("--hf-split", default="train", help="the hub dataset's split to read (hub ids only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(fn=cmd_prepare_socsci)
