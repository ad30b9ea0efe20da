"""Fail fast when the Hugging Face Hub cannot be reached.

transformers and datasets retry for minutes when there is no network; a researcher on an offline
machine should instead get one line that says so at once.
"""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

from ftlab.errors import UserError

EMBEDDED_HINT = "use the embedded model 'smollm2-135m-instruct' or a local directory"


@lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub endpoint accepts a TCP connection within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, hint: str = EMBEDDED_HINT) -> None:
    """Raise a one-line UserError if `what` (a hub id) would need the network and there is none."""
    if not hub_reachable():
        raise UserError(f"cannot reach the Hugging Face Hub to fetch {what!r} (offline or no network); {hint}")
