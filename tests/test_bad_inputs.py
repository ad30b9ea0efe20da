"""The bad-input corpus: every way a user can hand ftlab a bad setting or file, run through the real CLI.

Each case is a dict; the runner writes its files, runs `ftlab <argv>` in-process (or as a subprocess),
and asserts what ftlab promises on bad input:

* the exit code (2 for a user error),
* exactly one `ftlab: error: ...` line containing the expected fragment, and nothing else on stderr
  but ftlab's own timestamped log lines (no traceback, no warning, no second error),
* no run directory left whose summary.json says `complete`.

Fields of a case:
    id        unique name (the pytest id)
    argv      the command line after `ftlab`; placeholders are replaced (see PLACEHOLDERS)
    needle    a fragment of the error line (placeholders replaced too)
    files     {relative path: content} written first: str (placeholders replaced), bytes, or a JSON value
    env       {name: value} set for the run (placeholders replaced); None removes a variable
    exit      expected exit code (default 2)
    subprocess  run `python -m ftlab.cli` instead of in-process (a real exit code and stderr)
    max_seconds  the run must fail within this many seconds (fail-fast checks)
    pending   a reason: the case is a strict xfail until the fix lands (then remove `pending`)
    requires_key  skip while this recipe key is not in the schema yet (a setting being added)

To add a case (e.g. for checkpoints and resume), append a dict to CASES; `{recipe}` is a tiny recipe
training a random 2-layer Llama on `{data}` (32 generic prompt/response rows) with outputs in {tmp}/runs.
"""
from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ftlab.cli import main
from tests.helpers import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


def jsonl(*records: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def safetensors_bytes(truncate_by: int = 0) -> bytes:
    """A valid one-tensor safetensors file (4 float32), optionally cut short by `truncate_by` bytes."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    data = struct.pack("<Q", len(header)) + header + struct.pack("<4f", 1, 2, 3, 4)
    return data[:len(data) - truncate_by]


SMALL_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 256}
ADAPTER_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                  "target_modules": ["q_proj"], "base_model_name_or_path": "smollm2-135m-instruct"}
OK_ROW = {"prompt": "What is 1 plus 2?", "response": "3"}
HUB = ["model.scratch=null", "model.name=someorg/somemodel"]  # a hub id that is not cached
# every case's folder also holds in.jsonl (one prompt) and g.jsonl (two GSM8K rows) unless its files replace them
INFER = ["infer", "{recipe}", "--input", "{tmp}/in.jsonl", "--output", "{tmp}/out.jsonl"]
EVAL = ["eval", "{recipe}", "eval.task=gsm8k", "eval.source={tmp}/g.jsonl", "eval.max_new_tokens=2"]
DEFAULT_FILES = {"in.jsonl": jsonl({"prompt": "hi"}),
                 "g.jsonl": jsonl({"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"})}
# a local model directory and adapters on top of it (no real weights needed: checks run before loading)
MODEL_DIR = {"m/config.json": SMALL_LLAMA, "m/model.safetensors": safetensors_bytes()}
MEMORY = ["memory", "{tmp}/m/config.json", "--seq-len", "128"]  # within its 256-token window
FULL = len(safetensors_bytes())

TRAIN, EVAL_, QUICKSTART = ["train", "{recipe}"], ["eval", "{recipe}"], ["quickstart", "{recipe}"]
LOOP = ["loop", "{recipe}"]
DPO = ["train", "{recipe}", "train.method=dpo", "data.train={tmp}/p.jsonl"]  # preference pairs in p.jsonl
PAIR = {"prompt": "What is 1 plus 2?", "chosen": "3", "rejected": "4"}
PRETRAIN = ["train", "{recipe}", "train.method=pretrain", "pretrain.corpus={tmp}/pc", "model.tokenizer={tmp}/tok",
            "pretrain.seq_len=4"]  # the hand-made corpus of tiny_corpus()
CORPUS = ["prepare-corpus", "{tmp}/c.jsonl", "--out", "{tmp}/corpus", "--workers", "0"]  # documents in c.jsonl
DOC = {"id": "1", "category": "math", "text": "A lemma on primes."}


def tokenizer_files(folder: str) -> dict[str, str]:
    """The files of the tests' tiny word-level tokenizer (not the policy's), saved under `folder`."""
    import tempfile

    from tests.conftest import build_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer().save_pretrained(tmp)
        return {f"{folder}/{p.name}": p.read_text() for p in Path(tmp).iterdir()}


def tiny_corpus(tokens: list[int] | None = None, declared_tokens: int | None = None) -> dict[str, Any]:
    """A hand-made prepared corpus in pc/ for the tests' tiny tokenizer (in tok/; ids below 17): train documents
    'a' (math, 6 tokens) and 'b' (bio, 8 tokens), val document 'c' (math, 6 tokens)."""
    from ftlab.data.corpus import tokenizer_hash
    from tests.conftest import build_tiny_tokenizer

    tokens = tokens or [4, 5, 6, 7, 8, 9, 4, 5, 6, 7, 8, 9, 10, 11, 6, 7, 8, 9, 10, 11]
    docs = [("a", "math", "train", 0, 6), ("b", "bio", "train", 6, 8), ("c", "math", "val", 14, 6)]
    index = jsonl(*({"doc": i, "id": d, "category": c, "split": s, "offset": o, "length": n, "bytes": 4 * n}
                    for i, (d, c, s, o, n) in enumerate(docs)))
    meta = {"format": 1, "tokenizer": "tiny", "tokenizer_sha256": tokenizer_hash(build_tiny_tokenizer()),
            "vocab_size": 17, "dtype": "uint16", "documents": 3, "tokens": declared_tokens or len(tokens)}
    return {"pc/tokens.bin": struct.pack(f"<{len(tokens)}H", *tokens), "pc/index.jsonl": index,
            "pc/splits.json": {"train": [0, 1], "val": [2], "test": []}, "pc/meta.json": meta,
            **tokenizer_files("tok"), "tok/config.json": SMALL_LLAMA}


def setting(verb: list[str], override: str, needle: str) -> dict[str, Any]:
    """A case for one out-of-range override (id = the override)."""
    return {"id": override, "argv": verb + [override], "needle": needle}


CASES: list[dict[str, Any]] = [
    # -- numeric settings: schema-level validation, before anything loads (issue 11: 1, 2, 5, 9) -----------
    setting(EVAL_, "eval.offset=-2", "'eval.offset' must be >= 0; got -2"),
    setting(EVAL_, "eval.limit=0", "'eval.limit' must be >= 1"),
    setting(EVAL_, "eval.limit=-1", "'eval.limit' must be >= 1"),
    setting(TRAIN, "train.max_steps=0",
            "override 'train.max_steps=0': 'train.max_steps' must be >= 1 (or null: train for train.epochs); got 0"),
    setting(TRAIN, "train.max_steps=-3", "'train.max_steps' must be >= 1"),
    setting(TRAIN, "train.epochs=0", "'train.epochs' must be > 0; got 0.0"),
    setting(TRAIN, "data.limit=0", "'data.limit' must be >= 1"),
    setting(TRAIN, "data.val_limit=0", "'data.val_limit' must be >= 1"),
    setting(TRAIN, "train.save_every=0",
            "'train.save_every' must be >= 1 (or null: no intermediate checkpoints); got 0"),
    setting(TRAIN, "schedule.warmup_ratio=2", "'schedule.warmup_ratio' must be in [0, 1]; got 2.0"),
    setting(TRAIN, "schedule.warmup_steps=-1", "'schedule.warmup_steps' must be >= 0"),
    setting(TRAIN, "schedule.min_lr=-1", "'schedule.min_lr' must be >= 0"),
    setting(TRAIN, "train.log_every=0", "'train.log_every' must be >= 1; got 0"),
    setting(TRAIN, "train.eval_every=0", "'train.eval_every' must be >= 1"),
    setting(TRAIN, "train.log_generations_every=0", "'train.log_generations_every' must be >= 1"),
    setting(TRAIN, "train.keep_last=-1", "'train.keep_last' must be >= 0"),
    setting(TRAIN, "train.max_minutes=0", "'train.max_minutes' must be > 0"),
    setting(TRAIN, "train.grad_clip=0", "'train.grad_clip' must be > 0 (or null: no clipping)"),
    setting(TRAIN, "train.batch_size=0", "'train.batch_size' must be >= 1"),
    setting(TRAIN, "train.grad_accum=0", "'train.grad_accum' must be >= 1"),
    setting(TRAIN, "train.global_batch=0", "'train.global_batch' must be >= 1"),
    setting(TRAIN, "train.dist_timeout=0", "'train.dist_timeout' must be > 0 (or null: torch's default time-out)"),
    dict(setting(TRAIN, "train.fp16_init_scale=0", "'train.fp16_init_scale' must be > 0"),
         requires_key="train.fp16_init_scale"),
    setting(TRAIN, "optim.lr=-1e-4", "'optim.lr' must be > 0; got -0.0001"),
    setting(TRAIN, "optim.lr=nan", "'optim.lr' must be > 0; got nan"),
    setting(TRAIN, "optim.lr=inf", "'optim.lr' must be > 0; got inf"),
    setting(TRAIN, "optim.eps=0", "'optim.eps' must be > 0"),
    setting(TRAIN, "optim.weight_decay=-0.1", "'optim.weight_decay' must be >= 0"),
    setting(TRAIN, "optim.betas=[0.9]", "'optim.betas' must be two numbers"),
    setting(TRAIN, "optim.betas=[0.9,1.5]", "'optim.betas[1]' must be in [0, 1); got 1.5"),
    {"id": "lora.dropout=5", "argv": ["train", "{recipe}", "lora.enabled=true", "lora.dropout=5"],
     "needle": "'lora.dropout' must be in [0, 1); got 5.0"},
    setting(TRAIN, "lora.r=0", "'lora.r' must be >= 1"),
    setting(TRAIN, "lora.last_layers=0", "'lora.last_layers' must be >= 1"),
    {"id": "detach-prompt-with-packing", "argv": TRAIN + ["train.detach_prompt=true", "data.packing=true"],
     "needle": "override 'train.detach_prompt=true': 'train.detach_prompt' cannot be combined with "
               "'data.packing=True': packed rows hold several prompts"},
    {"id": "detach-prompt-with-checkpointing",
     "argv": TRAIN + ["train.detach_prompt=true", "train.gradient_checkpointing=true"],
     "needle": "'train.detach_prompt' cannot be combined with 'train.gradient_checkpointing=True'"},
    setting(TRAIN, "lora.alpha=0", "'lora.alpha' must be > 0"),
    setting(TRAIN, "data.max_length=0", "'data.max_length' must be >= 1"),
    setting(TRAIN, "data.max_bad_share=1.5", "'data.max_bad_share' must be in [0, 1]"),
    setting(TRAIN, "data.shots=-1", "'data.shots' must be >= 0"),
    setting(TRAIN, "seed=-1", "'seed' must be >= 0; got -1"),
    setting(EVAL_, "eval.shots=-1", "'eval.shots' must be >= 0"),
    setting(EVAL_, "eval.stop_line_repeats=-1", "'eval.stop_line_repeats' must be >= 0"),
    setting(EVAL_, "eval.batch_size=0", "'eval.batch_size' must be >= 1"),
    setting(INFER, "eval.max_new_tokens=0", "'eval.max_new_tokens' must be >= 1"),
    setting(INFER, "eval.temperature=-1", "'eval.temperature' must be >= 0"),
    setting(INFER, "eval.top_p=0", "'eval.top_p' must be in (0, 1]; got 0.0"),
    setting(INFER, "eval.n=0", "'eval.n' must be >= 1"),
    setting(QUICKSTART, "quickstart.heldout_offset=-1", "'quickstart.heldout_offset' must be >= 0"),
    setting(QUICKSTART, "quickstart.train_hops=[0,1]", "'quickstart.train_hops[0]' must be >= 1; got 0"),
    {"id": "quickstart.hops-too-many", "argv": ["quickstart", "{recipe}", "quickstart.heldout_hops=[99]",
                                                "quickstart.heldout_sizes=[5]"],
     "needle": "'quickstart.heldout_hops' must list hop counts from 1 to"},
    {"id": "quickstart.sizes-mismatch", "argv": ["quickstart", "{recipe}", "quickstart.heldout_sizes=[5]"],
     "needle": "'quickstart.heldout_sizes' must give one size per entry of quickstart.heldout_hops (3); got 1"},
    setting(QUICKSTART, "quickstart.more_queries=-1", "'quickstart.more_queries' must be >= 0"),
    setting(QUICKSTART, "quickstart.lookups=-2", "'quickstart.lookups' must be >= 0"),
    setting(QUICKSTART, "quickstart.data_seed=-1", "'quickstart.data_seed' must be >= 0"),
    setting(QUICKSTART, "quickstart.heldout_seed=-1", "'quickstart.heldout_seed' must be >= 0"),
    setting(QUICKSTART, "quickstart.train_examples=0", "'quickstart.train_examples' must be >= 1"),
    {"id": "range-in-recipe-file", "argv": ["train", "{tmp}/r.yaml"], "files": {"r.yaml": "train: {log_every: 0}\n"},
     "needle": "{tmp}/r.yaml: 'train.log_every' must be >= 1; got 0"},
    {"id": "max_length-beyond-context-window", "argv": ["train", "{recipe}", "data.max_length=4096"],
     "needle": "'data.max_length' is 4096, beyond the model's context window of 2048 tokens"},
    setting(TRAIN, "train.batch_size=[1,", "override 'train.batch_size=[1,': the value is not valid YAML"),
    setting(TRAIN, "train.best_metric=eval/bleu", "'train.best_metric' must be one of eval/accuracy"),
    {"id": "full-finetune-of-bf16-weights", "argv": ["train", "{recipe}", "model.dtype=bf16"],
     "needle": "trainable weights in bf16 (model.dtype=bf16): AdamW would update them without fp32 master weights"},
    {"id": "fp16-autocast-on-fp16-weights", "argv": ["train", "{recipe}", "model.dtype=fp16", "train.precision=fp16"],
     "needle": "train.precision=fp16 with trainable fp16 weights (model.dtype=fp16): the gradient scaler cannot"},

    # -- ftlab memory ------------------------------------------------------------------------------------
    {"id": "memory-lora-dropout=5", "argv": MEMORY + ["--method", "lora", "--lora-dropout", "5"],
     "files": MODEL_DIR, "needle": "LoRA dropout (--lora-dropout) must be in [0, 1); got 5"},
    {"id": "memory-seq-len-beyond-window", "argv": ["memory", "{tmp}/m/config.json", "--seq-len", "512"],
     "files": MODEL_DIR, "needle": "--seq-len 512 is beyond the context window of {tmp}/m/config.json (256 tokens"},
    {"id": "memory-batch-size=0", "argv": MEMORY + ["--batch-size", "0"], "files": MODEL_DIR,
     "needle": "batch size must be >= 1, got 0"},
    {"id": "memory-supervised-share=0", "argv": MEMORY + ["--supervised-share", "0"],
     "files": MODEL_DIR, "needle": "(--supervised-share) must be in (0, 1]; got 0"},
    {"id": "memory-config-not-utf8", "argv": ["memory", "{tmp}/c/config.json"],
     "files": {"c/config.json": b"{\"a\": \"\xff\"}"},
     "needle": "{tmp}/c/config.json: cannot read as JSON"},
    {"id": "memory-config-bad-values", "argv": ["memory", "{tmp}/c/config.json"],
     "files": {"c/config.json": dict(SMALL_LLAMA, hidden_size="wide")},
     "needle": "{tmp}/c/config.json: cannot build a config"},
    {"id": "memory-batch-size-not-a-number", "argv": MEMORY + ["--batch-size", "abc"],
     "needle": "argument --batch-size: invalid int value: 'abc'"},
    {"id": "unknown-option", "argv": ["train", "{recipe}", "--fast"], "needle": "unrecognized arguments: --fast"},
    {"id": "infer-without-output", "argv": ["infer", "{recipe}", "--input", "{tmp}/in.jsonl"],
     "needle": "the following arguments are required: --output"},
    {"id": "memory-bad-config-json", "argv": ["memory", "{tmp}/c/config.json"], "files": {"c/config.json": "{nope"},
     "needle": "{tmp}/c/config.json: cannot read as JSON"},

    # -- recipe files and overrides (7, 15) --------------------------------------------------------------
    setting(TRAIN, "optim.lerning_rate=1", "override 'optim.lerning_rate=1': unknown key 'optim.lerning_rate'"),
    setting(TRAIN, "train.batch_size=abc", "override 'train.batch_size=abc': wrong type for 'train.batch_size'"),
    {"id": "recipe-unknown-key-names-the-file", "argv": ["train", "{tmp}/r.yaml"],
     "files": {"r.yaml": "optim: {lrr: 1}\n"},
     "needle": "{tmp}/r.yaml: unknown key 'optim.lrr'; did you mean 'optim.lr'?"},
    {"id": "missing-base-names-the-referrer", "argv": ["train", "{tmp}/v.yaml"],
     "files": {"v.yaml": "# a variant\nbase: nope.yaml\noptim: {lr: 1.0e-4}\n"},
     "needle": "{tmp}/v.yaml:2: base recipe 'nope.yaml' not found ({tmp}/nope.yaml)"},
    {"id": "missing-base-in-a-list", "argv": ["train", "{tmp}/v.yaml"],
     "files": {"v.yaml": "base:\n  - p.yaml\n  - gone.yaml\n", "p.yaml": "name: p\n"},
     "needle": "{tmp}/v.yaml:3: base recipe 'gone.yaml' not found"},
    {"id": "base-not-a-path", "argv": ["train", "{tmp}/v.yaml"], "files": {"v.yaml": "name: v\nbase: 3\n"},
     "needle": "{tmp}/v.yaml:2: base: must be a recipe path or a list of them; got 3"},
    {"id": "recipe-not-utf8", "argv": ["train", "{tmp}/r.yaml"], "subprocess": True,
     "files": {"r.yaml": b"name: r\noptim: {lr: 1.0e-4}\nnote: caf\xe9\n"},
     "needle": "{tmp}/r.yaml:3: not UTF-8 text (byte 0xe9 at column 10)"},
    {"id": "recipe-not-a-mapping", "argv": ["train", "{tmp}/r.yaml"], "files": {"r.yaml": "- a\n- b\n"},
     "needle": "a recipe must be a mapping of keys, got list"},
    {"id": "recipe-yaml-date-value", "argv": ["train", "{tmp}/r.yaml"], "files": {"r.yaml": "name: 2024-01-01\n"},
     "needle": "{tmp}/r.yaml: bad value for 'name'"},
    {"id": "recipe-is-a-directory", "argv": ["train", "{tmp}"], "needle": "recipe file not found"},
    {"id": "recipe-section-null", "argv": ["train", "{tmp}/r.yaml"], "files": {"r.yaml": "train:\n"},
     "needle": "wrong type for 'train'"},

    # -- training files (7, 8) ---------------------------------------------------------------------------
    {"id": "train-file-not-utf8", "argv": ["train", "{recipe}", "data.train={tmp}/t.jsonl"],
     "files": {"t.jsonl": jsonl(OK_ROW).encode() + b'{"prompt": "caf\xe9", "response": "x"}\n'},
     "needle": "{tmp}/t.jsonl:2: not UTF-8 text (byte 0xe9 at column 16)"},
    {"id": "train-prompt-int", "argv": ["train", "{recipe}", "data.train={tmp}/t.jsonl"],
     "files": {"t.jsonl": jsonl(OK_ROW, {"prompt": 7, "response": "x"})},
     "needle": "{tmp}/t.jsonl:2: field 'prompt' must be a string; got a number"},
    {"id": "train-response-list", "argv": ["train", "{recipe}", "data.train={tmp}/t.jsonl"],
     "files": {"t.jsonl": jsonl({"prompt": "p", "response": ["a", "b"]})},
     "needle": "{tmp}/t.jsonl:1: field 'response' must be a string; got an array"},
    {"id": "train-messages-without-content", "argv": ["train", "{recipe}", "data.train={tmp}/t.jsonl"],
     "files": {"t.jsonl": jsonl({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]})},
     "needle": "{tmp}/t.jsonl:1: field 'messages[1]' has no 'content'"},
    {"id": "train-messages-strings", "argv": ["train", "{recipe}", "data.train={tmp}/t.jsonl"],
     "files": {"t.jsonl": jsonl(OK_ROW, {"messages": ["hi", "hello"]})},
     "needle": "{tmp}/t.jsonl:2: field 'messages[0]' must be an object with 'role' and 'content'; got a string"},
    {"id": "train-messages-content-number", "argv": ["train", "{recipe}", "data.train={tmp}/t.jsonl"],
     "files": {"t.jsonl": jsonl({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": 4}]})},
     "needle": "{tmp}/t.jsonl:1: field 'messages[1].content' must be a string; got a number"},
    {"id": "train-messages-not-ending-with-answer", "argv": ["train", "{recipe}", "data.train={tmp}/t.jsonl"],
     "files": {"t.jsonl": jsonl({"messages": [{"role": "user", "content": "hi"}]})},
     "needle": "{tmp}/t.jsonl:1: 'messages' must be a list ending with an assistant turn"},
    {"id": "train-messages-empty", "argv": ["train", "{recipe}", "data.train={tmp}/t.jsonl"],
     "files": {"t.jsonl": jsonl({"messages": []})}, "needle": "field 'messages' must be a non-empty array"},
    {"id": "train-row-not-an-object", "argv": ["train", "{recipe}", "data.train={tmp}/t.jsonl"],
     "files": {"t.jsonl": jsonl(OK_ROW, ["a", "b"])},
     "needle": "{tmp}/t.jsonl:2: expected a JSON object, got an array"},
    setting(TRAIN, "data.train={tmp}", "is a directory, not a JSONL file"),
    {"id": "task-file-not-utf8", "argv": EVAL,
     "files": {"g.jsonl": b'{"question": "1+1?", "answer": "#### 2"}\n\xff\n'},
     "needle": "{tmp}/g.jsonl:2: not UTF-8 text (byte 0xff at column 1)"},

    {"id": "prontoqa-json-not-utf8", "argv": EVAL + ["eval.task=prontoqa", "eval.source={tmp}/p.json"],
     "files": {"p.json": b'[{"question": "caf\xe9"}]'}, "needle": "{tmp}/p.json:1: not UTF-8 text (byte 0xe9"},

    # -- infer inputs and resuming into an existing output (3, 7, 8) -------------------------------------
    {"id": "infer-input-not-utf8", "argv": INFER, "files": {"in.jsonl": b'{"prompt": "ok"}\n{"prompt": "\xc3("}\n'},
     "needle": "{tmp}/in.jsonl:2: not UTF-8 text (byte 0xc3 at column 13)"},
    {"id": "infer-prompt-int", "argv": INFER, "files": {"in.jsonl": jsonl({"prompt": 12})},
     "needle": "{tmp}/in.jsonl:1: field 'prompt' must be a string; got a number"},
    {"id": "infer-messages-strings", "argv": INFER, "files": {"in.jsonl": jsonl({"messages": ["hi"]})},
     "needle": "{tmp}/in.jsonl:1: field 'messages[0]' must be an object"},
    {"id": "infer-messages-without-content", "argv": INFER,
     "files": {"in.jsonl": jsonl({"messages": [{"role": "user"}]})},
     "needle": "{tmp}/in.jsonl:1: field 'messages[0]' has no 'content'"},
    {"id": "infer-resume-other-settings", "argv": INFER,
     "files": {"in.jsonl": jsonl({"prompt": "hi"}),
               "out.jsonl": jsonl({"index": 0, "prompt": "hi", "output": "x", "settings": "0123456789abcdef"})},
     "needle": "{tmp}/out.jsonl:1: written with another model or generation settings"},
    {"id": "infer-resume-older-output", "argv": INFER,
     "files": {"in.jsonl": jsonl({"prompt": "hi"}), "out.jsonl": jsonl({"index": 0, "prompt": "hi", "output": "x"})},
     "needle": "{tmp}/out.jsonl:1: written without a record of its model and generation settings"},
    {"id": "infer-resume-damaged-output", "argv": INFER,
     "files": {"in.jsonl": jsonl({"prompt": "hi"}), "out.jsonl": "garbage\n" + jsonl({"index": 0, "prompt": "hi"})},
     "needle": "{tmp}/out.jsonl:1: not a row ftlab infer wrote"},
    {"id": "infer-output-is-a-directory", "argv": INFER[:-1] + ["{tmp}/outdir"],
     "files": {"outdir/keep": ""}, "needle": "--output {tmp}/outdir is not a file"},
    {"id": "infer-output-is-the-input", "argv": INFER[:-1] + ["{tmp}/in.jsonl"], "needle": "is the --input file"},

    # -- model and adapter directories (10, 16) ----------------------------------------------------------
    {"id": "adapter-without-weights", "argv": INFER + ["model.scratch=null", "model.name={tmp}/ad"],
     "files": {"in.jsonl": jsonl({"prompt": "hi"}), "ad/adapter_config.json": ADAPTER_CONFIG},
     "needle": "{tmp}/ad: adapter directory has adapter_config.json but no adapter_model.safetensors"},
    {"id": "adapter-truncated-weights", "argv": EVAL + ["model.scratch=null", "model.name={tmp}/ad"],
     "files": {"ad/adapter_config.json": ADAPTER_CONFIG, "ad/adapter_model.safetensors": safetensors_bytes(5)},
     "needle": f"{{tmp}}/ad/adapter_model.safetensors: truncated safetensors file ({FULL - 5} of {FULL} bytes)"},
    {"id": "explicit-adapter-without-weights", "argv": INFER + ["model.adapter={tmp}/ad"],
     "files": {"in.jsonl": jsonl({"prompt": "hi"}), "ad/adapter_config.json": ADAPTER_CONFIG},
     "needle": "no adapter_model.safetensors"},
    {"id": "adapter-base-gone", "argv": INFER + ["model.scratch=null", "model.name={tmp}/ad"],
     "files": {"in.jsonl": jsonl({"prompt": "hi"}), "ad/adapter_model.safetensors": safetensors_bytes(),
               "ad/adapter_config.json": dict(ADAPTER_CONFIG, base_model_name_or_path="/nowhere/my-model")},
     "needle": "{tmp}/ad/adapter_config.json: its base model '/nowhere/my-model' cannot be loaded"},
    {"id": "adapter-config-malformed", "argv": INFER + ["model.scratch=null", "model.name={tmp}/ad"],
     "files": {"in.jsonl": jsonl({"prompt": "hi"}), "ad/adapter_config.json": "{"},
     "needle": "{tmp}/ad/adapter_config.json: not valid JSON"},
    {"id": "model-truncated-weights", "argv": INFER + ["model.scratch=null", "model.name={tmp}/m"],
     "files": {**MODEL_DIR, "in.jsonl": jsonl({"prompt": "hi"}), "m/model.safetensors": safetensors_bytes(3)},
     "needle": f"{{tmp}}/m/model.safetensors: truncated safetensors file ({FULL - 3} of {FULL} bytes)"},
    {"id": "model-damaged-header", "argv": EVAL + ["model.scratch=null", "model.name={tmp}/m"],
     "files": {**MODEL_DIR, "m/model.safetensors": b"\xff" * 20},
     "needle": "{tmp}/m/model.safetensors: damaged safetensors file"},
    {"id": "model-without-weights", "argv": EVAL + ["model.scratch=null", "model.name={tmp}/m"],
     "files": {"m/config.json": SMALL_LLAMA}, "needle": "{tmp}/m: model directory has config.json but no weights"},
    {"id": "model-config-malformed", "argv": EVAL + ["model.scratch=null", "model.name={tmp}/m"],
     "files": {**MODEL_DIR, "m/config.json": "{\"model_type\": "}, "needle": "{tmp}/m/config.json: not valid JSON"},

    {"id": "scratch-config-wrong-type", "argv": INFER + ["model.scratch.hidden_size=wide"],
     "needle": "model.scratch: cannot build a 'llama' model"},
    {"id": "scratch-config-inconsistent", "argv": INFER + ["model.scratch.hidden_size=30"],
     "needle": "model.scratch: cannot build a 'llama' model"},

    {"id": "output_dir-is-a-file", "argv": EVAL + ["output_dir={tmp}/in.jsonl"],
     "needle": "output_dir {tmp}/in.jsonl: cannot create {tmp}/in.jsonl/eval"},
    {"id": "model-cache-unwritable", "argv": INFER + ["model.scratch=null"], "env": {"FTLAB_CACHE": "{tmp}/in.jsonl"},
     "needle": "cannot write the model cache {tmp}/in.jsonl/models"},

    # -- DPO preference pairs and the reference model (issue 12) -------------------------------------------
    {"id": "dpo-row-without-rejected", "argv": DPO, "files": {"p.jsonl": jsonl(PAIR, {"prompt": "p", "chosen": "c"})},
     "needle": "{tmp}/p.jsonl:2: missing field 'rejected' (a preference row needs prompt + chosen + rejected"},
    {"id": "dpo-row-without-chosen", "argv": DPO, "files": {"p.jsonl": jsonl({"prompt": "p", "rejected": "r"})},
     "needle": "{tmp}/p.jsonl:1: missing field 'chosen'"},
    {"id": "dpo-empty-response", "argv": DPO, "files": {"p.jsonl": jsonl(PAIR, dict(PAIR, rejected=""))},
     "needle": "{tmp}/p.jsonl:2: the rejected response is empty"},
    {"id": "dpo-chosen-equals-rejected", "argv": DPO, "files": {"p.jsonl": jsonl(dict(PAIR, rejected="3"), PAIR)},
     "needle": "1 of 2 preference pairs (50.0%) are bad (1 dropped, 0 truncated), above data.max_bad_share=5.0%; "
               "first: {tmp}/p.jsonl:1: chosen and rejected are identical"},
    {"id": "dpo-prompt-longer-than-max_length", "argv": DPO + ["data.max_length=8"],
     "files": {"p.jsonl": jsonl(dict(PAIR, prompt="one two three four five six seven eight nine ten"))},
     "needle": "{tmp}/p.jsonl:1: the prompt has 10 tokens, more than data.max_length=8"},
    {"id": "dpo-chosen-not-a-string", "argv": DPO, "files": {"p.jsonl": jsonl(dict(PAIR, chosen=3))},
     "needle": "{tmp}/p.jsonl:1: field 'chosen' must be a string or one assistant message; got a number"},
    {"id": "dpo-prompt-messages-end-with-answer", "argv": DPO + ["data.chat_template=true"],
     "files": {"p.jsonl": jsonl({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                  "content": "yo"}],
                                 "chosen": "a", "rejected": "b"})},
     "needle": "{tmp}/p.jsonl:1: the prompt messages end with an assistant turn"},
    {"id": "dpo-reference-not-found", "argv": DPO + ["dpo.reference={tmp}/nope"], "files": {"p.jsonl": jsonl(PAIR)},
     "needle": "dpo.reference: model path '{tmp}/nope' does not exist"},
    {"id": "dpo-reference-other-tokenizer", "argv": DPO + ["dpo.reference={tmp}/m"],
     "files": {**MODEL_DIR, **tokenizer_files("m"), "p.jsonl": jsonl(PAIR)},
     "needle": "dpo.reference {tmp}/m: its tokenizer differs from the policy's"},
    {"id": "dpo-reference-cache-not-found", "argv": DPO + ["dpo.reference_cache={tmp}"],
     "files": {"p.jsonl": jsonl(PAIR)}, "needle": "dpo.reference_cache: no reference_logps.pt at {tmp}"},
    {"id": "dpo-task-cannot-build-pairs", "argv": ["train", "{recipe}", "train.method=dpo", "data.task=gsm8k",
                                                   "data.train={tmp}/g.jsonl"],
     "needle": "task 'gsm8k' cannot build preference pairs itself"},
    {"id": "dpo-label-smoothing-with-ipo", "argv": DPO + ["dpo.loss_type=ipo", "dpo.label_smoothing=0.1"],
     "files": {"p.jsonl": jsonl(PAIR)},
     "needle": "dpo.label_smoothing applies to dpo.loss_type=sigmoid (conservative DPO); got dpo.loss_type=ipo"},
    {"id": "dpo-packing", "argv": DPO + ["data.packing=true"], "files": {"p.jsonl": jsonl(PAIR)},
     "needle": "data.packing is not supported with train.method=dpo"},
    {"id": "prontoqa-generate-source-bad", "argv": ["train", "{recipe}", "data.task=prontoqa",
                                                    "data.train=generate:ten"],
     "needle": "prontoqa source 'generate:ten': expected generate:N[,hops=A-B][,seed=S]"},
    setting(TRAIN, "dpo.loss_type=kto", "'dpo.loss_type' must be one of sigmoid, ipo, hinge; got 'kto'"),
    setting(TRAIN, "dpo.beta=0", "'dpo.beta' must be > 0; got 0.0"),
    setting(TRAIN, "dpo.label_smoothing=0.5", "'dpo.label_smoothing' must be in [0, 0.5); got 0.5"),
    setting(TRAIN, "dpo.nll_weight=-1", "'dpo.nll_weight' must be >= 0; got -1.0"),
    # -- GRPO settings (the GRPO objective's own bad input: tests/test_grpo.py) -------------------------------
    setting(TRAIN, "grpo.num_generations=1", "'grpo.num_generations' must be >= 2; got 1"),
    setting(TRAIN, "grpo.num_iterations=0", "'grpo.num_iterations' must be >= 1; got 0"),
    setting(TRAIN, "grpo.epsilon=0", "'grpo.epsilon' must be > 0; got 0.0"),
    setting(TRAIN, "grpo.epsilon_high=-0.1", "'grpo.epsilon_high' must be > 0 (or null: grpo.epsilon); got -0.1"),
    setting(TRAIN, "grpo.beta=-1", "'grpo.beta' must be >= 0; got -1.0"),
    setting(TRAIN, "grpo.temperature=0", "'grpo.temperature' must be > 0; got 0.0"),
    setting(TRAIN, "grpo.top_p=1.5", "'grpo.top_p' must be in (0, 1]; got 1.5"),
    setting(TRAIN, "grpo.max_completion_length=0", "'grpo.max_completion_length' must be >= 1; got 0"),
    setting(TRAIN, "grpo.generation_batch_size=0", "'grpo.generation_batch_size' must be >= 1; got 0"),
    setting(TRAIN, "grpo.log_completions_every=0",
            "'grpo.log_completions_every' must be >= 1 (or null: never printed); got 0"),
    setting(TRAIN, "grpo.vllm_sync_timeout=0", "'grpo.vllm_sync_timeout' must be > 0; got 0.0"),

    # -- prepare-corpus (issue 14) ---------------------------------------------------------------------------
    {"id": "corpus-line-without-text", "argv": CORPUS, "files": {"c.jsonl": jsonl(DOC, {"id": "2", "category": "x"})},
     "needle": "c.jsonl:2: missing field 'text'"},
    {"id": "corpus-line-without-category", "argv": CORPUS + ["--category-field", "topic"],
     "files": {"c.jsonl": jsonl(dict(DOC, topic="a"), DOC)}, "needle": "c.jsonl:2: missing field 'topic'"},
    {"id": "corpus-category-not-a-string", "argv": CORPUS, "files": {"c.jsonl": jsonl(dict(DOC, category=["a"]))},
     "needle": "c.jsonl:1: field 'category' must be a non-empty string; got an array"},
    {"id": "corpus-s3-endpoint-unreachable", "argv": CORPUS + ["--s3-bucket", "b", "--s3-endpoint", "http://127.0.0.1:1"],
     "files": {"c.jsonl": jsonl(DOC)}, "env": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                                              "AWS_DEFAULT_REGION": "us-east-1"},
     "needle": "cannot reach S3 at http://127.0.0.1:1 to read s3://b/", "max_seconds": 30},
    {"id": "corpus-val-fraction-too-big", "argv": CORPUS + ["--val-fraction", "0.6", "--test-fraction", "0.5"],
     "files": {"c.jsonl": jsonl(DOC)}, "needle": "--val-fraction + --test-fraction must be below 1"},
    {"id": "corpus-datasets-id-offline", "argv": ["prepare-corpus", "someorg/somedata", "--out", "{tmp}/corpus"],
     "env": {"HF_HUB_OFFLINE": "1"}, "needle": "to fetch 'someorg/somedata' (HF_HUB_OFFLINE is set)",
     "max_seconds": 15},

    # -- pretraining settings (issue 14) ----------------------------------------------------------------------
    setting(TRAIN, "train.token_budget=0", "'train.token_budget' must be >= 1 (or null: train for train.epochs); got 0"),
    setting(TRAIN, "pretrain.seq_len=0", "'pretrain.seq_len' must be >= 1; got 0"),
    setting(TRAIN, "pretrain.num_categories=0", "'pretrain.num_categories' must be >= 1 (or null: every category)"),
    setting(TRAIN, "pretrain.category_seed=-1", "'pretrain.category_seed' must be >= 0"),
    setting(TRAIN, "pretrain.min_category_docs=0", "'pretrain.min_category_docs' must be >= 1"),
    setting(TRAIN, "pretrain.val_windows=0", "'pretrain.val_windows' must be >= 1"),
    setting(TRAIN, "pretrain.peak_tflops=0", "'pretrain.peak_tflops' must be > 0 (or null: no MFU)"),
    setting(TRAIN, "pretrain.spike_factor=1", "'pretrain.spike_factor' must be > 1 (or null: no spike detection)"),
    setting(TRAIN, "pretrain.spike_window=0", "'pretrain.spike_window' must be >= 1"),
    setting(TRAIN, "pretrain.spike_action=drop", "'pretrain.spike_action' must be one of log, skip; got 'drop'"),
    setting(TRAIN, "pretrain.icl_early=-1", "'pretrain.icl_early' must be >= 0"),
    setting(TRAIN, "pretrain.icl_late=0", "'pretrain.icl_late' must be >= 1"),
    setting(TRAIN, "sweep.seeds=[0,-1]", "'sweep.seeds[1]' must be >= 0; got -1"),
    setting(TRAIN, "sweep.num_categories=[0]", "'sweep.num_categories[0]' must be >= 1; got 0"),

    # -- pretraining data (issue 14) ------------------------------------------------------------------------
    {"id": "pretrain-category-matches-nothing", "argv": PRETRAIN + ["pretrain.categories=[physics]"],
     "files": tiny_corpus(), "needle": "no train documents of categories ['physics'] in corpus"},
    {"id": "pretrain-seq-len-beyond-every-document", "argv": PRETRAIN + ["pretrain.seq_len=8"], "files": tiny_corpus(),
     "needle": "pretrain.seq_len=8 is longer than every train document of corpus"},
    {"id": "pretrain-token-beyond-vocabulary", "argv": PRETRAIN,
     "files": tiny_corpus(tokens=[4, 5, 6, 7, 8, 9, 4, 5, 6, 40, 8, 9, 10, 11, 6, 7, 8, 9, 10, 11]),
     "needle": "tokens.bin: token id 40 at offset 9 (document 1 'b', category 'bio', position 3) is beyond the "
               "model's vocabulary of"},
    {"id": "pretrain-truncated-tokens", "argv": PRETRAIN, "files": tiny_corpus(declared_tokens=30),
     "needle": "tokens.bin: 40 bytes, but meta.json says 30 uint16 tokens (60 bytes)"},
    {"id": "pretrain-corpus-missing", "argv": PRETRAIN + ["pretrain.corpus={tmp}/nope"], "files": tiny_corpus(),
     "needle": "corpus {tmp}/nope: not found; build it with: ftlab prepare-corpus"},
    {"id": "pretrain-corpus-not-set", "argv": ["train", "{recipe}", "train.method=pretrain"],
     "needle": "pretrain.corpus is not set"},
    {"id": "pretrain-corpus-incomplete", "argv": PRETRAIN,
     "files": {k: v for k, v in tiny_corpus().items() if k != "pc/meta.json"}, "needle": "pc/meta.json: missing"},
    {"id": "pretrain-too-many-categories", "argv": PRETRAIN + ["pretrain.num_categories=3"], "files": tiny_corpus(),
     "needle": "pretrain.num_categories=3, but only 2 categories"},
    {"id": "pretrain-categories-and-k", "argv": PRETRAIN + ["pretrain.num_categories=1", "pretrain.categories=[bio]"],
     "files": tiny_corpus(), "needle": "set pretrain.categories or pretrain.num_categories, not both"},
    {"id": "pretrain-corpus-of-another-tokenizer", "argv": PRETRAIN[:-2], "files": tiny_corpus(),
     "needle": "was tokenized with 'tiny', which is not this model's tokenizer"},
    {"id": "pretrain-seq-len-beyond-context", "argv": PRETRAIN + ["pretrain.seq_len=4096"], "files": tiny_corpus(),
     "needle": "'pretrain.seq_len' is 4096, beyond the model's context window of 2048"},
    {"id": "model.preset-unknown", "argv": PRETRAIN + ["model.preset=gpt-9"],
     "needle": "'model.preset' must be one of pythia-tiny"},

    # -- the SOKRATES loop (issue 13): settings, and a loop directory from another recipe -------------------------
    setting(LOOP, "loop.iterations=-1", "'loop.iterations' must be >= 0; got -1"),
    setting(LOOP, "loop.max_problems=0", "'loop.max_problems' must be >= 1 (or null: every problem)"),
    setting(LOOP, "loop.heldout_limit=0", "'loop.heldout_limit' must be >= 1 (or null: every held-out problem)"),
    setting(LOOP, "loop.samples=0", "'loop.samples' must be >= 1; got 0"),
    setting(LOOP, "loop.temperature=-0.5", "'loop.temperature' must be >= 0"),
    setting(LOOP, "loop.top_p=0", "'loop.top_p' must be in (0, 1]"),
    setting(LOOP, "loop.max_new_tokens=0", "'loop.max_new_tokens' must be >= 1"),
    setting(LOOP, "loop.batch_size=0", "'loop.batch_size' must be >= 1"),
    setting(LOOP, "loop.max_pairs_per_problem=0", "'loop.max_pairs_per_problem' must be >= 1 (or null: every pair)"),
    setting(LOOP, "loop.eval_samples=-1", "'loop.eval_samples' must be >= 0"),
    setting(LOOP, "loop.pass_k=[1,0]", "'loop.pass_k[1]' must be >= 1; got 0"),
    setting(LOOP, "loop.head_epochs=0", "'loop.head_epochs' must be >= 1"),
    setting(LOOP, "loop.head_lr=0", "'loop.head_lr' must be > 0"),
    setting(LOOP, "loop.head_holdout=1", "'loop.head_holdout' must be in (0, 1)"),
    setting(LOOP, "loop.calibration_bins=0", "'loop.calibration_bins' must be >= 1"),
    setting(LOOP, "loop.engine=tgi", "'loop.engine' must be one of hf, vllm; got 'tgi'"),
    {"id": "loop-needs-the-sokrates-task", "argv": LOOP, "needle": "set data.task: sokrates (got 'generic')"},
    {"id": "loop-pass-k-beyond-samples", "argv": LOOP + ["data.task=sokrates", "data.val=generate:2", "loop.eval_samples=2",
                                                         "loop.pass_k=[4]"],
     "needle": "loop.pass_k: pass@4 needs loop.eval_samples >= 4; got 2"},
    {"id": "loop-dir-of-another-recipe", "argv": LOOP + ["data.task=sokrates", "data.train=generate:2",
                                                         "data.val=generate:2", "loop.dir={tmp}/loopdir"],
     "files": {"loopdir/recipe.json": {"hash": "0123456789abcdef", "flat": {"optim.lr": 1.0}}},
     "needle": "loop directory {tmp}/loopdir was made by another recipe (recipe hash 0123456789abcdef"},

    # -- the hub (12) --------------------------------------------------------------------------------------
    {"id": "hub-tls-fails", "argv": ["train", "{recipe}"] + HUB, "env": {"HF_ENDPOINT": "{garbage_https}",
                                                                         "HF_HUB_OFFLINE": None},
     "needle": "cannot reach the Hugging Face Hub at {garbage_https} to fetch 'someorg/somemodel' "
               "(TLS handshake failed",
     "max_seconds": 10, "subprocess": True},
    {"id": "hub-offline", "argv": EVAL + HUB, "env": {"HF_HUB_OFFLINE": "1"},
     "needle": "(HF_HUB_OFFLINE is set)", "max_seconds": 10},
]


# -- the runner ---------------------------------------------------------------------------------------------
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d ")  # ftlab's console log format (cli.setup_console_logging)


@pytest.fixture(scope="module")
def garbage_https() -> str:
    """A real local TCP server that accepts every connection, writes garbage and closes: TLS fails at once."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            conn.sendall(b"garbage, not TLS\r\n\r\n")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"https://127.0.0.1:{server.getsockname()[1]}"


def expand(value: str, subst: dict[str, str]) -> str:
    for key, real in subst.items():
        value = value.replace("{" + key + "}", real)
    return value


def write_files(root: Path, files: dict[str, Any], subst: dict[str, str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(expand(content, subst), encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")


def run(case: dict[str, Any], argv: list[str], env: dict[str, str | None], capsys: Any,
        monkeypatch: Any) -> tuple[int, str]:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    if case.get("subprocess"):
        import os

        out = subprocess.run([sys.executable, "-m", "ftlab.cli", *argv], capture_output=True, text=True,
                             cwd=REPO, env=dict(os.environ), timeout=300)
        return out.returncode, out.stderr
    try:
        code = main(argv)
    except SystemExit as e:  # argparse ends usage errors with sys.exit
        code = e.code
    return code, capsys.readouterr().err


def params() -> list[Any]:
    from ftlab.config.load import valid_keys

    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    keys = set(valid_keys())

    def marks(c: dict[str, Any]) -> list[Any]:
        if c.get("requires_key") and c["requires_key"] not in keys:
            return [pytest.mark.skip(reason=f"{c['requires_key']} is not in the schema yet")]
        return [pytest.mark.xfail(strict=True, reason=c["pending"])] if c.get("pending") else []

    return [pytest.param(c, id=c["id"], marks=marks(c)) for c in CASES]


@pytest.mark.parametrize("case", params())
def test_bad_input(case: dict[str, Any], tmp_path: Path, capsys: Any, monkeypatch: Any, garbage_https: str) -> None:
    from ftlab import hub

    hub.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no case may touch the network unless it says so
    recipe = tiny_recipe(tmp_path)
    subst = {"tmp": str(tmp_path), "recipe": str(recipe), "data": str(tmp_path / "train.jsonl"),
             "garbage_https": garbage_https}
    write_files(tmp_path, {**DEFAULT_FILES, **case.get("files", {})}, subst)
    argv = [expand(a, subst) for a in case["argv"]]
    env = {k: (expand(v, subst) if v is not None else None) for k, v in case.get("env", {}).items()}

    started = time.time()
    code, err = run(case, argv, env, capsys, monkeypatch)
    seconds = time.time() - started

    errors = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    others = [line for line in err.splitlines() if line.strip() and not line.startswith("ftlab: error:")
              and not LOG_LINE.match(line)]
    assert code == case.get("exit", 2), err
    assert len(errors) == 1, err
    assert expand(case["needle"], subst) in errors[0], err
    assert "Traceback" not in err and not others, err
    if "max_seconds" in case:
        assert seconds < case["max_seconds"], f"took {seconds:.1f} s"
    for summary in tmp_path.rglob("summary.json"):
        assert json.loads(summary.read_text()).get("status") != "complete", summary


def numeric_keys(cls: Any = None, prefix: str = "") -> list[str]:
    """Every int/float (or list of them) setting of the recipe schema, as dotted keys."""
    import dataclasses
    import typing

    from ftlab.config.schema import Recipe

    keys = []
    hints = typing.get_type_hints(cls or Recipe)
    for f in dataclasses.fields(cls or Recipe):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += numeric_keys(t, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(t) if a is not type(None)] or [t]
        inner = [x for a in args for x in (typing.get_args(a) or [a])]
        if any(a in (int, float) for a in inner) and bool not in inner:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_every_numeric_setting_has_a_range() -> None:
    """A new int/float setting in schema.py needs its range in RANGES (and a case here)."""
    from ftlab.config.schema import RANGES

    missing = [k for k in numeric_keys() if k not in RANGES]
    assert not missing, f"numeric settings without a range in schema.RANGES: {missing}"


def test_corpus_covers_every_numeric_setting() -> None:
    """Each key with a range in the schema has at least one case here (so a new setting gets one too)."""
    from ftlab.config.schema import RANGES

    text = " ".join(" ".join(c["argv"]) + " " + c["needle"] for c in CASES)
    missing = [k for k in RANGES if f"'{k}" not in text and f"{k}=" not in text]
    assert not missing, f"no bad-input case for: {missing}"


def test_first_use_of_the_embedded_model_adds_log_lines_only(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    """From an empty cache the embedded model is converted first: transformers' progress bars (de-quantizing,
    writing shards) came between the log lines and the one error line when stderr is not a terminal."""
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    code = main(["train", str(tiny_recipe(tmp_path)), "data.max_length=4096"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ftlab: error:")]
    assert code == 2 and len(errors) == 1 and "beyond the model's context window" in errors[0], err
    assert any("converting embedded" in line for line in lines), err
    assert all(LOG_LINE.match(line) for line in lines if line not in errors), err
