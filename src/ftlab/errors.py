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
