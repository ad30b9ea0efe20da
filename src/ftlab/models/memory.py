"""`ftlab memory`: estimate the GPU memory a training run needs, from the model's config alone.

    ftlab memory smollm2-135m-instruct --method lora --precision bf16 --batch-size 8 --seq-len 512
    ftlab memory path/to/config.json --method full --optim adamw_8bit --gradient-checkpointing

Nothing is downloaded but a hub model's config.json (an offline hub id fails at once with one line):
the architecture is built on the `meta` device, so parameter counts are exact and cost no memory.

    est = estimate_memory(architecture(load_config("smollm2-135m-instruct")), method="lora", precision="bf16")
    est.total_bytes, est.rows, est.assumptions; print(format_estimate(est))

The model behind the numbers (what ftlab's trainer does; every choice is printed with the estimate):

* weights are stored as `model.dtype` says (`weight_dtype`, ftlab's default fp32). Under bf16/fp16 mixed
  precision (autocast) the trainable fp32 parameters are the master weights, and autocast keeps a 16-bit
  copy of every fp32 matmul weight for the backward pass (+2 B/param) - so LoRA with fp32-stored base
  weights and bf16 autocast takes 6 B/param of base weights, more than fp32 LoRA; the table says how much
  `model.dtype=bf16` saves. LoRA adapters are fp32 (peft upcasts them). QLoRA: every Linear but the LM
  head is NF4 with double quantization (0.5 B + 1/64 B absmax + 4/16384 B per param, bitsandbytes blocks of
  64); embeddings, norms and the LM head are fp32 (peft's prepare_model_for_kbit_training upcasts them).
* gradients: one per trainable parameter, in its storage dtype (fp32 master weights -> 4 B).
* optimizer: AdamW 2 states per trainable param in its dtype (8 B for fp32); 8-bit AdamW (bitsandbytes,
  paged or not) 2 B/param plus fp32 absmax per 256-value block, 32-bit states for tensors under 4096 values;
  SGD (no momentum) nothing.
* activations, per decoder layer and token, itemized for a Llama-style block as autograd saves them (HF
  eager code, sdpa/flash attention: no s^2 term; `attn_implementation="eager"` adds the fp32 softmax
  probabilities). The generic per-layer count is Korthikanti et al. 2022 (s*b*h*(34 + 5*a*s/h) bytes at
  16-bit for a GPT block with dropout); the items below are the same bookkeeping for RMSNorm + GQA +
  (gated) MLP + LoRA, checked against the bytes autograd really saves (tests/test_memory.py):
    norms (2):      fp32 input [+ fp32 normalized copy when the norm weight trains]
    matmul inputs:  kept only where the weight trains: q/k/v and gate/up inputs, o and down inputs
                    are other saved tensors (under autocast each projection keeps its own 16-bit cast)
    attention:      q, k, v, output (2*h_q + 2*h_kv)
    MLP:            gated 4*I (gate out, silu out, up out, product; 3*I when down_proj is frozen),
                    plain 2*I (fc1 out, activation out; 1*I when frozen)
    LoRA target:    dropout mask (fp32) + lora_A input + r
  plus, once per token, the final norm and the LM head's input, minus what the first layer of a
  LoRA/QLoRA model does not keep (nothing before it trains: its norm input, its q/k/v dropout masks).
  For SmolLM2-135M this matches the bytes autograd saves on CPU within 0.1% (full/LoRA, fp32/bf16
  autocast, sdpa/eager; docs/BENCHMARKS.md). With gradient checkpointing (per decoder layer) only each
  layer's input is kept (h per token per layer) plus one layer's activations while it is recomputed.
* logits: training runs the LM head on the supervised positions only (`ftlab.losses.response_token_log_probs`
  slices the hidden states first), so logits cost per supervised token: the fp32 logits the loss keeps
  (4 B x vocab) and, in backward, their gradient (4 B); mixed precision adds the 16-bit logits (2 B). The
  LM head's input (kept when the head trains) is per supervised token too. A frozen head (LoRA, QLoRA)
  runs chunk by chunk instead (`ftlab.losses.head_log_probs`): 4 B x hidden per supervised token for its
  row gradient, plus one chunk of rows x vocab x 8 B (the chunk's logits and softmax) at a time. `supervised_share` (CLI
  `--supervised-share`) is the share of tokens that carry loss: 1.0, every position, is the upper bound
  (the default); SFT on long prompts with short answers needs far less.
* total = the sum of the rows: an upper bound of the peak (gradients fill in while activations are
  freed), without the CUDA context (~0.3-1 GiB) and allocator fragmentation.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ftlab.errors import UserError

GiB = 1024 ** 3
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)   # 4-bit values + 8-bit absmax per 64 + fp32 constant per 256 blocks
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")
BNB_MIN_8BIT_SIZE = 4096                    # bitsandbytes keeps 32-bit states for smaller tensors
BNB_BLOCK = 256                             # bitsandbytes 8-bit optimizer block size (one fp32 absmax each)
GATED = {"gate_proj", "up_proj", "w1", "w3", "gate_up_proj"}
# Input groups: projections that read the same tensor (q/k/v read the attention norm's output, ...).
INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
               "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid",
               "w1": "mlp_in", "w3": "mlp_in", "w2": "mlp_mid", "fc1": "mlp_in", "fc2": "mlp_mid",
               "c_attn": "attn_in", "c_fc": "mlp_in", "c_proj": "out"}


# -- architecture from the config -------------------------------------------------------------------
def load_config(model: str) -> Any:
    """A transformers config for a model name, hub id, local directory or config.json path.

    Embedded names go through `resolve_model_path` (its cached conversion holds the config); a hub id
    needs the hub only for config.json and fails at once, in one line, when offline.
    """
    from transformers import AutoConfig

    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise UserError(f"{model}: expected a model directory or a config.json file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # ValueError: malformed JSON, or bytes that are not UTF-8
            raise UserError(f"{model}: cannot read as JSON: {e}") from None
        return _config_from_dict(data, model)

    from ftlab.models.load import adapter_base_path, is_adapter_dir, resolve_model_path

    resolved = resolve_model_path(model)
    if is_adapter_dir(resolved):  # an adapter: the memory is the base model's
        resolved = adapter_base_path(resolved)
    from ftlab.models.load import config_errors, first_line

    local = Path(resolved).is_dir()
    try:
        return AutoConfig.from_pretrained(resolved, local_files_only=local)
    except (OSError, *config_errors()) as e:
        raise UserError(f"{model}: cannot read its config: {first_line(e)}") from None


def _config_from_dict(data: dict, where: str) -> Any:
    from transformers import AutoConfig

    from ftlab.models.load import config_errors, first_line

    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{where}: not a transformers config (no 'model_type')")
    data = dict(data)
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except config_errors() as e:
        raise UserError(f"{where}: cannot build a config: {first_line(e)}") from None


@dataclass
class Linear:
    name: str            # qualified module name, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int
    bias: bool

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass
class Architecture:
    """What the estimate needs, read from a model built on the meta device."""

    name: str
    model_type: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    tied_embeddings: bool
    total_params: int                   # unique parameters (tied weights counted once)
    embedding_params: int               # input embeddings (and position embeddings)
    head_params: int                    # the output projection when it is not tied (else 0)
    linears: list[Linear] = field(default_factory=list)   # every Linear/Conv1D except the LM head
    param_numels: list[int] = field(default_factory=list)  # numel of each parameter tensor

    @property
    def linear_params(self) -> int:
        return sum(m.numel for m in self.linears)

    @property
    def other_params(self) -> int:      # norms, biases outside Linears, position embeddings, ...
        return self.total_params - self.linear_params - self.embedding_params - self.head_params

    @property
    def h_q(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def h_kv(self) -> int:
        return self.n_kv_heads * self.head_dim

    def matching(self, targets: Sequence[str]) -> list[Linear]:
        """Linears that peft's `target_modules` would adapt (suffix match; 'all-linear' = all but the head)."""
        targets = [targets] if isinstance(targets, str) else list(targets)
        if targets == ["all-linear"]:
            return list(self.linears)

        def hit(m: Linear, t: str) -> bool:
            return m.name == t or m.name.endswith("." + t)

        for t in targets:
            if not any(hit(m, t) for m in self.linears):
                names = sorted({m.leaf for m in self.linears})
                raise UserError(f"LoRA target {t!r} is not a Linear of this model; available: {', '.join(names)}")
        return [m for m in self.linears if any(hit(m, t) for t in targets)]


def build_meta_model(config: Any) -> Any:
    import torch  # here, not at the top: `ftlab plan` and the CLI's start need no torch
    from transformers import AutoModelForCausalLM

    from ftlab.models.load import config_errors, first_line

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except config_errors() as e:
        raise UserError(f"cannot build a causal LM from this config ({getattr(config, 'model_type', '?')}): "
                        f"{first_line(e)}") from None


def architecture(config: Any, name: str | None = None) -> Architecture:
    """Exact parameter counts and layer shapes from a model instantiated on the meta device."""
    import torch
    from transformers.pytorch_utils import Conv1D

    model = build_meta_model(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    inp = model.get_input_embeddings()
    outp = model.get_output_embeddings()
    tied = outp is not None and inp is not None and outp.weight is inp.weight
    head_ids = {id(outp)} if outp is not None else set()

    linears = []
    for qual, m in model.named_modules():
        if id(m) in head_ids:
            continue
        if isinstance(m, torch.nn.Linear):
            linears.append(Linear(qual, m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, Conv1D):  # GPT-2 style: weight (in, out)
            linears.append(Linear(qual, m.weight.shape[0], m.weight.shape[1], m.bias is not None))
    params = list(model.parameters())  # unique: a tied weight appears once
    emb = sum(p.numel() for mod in model.modules() if isinstance(mod, torch.nn.Embedding)
              for p in mod.parameters(recurse=False))
    head = 0 if tied or outp is None else sum(p.numel() for p in outp.parameters())

    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    if isinstance(inter, (list, tuple)):
        inter = max(inter)
    leaves = {m.leaf for m in linears}
    return Architecture(
        name=name or getattr(config, "_name_or_path", "") or text.model_type, model_type=text.model_type,
        n_layers=int(text.num_hidden_layers), hidden=hidden, n_heads=heads, n_kv_heads=kv, head_dim=head_dim,
        intermediate=int(inter), vocab=int(text.vocab_size), gated_mlp=bool(leaves & GATED), tied_embeddings=tied,
        total_params=sum(p.numel() for p in params), embedding_params=emb, head_params=head, linears=linears,
        param_numels=[p.numel() for p in params])


def lora_param_count(arch: Architecture, r: int, target_modules: Sequence[str] = DEFAULT_TARGETS) -> int:
    """Trainable LoRA parameters: r * (in + out) for every adapted Linear (A: r x in, B: out x r)."""
    return sum(r * (m.in_features + m.out_features) for m in arch.matching(target_modules))


# -- the estimate -----------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    arch: Architecture
    setup: dict[str, Any]
    trainable_params: int
    rows: list[tuple[str, float, str]]      # (component, bytes, how it was computed)
    assumptions: list[str]

    @property
    def total_bytes(self) -> float:
        return sum(b for _, b, _ in self.rows)

    def bytes_of(self, component: str) -> float:
        return sum(b for c, b, _ in self.rows if c == component)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB


def optimizer_bytes(numels: Iterable[int], optim: str, state_dtype_bytes: int = 4) -> float:
    """Optimizer state bytes for trainable tensors of the given sizes."""
    if optim == "sgd":
        return 0.0
    if optim == "adamw":
        return float(sum(2 * state_dtype_bytes * n for n in numels))
    if optim in ("adamw_8bit", "paged_adamw_8bit"):
        total = 0.0
        for n in numels:
            if n < BNB_MIN_8BIT_SIZE:
                total += 8 * n
            else:
                total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
        return total
    raise UserError(f"unknown optimizer {optim!r}; choose from {', '.join(OPTIMIZERS)}")


def layer_activation_bytes(arch: Architecture, method: str, precision: str, seq_len: int,
                           lora: Sequence[Linear] = (), lora_r: int = 16, lora_dropout: float = 0.05,
                           attn_implementation: str = "sdpa", weight_bytes: int = 4) -> float:
    """Bytes autograd keeps per token for ONE decoder layer (see the module docstring for the items).

    `lora` lists the adapted Linears of the whole model; their share is averaged over the layers.
    """
    mixed = precision != "fp32"
    p = 2 if mixed or weight_bytes == 2 else 4  # matmul inputs/outputs: 16-bit under autocast or 16-bit weights
    f = 4                            # HF norms compute in fp32, dropout masks follow the fp32 input
    per_proj_cast = mixed and weight_bytes == 4  # autocast casts the fp32 input once per projection
    h, hq, hkv, inter = arch.hidden, arch.h_q, arch.h_kv, arch.intermediate
    full = method == "full"

    norms = 2 * (f * h + (f * h if full else 0) + 4)   # + the fp32 rsqrt per token
    attn = p * (2 * hq + 2 * hkv) + 4 * arch.n_heads  # + the fp32 logsumexp per head
    if attention_is_eager(attn_implementation):
        attn += arch.n_heads * seq_len * (4 + (p if mixed else 0)) + p * 2 * (hq - hkv)
    if arch.gated_mlp:
        mlp = p * (4 if full else 3) * inter
    else:
        mlp = p * (2 if full else 1) * inter
    inputs = 0.0
    if full:  # weight gradients need the inputs of q/k/v and gate/up (o/down inputs are saved already)
        n_in = 2 if arch.gated_mlp else 1
        inputs = (p * h * (3 + n_in)) if per_proj_cast else (p * h * 2)
    adapters = 0.0
    seen_groups: set[tuple[str, str]] = set()
    for m in lora:
        adapters += p * lora_r
        if lora_dropout > 0:
            adapters += m.in_features * (f + p)  # dropout mask + lora_A's (cast) input
            continue
        group = INPUT_GROUP.get(m.leaf, m.leaf)
        if group == "attn_out" and not mixed:
            continue  # lora_A reads the attention output, which sdpa saves anyway (cast copy under autocast)
        key = (m.name.rsplit(".", 1)[0], group)  # q/k/v of one layer read one tensor
        if mixed or key not in seen_groups:  # under autocast each adapter gets its own cast
            adapters += p * m.in_features
        seen_groups.add(key)
    return norms + attn + mlp + inputs + adapters / max(arch.n_layers, 1)  # `lora` spans all layers


def head_input_bytes(arch: Architecture, method: str, precision: str, weight_bytes: int = 4) -> float:
    """Per token, outside the decoder layers: the final norm (fp32 input [+ normalized copy when it trains])
    and the LM head's input (kept when the head trains: full fine-tuning), every position supervised."""
    full = method == "full"
    return 4 * arch.hidden * (2 if full else 1) + lm_head_input_bytes(arch, method, precision, weight_bytes)


def lm_head_input_bytes(arch: Architecture, method: str, precision: str, weight_bytes: int = 4) -> float:
    """Per SUPERVISED token: the LM head's input, kept for its weight gradient when the head trains."""
    p = 2 if precision != "fp32" or weight_bytes == 2 else 4
    return p * arch.hidden if method == "full" else 0.0


def frozen_prefix_savings(arch: Architecture, method: str, lora: Sequence[Linear] = (),
                          lora_dropout: float = 0.05) -> float:
    """Per token, what the FIRST layer does not keep under LoRA/QLoRA: nothing before its attention
    adapters trains, so its first norm's input and the dropout masks of the adapters reading that norm's
    output (q/k/v) need no gradient and are not saved."""
    if method == "full":
        return 0.0
    first = [m for m in lora if INPUT_GROUP.get(m.leaf) == "attn_in"]
    first = [m for m in first if m.name.rsplit(".", 1)[0] == first[0].name.rsplit(".", 1)[0]] if first else []
    masks = sum(4 * m.in_features for m in first) if lora_dropout > 0 else 0
    return 4 * arch.hidden + masks


def attention_is_eager(impl: str) -> bool:
    return impl == "eager"


def estimate_memory(arch: Architecture, method: str = "full", optim: str = "adamw", precision: str = "bf16",
                    batch_size: int = 1, seq_len: int = 1024, lora_r: int = 16,
                    target_modules: Sequence[str] | None = None, gradient_checkpointing: bool = False,
                    attn_implementation: str = "sdpa", lora_dropout: float = 0.05,
                    weight_dtype: str = "fp32", supervised_share: float = 1.0) -> MemoryEstimate:
    """Estimate training memory (bytes per component) for `arch`; see the module docstring.

    `supervised_share`: the share of tokens that carry loss (the LM head runs on those only)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if precision not in DTYPE_BYTES or weight_dtype not in DTYPE_BYTES:
        raise UserError(f"precision and weight dtype must be one of {', '.join(DTYPE_BYTES)}")
    if optim not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optim!r}; choose from {', '.join(OPTIMIZERS)}")
    for label, value in (("batch size", batch_size), ("sequence length", seq_len), ("LoRA r", lora_r)):
        if value < 1:
            raise UserError(f"{label} must be >= 1, got {value}")
    if not 0 <= lora_dropout < 1:
        raise UserError(f"LoRA dropout (--lora-dropout) must be in [0, 1); got {lora_dropout:g}")
    if not 0 < supervised_share <= 1:
        raise UserError(f"supervised share (--supervised-share) must be in (0, 1]; got {supervised_share:g}")
    targets = list(target_modules or DEFAULT_TARGETS)
    mixed = precision != "fp32"
    W = DTYPE_BYTES[weight_dtype]
    tokens = batch_size * seq_len
    supervised = math.ceil(tokens * supervised_share)  # positions the LM head runs on
    a = arch
    rows: list[tuple[str, float, str]] = []
    notes: list[str] = []
    head_like = a.head_params if a.head_params else _tied_head_numel(a)

    # weights, gradients, optimizer
    if method == "full":
        trainable = a.total_params
        copies = 2 * (a.linear_params + head_like) if mixed and W == 4 else 0
        rows.append(("weights", W * a.total_params + copies,
                     f"{_n(a.total_params)} x {W} B ({weight_dtype})"
                     + (f" + {_n(a.linear_params + head_like)} x 2 B autocast copies" if copies else "")))
        rows.append(("gradients", W * trainable, f"{_n(trainable)} trainable x {W} B"))
        rows.append(("optimizer states", optimizer_bytes(a.param_numels, optim, W), _optim_how(optim, trainable, W)))
        if mixed and W == 4:
            notes.append(f"{precision} mixed precision: the fp32 parameters are the master weights; autocast keeps a "
                         "16-bit copy of each matmul weight for backward (+2 B/param)")
        elif mixed:
            notes.append(f"weights stored in {weight_dtype} (model.dtype): pure 16-bit training, no fp32 master "
                         "copy and 16-bit optimizer states (ftlab's default model.dtype=fp32 keeps fp32 masters)")
    else:
        adapted = a.matching(targets)
        trainable = sum(lora_r * (m.in_features + m.out_features) for m in adapted)
        lora_numels = [n for m in adapted for n in (lora_r * m.in_features, lora_r * m.out_features)]
        if method == "lora":
            base = W * a.total_params
            copies = 2 * (a.linear_params + head_like) if mixed and W == 4 else 0
            how = f"{_n(a.total_params)} frozen x {W} B ({weight_dtype})"
            base += copies
            if copies:
                how += f" + {_n(a.linear_params + head_like)} x 2 B autocast copies"
                saved = (W - 2) * a.total_params + copies
                notes.append(f"frozen base stored in fp32 (ftlab's default model.dtype=fp32) and run under {precision} "
                             f"autocast: 4 B + a 2 B copy per matmul weight; model.dtype={precision} would save "
                             f"{saved / GiB:.2f} GiB")
        else:  # qlora
            quant = a.linear_params
            rest = a.total_params - quant
            copies = 2 * head_like if mixed else 0
            base = NF4_BYTES * quant + 4 * rest + copies
            how = (f"{_n(quant)} NF4 x {NF4_BYTES:.3f} B + {_n(rest)} embeddings/norms/head x 4 B"
                   + (" + 2 B head copy" if copies else ""))
            notes.append("QLoRA: every Linear but the LM head in NF4 with double quantization (bitsandbytes, "
                         "blocks of 64: 0.5 B + 1/64 B + 4/16384 B per param); peft's prepare_model_for_kbit_training "
                         "keeps embeddings, norms and the head in fp32")
        rows.append(("weights", base + 4 * trainable, how + f" + {_n(trainable)} LoRA x 4 B (fp32)"))
        rows.append(("gradients", 4 * trainable, f"{_n(trainable)} LoRA x 4 B"))
        rows.append(("optimizer states", optimizer_bytes(lora_numels, optim), _optim_how(optim, trainable, 4)))
        notes.append(f"LoRA r={lora_r} on {', '.join(targets)} ({len(adapted)} modules): r x (in + out) "
                     "params each, fp32 (peft upcasts adapters), dropout "
                     f"{lora_dropout:g}")

    # activations
    adapted_mods = [] if method == "full" else a.matching(targets)
    per_layer = layer_activation_bytes(a, method, precision, seq_len, adapted_mods, lora_r, lora_dropout,
                                       attn_implementation, W if method != "qlora" else 4)
    head_w = W if method != "qlora" else 4
    head_sup = lm_head_input_bytes(a, method, precision, head_w)  # per supervised token
    head_in = (head_input_bytes(a, method, precision, head_w) - head_sup
               - frozen_prefix_savings(a, method, adapted_mods, lora_dropout))
    if gradient_checkpointing:
        resid = W if method != "qlora" else 4
        layers = a.n_layers * tokens * resid * a.hidden + tokens * (per_layer + head_in) + supervised * head_sup
        how = (f"{a.n_layers} layer inputs x {tokens} tokens x {resid * a.hidden} B + one layer recomputed "
               f"({per_layer / 1024:.1f} KiB/token) + final norm/head input ({head_in:+.0f} B/token"
               + (f", {head_sup:.0f} B/supervised token)" if head_sup else ")"))
        notes.append("gradient checkpointing per decoder layer: keeps each layer's input, recomputes one layer "
                     "at a time in backward (~30% more compute)")
    else:
        layers = tokens * (a.n_layers * per_layer + head_in) + supervised * head_sup
        how = (f"{tokens} tokens x ({a.n_layers} layers x {per_layer / 1024:.1f} KiB {head_in:+.0f} B final "
               "norm" + (", frozen first layer)" if method != "full" else ")")
               + (f" + {supervised} supervised tokens x {head_sup:.0f} B LM head input" if head_sup else ""))
    rows.append(("activations", layers, how))
    if method == "full":
        logit_b = 8 + (2 if mixed else 0)
        rows.append(("logits (loss)", supervised * a.vocab * logit_b,
                     f"{supervised} supervised tokens x {a.vocab} vocab x {logit_b} B"))
    else:  # a frozen head: log-probs chunk by chunk, each row's gradient kept (ftlab.losses.head_log_probs)
        from ftlab.losses import head_chunk_rows

        chunk = min(supervised, head_chunk_rows(a.vocab))
        rows.append(("logits (loss)", supervised * a.hidden * 4 + chunk * a.vocab * 8,
                     f"{supervised} supervised tokens x {a.hidden} x 4 B + one chunk of {chunk} rows x "
                     f"{a.vocab} vocab x 8 B"))
    notes.append(f"activations: {attn_implementation} attention "
                 + ("(fp32 softmax probabilities: s^2 term)" if attention_is_eager(attn_implementation)
                    else "(flash/memory-efficient kernels: no s^2 term)")
                 + "; per layer and token: norms, attention q/k/v/out, MLP, matmul inputs, LoRA inputs "
                 "as autograd saves them (Korthikanti et al. 2022 bookkeeping for a Llama block)")
    notes.append(f"logits: the LM head runs on supervised positions only ({supervised_share:g} of the tokens"
                 + (", every position: the upper bound; pass --supervised-share for SFT data" if supervised_share == 1
                    else "") + "): "
                 + ("fp32 logits for the loss and their gradient (8 B per supervised token x vocab)"
                    + (", plus the 16-bit logits (2 B)" if mixed else "") if method == "full" else
                    "the frozen head's log-probs run chunk by chunk, keeping each row's fp32 gradient (4 B x hidden); "
                    "one chunk's fp32 logits and softmax are alive at a time"))
    notes.append(f"optimizer: {_optim_note(optim)}")
    notes.append("total = sum of the rows: an upper bound of the peak (gradients fill in while activations are "
                 "freed); add the CUDA context (~0.3-1 GiB) and allocator fragmentation")
    setup = dict(method=method, optim=optim, precision=precision, batch_size=batch_size, seq_len=seq_len,
                 lora_r=lora_r, target_modules=targets, gradient_checkpointing=gradient_checkpointing,
                 attn_implementation=attn_implementation, lora_dropout=lora_dropout, weight_dtype=weight_dtype,
                 supervised_share=supervised_share)
    return MemoryEstimate(arch=a, setup=setup, trainable_params=trainable, rows=rows, assumptions=notes)


def _tied_head_numel(a: Architecture) -> int:
    """The matmul weight of a tied LM head is the embedding matrix (vocab x hidden)."""
    return a.vocab * a.hidden if a.tied_embeddings else 0


def _optim_how(optim: str, n: int, state_bytes: int) -> str:
    if optim == "adamw":
        return f"{_n(n)} x {2 * state_bytes} B (AdamW m, v)"
    if optim == "sgd":
        return "none (SGD without momentum)"
    return f"{_n(n)} x ~2 B (8-bit AdamW m, v + absmax)"


def _optim_note(optim: str) -> str:
    return {
        "adamw": "AdamW keeps m and v in the parameter dtype (fp32: 8 B/param)",
        "adamw_8bit": "bitsandbytes 8-bit AdamW: 2 B/param + fp32 absmax per 256 values (32-bit for tensors "
                      "< 4096 values)",
        "paged_adamw_8bit": "bitsandbytes paged 8-bit AdamW: as adamw_8bit, and the states can be paged to CPU "
                            "memory under pressure (the GPU figure is then lower)",
        "sgd": "SGD without momentum has no state (momentum would add 4 B/param)",
    }[optim]


def _n(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


# -- output -----------------------------------------------------------------------------------------
def format_estimate(est: MemoryEstimate) -> str:
    a, s = est.arch, est.setup
    share = 100 * est.trainable_params / max(a.total_params, 1)
    mlp = f"mlp {a.intermediate} ({'gated' if a.gated_mlp else 'plain'})"
    attn = f"{a.n_heads} heads ({a.n_kv_heads} kv, head_dim {a.head_dim})"
    lines = [
        f"ftlab memory estimate: {a.name}",
        f"  architecture  {a.model_type}, {a.n_layers} layers, hidden {a.hidden}, {attn}, {mlp}, "
        f"vocab {a.vocab:,}{', tied embeddings' if a.tied_embeddings else ''}",
        f"  parameters    {a.total_params:,} total, {est.trainable_params:,} trainable ({share:.2f}%)",
        f"  setup         {s['method']}, {s['precision']}"
        + (" (fp32)" if s["precision"] == "fp32" else " mixed precision (autocast)")
        + f", weights stored {s['weight_dtype']}, {s['optim']}, batch {s['batch_size']} x seq {s['seq_len']}"
        + f", {s['attn_implementation']} attention"
        + (", gradient checkpointing" if s["gradient_checkpointing"] else ""),
        "",
        f"  {'component':<18}{'GiB':>9}   how",
    ]
    for comp, b, how in est.rows:
        lines.append(f"  {comp:<18}{b / GiB:>9.3f}   {how}")
    lines.append(f"  {'total':<18}{est.total_gib:>9.3f}   sum of the rows (upper bound of the peak)")
    lines += ["", "assumptions"] + [f"  - {n}" for n in est.assumptions]
    return "\n".join(lines)


def cli_memory(args: Any) -> str:
    """`ftlab memory`: the text to print for parsed CLI arguments."""
    from ftlab.models.load import context_window

    config = load_config(args.model)
    window = context_window(config)
    if window is not None and args.seq_len > window:
        raise UserError(f"--seq-len {args.seq_len} is beyond the context window of {args.model} "
                        f"({window} tokens, max_position_embeddings)")
    arch = architecture(config, name=args.model)
    targets = getattr(args, "lora_target_modules", None) or getattr(args, "target_modules", None)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    est = estimate_memory(
        arch, method=args.method, optim=args.optim, precision=args.precision, batch_size=args.batch_size,
        seq_len=args.seq_len, lora_r=args.lora_r, target_modules=targets,
        gradient_checkpointing=bool(args.gradient_checkpointing),
        attn_implementation=getattr(args, "attn_implementation", None) or "sdpa",
        lora_dropout=0.05 if getattr(args, "lora_dropout", None) is None else float(args.lora_dropout),
        weight_dtype=getattr(args, "weight_dtype", None) or "fp32",
        supervised_share=1.0 if getattr(args, "supervised_share", None) is None else float(args.supervised_share))
    return format_estimate(est)
