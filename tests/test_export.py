"""`ftlab export`: merged weights, GGUF (read back by transformers' own GGUF loader), the Ollama Modelfile,
the model card, the Hub upload, and the one-line refusals.

One real LoRA run is trained here on a tiny random Llama saved as a base directory (with the embedded
SmolLM2 tokenizer, so the GGUF vocabulary is the real 49k-token one); the expected values come from that
base + adapter as peft applies it, never from the export itself. The embedded 135M model is exported once,
to compare the metadata with the GGUF file llama.cpp's converter wrote for it.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import yaml

from ftlab.cli import main
from tests.helpers import TINY_SCRATCH, tiny_recipe

LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: Any) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def lora_run(tmp_module: Path, embedded_tokenizer: Any) -> Path:
    """A finished LoRA SFT run (2 steps, in-training eval) on a saved tiny random Llama base; the run sits
    where a quickstart puts its SFT step (<job>/sft/<run>)."""
    from ftlab.models.load import build_scratch_model

    torch.manual_seed(0)
    base = build_scratch_model(dict(TINY_SCRATCH), embedded_tokenizer)
    base.save_pretrained(tmp_module / "base")
    embedded_tokenizer.save_pretrained(tmp_module / "base")
    recipe = tiny_recipe(tmp_module, model={"name": str(tmp_module / "base"), "scratch": None}, lora=LORA,
                         data={"val": str(tmp_module / "train.jsonl"), "val_limit": 8, "chat_template": True},
                         train={"eval_every": 2}, optim={"lr": 1e-2})
    assert main(["train", str(recipe), "train.max_steps=2", f"output_dir={tmp_module / 'job'}"]) == 0
    (run,) = [p for p in (tmp_module / "job" / "sft").iterdir() if not p.is_symlink()]
    return run


@pytest.fixture(scope="module")
def merged(lora_run: Path, tmp_module: Path) -> Path:
    """`ftlab export RUN --merge --gguf f32`."""
    out = tmp_module / "merged"
    assert main(["export", str(lora_run), "--out", str(out), "--merge", "--gguf", "f32"]) == 0
    return out


@pytest.fixture(scope="module")
def reference(lora_run: Path, tmp_module: Path) -> tuple[Any, Any]:
    """(base + adapter as peft runs it, unmerged, fp32; tokenizer): the expected model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tmp_module / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, lora_run / "final").eval()
    return model, AutoTokenizer.from_pretrained(lora_run / "final")


def prompts(tokenizer: Any) -> list[str]:
    """Real prompts as a chat would send them, plus plain text with digits, unicode and an emoji."""
    chat = [[{"role": "user", "content": "What is 17 plus 25?"}],
            [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Café, naïve, 🦙: spell them."}]]
    return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chat] + \
        ["The answer is 42.\n\n  Indented   spaces\tand tabs"]


@torch.no_grad()
def logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


# -- merging ---------------------------------------------------------------------------------------
def test_merged_model_equals_base_plus_adapter(merged: Path, reference: tuple[Any, Any], tmp_module: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = reference
    out = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_module / "base", dtype=torch.float32).eval()
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float32"  # fp32 base -> fp32 merge
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"} <= {p.name for p in merged.iterdir()}
    assert AutoTokenizer.from_pretrained(merged).chat_template == tokenizer.chat_template
    for text in prompts(tokenizer):
        ids = tokenizer(text)["input_ids"]
        expected = logits(model, ids)
        torch.testing.assert_close(logits(out, ids), expected, atol=1e-5, rtol=0)
        assert (logits(base, ids) - expected).abs().max() > 1e-3  # the adapter changed the model measurably


def test_adapter_exported_as_adapter(lora_run: Path, tmp_module: Path) -> None:
    """Without --merge: the adapter files and tokenizer as training saved them, peft's card replaced."""
    out = tmp_module / "adapter"
    assert main(["export", str(lora_run / "final"), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= names
    assert "model.safetensors" not in names and "model.gguf" not in names
    assert (out / "adapter_model.safetensors").read_bytes() == (lora_run / "final" / "adapter_model.safetensors").read_bytes()
    assert "ftlab" in (out / "README.md").read_text()  # the export's card, found its run from final/
    assert f"Exported by ftlab from `{lora_run / 'final'}`" in (out / "README.md").read_text()


# -- GGUF ------------------------------------------------------------------------------------------
def test_gguf_f32_loads_back_through_transformers_as_model_name(merged: Path, reference: tuple[Any, Any],
                                                                 tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    """`model.name: model.gguf` loads via transformers' GGUF loader (from_pretrained(dir, gguf_file=...), model
    and tokenizer) into a cache keyed by the file's hash: same logits and token ids as base + adapter."""
    from ftlab.config.schema import ModelConfig
    from ftlab.models.load import load_model_and_tokenizer

    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    model, tokenizer = reference
    gguf_copy = tmp_path / "renamed.gguf"
    shutil.copy(merged / "model.gguf", gguf_copy)
    with caplog.at_level("INFO", logger="ftlab"):
        loaded, loaded_tok = load_model_and_tokenizer(ModelConfig(name=str(merged / "model.gguf")))
        load_model_and_tokenizer(ModelConfig(name=str(gguf_copy)))  # same content: no second conversion
    assert sum("from GGUF (one time)" in r.getMessage() for r in caplog.records) == 1
    assert len(list((tmp_path / "cache" / "models").glob("gguf-*"))) == 1
    for text in prompts(tokenizer):
        ids = tokenizer(text)["input_ids"]
        assert loaded_tok(text)["input_ids"] == ids
        torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert loaded_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)


def q8_0_round_trip(w: np.ndarray) -> np.ndarray:
    """GGML's Q8_0 by its definition, written independently of gguf-py: blocks of 32 consecutive weights of
    a row, scale d = max|w| / 127 stored as f16, q = round(w / d) (half away from zero), value q * d."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.sign(blocks * inv) * np.floor(np.abs(blocks * inv) + 0.5)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def test_gguf_q8_0_within_the_quantization_error(lora_run: Path, merged: Path, tmp_module: Path) -> None:
    """q8_0 rounds each block of 32 weights to 8 bits: error <= max|block| / 254 per weight, RMS
    (max|block|/127)/sqrt(12). For Gaussian weights E[max|block|] ~ 2.1 sigma (2.5 allowed), so a matmul's
    output moves by ~2.5/(127*sqrt(12)) = 0.57% of its RMS; n quantized matrices on the path (token
    embedding, lm_head, 7 per layer) add independent errors, so logits move by at most sqrt(n) * 0.57% of
    their RMS, and their largest deviation over T x V entries stays below 6x that (a Gaussian's max over
    ~1e6 draws is ~5 sigma). Exactness is checked separately: the file's weights are Q8_0 by its definition
    (an HF model given those weights, computed independently, gives the same logits)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_module / "q8"
    assert main(["export", str(lora_run), "--out", str(out), "--gguf", "q8_0"]) == 0
    assert {p.name for p in out.iterdir()} == {"model.gguf", "Modelfile", "README.md"}  # merged first, then removed
    q8 = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    f32 = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    simulated = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in simulated.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(q8_0_round_trip(p.numpy())))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    n_quantized = 2 + 7 * TINY_SCRATCH["num_hidden_layers"]
    rms_bound = n_quantized ** 0.5 * 2.5 / (127 * 12 ** 0.5)
    decisive = agree = 0
    for text in prompts(tokenizer):
        ids = tokenizer(text)["input_ids"]
        exact, got, expected = logits(f32, ids), logits(q8, ids), logits(simulated, ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # the file holds Q8_0 as defined
        scale = (exact - exact.mean(-1, keepdim=True)).pow(2).mean().sqrt()
        err = got - exact
        assert err.pow(2).mean().sqrt() <= rms_bound * scale, (err.pow(2).mean().sqrt(), rms_bound * scale)
        assert err.abs().max() <= 6 * rms_bound * scale
        top2 = exact.topk(2, dim=-1).values
        sure = (top2[:, 0] - top2[:, 1]) > 2 * 6 * rms_bound * scale  # a flip there would break the bound
        decisive += int(sure.sum())
        agree += int((got.argmax(-1) == exact.argmax(-1))[sure].sum())
    assert decisive > 0 and agree == decisive


def test_gguf_metadata_and_tensors_match_llama_cpp(tmp_module: Path) -> None:
    """The embedded model, exported from its converted HF directory, has the metadata keys and values and
    the tensor names and shapes of the GGUF file llama.cpp's converter wrote for it; only the model-card
    naming keys (which llama.cpp read from the original repository's card) and the file type differ."""
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    from ftlab.models.load import EMBEDDED_MODEL, embedded_gguf

    out = tmp_module / "embedded"
    assert main(["export", EMBEDDED_MODEL, "--out", str(out), "--gguf", "f16"]) == 0
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "general.languages")
    theirs, _ = read_gguf_metadata(str(embedded_gguf(EMBEDDED_MODEL)), arrays)
    ours, _ = read_gguf_metadata(str(out / "model.gguf"), arrays)
    naming = {"general.name", "general.basename", "general.finetune", "general.organization", "general.languages"}
    assert set(ours) == set(theirs) - naming | {"general.name"}
    differ = {k for k in ours if ours[k] != theirs.get(k)}
    assert differ == {"general.name", "general.file_type"}, {k: (ours[k], theirs.get(k)) for k in differ}
    assert ours["general.file_type"] == 1 and ours["general.size_label"] == "135M"
    shapes = {t.name: t.shape for t in GgufHeader.from_file(str(out / "model.gguf")).tensors}
    assert shapes == {t.name: t.shape for t in GgufHeader.from_file(str(embedded_gguf(EMBEDDED_MODEL))).tensors}
    card = front_matter(out / "README.md")
    assert card["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and card["license"] == "apache-2.0"


def small_byte_level_tokenizer() -> Any:
    """A byte-level BPE tokenizer of ~300 tokens trained here (GGUF files with it read back in a blink)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = ["What is 17 plus 25? The answer is 42.", "Café, naïve, 🦙: spell them.", "Every cat is a mammal."]
    bpe.train_from_iterator(text * 20, vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def test_gguf_qwen2_round_trip(tmp_path: Path, monkeypatch: Any) -> None:
    """Qwen2 (attention biases, no q/k permutation): the f32 GGUF gives the HF model's logits and token ids.
    In a qwen2 directory transformers splits text with Qwen2's regex whatever the vocabulary; llama.cpp's
    `qwen2` pre-tokenizer is that regex, so the test names this (test-trained) vocabulary so in the table."""
    from hashlib import sha256

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftlab.models.load import build_scratch_model
    from ftlab.use import gguf_export

    torch.manual_seed(0)
    small = small_byte_level_tokenizer()
    qwen = build_scratch_model({**TINY_SCRATCH, "model_type": "qwen2"}, small).eval()
    with torch.no_grad():
        for name, p in qwen.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # zero biases would hide a misplaced bias tensor
    qwen.save_pretrained(tmp_path / "qwen")
    small.save_pretrained(tmp_path / "qwen")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "qwen")
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    digest = sha256(str(tokenizer.encode(gguf_export.CHECK_TEXT)).encode()).hexdigest()
    monkeypatch.setitem(gguf_export.PRE_TOKENIZERS, digest, "qwen2")
    assert main(["export", str(tmp_path / "qwen"), "--out", str(tmp_path / "out"), "--gguf", "f32"]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
    assert type(back).__name__ == "Qwen2ForCausalLM"
    back_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    for text in ["What is 17 plus 25?", "Café, naïve, 🦙:\n\n  spell   them 12345.", gguf_export.CHECK_TEXT]:
        ids = tokenizer(text)["input_ids"]
        assert back_tokenizer(text)["input_ids"] == ids
        torch.testing.assert_close(logits(back.eval(), ids), logits(qwen, ids), atol=1e-5, rtol=0)


def test_gguf_llama3_rope_frequencies(tmp_path: Path, embedded_tokenizer: Any) -> None:
    """Llama 3.1+ RoPE: llama.cpp reads the per-frequency scaling from a `rope_freqs` tensor; its values are
    the ratio of plain RoPE frequencies to the llama3-scaled ones transformers computes. The heads here are
    wider than hidden_size / heads (as in some Llama variants): llama.cpp then needs the key/value length."""
    from transformers import LlamaConfig
    from transformers.integrations.gguf.reader import (
        GgufHeader,
        load_gguf_state_dict,
        read_gguf_metadata,
    )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ftlab.models.load import build_scratch_model

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    dim = 16  # hidden_size / heads would be 8
    model = build_scratch_model({**TINY_SCRATCH, "rope_parameters": rope, "max_position_embeddings": 1024,
                                 "head_dim": dim}, embedded_tokenizer)
    model.save_pretrained(tmp_path / "m")
    embedded_tokenizer.save_pretrained(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "out"), "--gguf", "f16"]) == 0
    tensors = load_gguf_state_dict(GgufHeader.from_file(str(tmp_path / "out" / "model.gguf")))
    metadata, _ = read_gguf_metadata(str(tmp_path / "out" / "model.gguf"))
    assert metadata["llama.rope.dimension_count"] == metadata["llama.attention.key_length"] == dim
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**model.config.to_dict()), "cpu")
    torch.testing.assert_close(tensors["rope_freqs.weight"][...], plain / scaled)


def ollama_render(template: str, system: str, prompt: str, response: str | None) -> str:
    """One turn as Ollama renders a legacy template: `{{ if .System }}...{{ end }}`, the fields, and on the
    last turn (no response yet) everything after `{{ .Response }}` cut away."""
    if response is None:
        template = template.split("{{ .Response }}")[0]
    text = re.sub(r"\{\{ if \.System \}\}(.*?)\{\{ end \}\}", lambda m: m.group(1) if system else "", template,
                  flags=re.DOTALL)
    return text.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace("{{ .Response }}",
                                                                                          response or "")


def test_modelfile_renders_the_chat_template(merged: Path, reference: tuple[Any, Any]) -> None:
    _, tokenizer = reference
    text = (merged / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.DOTALL).group(1)
    default = re.search(r'SYSTEM """(.*?)"""', text, re.DOTALL).group(1)
    assert re.findall(r"PARAMETER stop (.*)", text) == [json.dumps(tokenizer.eos_token)]
    sys_msg, user, user2, answer = "You are terse.", "What is 2+2?", "And 3+3?", "4"

    def chat(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    one_turn = [{"role": "system", "content": sys_msg}, {"role": "user", "content": user}]
    assert ollama_render(template, sys_msg, user, None) == chat(one_turn)
    # no system message: Ollama sends the Modelfile's SYSTEM, which is what the chat template inserts itself
    assert ollama_render(template, default, user, None) == chat([{"role": "user", "content": user}])
    # two turns: the first rendered whole with its answer, the system only there, the second cut
    two = ollama_render(template, sys_msg, user, answer) + ollama_render(template, "", user2, None)
    assert two == chat(one_turn + [{"role": "assistant", "content": answer}, {"role": "user", "content": user2}])


# -- the model card --------------------------------------------------------------------------------
def front_matter(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def test_model_card_of_a_real_run(lora_run: Path, merged: Path, tmp_module: Path) -> None:
    from ftlab.tasks.scoring import bootstrap_ci, two_rule_metrics

    card = (merged / "README.md").read_text()
    meta = front_matter(merged / "README.md")
    assert meta["library_name"] == "transformers" and {"ftlab", "lora", "sft", "gguf"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local base directory is not a Hub id
    assert "LoRA: r=4, alpha=8, dropout=0.05, target modules ['q_proj', 'v_proj']" in card
    assert f"Training data: `{tmp_module / 'train.jsonl'}`" in card and "Task: `generic`" in card
    assert "Examples trained on: 32" in card  # tests/helpers writes 32 rows
    assert (lora_run / "config.yaml").read_text().rstrip() in card
    last_eval = [json.loads(x) for x in (lora_run / "metrics.jsonl").read_text().splitlines() if "eval_step" in x][-1]
    assert f"eval/loss {last_eval['eval/loss']:.4g}" in card
    argv = json.loads((lora_run / "env.json").read_text())["argv"]
    assert shlex.join(argv[1:]) in card  # the training command as env.json recorded it
    assert f"ftlab export {lora_run} --out {merged} --merge --gguf f32" in card
    # a quickstart job (the SFT run inside it) named as SOURCE: its held-out accuracy with interval and rule
    job = lora_run.parent.parent
    rows = [{"correct": i % 4 != 0, "extracted": "True"} for i in range(40)]
    written = {"metrics_tuned.json": {"3": two_rule_metrics(rows, "the last True/False")},
               "summary.json": {"kind": "quickstart", "status": "complete", "sft_run": str(lora_run),
                                "heldout": "40 generated 3-hop problems"}}
    for name, content in written.items():
        (job / name).write_text(json.dumps(content))
    shutil.copy(lora_run / "config.yaml", job / "config.yaml")
    out = tmp_module / "card"
    try:
        assert main(["export", str(job), "--out", str(out)]) == 0
    finally:
        for name in [*written, "config.yaml"]:
            (job / name).unlink()
    lo, hi = bootstrap_ci([r["correct"] for r in rows])
    card = (out / "README.md").read_text()
    assert (out / "adapter_model.safetensors").read_bytes() == (lora_run / "final" / "adapter_model.safetensors").read_bytes()
    assert f"75.0% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%), n=40" in card
    assert "Accuracy rule: strict, else flexible; extraction: the last True/False" in card
    assert "Held-out problems: 40 generated 3-hop problems" in card


def test_merge_keeps_a_half_precision_base_in_its_dtype(lora_run: Path, tmp_module: Path, tmp_path: Path,
                                                       caplog: Any) -> None:
    """A base stored in bf16 is merged in bf16 (fp32 would double the size and add nothing), and it says so."""
    from transformers import AutoModelForCausalLM

    from ftlab.models.load import read_json

    AutoModelForCausalLM.from_pretrained(tmp_module / "base", dtype=torch.bfloat16).save_pretrained(tmp_path / "b16")
    shutil.copytree(lora_run / "final", tmp_path / "adapter")
    config = read_json(tmp_path / "adapter" / "adapter_config.json")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path":
                                                                         str(tmp_path / "b16")}))
    with caplog.at_level("INFO", logger="ftlab"):
        assert main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "out"), "--merge"]) == 0
    assert any("in bf16 (the base's dtype on disk)" in r.getMessage() for r in caplog.records)
    header = (tmp_path / "out" / "model.safetensors").read_bytes()
    header = json.loads(header[8:8 + int.from_bytes(header[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_qlora_run_merges_into_an_unquantized_base(lora_run: Path, reference: tuple[Any, Any], tmp_path: Path,
                                                   caplog: Any) -> None:
    """A QLoRA run (lora.quantize in its recipe) records its unquantized base; the export loads that base
    afresh, unquantized, and folds the adapter in (CPU here: the same merge the GPU run's adapter gets)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(lora_run, tmp_path / "run")
    text = (tmp_path / "run" / "config.yaml").read_text()
    (tmp_path / "run" / "config.yaml").write_text(text.replace("  quantize: null", "  quantize: nf4"))
    with caplog.at_level("INFO", logger="ftlab"):
        assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--merge"]) == 0
    assert any("QLoRA run: merging into a fresh unquantized copy" in r.getMessage() for r in caplog.records)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert "QLoRA (LoRA on a 4-bit NF4-quantized base)" in (tmp_path / "out" / "README.md").read_text()
    model, tokenizer = reference
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = tokenizer(prompts(tokenizer)[0])["input_ids"]
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_card_without_a_run_says_so(lora_run: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "loose_adapter"
    shutil.copytree(lora_run / "final", adapter)
    assert main(["export", str(adapter), "--out", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "No evaluation recorded." in card and "r=4, alpha=8" in card and "no run recorded" in card


# -- the Hub ---------------------------------------------------------------------------------------
class FakeHub(BaseHTTPRequestHandler):
    """A loopback HTTP server standing in for the Hub's API: records every request; creating a repository
    succeeds, everything else is refused (403), so an upload fails after a real create_repo call."""

    requests: ClassVar[list[tuple[str, str, bytes]]] = []

    def _record(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        FakeHub.requests.append((self.command, self.path, body))
        return body

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._record()
        self.send_response(200)
        self.end_headers()

    def do_POST(self) -> None:
        body = json.loads(self._record() or b"{}")
        if self.path == "/api/repos/create":
            name = f"{body.get('organization') or 'me'}/{body['name']}"
            self._reply(200, {"url": f"http://{self.headers['Host']}/{name}", "name": name})
        else:
            self._reply(403, {"error": "refused by the test server"})

    do_GET = do_PUT = do_POST

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def fake_hub(monkeypatch: Any) -> Iterator[list]:
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at its import: a test that imported it first under
    # HF_HUB_OFFLINE=1 left every later request refused before it was sent
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield FakeHub.requests
    server.shutdown()


def test_dry_run_lists_every_file_and_sends_nothing(lora_run: Path, tmp_path: Path, capsys: Any,
                                                    fake_hub: list) -> None:
    out = tmp_path / "out"
    assert main(["export", str(lora_run), "--out", str(out), "--push-to-hub", "me/tiny", "--private",
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert "to the private model repository me/tiny; nothing sent" in printed
    for p in files:
        assert f"  {p.relative_to(out).as_posix()}  {p.stat().st_size} bytes" in printed
    assert f"would upload {len(files)} files" in printed
    assert fake_hub == []


def test_push_calls_the_hub_api_and_fails_in_one_line(lora_run: Path, tmp_path: Path, capsys: Any,
                                                      fake_hub: list) -> None:
    """The real huggingface_hub calls against a loopback server: create_repo carries the private flag, the
    upload is refused, and that ends in one line saying where the (complete) export is."""
    out = tmp_path / "out"
    code = main(["export", str(lora_run / "final"), "--out", str(out), "--push-to-hub", "me/tiny", "--private"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: error:")]
    assert code == 2 and len(err) == 1 and "--push-to-hub me/tiny: upload failed" in err[0], err
    assert f"the export is complete in {out}" in err[0] and (out / "adapter_model.safetensors").is_file()
    created = [json.loads(body) for method, path, body in fake_hub if path == "/api/repos/create"]
    assert created and created[0]["name"] == "tiny" and created[0]["organization"] == "me"
    assert created[0].get("visibility") == "private" or created[0].get("private") is True  # huggingface_hub 2 / 1
    assert any(path != "/api/repos/create" and method != "HEAD" for method, path, _ in fake_hub)  # then an upload


@pytest.mark.parametrize("offline", [False, True], ids=["no-network", "HF_HUB_OFFLINE"])
def test_push_without_the_hub_fails_fast_and_writes_nothing(lora_run: Path, tmp_path: Path, capsys: Any,
                                                            monkeypatch: Any, offline: bool) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)  # the real huggingface.co: unreachable on this machine
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    from ftlab.hub import hub_reachable

    if not offline and hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable from here")
    started = time.time()
    code = main(["export", str(lora_run), "--out", str(tmp_path / "out"), "--push-to-hub", "me/tiny"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ftlab: error: --push-to-hub me/tiny: cannot reach")
    assert time.time() - started < 20
    assert list(tmp_path.iterdir()) == []


# -- bad input -------------------------------------------------------------------------------------
def bad_source(kind: str, tmp: Path, run: Path, base: Path) -> str:
    if kind == "run-without-final":
        shutil.copytree(run, tmp / "run", ignore=shutil.ignore_patterns("final"))
        return str(tmp / "run")
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=64, n_positions=16)).save_pretrained(tmp / "g")
        return str(tmp / "g")
    if kind == "4bit-base":
        shutil.copytree(base, tmp / "qbase")
        config = json.loads((tmp / "qbase" / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        (tmp / "qbase" / "config.json").write_text(json.dumps(config))
        shutil.copytree(run / "final", tmp / "qadapter")
        adapter = json.loads((tmp / "qadapter" / "adapter_config.json").read_text())
        adapter["base_model_name_or_path"] = str(tmp / "qbase")
        (tmp / "qadapter" / "adapter_config.json").write_text(json.dumps(adapter))
        return str(tmp / "qadapter")
    if kind == "scratch-run":  # the run's recipe built its base from model.scratch (never saved)
        shutil.copytree(run, tmp / "run")
        text = (tmp / "run" / "config.yaml").read_text()
        (tmp / "run" / "config.yaml").write_text(text.replace("  scratch: null", "  scratch: {model_type: llama}"))
        return str(tmp / "run")
    return str(run) if kind == "run" else str(tmp / "nope")


BAD = [("missing", "missing", [], "no such training run, adapter or model directory"),
       ("run-without-final", "run-without-final", [], "the run saved no final/ model"),
       ("out-not-empty", "run", ["OUT_NOT_EMPTY"], "directory is not empty"),
       ("gguf-gpt2", "gpt2", ["--gguf", "q8_0"], "is a GPT2LMHeadModel; GGUF export supports LlamaForCausalLM"),
       ("merge-4bit-base", "4bit-base", ["--merge"], "is stored bitsandbytes"),
       ("merge-scratch-base", "scratch-run", ["--gguf", "f16"], "a randomly initialised base that was never saved"),
       ("dry-run-alone", "run", ["--dry-run"], "give --push-to-hub REPO with it"),
       ("bad-repo-id", "run", ["--push-to-hub", "a/b/c"], "not a Hub repository id")]


@pytest.mark.parametrize("kind,extra,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(kind: str, extra: list[str], needle: str, lora_run: Path,
                                                  tmp_module: Path, tmp_path: Path, capsys: Any) -> None:
    source = bad_source(kind, tmp_path, lora_run, tmp_module / "base")
    out = tmp_path / "exports" / "out"
    out.parent.mkdir()
    if "OUT_NOT_EMPTY" in extra:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        extra = []
    capsys.readouterr()
    code = main(["export", source, "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ftlab: error:") and needle in err[0], err
    leftovers = sorted(p.name for p in out.parent.iterdir())  # no half-written export, no temporary directory
    assert leftovers == (["out"] if kind == "run" and out.exists() else []), leftovers
    if out.exists():
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_export_gets_the_permissions_of_the_users_umask(merged: Path) -> None:
    """Built in a private temporary directory (and transformers writes safetensors files private): once in place
    the export is readable as any new file of the user is, so it can be shared or served from another account."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(merged.stat().st_mode) == 0o777 & ~mask
    for f in merged.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f.name
