"""Fail fast when the Hugging Face Hub cannot be reached.

transformers and datasets retry for minutes when there is no network; a researcher on an offline
machine should instead get one line that says so at once. The check is a real HTTP(S) request, not
just a TCP connect: an intercepting proxy or a wrong endpoint accepts the connection and then fails
the TLS handshake, which transformers retried for 49 s before a 93-line traceback.
"""
from __future__ import annotations

import http.client
import os
import ssl
import urllib.error
import urllib.request
from functools import lru_cache
from urllib.parse import urlparse

from ftlab.errors import UserError

EMBEDDED_HINT = "use the embedded model 'smollm2-135m-instruct' or a local directory"


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


@lru_cache(maxsize=None)
def hub_problem(endpoint: str, offline: bool, timeout: float = 3.0) -> str | None:
    """None when `endpoint` answers an HTTP(S) request within `timeout` seconds, else why not (a few words).

    Any HTTP status counts as an answer; what fails is no connection, a TLS handshake that does not
    complete (an intercepting proxy, a server that is not the hub), or a reply that is not HTTP.
    urllib follows HTTPS_PROXY/NO_PROXY as huggingface_hub does.
    """
    if offline:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        return f"HF_ENDPOINT={endpoint!r} is not an http(s) URL"
    request = urllib.request.Request(endpoint, method="HEAD", headers={"User-Agent": "ftlab"})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:  # the server answered in HTTP: the hub is there
        return None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ssl.SSLError):
            return f"TLS handshake failed: {reason.reason or reason}"
        return str(reason.strerror if isinstance(reason, OSError) and reason.strerror else reason)
    except ssl.SSLError as e:
        return f"TLS handshake failed: {e.reason or e}"
    except (http.client.HTTPException, OSError, ValueError) as e:  # a reply that is not HTTP, a reset, a timeout
        return f"{type(e).__name__}: {str(e).strip()}" if str(e).strip() else type(e).__name__


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub endpoint (HF_ENDPOINT) answers HTTP(S) within `timeout` seconds."""
    return hub_problem(hub_endpoint(), hub_offline(), timeout) is None


hub_reachable.cache_clear = hub_problem.cache_clear  # type: ignore[attr-defined]  # re-check in long processes


def require_hub(what: str, hint: str = EMBEDDED_HINT) -> None:
    """Raise a one-line UserError if `what` (a hub id) would need the network and there is none."""
    problem = hub_problem(hub_endpoint(), hub_offline())
    if problem is not None:
        raise UserError(f"cannot reach the Hugging Face Hub at {hub_endpoint()} to fetch {what!r} ({problem}); "
                        f"{hint}")
