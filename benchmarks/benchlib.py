"""What every benchmark script here does the same way: quiet logging, its own section of docs/BENCHMARKS.md, the CPU's name."""
from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path
from typing import Any


def parse_configs(parser: argparse.ArgumentParser, text: str, choices: tuple[str, ...]) -> list[str]:
    """A comma list of configurations, each one of `choices` (else the usual argparse error)."""
    configs = [c.strip() for c in text.split(",") if c.strip()]
    for c in configs:
        if c not in choices:
            parser.error(f"unknown config {c!r}; choose from {', '.join(choices)}")
    return configs


def quiet_run(threads: int | None) -> None:
    """Set torch's thread count (None: torch's choice) and silence library logs and progress bars; ftlab's run
    logs still go to each run's run.log."""
    import torch
    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("ftlab").propagate = False
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass


def write_section(path: Path, section: str, text: str) -> None:
    """Replace only the section headed `section` in the shared benchmarks file (or append it); others stay."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(section)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(section))
        new = old[:start] + text.rstrip("\n") + "\n" + (old[end:] if end >= 0 else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.rstrip("\n") + "\n")


def print_report(table: str, meta: dict[str, Any], results: list[dict[str, Any]], json_path: str | None) -> None:
    """The markdown table and the run's date, duration and versions; all measurements as JSON when asked."""
    print()
    print(table)
    print(f"\n{meta['date']}, total {meta['total_s']} s, versions {meta['versions']}")
    if json_path:
        Path(json_path).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


def cpu_model() -> str:
    """The CPU's model name (every timing says which CPU it came from)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
