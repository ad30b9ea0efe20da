"""User-facing errors.

A `UserError` is something the user can fix (bad file, bad key, bad value). The CLI prints its
message as one line and exits with code 2; internal bugs still raise with a traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """An error caused by user input; printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def not_utf8(path: object, raw: bytes, e: UnicodeDecodeError, first_line: int = 1) -> UserError:
    """The one-line error for a file that is not UTF-8 text, naming its line and the offending byte.

    `raw` is the text that failed to decode (a whole file, or one line starting at `first_line`).
    """
    line = first_line + raw.count(b"\n", 0, e.start)
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    return UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                     "save the file as UTF-8")


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, stripped (library messages run over several
    lines, e.g. OmegaConf's `full_key`/`object_type` lines); the exception's type name when it has none."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a Slurm time limit, preemption, `kill`): handled like Ctrl-C, exit code 143.

    A KeyboardInterrupt on purpose, so every place that marks a run `interrupted` on Ctrl-C does the
    same for SIGTERM."""

    exit_code = 143
