"""report.html in a real browser: headless Chromium (Debian package `chromium`) driven over the DevTools protocol
on a pipe (--remote-debugging-pipe: no port, no websocket library). The page must load without a console
error, an uncaught exception or a failed resource, every image must decode, and every run must be on it."""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ftlab.cli import main
from tests.report_runs import build_small

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

PAGE_FACTS = """JSON.stringify({
  images: document.images.length,
  broken: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length,
  runs: Array.from(document.querySelectorAll('tr[data-run]')).map(t => t.dataset.run),
  text: document.body.innerText})"""


class Browser:
    """One headless Chromium; DevTools messages are JSON texts ending in a NUL byte, on fds 3 (in) and 4 (out)."""

    def __init__(self, profile: Path, timeout: float = 60):
        to_child, self._to = os.pipe()
        self._from, from_child = os.pipe()
        # Chromium reads the pipe on fds 3 and 4: bash's redirections put the ends there before exec (a
        # preexec_fn would do the same but is unsafe in a process with threads; dash takes one-digit fds only).
        wire = f'exec "$0" "$@" 3<&{to_child} 4>&{from_child}'
        self.proc = subprocess.Popen(["bash", "-c", wire, CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                                      "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                                      "about:blank"],
                                     pass_fds=(to_child, from_child),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.deadline = time.time() + timeout
        self.buffer, self.next_id, self.events = b"", 0, []

    def receive(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self._from], [], [], max(self.deadline - time.time(), 0))
            chunk = os.read(self._from, 1 << 16) if ready else b""
            if not chunk:
                raise TimeoutError("Chromium closed the pipe or did not answer in time")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def load(self, url: str) -> tuple[dict[str, Any], list[str]]:
        """(facts about the loaded page, its console errors, exceptions and failed loads)."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session)
        self.events.clear()
        self.call("Page.navigate", session, url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self.receive())
        facts = self.call("Runtime.evaluate", session, expression=PAGE_FACTS, returnByValue=True)
        return json.loads(facts["result"]["value"]), errors(self.events)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (TimeoutError, OSError):
            pass
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            os.close(self._to)
            os.close(self._from)


def errors(events: list[dict[str, Any]]) -> list[str]:
    found = []
    for e in events:
        params = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value")) for a in params.get("args", [])))
        elif e.get("method") == "Runtime.exceptionThrown":
            found.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif e.get("method") == "Log.entryAdded" and params["entry"].get("level") == "error":
            found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return found


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def test_report_page_loads_cleanly_with_every_run(tmp_path, browser):
    made = build_small(tmp_path)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    facts, problems = browser.load((out / "report.html").as_uri())
    assert problems == []
    md = (out / "report.md").read_text()
    assert facts["images"] == md.count("](img/") > 0 and facts["broken"] == 0
    labels = {"seed0", "seed1", "crashed", "oak"}
    assert labels <= set(facts["runs"])
    assert all(label in facts["text"] for label in labels | {"seed (2 seeds)"})
    assert f"{made['crashed'] / 'metrics.jsonl'}:2: damaged metrics line" in facts["text"]

    # the same checks catch a page that is broken: a failed image, an undecodable one, a console error
    bad = tmp_path / "bad.html"
    bad.write_text((out / "report.html").read_text().replace(
        "</body>", '<img src="missing.png"><img src="data:image/png;base64,AAAA">'
                   '<script>console.error("boom")</script></body>'))
    facts, problems = browser.load(bad.as_uri())
    assert facts["broken"] == 2
    assert any("boom" in p for p in problems) and any("missing.png" in p for p in problems)
