"""What `ftlab chat`, `ftlab serve` and `ftlab export` are pointed at: a model, an adapter, or a training run.

A training run directory (it has `config.yaml` and `summary.json`) stands for what it saved in `final/`: a
LoRA adapter (its base model is named in `adapter_config.json`) or a full model. The tokenizer saved beside
the weights carries the chat template SFT rendered the training examples with, so using a run renders
prompts exactly as training did.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftlab.errors import UserError


@dataclass
class ModelSource:
    """Where the weights come from: `name` as `load_model_and_tokenizer` takes it (embedded name, directory,
    hub id, or an adapter directory, whose base is loaded first), an extra `adapter`, and the run, if any."""

    name: str
    adapter: str | None = None
    run: Path | None = None

    @property
    def label(self) -> str:
        """A short name for logs, model cards and the server's model list."""
        if self.run is not None:
            return self.run.resolve().name
        return Path(self.name).name if Path(self.name).exists() else self.name


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (path / "summary.json").is_file()


def run_status(run: Path) -> str:
    import json

    try:
        return str(json.loads((run / "summary.json").read_text(encoding="utf-8")).get("status", "unknown"))
    except (OSError, ValueError):
        return "unknown"


def resolve_source(spec: str, adapter: str | None = None) -> ModelSource:
    """A model name or directory, an adapter directory, or a training run directory -> `ModelSource`.

    A run without `final/` (still running, crashed, interrupted) is refused in one line that says what it
    has instead: its `best/` or latest checkpoint can be named directly."""
    path = Path(spec).expanduser()
    if adapter is not None and not Path(adapter).expanduser().is_dir():
        raise UserError(f"--adapter {adapter}: not a directory")
    if not is_run_dir(path):
        return ModelSource(name=spec, adapter=adapter)
    final = path / "final"
    if not final.is_dir():
        from ftlab.train.checkpoint import complete_checkpoints

        others = [str(p) for p in (path / "best",) if p.is_dir()]
        if (path / "checkpoints").is_dir():
            others += [str(p / "model") for p in complete_checkpoints(path / "checkpoints")[-1:]]
        hint = f"; name one of these instead: {', '.join(others)}" if others else ""
        raise UserError(f"{spec}: the run saved no final/ model (status: {run_status(path)}){hint}")
    return ModelSource(name=str(final), adapter=adapter, run=path)


def load_source(source: ModelSource, dtype: str = "fp32", device: Any = None) -> tuple[Any, Any]:
    """(model in eval mode on `device` (the GPU when there is one), tokenizer) for `source`; an adapter comes
    back folded into the base weights, which is what inference wants."""
    from ftlab.config.schema import ModelConfig
    from ftlab.evaluate import eval_device
    from ftlab.models.load import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=source.name, adapter=source.adapter, dtype=dtype))
    return model.to(device if device is not None else eval_device()), tokenizer
