"""Run directories: runs/<kind>/<YYYYmmdd_HHMMSS>_<name>/ with config, environment, log, metrics.

A run is never overwritten. `summary.json` carries a `status` (running -> complete | failed |
interrupted), so a directory left by a crash or Ctrl-C never looks like a finished run.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.errors import UserError

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "OPENAI_API_KEY")
# Key names that hold secrets, matched as whole parts of the name (split at _ - .): hf_token, token,
# api_key, apikey, password, secret, aws_secret_access_key, private_key, credentials. Not max_new_tokens,
# tokenizer, pad_token or pad_token_id: redacting those made config.yaml impossible to run again.
SECRET_KEY = re.compile(r"(^|[_.-])(secret|password|passwd|api_?key|access_?key|secret_?key|private_?key|"
                        r"credentials?)($|[_.-])|(^|[_.-])token$", re.I)
TOKENIZER_TOKEN = re.compile(r"(^|[_.-])(pad|eos|bos|unk|sep|cls|mask|stop|special)_token$", re.I)


def is_secret_key(key: Any) -> bool:
    """Whether a config key (or any part of a dotted key) names a secret."""
    return any(SECRET_KEY.search(part) and not TOKENIZER_TOKEN.search(part) for part in str(key).split("."))


def redact(obj: Any) -> Any:
    """Replace secret-looking values (by key name, or equal to a secret env var) with '***'."""
    secrets = {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    if isinstance(obj, dict):
        return {k: ("***" if is_secret_key(k) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "***")
    return obj


def redact_argv(argv: list[str]) -> list[str]:
    """A command line as env.json records it: the value of a secret-named override (`job.hf_token=...`)
    or option (`--hf-token ...`) is hidden, as config.yaml hides it, and so is any secret env value."""
    def secret_option(arg: str) -> bool:
        return is_secret_key(arg.lstrip("-").replace("-", "_"))

    out: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and value and secret_option(key):
            arg = f"{key}=***"
        elif out and out[-1].startswith("-") and "=" not in out[-1] and secret_option(out[-1]):
            arg = "***"
        out.append(arg)
    return redact(out)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(seed: int | None = None) -> dict[str, Any]:
    import torch
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:  # pragma: no cover
        peft_version = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_version,
        "git_commit": _git_commit(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "gpus": gpus, "seed": seed, "argv": redact_argv(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class RunDir:
    """One run's directory and its files. Create with `RunDir.create(...)`."""

    def __init__(self, path: Path):
        self.path = path
        self.metrics_path = path / "metrics.jsonl"
        self._summary: dict[str, Any] = {}

    @classmethod
    def create(cls, output_dir: str | os.PathLike, kind: str, name: str, cfg: DictConfig | None = None,
               seed: int | None = None) -> "RunDir":
        parent = Path(output_dir) / kind
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # read-only or full file system, output_dir naming a file
            raise UserError(f"output_dir {output_dir}: cannot create {parent} ({e.strerror or e})") from None
        stamp = time.strftime("%Y%m%d_%H%M%S")
        safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-") or "run"
        for i in range(1000):  # never overwrite: a second run in the same second gets a suffix
            path = parent / (f"{stamp}_{safe}" + (f"_{i + 1}" if i else ""))
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        run = cls(path)
        if cfg is not None:
            (path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(redact(
                OmegaConf.to_container(cfg, resolve=True)))), encoding="utf-8")
        (path / "env.json").write_text(json.dumps(environment(seed), indent=2), encoding="utf-8")
        run.metrics_path.touch()
        run.update_summary(status="running", kind=kind, name=name)
        run._link_latest(parent)
        run.log_to_file()
        return run

    def _link_latest(self, parent: Path) -> None:
        latest = parent / "latest"
        tmp = parent / f".latest.{os.getpid()}"
        try:
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(self.path.name)
            os.replace(tmp, latest)
        except OSError:  # file systems without symlinks: write the name instead
            (parent / "latest.txt").write_text(self.path.name)

    def log_to_file(self) -> None:
        """Attach run.log to the 'ftlab' logger (console output is configured by the CLI)."""
        handler = logging.FileHandler(self.path / "run.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._ftlab_run = True  # type: ignore[attr-defined]
        logger = logging.getLogger("ftlab")
        for h in [h for h in logger.handlers if getattr(h, "_ftlab_run", False)]:
            logger.removeHandler(h)
            h.close()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    def update_summary(self, **fields: Any) -> None:
        """Merge fields into summary.json, written atomically."""
        self._summary.update(fields)
        write_json(self.path / "summary.json", self._summary)

    def finish(self, status: str = "complete", **fields: Any) -> None:
        self.update_summary(status=status, finished=time.strftime("%Y-%m-%d %H:%M:%S"), **fields)
        self.detach_log()

    def detach_log(self) -> None:
        """Stop writing run.log: what the next run logs before its own directory exists (the model it loads,
        its trainable parameters) must not land in this run's log."""
        logger = logging.getLogger("ftlab")
        mine = str(self.path / "run.log")
        for h in [h for h in logger.handlers if getattr(h, "_ftlab_run", False)]:
            if getattr(h, "baseFilename", None) == os.path.abspath(mine):
                logger.removeHandler(h)
                h.close()

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self._summary)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp + rename): readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_status(run_path: str | os.PathLike) -> str | None:
    p = Path(run_path) / "summary.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text()).get("status")
