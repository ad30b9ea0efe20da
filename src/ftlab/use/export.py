"""`ftlab export SOURCE --out DIR`: what was trained, in the forms other tools load.

    SOURCE: a training run (its final/), a LoRA adapter directory, or a full model directory
    DIR/    the adapter as it is (+ tokenizer), or with --merge the adapter folded into a full-precision
            copy of its base (safetensors shards, tokenizer, chat template); with --gguf model.gguf and an
            Ollama Modelfile; always a model card README.md
    --push-to-hub REPO uploads DIR (create_repo + upload_folder); --dry-run lists what would be sent.

Everything a user can get wrong is checked before any weights are touched (the source, the output
directory, a base stored quantized, an architecture GGUF export does not cover, a Hub that cannot be
reached), so a refusal is one line and writes nothing. The export is built in a temporary directory
beside DIR and renamed into place at the end: an interrupted export leaves no half-written DIR.

Merging loads the base unquantized, in fp32, or in bf16/fp16 when the base is stored so on disk (fp32
would only double the size without adding information). A QLoRA run's adapter is therefore folded into a
fresh unquantized copy of its base, never into the 4-bit weights it trained against (which would round
most of the update away; see `ftlab.train.checkpoint.save_merged_from_adapter`).
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftlab.errors import UserError, first_line

log = logging.getLogger("ftlab")

MAX_SHARD_SIZE = "5GB"  # the Hub's recommended shard size (transformers' default is one 50 GB file)
SKIPPED_FILES = {"README.md"}  # peft's generated card: the export writes its own


@dataclass
class Exported:
    """What SOURCE turned out to be."""

    spec: str
    path: Path                    # the adapter or model directory whose files are exported
    is_adapter: bool
    run: Path | None              # the training run it comes from, if any
    run_cfg: Any = None           # that run's config.yaml (OmegaConf), if any
    base: str | None = None       # an adapter's base model, as this machine loads it
    tokenizer: Any = None         # loaded by the --gguf checks, reused for writing

    @property
    def label(self) -> str:
        return self.run.resolve().name if self.run else self.path.resolve().name


# -- checks (nothing is written before they pass) --------------------------------------------------
def check_options(gguf: str | None, push_to_hub: str | None, dry_run: bool, private: bool) -> None:
    from ftlab.use.gguf_export import OUT_TYPES

    if dry_run and not push_to_hub:
        raise UserError("--dry-run lists what --push-to-hub would upload; give --push-to-hub REPO with it")
    if private and not push_to_hub:
        raise UserError("--private sets the visibility of the Hub repository; give --push-to-hub REPO with it")
    if gguf is not None and gguf not in OUT_TYPES:
        raise UserError(f"--gguf {gguf}: choose one of {', '.join(OUT_TYPES)}")
    if push_to_hub is not None:
        from ftlab.models.load import HUB_ID

        if not HUB_ID.match(push_to_hub) or push_to_hub.count("/") > 1:
            raise UserError(f"--push-to-hub {push_to_hub!r}: not a Hub repository id (NAME or OWNER/NAME)")


def check_out(out: str) -> Path:
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"--out {out}: directory is not empty; choose a new directory (the export never overwrites)")
    if not path.parent.exists():
        raise UserError(f"--out {out}: its parent directory {path.parent} does not exist")
    return path


def enclosing_run(path: Path) -> Path | None:
    """The training run a final/, best/ or checkpoint model directory belongs to."""
    from ftlab.use.source import is_run_dir

    for parent in (path.parent, path.parent.parent.parent):
        if is_run_dir(parent):
            return parent
    return None


def read_run_config(run: Path | None) -> Any:
    if run is None:
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(run / "config.yaml")
    except Exception as e:  # noqa: BLE001 - any YAML problem: the card just lacks the recipe facts
        log.warning("%s: cannot read config.yaml (%s); the model card will not show the recipe", run, first_line(e))
        return None


def locate_source(spec: str) -> Exported:
    """SOURCE as a run, adapter or model directory (the embedded model by its name too)."""
    from ftlab.models.load import EMBEDDED, is_adapter_dir, resolve_model_path
    from ftlab.use.source import resolve_source

    if spec not in EMBEDDED and not Path(spec).expanduser().exists():
        raise UserError(f"{spec}: no such training run, adapter or model directory")
    source = resolve_source(quickstart_model(spec))  # a run without final/ is refused here, naming what it has instead
    path = Path(resolve_model_path(source.name))
    run = source.run or enclosing_run(path)
    run = run.resolve() if run is not None else None  # runs/sft/latest: the run's own name in the card
    return Exported(spec, path, is_adapter_dir(str(path)), run, read_run_config(run))


def quickstart_model(spec: str) -> str:
    """A quickstart job directory stands for its SFT run (the job has no final/ of its own; its summary names
    the run that trained the model)."""
    import json

    from ftlab.use.source import is_run_dir

    path = Path(spec).expanduser()
    if not is_run_dir(path) or (path / "final").is_dir():
        return spec
    try:
        sft_run = json.loads((path / "summary.json").read_text(encoding="utf-8")).get("sft_run")
    except (OSError, ValueError):
        return spec
    if sft_run and (Path(sft_run) / "final").is_dir():
        log.info("%s is a quickstart job: exporting the model its SFT run trained, %s", spec, sft_run)
        return str(sft_run)
    return spec


def local_config(name: str) -> tuple[dict, Path | None]:
    """config.json of a model given as a directory or a hub id in the local Hub cache ({} when unknown)."""
    from ftlab.models.load import read_json

    path = Path(name)
    if path.is_dir():
        return read_json(path / "config.json"), path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not cached, or not a hub id
        cached = None
    return (read_json(Path(cached)), Path(cached).parent) if isinstance(cached, str) else ({}, None)


def check_mergeable(src: Exported) -> None:
    """The adapter's base exists here and is stored unquantized (sets `src.base`)."""
    from ftlab.models.load import adapter_base_path

    if src.run_cfg is not None and src.run_cfg.model.get("scratch"):
        raise UserError(f"{src.spec}: the run trained its adapter on model.scratch, a randomly initialised base "
                        "that was never saved; there is no base to merge into (export the adapter without "
                        "--merge/--gguf)")
    src.base = adapter_base_path(str(src.path))
    config, _ = local_config(src.base)
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        raise UserError(f"--merge: the base model {src.base} is stored {method} (its config.json has a "
                        "quantization_config); folding the adapter into quantized weights would round most of it "
                        "away. Point the adapter at the unquantized base: model.name=<unquantized base>")


def check_gguf(src: Exported) -> None:
    from ftlab.use.gguf_export import check_gguf_supported

    model = src.base if src.is_adapter else str(src.path)
    config, model_dir = local_config(model)
    if not config or model_dir is None:
        raise UserError(f"--gguf: cannot read the config.json of {model} here")
    # the tokenizer a merge saves: the adapter's own when it has one (as `load_model_and_tokenizer` picks)
    own = src.is_adapter and (src.path / "tokenizer_config.json").is_file()
    tokenizer_dir = src.path if own else model_dir
    src.tokenizer = check_gguf_supported(config, model, tokenizer_dir)


def check_hub(repo: str) -> None:
    """Fail at once, before exporting, when the Hub cannot be reached (no network, HF_HUB_OFFLINE)."""
    from ftlab.hub import hub_endpoint, hub_offline, hub_problem

    problem = hub_problem(hub_endpoint(), hub_offline())
    if problem is not None:
        raise UserError(f"--push-to-hub {repo}: cannot reach the Hugging Face Hub at {hub_endpoint()} ({problem}); "
                        "nothing exported. Export without --push-to-hub and upload later with "
                        f"`hf upload {repo} DIR`")


# -- building the export ---------------------------------------------------------------------------
def stored_dtype(model_dir: Path | None, config: dict) -> str:
    """fp32, or bf16/fp16 when the base's weights are stored so (safetensors header, else config.json)."""
    import json

    names = {"BF16": "bf16", "F16": "fp16", "bfloat16": "bf16", "float16": "fp16"}
    if model_dir is not None:
        for f in sorted(model_dir.glob("*.safetensors"))[:1]:
            with f.open("rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            kinds = [v["dtype"] for k, v in header.items() if k != "__metadata__"]
            return names.get(max(set(kinds), key=kinds.count), "fp32") if kinds else "fp32"
    return names.get(str(config.get("dtype") or config.get("torch_dtype")), "fp32")


def merge_adapter(src: Exported, out: Path) -> str:
    """Fold the adapter into a fresh, unquantized copy of its base and save it in shards; returns the dtype."""
    from omegaconf import OmegaConf

    from ftlab.config.schema import ModelConfig
    from ftlab.models.load import load_model_and_tokenizer, release_memory

    config, base_dir = local_config(src.base)
    dtype = stored_dtype(base_dir, config)
    why = "the base's dtype on disk" if dtype != "fp32" else "full precision"
    if src.run_cfg is not None and src.run_cfg.lora.get("quantize"):
        log.info("QLoRA run: merging into a fresh unquantized copy of %s, not the 4-bit weights it trained on", src.base)
    log.info("merging the LoRA adapter %s into %s in %s (%s)", src.path, src.base, dtype, why)
    model_cfg = src.run_cfg.model if src.run_cfg is not None else OmegaConf.structured(ModelConfig)
    # tokenizer None: the adapter directory's own tokenizer, the one training saved beside the weights
    cfg = OmegaConf.merge(model_cfg, {"name": src.base, "adapter": None, "scratch": None, "preset": None,
                                      "tokenizer": None, "dtype": dtype})
    # loaded for inference, the adapter comes back folded into the base (`attach_adapter`)
    merged, tokenizer = load_model_and_tokenizer(cfg, adapter=str(src.path))
    merged.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(out)
    del merged
    release_memory()
    return dtype


def copy_files(src: Path, out: Path) -> None:
    """The model or adapter files as they are (the run's own card is replaced by the export's)."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name not in SKIPPED_FILES:
            shutil.copy2(f, out / f.name)


def export_command(spec: str, out: str, merge: bool, gguf: str | None, push_to_hub: str | None,
                   dry_run: bool, private: bool) -> str:
    argv = ["ftlab", "export", spec, "--out", out] + (["--merge"] if merge else []) + \
        (["--gguf", gguf] if gguf else []) + (["--push-to-hub", push_to_hub] if push_to_hub else []) + \
        (["--private"] if private else []) + (["--dry-run"] if dry_run else [])
    return shlex.join(argv)


def build(src: Exported, tmp: Path, merge: bool, gguf: str | None, name: str) -> dict:
    """Write the export's weights into `tmp`; returns facts for the model card."""
    from ftlab.use.card import base_license, base_name

    facts: dict[str, Any] = {"form": "adapter" if src.is_adapter else "model"}
    license = base_license(base_name(src))
    hf_dir = src.path
    if src.is_adapter and (merge or gguf):
        if gguf and not merge:
            log.info("--gguf: merging the LoRA adapter into its base first (a GGUF file holds full weights)")
        hf_dir = tmp if merge else tmp / ".merged"
        hf_dir.mkdir(exist_ok=True)
        facts["merged_dtype"] = merge_adapter(src, hf_dir)
        facts["form"] = "merged" if merge else "gguf"
    else:
        if merge and not src.is_adapter:
            log.info("%s is a full model: nothing to merge; exporting its weights as they are", src.spec)
        if merge or not gguf:
            copy_files(src.path, tmp)
        if gguf and not merge:
            facts["form"] = "gguf"
    if gguf:
        from transformers import AutoTokenizer

        from ftlab.use.gguf_export import write_gguf, write_modelfile

        log.info("writing model.gguf (%s)", gguf)
        # the same tokenizer files: a merge saves the adapter's tokenizer, a full model is read where it is
        tokenizer = src.tokenizer if src.tokenizer is not None else AutoTokenizer.from_pretrained(hf_dir)
        facts["gguf"] = write_gguf(hf_dir, tmp / "model.gguf", gguf, name, license, tokenizer)
        write_modelfile(tmp, tokenizer, facts["gguf"]["add_bos"])
        if hf_dir == tmp / ".merged":
            shutil.rmtree(hf_dir)
    facts["license"] = license
    return facts


def finish(tmp: Path, out: Path) -> None:
    """Rename the finished export into place (an empty --out directory is replaced), with the permissions the
    user's umask gives new files: the temporary directory (and transformers' safetensors files) are private."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    if out.is_dir():
        out.rmdir()  # checked empty; a file appearing meanwhile makes this fail rather than overwrite
    os.replace(tmp, out)


# -- the Hub ---------------------------------------------------------------------------------------
def files_to_send(out: Path) -> list[tuple[str, int]]:
    return [(p.relative_to(out).as_posix(), p.stat().st_size) for p in sorted(out.rglob("*")) if p.is_file()]


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def list_upload(out: Path, repo: str, private: bool) -> str:
    files = files_to_send(out)
    lines = [(f"dry run: would upload {len(files)} files ({human_size(sum(s for _, s in files))}) from {out} to "
              f"the {'private' if private else 'public'} model repository {repo}; nothing sent")]
    lines += [f"  {path}  {size} bytes" for path, size in files]
    return "\n".join(lines)


def push(out: Path, repo: str, private: bool) -> str:
    """create_repo + upload_folder; any failure is one line that says where the export is."""
    from huggingface_hub import HfApi

    from ftlab.hub import hub_endpoint

    api = HfApi(endpoint=hub_endpoint())  # HF_ENDPOINT as ftlab's reachability check read it, not at import
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=out, repo_type="model", commit_message="ftlab export")
    except Exception as e:  # noqa: BLE001 - network, auth and server errors of every kind end in one line
        raise UserError(f"--push-to-hub {repo}: upload failed ({type(e).__name__}: {first_line(e)}); the export is "
                        f"complete in {out}: upload it later with `hf upload {repo} {out}`") from None
    return str(url)


# -- the verb --------------------------------------------------------------------------------------
def run_export(source: str, out: str, merge: bool = False, gguf: str | None = None, push_to_hub: str | None = None,
               dry_run: bool = False, private: bool = False) -> Path:
    """Export SOURCE into `out` (see the module docstring); returns the export directory."""
    from ftlab.use.card import write_card

    check_options(gguf, push_to_hub, dry_run, private)
    out_dir = check_out(out)
    src = locate_source(source)
    if src.is_adapter and (merge or gguf):
        check_mergeable(src)
    if gguf:
        check_gguf(src)
    if push_to_hub and not dry_run:
        check_hub(push_to_hub)
    from ftlab.models.load import progress_bars_only_on_a_terminal

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        with progress_bars_only_on_a_terminal():
            facts = build(src, tmp, merge, gguf, out_dir.name)
        write_card(tmp, src, facts, export_command(source, out, merge, gguf, push_to_hub, dry_run, private))
        finish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s", source, out_dir)
    if push_to_hub and dry_run:
        print(list_upload(out_dir, push_to_hub, private))
    elif push_to_hub:
        print(f"uploaded {out_dir} to {push(out_dir, push_to_hub, private)}")
    return out_dir
