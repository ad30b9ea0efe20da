"""`ftlab memory`: exact parameter counts, LoRA counts vs peft, byte arithmetic by hand, monotonicity,
the CLI, and a CPU sanity check of the estimate against what autograd and AdamW really allocate."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ftlab.errors import UserError
from ftlab.models.memory import (DEFAULT_TARGETS, NF4_BYTES, architecture, estimate_memory, format_estimate,
                                 frozen_prefix_savings, head_input_bytes, layer_activation_bytes, load_config,
                                 lora_param_count, optimizer_bytes)

# SmolLM2-135M-Instruct's config (the embedded model), so the tests need no model files.
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 2,
}
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=320, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_config(model_type: str = "llama", **kw):
    from transformers import AutoConfig

    if model_type == "gpt2":
        base = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    else:
        base = dict(TINY_LLAMA)
    base.update(kw)
    cfg = AutoConfig.for_model(model_type, **base)
    cfg._attn_implementation = "sdpa"
    return cfg


def real_model(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture()
def smollm2_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMOLLM2))
    return path


# -- parameter counts -------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type,kw", [
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": False}),
    ("gpt2", {}),
])
def test_param_counts_equal_an_instantiated_model(model_type, kw):
    cfg = tiny_config(model_type, **kw)
    arch = architecture(cfg)
    model = real_model(cfg)
    assert arch.total_params == sum(p.numel() for p in model.parameters())
    assert arch.param_numels == [p.numel() for p in model.parameters()]
    assert arch.linear_params + arch.embedding_params + arch.head_params + arch.other_params == arch.total_params
    assert arch.other_params >= 0
    tied = kw.get("tie_word_embeddings", model_type == "gpt2")
    assert arch.tied_embeddings == tied
    assert arch.head_params == (0 if tied else cfg.vocab_size * cfg.hidden_size)


def test_smollm2_counts(smollm2_json):
    arch = architecture(load_config(str(smollm2_json)))
    assert arch.total_params == 134_515_008  # SmolLM2-135M, tied embeddings
    assert arch.embedding_params == 49152 * 576
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536
    assert arch.linear_params == 30 * per_layer
    assert (arch.n_layers, arch.h_q, arch.h_kv, arch.gated_mlp) == (30, 576, 192, True)
    # q,k,v,o per layer: r * (in + out)
    assert lora_param_count(arch, 16) == 30 * 16 * ((576 + 576) * 2 + (576 + 192) * 2) == 1_843_200


@pytest.mark.parametrize("model_type,targets,r", [
    ("llama", list(DEFAULT_TARGETS), 8),
    ("llama", ["q_proj", "v_proj"], 4),
    ("llama", ["gate_proj", "up_proj", "down_proj"], 16),
    ("llama", ["all-linear"], 2),
    ("gpt2", ["c_attn"], 8),
])
def test_lora_count_equals_peft(model_type, targets, r):
    from peft import LoraConfig, get_peft_model

    cfg = tiny_config(model_type)
    arch = architecture(cfg)
    peft_model = get_peft_model(real_model(cfg), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets if targets != ["all-linear"] else "all-linear",
        task_type="CAUSAL_LM"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_param_count(arch, r, targets) == trainable


def test_unknown_lora_target_is_a_user_error():
    from ftlab.errors import UserError

    with pytest.raises(UserError, match="not a Linear of this model"):
        lora_param_count(architecture(tiny_config()), 8, ["query_key_value"])


# -- byte arithmetic by hand ------------------------------------------------------------------------
def test_toy_full_fp32_by_hand():
    arch = architecture(tiny_config())  # h=128, h_q=128, h_kv=64, I=256, 2 layers, vocab 320, tied
    n = arch.total_params
    est = estimate_memory(arch, method="full", optim="adamw", precision="fp32", batch_size=2, seq_len=16)
    assert est.bytes_of("weights") == 4 * n
    assert est.bytes_of("gradients") == 4 * n
    assert est.bytes_of("optimizer states") == 8 * n
    # per token and layer (fp32 = 4 B): norms 2 x (input + normalized) = 4h, q/k/v and gate/up inputs
    # (one tensor each) = 2h, attention q,k,v,out = 2*128 + 2*64, MLP gate/silu/up/product = 4*256
    elems = 4 * 128 + 2 * 128 + (2 * 128 + 2 * 64) + 4 * 256
    assert elems == 2176
    # + per token: final norm input + normalized, LM head input = 3h (fp32)
    assert head_input_bytes(arch, "full", "fp32") == 4 * 3 * 128
    small = 2 * 4 + 4 * 4  # fp32 rsqrt of the 2 norms, fp32 logsumexp of the 4 heads
    assert layer_activation_bytes(arch, "full", "fp32", 16) == 4 * elems + small
    # tokens x (layers x bytes + final norm and head input)
    assert est.bytes_of("activations") == 32 * (2 * (4 * elems + small) + 4 * 3 * 128)
    assert est.bytes_of("logits (loss)") == 32 * 320 * 8
    assert est.total_bytes == 16 * n + 32 * (2 * (4 * 2176 + small) + 4 * 384) + 32 * 320 * 8


def test_toy_lora_and_qlora_bf16_by_hand():
    arch = architecture(tiny_config())
    n, lin, r = arch.total_params, arch.linear_params, 8
    lora_n = lora_param_count(arch, r)  # q,k,v,o of 2 layers: 2 * 8 * ((128+128)*2 + (128+64)*2)
    assert lora_n == 2 * 8 * (256 * 2 + 192 * 2) == 14336
    lo = estimate_memory(arch, method="lora", precision="bf16", lora_r=r, batch_size=1, seq_len=8)
    # fp32 storage (ftlab default) + a 2 B autocast copy of every matmul weight (Linears + tied head)
    assert lo.bytes_of("weights") == 4 * n + 2 * (lin + 320 * 128) + 4 * lora_n
    assert lo.bytes_of("gradients") == 4 * lora_n
    assert lo.bytes_of("optimizer states") == 8 * lora_n
    lo16 = estimate_memory(arch, method="lora", precision="bf16", lora_r=r, weight_dtype="bf16")
    assert lo16.bytes_of("weights") == 2 * n + 4 * lora_n
    q = estimate_memory(arch, method="qlora", precision="bf16", lora_r=r, batch_size=1, seq_len=8)
    assert NF4_BYTES == pytest.approx(0.5 + 1 / 64 + 1 / 4096)
    assert q.bytes_of("weights") == pytest.approx(NF4_BYTES * lin + 4 * (n - lin) + 2 * 320 * 128 + 4 * lora_n)
    # LoRA activations per token and layer at bf16 (p=2) with dropout: norm inputs 2*4h, attention 2*(2*128+2*64),
    # gate/silu/up 3*2*256, 4 adapters x (128 in x (4 B mask + 2 B cast) + 2*8)
    per_layer = 2 * 4 * 128 + 2 * (2 * 128 + 2 * 64) + 3 * 2 * 256 + 4 * (128 * 6 + 2 * 8) + 2 * 4 + 4 * 4
    assert layer_activation_bytes(arch, "lora", "bf16", 8, arch.matching(DEFAULT_TARGETS), r, 0.05) == per_layer
    # + the final norm's fp32 input; the first layer keeps neither its norm input nor q/k/v dropout masks
    # (nothing before them trains)
    assert frozen_prefix_savings(arch, "lora", arch.matching(DEFAULT_TARGETS)) == 4 * 128 + 3 * 4 * 128
    assert lo.bytes_of("activations") == 8 * (2 * per_layer + 4 * 128 - 4 * 128 * 4)
    # the frozen head: 8 supervised rows x h x 4 B of row gradients + one chunk (all 8 rows) x vocab x 8 B
    assert lo.bytes_of("logits (loss)") == 8 * 128 * 4 + 8 * 320 * 8


def test_logits_and_head_input_are_charged_per_supervised_token():
    """Training runs the LM head on supervised positions only: with a quarter of 32 tokens supervised, the
    logits row is 8 tokens x vocab, and full fine-tuning keeps the head's input for those 8 only."""
    arch = architecture(tiny_config())  # h=128, vocab 320
    all_ = estimate_memory(arch, method="full", precision="fp32", batch_size=2, seq_len=16)
    part = estimate_memory(arch, method="full", precision="fp32", batch_size=2, seq_len=16, supervised_share=0.25)
    assert part.bytes_of("logits (loss)") == 8 * 320 * 8 and all_.bytes_of("logits (loss)") == 32 * 320 * 8
    assert all_.bytes_of("activations") - part.bytes_of("activations") == (32 - 8) * 4 * 128
    lora = estimate_memory(arch, method="lora", precision="bf16", batch_size=2, seq_len=16, supervised_share=0.25)
    assert lora.bytes_of("logits (loss)") == 8 * 128 * 4 + 8 * 320 * 8  # row gradients + one chunk in flight
    with pytest.raises(UserError, match="supervised share"):
        estimate_memory(arch, supervised_share=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_logits_saved_for_the_loss_are_the_supervised_positions_only(precision):
    """What autograd keeps of vocab-sized tensors in the training loss (`response_token_log_probs` with a
    response mask) equals the forward part of the estimate's logits row (fp32 logits, 4 B per position)."""
    from ftlab.losses import response_token_log_probs

    cfg = tiny_config()
    model = real_model(cfg).train()
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 12:] = True  # 8 of 32 positions supervised, like a prompt and a short answer
    saved: dict[int, int] = {}
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}  # the head's weight is not activation
    head_weight = (cfg.hidden_size, cfg.vocab_size)  # nor its bf16 autocast copy (the weights row has it)

    def pack(t):
        if (t.dim() >= 1 and t.shape[-1] == cfg.vocab_size and tuple(t.shape) != head_weight
                and t.untyped_storage().data_ptr() not in params):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        response_token_log_probs(model, ids, ids, mask).sum()
    est = estimate_memory(architecture(cfg), method="full", precision="fp32", batch_size=2, seq_len=16,
                          supervised_share=0.25)
    assert sum(saved.values()) == 8 * cfg.vocab_size * 4 == est.bytes_of("logits (loss)") / 2


def test_optimizer_bytes_by_hand():
    assert optimizer_bytes([100, 4096, 10_000], "adamw") == 8 * 14_196
    # 8-bit: < 4096 values stay 32-bit (8 B); else 2 B + two fp32 absmax per 256-value block
    assert optimizer_bytes([100, 4096, 10_000], "adamw_8bit") == 800 + (8192 + 8 * 16) + (20_000 + 8 * 40)
    assert optimizer_bytes([10_000], "paged_adamw_8bit") == optimizer_bytes([10_000], "adamw_8bit")
    assert optimizer_bytes([10_000], "sgd") == 0


def test_checkpointing_keeps_layer_inputs_plus_one_layer():
    arch = architecture(tiny_config())
    plain = estimate_memory(arch, method="full", precision="fp32", batch_size=2, seq_len=16)
    ck = estimate_memory(arch, method="full", precision="fp32", batch_size=2, seq_len=16,
                         gradient_checkpointing=True)
    per_layer = layer_activation_bytes(arch, "full", "fp32", 16)
    assert ck.bytes_of("activations") == 2 * 32 * 4 * 128 + 32 * (per_layer + head_input_bytes(arch, "full", "fp32"))
    assert ck.bytes_of("activations") < plain.bytes_of("activations")
    assert ck.bytes_of("logits (loss)") == plain.bytes_of("logits (loss)")


def test_eager_attention_adds_the_s_squared_term():
    arch = architecture(tiny_config())
    sdpa = layer_activation_bytes(arch, "full", "fp32", 64)
    eager = layer_activation_bytes(arch, "full", "fp32", 64, attn_implementation="eager")
    # fp32 softmax probabilities (heads x s per token) + k/v repeated to all heads for GQA
    assert eager - sdpa == 4 * 64 * 4 + 4 * 2 * (128 - 64)


# -- monotonicity -----------------------------------------------------------------------------------
LLAMA_1B = dict(SMOLLM2, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256)  # Llama-3.2-1B-like


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("config,batch,seq", [(SMOLLM2, 1, 512), (SMOLLM2, 4, 1024), (LLAMA_1B, 8, 2048)])
def test_qlora_below_lora_below_full(tmp_path, config, precision, batch, seq):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    arch = architecture(load_config(str(path)))
    kw = dict(precision=precision, batch_size=batch, seq_len=seq)
    full = estimate_memory(arch, method="full", **kw).total_bytes
    lora = estimate_memory(arch, method="lora", **kw).total_bytes
    qlora = estimate_memory(arch, method="qlora", **kw).total_bytes
    assert qlora < lora < full


def test_lora_dropout_costs_a_mask_and_a_copy_per_adapted_input(smollm2_json):
    """With dropout every adapter keeps its own fp32 mask and lora_A input; without, q/k/v share one input."""
    arch = architecture(load_config(str(smollm2_json)))
    kw = dict(method="lora", precision="fp32", batch_size=1, seq_len=1000)
    with_dropout = estimate_memory(arch, **kw).bytes_of("activations")
    without = estimate_memory(arch, lora_dropout=0.0, **kw).bytes_of("activations")
    # per layer: 4 adapters x (4 B mask + 4 B input) x 576 vs one shared q/k/v input (o reads sdpa's output);
    # the first layer keeps no q/k/v masks
    assert with_dropout - without == 1000 * (30 * (4 * 8 * 576 - 4 * 576) - 3 * 4 * 576)


def test_more_tokens_rank_or_state_never_cost_less(smollm2_json):
    arch = architecture(load_config(str(smollm2_json)))

    def total(**kw):
        return estimate_memory(arch, **{"method": "lora", "precision": "bf16", **kw}).total_bytes

    assert total(batch_size=1) < total(batch_size=2) < total(batch_size=4)
    assert total(seq_len=256) < total(seq_len=1024)
    assert total(lora_r=8) < total(lora_r=64)
    assert total(gradient_checkpointing=True) < total()
    assert total(weight_dtype="bf16") < total()
    for method in ("full", "lora"):
        adam = total(method=method, optim="adamw")
        assert total(method=method, optim="sgd") < total(method=method, optim="adamw_8bit") < adam


# -- CLI ----------------------------------------------------------------------------------------------
def test_cli_prints_a_table(smollm2_json, capsys):
    from ftlab.cli import main

    rc = main(["memory", str(smollm2_json), "--method", "lora", "--precision", "bf16", "--batch-size", "4",
               "--seq-len", "512", "--lora-r", "8", "--gradient-checkpointing"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "134,515,008 total" in out and "921,600 trainable" in out  # r=8: half of r=16's 1,843,200
    for row in ("weights", "gradients", "optimizer states", "activations", "logits (loss)", "total", "assumptions"):
        assert row in out
    assert "GiB" in out and "gradient checkpointing" in out


def test_cli_directory_and_format(tmp_path, capsys):
    from ftlab.cli import main

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    assert main(["memory", str(tmp_path), "--method", "full", "--optim", "adamw_8bit", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    total = float(next(line.split()[1] for line in out.splitlines() if line.strip().startswith("total")))
    arch = architecture(load_config(str(tmp_path)))
    est = estimate_memory(arch, method="full", optim="adamw_8bit", precision="fp32", seq_len=1024)
    assert total == pytest.approx(est.total_gib, abs=1e-3)
    assert format_estimate(est).splitlines()[0].startswith("ftlab memory estimate:")


def test_cli_offline_hub_id_is_one_line_exit_2(monkeypatch, capsys):
    from ftlab.cli import main
    from ftlab.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    try:
        rc = main(["memory", "some-org/not-a-cached-model-xyz", "--method", "lora"])
    finally:
        hub_reachable.cache_clear()
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    assert len(lines) == 1 and "Hugging Face Hub" in lines[0]
    assert "Traceback" not in err


def test_cli_rejects_dropout_share_and_seq_len_out_of_range(smollm2_json, capsys):
    from ftlab.cli import main

    for extra, needle in [(["--method", "lora", "--lora-dropout", "5"], "--lora-dropout) must be in [0, 1); got 5"),
                          (["--supervised-share", "1.5"], "--supervised-share) must be in (0, 1]"),
                          (["--seq-len", "9000"], "--seq-len 9000 is beyond the context window")]:
        assert main(["memory", str(smollm2_json)] + extra) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_missing_path_and_bad_json(tmp_path, capsys):
    from ftlab.cli import main

    assert main(["memory", str(tmp_path / "nope")]) == 2
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["memory", str(bad)]) == 2
    bad.write_text(json.dumps({"hidden_size": 8}))
    assert main(["memory", str(bad)]) == 2
    errs = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftlab: error:")]
    assert len(errs) == 3


# -- sanity check on CPU: what autograd / AdamW really allocate ---------------------------------------
def saved_activation_bytes(model, input_ids, autocast: bool) -> int:
    """Bytes of the tensors autograd saves for backward (parameters excluded, shared storage counted once),
    without the logits: the per-layer part of the estimate."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    vocab = model.config.vocab_size

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen and not (t.dim() == 3 and t.shape[-1] == vocab):
            seen[ptr] = storage.nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        model(input_ids=input_ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method,dropout", [("full", 0.0), ("lora", 0.05), ("lora", 0.0)])
def test_activation_estimate_matches_saved_tensors(method, precision, dropout):
    """Per-token slope of the bytes autograd saves (two sequence lengths, so constant-size tensors such as
    autocast weight copies cancel) vs the estimate per token: within 5% (measured: within 2%)."""
    cfg = tiny_config()
    model = real_model(cfg)
    arch = architecture(cfg)
    mods = []
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                 target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM"))
        mods = arch.matching(DEFAULT_TARGETS)
    model.train()
    gen = torch.Generator().manual_seed(0)
    b1, b2 = (saved_activation_bytes(model, torch.randint(3, 256, (2, s), generator=gen), precision == "bf16")
              for s in (32, 64))
    measured = (b2 - b1) / (2 * 32)
    estimated = (arch.n_layers * layer_activation_bytes(arch, method, precision, 64, mods, 8, dropout)
                 + head_input_bytes(arch, method, precision) - frozen_prefix_savings(arch, method, mods, dropout))
    assert estimated == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_weights_grads_and_adamw_states_equal_the_estimate_exactly(method):
    """fp32 training on CPU: the bytes of parameters, gradients and AdamW states after a real step."""
    cfg = tiny_config()
    model = real_model(cfg)
    arch = architecture(cfg)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(DEFAULT_TARGETS),
                                                 task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(3, 256, (2, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    est = estimate_memory(arch, method=method, precision="fp32", lora_r=8, batch_size=2, seq_len=16)

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    assert nbytes(model.parameters()) == est.bytes_of("weights")
    assert nbytes(p.grad for p in trainable) == est.bytes_of("gradients")
    states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    assert nbytes(states) == est.bytes_of("optimizer states")
    assert est.trainable_params == sum(p.numel() for p in trainable)
    assert math.isclose(est.total_bytes, sum(b for _, b, _ in est.rows))


def test_a_frozen_head_saves_no_vocab_sized_tensor():
    """With the head frozen (as under LoRA) the loss keeps each supervised row's gradient (8 rows x h fp32),
    nothing vocab-sized: what the estimate's logits row keeps after its chunk is freed."""
    from ftlab.losses import frozen_head_weight, response_token_log_probs

    cfg = tiny_config()
    model = real_model(cfg).train()
    model.lm_head.weight.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)  # tied to the head
    assert frozen_head_weight(model) is not None
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 12:] = True
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}  # views of the head's weight are not
    shapes: list[tuple[int, ...]] = []                                       # activations

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        response_token_log_probs(model, ids, ids, mask).sum()
    assert not [s for s in shapes if cfg.vocab_size in s]
    assert (8, cfg.hidden_size) in shapes
    est = estimate_memory(architecture(cfg), method="lora", precision="fp32", batch_size=2, seq_len=16,
                          supervised_share=0.25)
    assert est.bytes_of("logits (loss)") == 8 * cfg.hidden_size * 4 + 8 * cfg.vocab_size * 8
