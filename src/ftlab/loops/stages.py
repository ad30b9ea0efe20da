"""A resumable loop directory: one directory per stage, written whole or not at all, and the recipe it belongs to.

    <loop dir>/recipe.json            the resolved recipe and its hash (another recipe is refused)
    <loop dir>/stages.log             one line per stage: computed (with seconds) or skipped
    <loop dir>/iter_<k>/<stage>/      a finished stage: its files, stage.json (what it returns), DONE

A stage runs in `iter_<k>/.<stage>.tmp/` and is renamed into place with its DONE marker only when it has
finished, so after a crash (SIGKILL, OOM, a preempted job) every stage directory is complete; re-running
the loop skips those and starts the interrupted one again: from scratch, or, for a training stage
(`keep_partial`), from the last checkpoint its interrupted run saved there (`train.save_every`).

With several processes, every rank runs the stage function (each on its share of the work); rank 0
writes, renames and logs; the others wait for it and then read stage.json, so all ranks continue with the
same result.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from ftlab.config.load import flatten
from ftlab.errors import UserError
from ftlab.models.load import release_memory
from ftlab.runs.rundir import redact, write_json

log = logging.getLogger("ftlab")

# Keys that may change without making it another loop: where things are written, and how many iterations
# to run (raising loop.iterations continues a finished loop).
UNHASHED = ("output_dir", "loop.dir", "loop.iterations")


def recipe_fingerprint(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """(hash, flat {dotted key: value}) of the resolved recipe without the UNHASHED keys."""
    flat = flatten(redact(OmegaConf.to_container(cfg, resolve=True)))
    for key in UNHASHED:
        flat.pop(key, None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16], flat


class LoopDir:
    def __init__(self, path: Path, rank: int = 0, barrier: Callable[[], None] = lambda: None):
        self.path, self.rank, self.barrier = Path(path), rank, barrier

    @classmethod
    def open(cls, path: str | os.PathLike, cfg: DictConfig, rank: int = 0,
             barrier: Callable[[], None] = lambda: None) -> "LoopDir":
        """Create the directory, or reopen one made by this same recipe; another recipe's is one UserError."""
        path = Path(path)
        digest, flat = recipe_fingerprint(cfg)
        stored = path / "recipe.json"
        if stored.is_file():
            try:
                theirs = json.loads(stored.read_text())
            except (OSError, ValueError):
                raise UserError(f"loop directory {path}: recipe.json is unreadable; use another loop.dir") from None
            if theirs.get("hash") != digest:
                old = theirs.get("flat", {})
                diff = sorted(k for k in set(old) | set(flat) if old.get(k) != flat.get(k))
                raise UserError(f"loop directory {path} was made by another recipe (recipe hash {theirs.get('hash')}, "
                                f"this one {digest}; first difference: {diff[0] if diff else '?'}); use another "
                                "loop.dir or delete that directory")
        elif path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"loop directory {path} exists and is not a loop directory (no recipe.json); use another "
                            "loop.dir")
        barrier()  # every rank has checked before rank 0 writes anything
        if rank == 0 and not stored.is_file():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"loop.dir {path}: cannot create it ({e.strerror or e})") from None
            write_json(stored, {"hash": digest, "flat": flat})
        barrier()
        return cls(path, rank, barrier)

    def stage_dir(self, iteration: int, name: str) -> Path:
        return self.path / f"iter_{iteration}" / name

    def done(self, iteration: int, name: str) -> bool:
        return (self.stage_dir(iteration, name) / "DONE").is_file()

    def result(self, iteration: int, name: str) -> dict[str, Any] | None:
        path = self.stage_dir(iteration, name) / "stage.json"
        return json.loads(path.read_text()) if self.done(iteration, name) else None

    def run(self, iteration: int, name: str, fn: Callable[[Path], dict[str, Any] | None],
            keep_partial: bool = False) -> dict[str, Any]:
        """The stage's result: read back when the stage is complete, else computed by `fn(temp dir)` on every
        rank (rank 0's return value is the result) and moved into place. `keep_partial`: an interrupted
        attempt's temp dir is kept for `fn` to resume from."""
        final = self.stage_dir(iteration, name)
        label = f"iter_{iteration}/{name}"
        if self.done(iteration, name):
            if self.rank == 0:
                self.note(f"{label} skipped (complete)")
            return self.result(iteration, name)  # type: ignore[return-value]
        tmp = final.parent / f".{name}.tmp"
        if self.rank == 0:
            if not keep_partial:
                shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted attempt left
            tmp.mkdir(parents=True, exist_ok=True)
        self.barrier()
        if self.rank == 0:
            log.info("loop: %s ...", label)
        start = time.time()
        out = fn(tmp) or {}
        # The stage's models, optimizer and engine are unreachable now (each stage closes its engine and the
        # training loop frees what accelerate held): give their memory back before the next stage loads.
        release_memory()
        if self.rank == 0:
            out["seconds"] = round(time.time() - start, 2)
            write_json(tmp / "stage.json", out)
            (tmp / "DONE").write_text(time.strftime("%Y-%m-%d %H:%M:%S") + "\n")
            if final.exists():  # a stage directory without DONE (emptied by hand): never a finished stage
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.note(f"{label} computed in {out['seconds']} s")
        self.barrier()
        return self.result(iteration, name)  # type: ignore[return-value]

    def note(self, line: str) -> None:
        log.info("loop: %s", line)
        with (self.path / "stages.log").open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
