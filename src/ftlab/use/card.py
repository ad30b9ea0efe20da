"""The model card (README.md) of an export: Hub front matter, base model, method, data, evaluation, recipe
and the exact commands.

Everything in it is read from files that already exist: the run's config.yaml (the recipe), summary.json,
metrics.jsonl (in-training evaluation), env.json (the training command and versions) and run.log (how many
examples were trained on); the quickstart's metrics_base.json / metrics_tuned.json when the run is a
quickstart's SFT step; and `ftlab eval` runs (<output_dir>/eval/*/metrics.json) that evaluated this model.
Nothing is measured here, and what was not recorded is said to be missing rather than left out quietly.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

# The Hub repositories the embedded models were converted from (the base_model a Hub card should name).
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


# -- the base model --------------------------------------------------------------------------------
def front_matter_of(readme: Path) -> dict:
    """The YAML front matter of a README.md ({} when there is none or it does not parse)."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
        if text.startswith("---"):
            data = yaml.safe_load(text.split("---", 2)[1])
            return data if isinstance(data, dict) else {}
    except (OSError, UnicodeDecodeError, IndexError, yaml.YAMLError):
        pass
    return {}


def base_license(base: str | None) -> str | None:
    """The base model's license where this machine records it: the embedded model's GGUF metadata, a local
    model's README front matter, or a Hub model's README in the local cache."""
    if not base:
        return None
    from ftlab.models.load import EMBEDDED

    if base in EMBEDDED:
        import gguf

        from ftlab.models.load import embedded_gguf

        field = gguf.GGUFReader(embedded_gguf(base)).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    readme = Path(base).expanduser() / "README.md"
    if not readme.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "README.md")
        except Exception:  # noqa: BLE001 - not a hub id, or not cached: license unknown
            cached = None
        readme = Path(cached) if isinstance(cached, str) else readme
    value = front_matter_of(readme).get("license") if readme.is_file() else None
    return str(value) if value else None


def hub_id(base: str | None) -> str | None:
    """The base as a Hub repository id (what `base_model:` must be), or None for a local-only model."""
    from ftlab.models.load import HUB_ID

    if not base:
        return None
    if base in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[base]
    return base if "/" in base and HUB_ID.match(base) and not Path(base).expanduser().exists() else None


def base_name(src: Any) -> str | None:
    """The model that was fine-tuned, as the run or adapter records it (not the local cache path); the
    embedded model exported as it is names itself."""
    from ftlab.models.load import EMBEDDED

    if src.spec in EMBEDDED:
        return src.spec
    if src.run_cfg is not None and not src.run_cfg.model.get("scratch"):
        return str(src.run_cfg.model.name)
    if src.is_adapter:
        try:
            config = json.loads((src.path / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        from ftlab.models.load import portable_base

        return portable_base(config["base_model_name_or_path"]) if config.get("base_model_name_or_path") else None
    return None


# -- what the run recorded -------------------------------------------------------------------------
def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def trained_examples(run: Path) -> int | None:
    """The number of training examples the loop logged at its start (run.log), if it did."""
    try:
        found = re.search(r"\), (\d+) examples, batch", (run / "run.log").read_text(encoding="utf-8"))
    except OSError:
        return None
    return int(found.group(1)) if found else None


def method_lines(src: Any) -> list[str]:
    cfg = src.run_cfg
    if cfg is None:
        if not src.is_adapter:
            return ["No training run is recorded with this model: the method is unknown."]
        a = read_json_file(src.path / "adapter_config.json") or {}
        return [(f"- LoRA adapter: r={a.get('r')}, alpha={a.get('lora_alpha')}, "
                 f"target modules {sorted(a.get('target_modules') or [])} (from adapter_config.json; no run recorded)")]
    summary = read_json_file(src.run / "summary.json") or {}
    kind = str(summary.get("kind") or cfg.get("kind") or "sft")
    lines = [f"- Objective: {kind.upper()}"]
    lora = cfg.lora
    if lora.enabled:
        where = f", the last {lora.last_layers} layers" if lora.get("last_layers") else ""
        name = "QLoRA (LoRA on a 4-bit NF4-quantized base)" if lora.get("quantize") else "LoRA"
        lines.append(f"- {name}: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
                     f"target modules {list(lora.target_modules)}{where}")
    else:
        lines.append("- Full fine-tuning (all weights)")
    t, o = cfg.train, cfg.optim
    lines.append(f"- {summary.get('steps', '?')} optimizer steps, batch {t.batch_size} x accumulation {t.grad_accum}, "
                 f"{o.name} lr {o.lr}, {cfg.schedule.name} schedule, precision {t.precision}, seed {cfg.seed}")
    if kind == "dpo" and cfg.get("dpo") is not None:
        lines.append(f"- DPO: beta {cfg.dpo.beta}, loss {cfg.dpo.loss_type}")
    return lines


def data_lines(src: Any) -> list[str]:
    cfg = src.run_cfg
    if cfg is None:
        return ["Not recorded (no training run)."]
    d = cfg.data
    n = trained_examples(src.run)
    lines = [f"- Task: `{d.task}`" + (f" (options {dict(d.task_options)})" if d.get("task_options") else ""),
             f"- Training data: `{d.train}`" + (f" (split {d.train_split})" if not Path(str(d.train)).exists() else "")
             + (f", first {d.limit} rows" if d.get("limit") else ""),
             f"- Examples trained on: {n}" if n is not None else "- Examples trained on: not recorded"]
    if d.get("val"):
        lines.append(f"- Validation data: `{d.val}`")
    return lines


# -- evaluation ------------------------------------------------------------------------------------
def accuracy_text(m: dict) -> str:
    acc, ci, n = m.get("accuracy"), m.get("accuracy_ci95"), m.get("n")
    if acc is None:
        return "n/a"
    text = f"{100 * acc:.1f}%"
    if ci:
        text += f" (95% CI {100 * ci[0]:.1f}-{100 * ci[1]:.1f}%)"
    return text + (f", n={n}" if n is not None else "")


def in_training_eval(run: Path) -> list[str]:
    from ftlab.runs.trackers import read_metrics

    try:
        rows = [r for r in read_metrics(run / "metrics.jsonl") if "eval_step" in r]
    except Exception:  # noqa: BLE001 - a damaged metrics file: the card says nothing was recorded there
        rows = []
    if not rows:
        return []
    last = rows[-1]
    values = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith("eval/") and isinstance(v, float))
    lines = [(f"In-training evaluation on the validation set at step {last['eval_step']}: {values} "
              "(no interval recorded; in-training accuracy is greedy on data.val_limit examples).")]
    best = (read_json_file(run / "summary.json") or {}).get("best")
    if best:
        lines.append(f"Best {best.get('metric')}: {best.get('value'):.4g} at step {best.get('step')} (saved as best/).")
    return lines


def quickstart_eval(run: Path) -> list[str]:
    """The quickstart's before/after table when `run` is its SFT step (<quickstart run>/sft/<run>)."""
    job = run.parent.parent
    tuned, base = read_json_file(job / "metrics_tuned.json"), read_json_file(job / "metrics_base.json")
    if run.parent.name != "sft" or not isinstance(tuned, dict):
        return []
    base = base if isinstance(base, dict) else {}
    lines = [f"Held-out evaluation by `ftlab quickstart` ({job}): greedy decoding, identical prompts before and after.",
             "", "| set | base model | this model |", "|---|---|---|"]
    for key in sorted(tuned, key=lambda k: int(k) if str(k).isdigit() else 0):
        label = f"{key}-hop" if str(key).isdigit() else str(key)
        lines.append(f"| {label} | {accuracy_text(base.get(key, {}))} | {accuracy_text(tuned[key])} |")
    first = next(iter(tuned.values()), {})
    lines += ["", (f"Accuracy rule: {first.get('primary_rule', 'not recorded')}; extraction: "
                   f"{first.get('extraction_rule', 'not recorded')}")]
    summary = read_json_file(job / "summary.json") or {}
    if summary.get("heldout"):
        lines.append(f"Held-out problems: {summary['heldout']}")
    return lines


def eval_runs(src: Any) -> list[str]:
    """`ftlab eval` runs of this model: <output_dir>/eval/*/metrics.json whose model or adapter is it."""
    if src.run is None:
        return []
    targets = {p.resolve() for p in (src.run, src.run / "final", src.path)}
    lines = []
    for path in sorted((src.run.parent.parent / "eval").glob("*/metrics.json")):
        m = read_json_file(path)
        if not isinstance(m, dict):
            continue
        named = [m.get("model"), m.get("adapter")]
        if any(x and Path(x).expanduser().resolve() in targets for x in named):
            lines.append(f"- `ftlab eval` on {m.get('task')} ({m.get('source')}): accuracy {accuracy_text(m)}; "
                         f"rule: {m.get('primary_rule', '?')}; extraction: {m.get('extraction_rule', '?')} "
                         f"({path.parent})")
    return lines


def evaluation_lines(src: Any) -> list[str]:
    if src.run is None:
        return ["No evaluation recorded."]
    parts = [quickstart_eval(src.run), eval_runs(src), in_training_eval(src.run)]
    lines = [line for part in parts if part for line in part + [""]]
    return lines[:-1] if lines else ["No evaluation recorded."]


# -- commands and usage ----------------------------------------------------------------------------
def training_command(run: Path) -> str | None:
    argv = (read_json_file(run / "env.json") or {}).get("argv")
    if not argv:
        return None
    head = "ftlab" if Path(argv[0]).name == "ftlab" else argv[0]
    return shlex.join([head] + list(argv[1:]))


def usage_lines(facts: dict, repo_hint: str) -> list[str]:
    form = facts.get("form")
    lines = []
    if form == "adapter":
        lines += ["```python", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_hint}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_hint}")', "```"]
    elif form in ("merged", "model"):
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_hint}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_hint}")', "```"]
    if facts.get("gguf"):
        g = facts["gguf"]
        lines += [(f"`model.gguf` ({g['type']}, {g['architecture']}, {g['parameters'] / 1e6:.0f}M parameters) loads "
                   "in llama.cpp and, with the Modelfile, in Ollama:"), "", "```sh",
                  "ollama create my-model -f Modelfile", "ollama run my-model", "```", "",
                  "ftlab evaluates it directly: `ftlab eval RECIPE model.name=model.gguf`."]
    return lines


def front_matter(src: Any, facts: dict, base: str | None) -> str:
    import yaml

    cfg = src.run_cfg
    tags = ["ftlab"]
    if cfg is not None:
        tags.append("qlora" if cfg.lora.get("quantize") else "lora" if cfg.lora.enabled else "full-fine-tuning")
        tags.append(str((read_json_file(src.run / "summary.json") or {}).get("kind") or "sft"))
        if cfg.data.task and cfg.data.task != "generic":
            tags.append(str(cfg.data.task))
    elif src.is_adapter:
        tags.append("lora")
    if facts.get("gguf"):
        tags.append("gguf")
    meta: dict[str, Any] = {}
    if hub_id(base):
        meta["base_model"] = hub_id(base)
    library = {"adapter": "peft", "merged": "transformers", "model": "transformers"}.get(facts.get("form"))
    if library:
        meta["library_name"] = library
    if facts.get("license"):
        meta["license"] = facts["license"]
    meta.update({"pipeline_tag": "text-generation", "tags": tags})
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def card_text(src: Any, facts: dict, export_cmd: str) -> str:
    base = base_name(src)
    form = {"adapter": "a LoRA adapter (load it on its base model)",
            "merged": f"the LoRA adapter merged into its base ({facts.get('merged_dtype', 'fp32')} weights)",
            "model": "a full model", "gguf": "a GGUF file for llama.cpp and Ollama"}[facts["form"]]
    sections = [front_matter(src, facts, base), f"# {src.label}", "",
                f"Exported by ftlab from `{src.spec}`: {form}."
                + (f" Also `model.gguf` ({facts['gguf']['type']}) with an Ollama `Modelfile`."
                   if facts.get("gguf") and facts["form"] != "gguf" else ""), "",
                "## Base model", "", f"`{base}`" + (f" ({hub_id(base)} on the Hub)" if hub_id(base) and hub_id(base) != base
                                                    else "") if base else "Not recorded.", "",
                "## Method", "", *method_lines(src), "", "## Data", "", *data_lines(src), "",
                "## Evaluation", "", *evaluation_lines(src), ""]
    if src.run_cfg is not None:
        recipe = (src.run / "config.yaml").read_text(encoding="utf-8").rstrip()
        sections += ["## Recipe", "", f"The run's `config.yaml` ({src.run}):", "", "```yaml", recipe, "```", ""]
    sections += ["## Commands", ""]
    trained = training_command(src.run) if src.run is not None else None
    env = read_json_file(src.run / "env.json") if src.run is not None else None
    if trained:
        sections += ["Trained with:", "", "```sh", trained, "```", ""]
        if isinstance(env, dict):
            sections += [(f"(torch {env.get('torch')}, transformers {env.get('transformers')}, "
                          f"peft {env.get('peft')}, ftlab commit {env.get('git_commit') or 'unknown'})"), ""]
    sections += ["Exported with:", "", "```sh", export_cmd, "```", ""]
    usage = usage_lines(facts, "<this directory or repository>")
    if usage:
        sections += ["## Use", "", *usage, ""]
    return "\n".join(sections)


def write_card(out: Path, src: Any, facts: dict, export_cmd: str) -> Path:
    path = out / "README.md"
    path.write_text(card_text(src, facts, export_cmd), encoding="utf-8")
    return path
