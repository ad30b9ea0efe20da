"""A Hugging Face causal-LM directory as one GGUF file (llama.cpp, Ollama, LM Studio) and an Ollama Modelfile.

The file is written with the `gguf` package's own `GGUFWriter`, tensor-name map (`get_tensor_name_map`) and
quantizer (`gguf.quants.quantize`), in the layout llama.cpp's `convert_hf_to_gguf.py` produces, so that
llama.cpp, Ollama and transformers' GGUF loader read it back as they read llama.cpp's own files:

* hyper-parameters under `<arch>.*` (block count, context length, heads, RoPE base, norm epsilon, ...);
* llama's q/k projection rows permuted into llama.cpp's rotary layout (transformers' loader undoes it);
* a byte-level BPE vocabulary as `tokenizer.ggml.*` (tokens, token types, merges, special ids, whether BOS is
  added, the chat template), the pre-tokenizer named as llama.cpp names it (by hashing the tokenization of
  llama.cpp's own check text), the special ids and merges through `gguf.SpecialVocab`, as llama.cpp does;
* 1-D tensors (norms, biases) always in f32; matrices in the type asked for (q8_0: blocks of 32 weights
  with one f16 scale each; a row length that is not a multiple of 32 falls back to f16, as in llama.cpp).

Tensors are read one at a time from the safetensors shards and written straight after the header, so
the peak memory is one tensor, not the model. The Modelfile's TEMPLATE is derived from the model's own Jinja
chat template by rendering it with sentinel contents (see `ollama_template`).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftlab.errors import UserError

log = logging.getLogger("ftlab")

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_SENTENCE = "LlamaForCausalLM (SmolLM2, Llama 3, ...) and Qwen2ForCausalLM, with a byte-level BPE tokenizer"
OUT_TYPES = ("f32", "f16", "q8_0")

# llama.cpp names a byte-level BPE pre-tokenizer by the sha256 of the ids its tokenizer gives this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); llama.cpp then splits text with the matching regex.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
              '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {  # the hashes of llama.cpp's table for the tokenizers of the supported architectures
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Llama 3, 3.1, 3.2
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",   # Llama 3 variants
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",       # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",       # Qwen3 embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
SENTINEL = {"system": "FTLABSYSTEMSENTINEL", "user": "FTLABPROMPTSENTINEL", "assistant": "FTLABRESPONSESENTINEL",
            "user2": "FTLABSECONDPROMPTSENTINEL"}


# -- what can be exported ------------------------------------------------------------------------
def model_architecture(config: dict, where: str) -> str:
    """The GGUF architecture name of a model's config.json, or one line saying what is supported."""
    archs = config.get("architectures") or [config.get("model_type", "?")]
    arch = SUPPORTED_ARCHITECTURES.get(archs[0])
    if arch is None:
        raise UserError(f"--gguf: {where} is a {archs[0]}; GGUF export supports {SUPPORTED_SENTENCE}")
    return arch


def tokenizer_json(tokenizer_dir: Path) -> dict:
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"--gguf: {tokenizer_dir} has no tokenizer.json; GGUF export supports {SUPPORTED_SENTENCE}")
    return json.loads(path.read_text(encoding="utf-8"))


def byte_level_prefix_space(node: Any) -> bool | None:
    """add_prefix_space of the ByteLevel pre-tokenizer in tokenizer.json (None: there is none)."""
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel":
            return bool(node.get("add_prefix_space", False))
        for child in node.get("pretokenizers") or []:
            found = byte_level_prefix_space(child)
            if found is not None:
                return found
    return None


def pre_tokenizer_name(tokenizer: Any, where: Path) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer; an unknown one is refused (llama.cpp would
    split text with another regex than the one the model was trained on: silently worse outputs)."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        raise UserError(f"--gguf: the tokenizer in {where} splits text in a way llama.cpp's table does not name "
                        f"(pre-tokenizer hash {digest[:12]}; known here: {known})")
    return name


def check_gguf_supported(config: dict, config_where: str, tokenizer_dir: Path) -> Any:
    """Everything --gguf would refuse, checked before any weights are merged or written; returns the tokenizer."""
    from transformers import AutoTokenizer

    model_architecture(config, config_where)
    spec = tokenizer_json(tokenizer_dir)
    if (spec.get("model") or {}).get("type") != "BPE" or byte_level_prefix_space(spec.get("pre_tokenizer")) is None:
        raise UserError(f"--gguf: the tokenizer in {tokenizer_dir} is not a byte-level BPE (GPT-2 style) one; "
                        f"GGUF export supports {SUPPORTED_SENTENCE}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    largest = max(tokenizer.get_vocab().values())
    if largest >= config.get("vocab_size", largest + 1):  # llama.cpp has no row for such a token
        raise UserError(f"--gguf: the tokenizer in {tokenizer_dir} has token id {largest}, beyond the model's "
                        f"vocab_size {config['vocab_size']} (tokens added without resizing the embeddings)")
    pre_tokenizer_name(tokenizer, tokenizer_dir)
    ollama_template(tokenizer, add_bos=False)  # a chat template Ollama's cannot express is refused now, not later
    return tokenizer


# -- metadata --------------------------------------------------------------------------------------
def rope_settings(config: dict) -> tuple[float, dict]:
    """(rope theta, scaling parameters) from a transformers 5 `rope_parameters` or an older
    `rope_theta` + `rope_scaling` config."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), params


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def add_hyperparameters(writer: Any, config: dict, arch: str, file_type: int) -> None:
    """The `<arch>.*` keys llama.cpp's converter writes for these architectures."""
    import gguf

    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    theta, scaling = rope_settings(config)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(file_type)
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config["hidden_size"] // config["num_attention_heads"]:  # llama.cpp assumes it otherwise
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif rope_type not in ("default", "llama3") or (rope_type == "llama3" and arch != "llama"):
        raise UserError(f"--gguf: RoPE scaling {rope_type!r} is not supported by ftlab's GGUF export "
                        "(supported: none, linear, llama3)")


def llama3_rope_factors(config: dict) -> torch.Tensor | None:
    """Llama 3.1+ RoPE frequency factors as the `rope_freqs` tensor llama.cpp reads (None: other RoPE)."""
    theta, scaling = rope_settings(config)
    if scaling.get("rope_type") != "llama3":
        return None
    dim = head_dim(config)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# -- vocabulary ------------------------------------------------------------------------------------
def looks_special(token: str) -> bool:
    """llama.cpp's rule for added tokens that are control tokens though not flagged special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1, as llama.cpp's `get_vocab_base` builds them: ids the
    tokenizer lacks become [PAD<id>] (unused), added tokens control or user-defined, the rest normal."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            types.append(gguf.TokenType.CONTROL if decoder[i].special or looks_special(token)
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, [int(t) for t in types]


def adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding plain text adds BOS / EOS, as the tokenizer really behaves (tokenizer_config.json
    often does not say; llama.cpp must do the same or every prompt differs by one token)."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def add_vocabulary(writer: Any, tokenizer: Any, model_dir: Path, vocab_size: int) -> bool:
    """tokenizer.ggml.* and tokenizer.chat_template; returns whether llama.cpp will add BOS to prompts."""
    import gguf

    spec = tokenizer_json(model_dir)
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, model_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_add_space_prefix(bool(byte_level_prefix_space(spec.get("pre_tokenizer"))))
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    add_bos, add_eos = adds_special(tokenizer)
    special.add_special_token["bos"] = add_bos
    if add_eos or "eos" in special.add_special_token:
        special.add_special_token["eos"] = add_eos
    special.add_to_gguf(writer, quiet=True)
    return add_bos


# -- tensors ---------------------------------------------------------------------------------------
@dataclass
class TensorPlan:
    """One tensor to write: where it comes from, its GGUF name and logical shape, and its GGML type."""

    name: str
    source: str | None            # safetensors key (None: computed, e.g. rope_freqs)
    file: Path | None
    shape: tuple[int, ...]
    qtype: Any
    data: torch.Tensor | None = field(default=None, repr=False)


def weight_files(model_dir: Path) -> dict[str, Path]:
    """safetensors key -> shard file of a model directory."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"--gguf: {model_dir} has no *.safetensors weights")
    keys = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            keys.update({k: f for k in st.keys()})  # noqa: SIM118 - a safetensors handle, not a dict
    return keys


def tensor_type(gguf_name: str, shape: tuple[int, ...], out_type: str) -> Any:
    """llama.cpp's rule: 1-D tensors and norms in f32, matrices in the requested type; q8_0 needs rows in
    whole blocks of 32, else f16."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    qtype = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[out_type]
    if qtype == Q.Q8_0 and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
        log.info("%s: rows of %d weights are not whole q8_0 blocks; written in f16", gguf_name, shape[-1])
        return Q.F16
    return qtype


def plan_tensors(model_dir: Path, config: dict, arch: str, out_type: str) -> list[TensorPlan]:
    import gguf
    from safetensors import safe_open

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    plans = []
    for key, file in weight_files(model_dir).items():
        if key == "lm_head.weight" and tied:  # llama.cpp reuses token_embd; writing it would untie the model
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"--gguf: {model_dir}: tensor {key!r} has no GGUF name for {arch}")
        with safe_open(file, framework="pt") as st:
            shape = tuple(st.get_slice(key).get_shape())
        plans.append(TensorPlan(name, key, file, shape, tensor_type(name, shape, out_type)))
    factors = llama3_rope_factors(config) if arch == "llama" else None
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plans.append(TensorPlan(name, None, None, tuple(factors.shape), gguf.GGMLQuantizationType.F32, factors))
    return plans


def permute_rotary(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: each head's rotary halves interleaved (`LlamaModel.permute`)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def tensor_data(plan: TensorPlan, config: dict, arch: str) -> np.ndarray:
    """The tensor as the bytes GGUF stores: permuted for llama's q/k, converted or quantized."""
    from gguf.quants import quantize
    from safetensors import safe_open

    if plan.data is not None:
        data = plan.data
    else:
        with safe_open(plan.file, framework="pt") as st:
            data = st.get_tensor(plan.source)
    data = data.to(torch.float32)
    if arch == "llama" and plan.source is not None:
        heads = config["num_attention_heads"]
        if plan.source.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_rotary(data, heads)
        elif plan.source.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_rotary(data, config.get("num_key_value_heads") or heads)
    return quantize(data.numpy(), plan.qtype)


def file_type(out_type: str) -> int:
    from gguf import LlamaFileType

    return int({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                "q8_0": LlamaFileType.MOSTLY_Q8_0}[out_type])


def write_gguf(model_dir: Path, out_file: Path, out_type: str, name: str, license: str | None = None,
               tokenizer: Any = None) -> dict:
    """Write `model_dir` (a full HF model) as a GGUF file; returns a few facts for logs and the model card."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape
    from transformers import AutoTokenizer

    from ftlab.models.load import read_json

    config = read_json(model_dir / "config.json")
    arch = model_architecture(config, str(model_dir))
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_dir)
    plans = plan_tensors(model_dir, config, arch, out_type)
    writer = gguf.GGUFWriter(out_file, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    params = sum(math.prod(p.shape) for p in plans)
    writer.add_size_label(gguf.size_label(params, 0, 0, 0))
    if license:
        writer.add_license(license)
    add_hyperparameters(writer, config, arch, file_type(out_type))
    add_bos = add_vocabulary(writer, tokenizer, model_dir, config["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for p in plans:
        item = np.dtype(np.float16 if p.qtype == gguf.GGMLQuantizationType.F16 else np.float32).itemsize
        nbytes = (math.prod(quant_shape_to_byte_shape(p.shape, p.qtype)) if p.qtype == gguf.GGMLQuantizationType.Q8_0
                  else math.prod(p.shape) * item)
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in plans:  # one tensor in memory at a time
        writer.write_tensor_data(tensor_data(p, config, arch))
    writer.close()
    return {"architecture": arch, "type": out_type, "tensors": len(plans), "parameters": params,
            "add_bos": add_bos, "bytes": out_file.stat().st_size}


# -- Ollama ----------------------------------------------------------------------------------------
@dataclass
class TurnTemplate:
    """Ollama's per-turn template (Go text/template over .System, .Prompt, .Response), the system prompt
    the chat template uses when a conversation has none, and the end-of-turn stop strings."""

    template: str | None
    default_system: str | None
    stops: list[str]


def render(tokenizer: Any, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def ollama_template(tokenizer: Any, add_bos: bool) -> TurnTemplate:
    """Derive Ollama's template from the Jinja chat template by rendering conversations whose contents are
    sentinels and putting the Go placeholders where the sentinels land.

    Ollama renders its template once per turn (system only on the first), and for the last turn cuts it
    after `{{ .Response }}`. So: the turn = [system block, if a system is given] + user block + generation
    prompt + `{{ .Response }}` + what the template writes after an answer (the end-of-turn marker). The
    user block is what a second user turn adds; the system block is the rest of the first prompt.
    A system prompt that the chat template inserts by itself becomes the Modelfile's SYSTEM."""
    if not getattr(tokenizer, "chat_template", None):  # a base model: Ollama's default template (the raw prompt)
        return TurnTemplate(None, None, [])
    s, u, a, u2 = (SENTINEL[k] for k in ("system", "user", "assistant", "user2"))
    with_system = render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u}], True)
    answered = render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u},
                                  {"role": "assistant", "content": a}], False)
    second = render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u},
                                {"role": "assistant", "content": a}, {"role": "user", "content": u2}], True)
    no_system = render(tokenizer, [{"role": "user", "content": u}], True)
    after_answer = answered[answered.index(a) + len(a):] if a in answered else ""
    turn = second[len(answered):] if second.startswith(answered) else ""
    user_block = turn.replace(u2, u)
    if not (user_block and with_system.endswith(user_block) and u in user_block):
        raise UserError("--gguf: the chat template does not render turns in a way an Ollama template can "
                        "express (a user turn is not the same text each time)")
    system_block = with_system[:len(with_system) - len(user_block)]
    if add_bos and tokenizer.bos_token and system_block.startswith(tokenizer.bos_token):
        system_block = system_block[len(tokenizer.bos_token):]  # llama.cpp adds BOS itself: never twice
        no_system = no_system.removeprefix(tokenizer.bos_token)
    default_system = implied_system(system_block, no_system[:len(no_system) - len(user_block)], s)
    go = ("{{ if .System }}" + system_block.replace(s, "{{ .System }}") + "{{ end }}"
          + user_block.replace(u, "{{ .Prompt }}") + "{{ .Response }}" + after_answer)
    stops = [t for t in tokenizer.all_special_tokens if t and t in after_answer] or (
        [after_answer.strip()] if after_answer.strip() else [])
    return TurnTemplate(go, default_system, stops)


def implied_system(system_block: str, rendered_without: str, sentinel: str) -> str | None:
    """The system text the chat template writes when a conversation has no system message (SmolLM2: "You
    are a helpful AI assistant named SmolLM..."), found by lining the two renderings up around the sentinel."""
    if sentinel not in system_block or not rendered_without:
        return None
    before, after = system_block.split(sentinel, 1)
    if rendered_without.startswith(before) and rendered_without.endswith(after) \
            and len(rendered_without) >= len(before) + len(after):
        return rendered_without[len(before):len(rendered_without) - len(after)]
    return None


def modelfile_text(turn: TurnTemplate, gguf_name: str = "model.gguf") -> str:
    lines = [f"FROM ./{gguf_name}"] + (["", f'TEMPLATE """{turn.template}"""'] if turn.template else [])
    if turn.default_system:
        lines += ["", f'SYSTEM """{turn.default_system}"""']
    lines += [""] + [f"PARAMETER stop {json.dumps(stop)}" for stop in turn.stops]
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: Path, tokenizer: Any, add_bos: bool) -> Path:
    turn = ollama_template(tokenizer, add_bos)
    path = out_dir / "Modelfile"
    path.write_text(modelfile_text(turn), encoding="utf-8")
    return path
