"""Named model sizes for from-scratch pretraining (`model.preset`), parameter counts and FLOPs per token.

Two families at the same widths and depths, from a few-second CPU toy to Pythia-160M:

    size   d_model layers heads  (GPT-NeoX / Pythia: 4 x d MLP; Llama: SwiGLU with the same MLP parameters)
    tiny      64      2      4
    mini     128      4      4
    14m      128      6      4     Pythia-14M's shape
    31m      256      6      8     Pythia-31M
    70m      512      6      8     Pythia-70M
    160m     768     12     12     Pythia-160M

`pythia-*` are GPT-NeoX configs as Pythia's (parallel residual, rotary on 25% of each head, untied
embeddings, GELU); `llama-*` are Llama configs (RMSNorm, SwiGLU, full rotary, untied). The vocabulary
comes from the tokenizer (the name says the shape, not the vocabulary: with a 50k vocabulary "70m" has
~70M parameters, as Pythia-70M). `model.scratch` keys override a preset's: the recipe loader merges the
preset into model.scratch, so config.yaml shows the whole architecture.
"""
from __future__ import annotations

from typing import Any

from ftlab.errors import UserError

SHAPES = {  # size: (d_model, layers, heads)
    "tiny": (64, 2, 4), "mini": (128, 4, 4), "14m": (128, 6, 4), "31m": (256, 6, 8), "70m": (512, 6, 8),
    "160m": (768, 12, 12),
}
CONTEXT = 2048


def pythia(d: int, layers: int, heads: int) -> dict[str, Any]:
    return {"model_type": "gpt_neox", "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": 4 * d, "rotary_pct": 0.25, "rotary_emb_base": 10000,
            "max_position_embeddings": CONTEXT, "use_parallel_residual": True, "tie_word_embeddings": False,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "hidden_dropout": 0.0,
            "initializer_range": 0.02}


def llama(d: int, layers: int, heads: int) -> dict[str, Any]:
    # SwiGLU has 3 matrices where GELU has 2: 8d/3 (rounded up to a multiple of 32) keeps the MLP's parameters.
    ff = -(-(8 * d // 3) // 32) * 32
    return {"model_type": "llama", "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "intermediate_size": ff, "max_position_embeddings": CONTEXT,
            "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "attention_dropout": 0.0,
            "initializer_range": 0.02}


PRESETS: dict[str, dict[str, Any]] = {
    **{f"pythia-{k}": pythia(*v) for k, v in SHAPES.items()},
    **{f"llama-{k}": llama(*v) for k, v in SHAPES.items()},
}


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise UserError(f"'model.preset' must be one of {', '.join(PRESETS)}; got {name!r}")
    return dict(PRESETS[name])


def param_counts(model: Any) -> dict[str, int]:
    """total, embedding (input token embedding) and non-embedding parameters."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return {"params": total, "params_embedding": emb, "params_non_embedding": total - emb}


def flops_per_token(model: Any, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward), the PaLM appendix-B count used for MFU:

        6 x N_matmul + 12 x layers x d_model x seq_len

    N_matmul: the weights of every Linear layer (attention, MLP and the LM head; an embedding lookup is not a
    matmul); the second term is attention's scores and weighted sum (QK^T and AV). Norms, activations and
    softmax are left out, as in PaLM's and nanoGPT's MFU."""
    import torch

    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    seen, n_matmul = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n_matmul += m.weight.numel()
    attention = 12 * text.num_hidden_layers * text.hidden_size * seq_len
    return {"flops_per_token": float(6 * n_matmul + attention), "params_matmul": n_matmul,
            "flops_per_token_attention": float(attention)}
