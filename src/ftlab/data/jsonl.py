"""JSONL reading and writing with errors that name the file and line."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from ftlab.errors import UserError, not_utf8


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record) for each non-blank line; a bad line is a UserError naming file:line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a JSONL file")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        f = path.open("rb")  # bytes: a line that is not UTF-8 is then an error naming that line
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        yield from read_records(path, f)


def read_records(path: str | os.PathLike, f: IO[bytes]) -> Iterator[tuple[int, dict]]:
    """(line_number, record) from an open binary stream (a file, a gzip stream, a pipe); errors name `path`:line."""
    for lineno, raw in enumerate(f, start=1):
        try:  # utf-8-sig on line 1: editors on Windows start files with a byte-order mark
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise not_utf8(path, raw, e, lineno) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {json_type(record)}")
        yield lineno, record


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages about fields of the wrong type."""
    if value is None:
        return "null"
    for types, name in ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"),
                        (dict, "an object")):
        if isinstance(value, types):
            return name
    return type(value).__name__


def text_field(record: dict, field: str, where: str) -> str:
    """`record[field]` when it is a string; otherwise a one-line error naming file:line and the field."""
    value = record[field]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {field!r} must be a string; got {json_type(value)}")
    return value


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = (), limit: int | None = None) -> list[dict]:
    """Read a JSONL file; every record must have the `required` fields. Empty files are an error."""
    required = list(required)
    records = []
    for lineno, record in iter_jsonl(path):
        missing = [k for k in required if k not in record]
        if missing:
            raise UserError(f"{path}:{lineno}: missing field {missing[0]!r} (required: {', '.join(required)})")
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise UserError(f"{path}: file is empty (no JSON records)")
    return records


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write records atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record and flush, so rows already written survive a crash."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
