"""Tests for ftlab.losses; expected values are derived by hand in the comments."""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from ftlab.data.collate import pad_collate
from ftlab.losses import (
    accepts_logits_to_keep,
    accumulation_loss,
    compute_entropy,
    frozen_head_weight,
    get_response_log_probs,
    head_log_probs,
    masked_mean,
    masked_normalize,
    prompt_detached_log_probs,
    response_token_log_probs,
    sft_microbatch_train_step,
    token_log_probs,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


# ---------------------------------------------------------------- entropy


def test_entropy_uniform_is_log_vocab():
    # softmax of equal logits is uniform over V=4 -> H = log 4, whatever the constant
    logits = torch.full((2, 3, 4), 7.0)
    h = compute_entropy(logits)
    assert h.shape == (2, 3)
    torch.testing.assert_close(h, torch.full((2, 3), LN4))


def test_entropy_by_hand():
    # logits [0, ln 3] -> p = [1/4, 3/4]
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 1/4 ln 4 + 3/4 (ln 4 - ln 3) = ln 4 - 3/4 ln 3 = 0.5623351
    h = compute_entropy(torch.tensor([0.0, LN3]))
    assert h.shape == ()
    assert h.item() == pytest.approx(LN4 - 0.75 * LN3, abs=1e-6)


def test_entropy_stable_for_huge_logits():
    # [1e4, 0, -1e4]: all mass on token 0 -> H = 0; [1e4, 1e4, -1e4]: two equal tokens -> H = ln 2.
    # A naive exp(1e4) overflows to inf and gives NaN.
    h = compute_entropy(torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4, -1e4]]))
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h, torch.tensor([0.0, LN2]), atol=1e-5, rtol=0)


def test_entropy_ignores_minus_inf_logits():
    # a banned token (-inf) has p = 0 and contributes 0 (not NaN from 0 * -inf): H = ln 2
    h = compute_entropy(torch.tensor([0.0, float("-inf"), 0.0]))
    assert h.item() == pytest.approx(LN2, abs=1e-6)


# ---------------------------------------------------------------- log-probs


class TableModel(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: a 'model' whose outputs we can write by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.seen_kwargs: dict = {}

    def forward(self, input_ids, **kwargs):
        self.seen_kwargs = kwargs
        return SimpleNamespace(logits=self.table[input_ids])


def test_token_log_probs_by_hand():
    # row logits [0, ln 3] -> p = [1/4, 3/4] -> log p = [-ln 4, ln 3 - ln 4]
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3]]])
    labels = torch.tensor([[0, 1]])
    expected = torch.tensor([[-LN4, LN3 - LN4]])
    torch.testing.assert_close(token_log_probs(logits, labels), expected)


def test_get_response_log_probs_by_hand():
    # token 0 -> logits [0, ln 3] (p = 1/4, 3/4); token 1 -> logits [0, 0] (p = 1/2, 1/2)
    model = TableModel(torch.tensor([[0.0, LN3], [0.0, 0.0]]))
    input_ids = torch.tensor([[0, 1, 0]])
    labels = torch.tensor([[1, 0, 0]])
    # pos 0: input 0, label 1 -> ln(3/4); pos 1: input 1, label 0 -> ln(1/2); pos 2: input 0, label 0 -> ln(1/4)
    out = get_response_log_probs(model, input_ids, labels, return_token_entropy=True)
    torch.testing.assert_close(out["log_probs"], torch.tensor([[LN3 - LN4, -LN2, -LN4]]))
    # entropies: p=[1/4,3/4] -> ln4 - 3/4 ln3; uniform over 2 -> ln 2
    h1 = LN4 - 0.75 * LN3
    torch.testing.assert_close(out["token_entropy"], torch.tensor([[h1, LN2, h1]]))
    assert out["log_probs"].requires_grad and not out["token_entropy"].requires_grad
    # a training forward never uses a KV cache (it would also disable packed-sequence isolation)
    assert model.seen_kwargs["use_cache"] is False
    assert "attention_mask" not in model.seen_kwargs and "position_ids" not in model.seen_kwargs


def test_get_response_log_probs_matches_log_softmax_on_tiny_llama(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (2, 6))
    labels = torch.randint(0, 32, (2, 6))
    out = get_response_log_probs(tiny_llama, ids, labels, return_token_entropy=True)
    logits = tiny_llama(ids).logits
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out["log_probs"], expected, atol=1e-5, rtol=0)
    assert out["log_probs"].shape == (2, 6) and out["token_entropy"].shape == (2, 6)


# ---------------------------------------------------------------- masked reductions

T = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[True, False, True], [False, True, False]])


def test_masked_normalize_by_hand():
    # kept elements: 1, 3 (row 0) and 5 (row 1)
    assert masked_normalize(T, M, 2.0).item() == pytest.approx((1 + 3 + 5) / 2)  # 4.5
    torch.testing.assert_close(masked_normalize(T, M, 2.0, dim=1), torch.tensor([4 / 2, 5 / 2]))
    torch.testing.assert_close(masked_normalize(T, M, 2.0, dim=0), torch.tensor([1 / 2, 5 / 2, 3 / 2]))
    torch.testing.assert_close(masked_normalize(T, M), torch.tensor(9.0))  # default constant 1


def test_masked_reductions_do_not_leak_masked_out_inf():
    # -inf where the mask is False must not turn the result into NaN (0 * -inf)
    t = torch.tensor([1.0, float("-inf")])
    m = torch.tensor([True, False])
    assert masked_normalize(t, m).item() == 1.0
    assert masked_mean(t, m).item() == 1.0


def test_masked_mean_by_hand():
    # all: (1 + 3 + 5) / 3 = 3; rows: (1 + 3) / 2 = 2 and 5 / 1 = 5; columns: 1/1, 5/1, 3/1
    assert masked_mean(T, M).item() == pytest.approx(3.0)
    torch.testing.assert_close(masked_mean(T, M, dim=1), torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(masked_mean(T, M, dim=0), torch.tensor([1.0, 5.0, 3.0]))


def test_masked_mean_empty_slice_is_nan():
    # no masked element -> 0 / 0 = NaN, no clamping
    assert torch.isnan(masked_mean(T, torch.zeros_like(M)))
    row_mask = torch.tensor([[True, True, False], [False, False, False]])
    out = masked_mean(T, row_mask, dim=1)
    assert out[0].item() == pytest.approx(1.5) and torch.isnan(out[1])


# ---------------------------------------------------------------- train step / accumulation loss

LP = [[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]]
LP_MASK = torch.tensor([[True, True, False], [False, True, True]])  # supervised: -1 -2 -5 -6


def test_sft_microbatch_train_step_by_hand():
    lp = torch.tensor(LP, requires_grad=True)
    # masked sum = -1 - 2 - 5 - 6 = -14; batch 2, accumulation 4: loss = 14 / 2 / 4 = 1.75
    loss, meta = sft_microbatch_train_step(lp, LP_MASK, gradient_accumulation_steps=4)
    assert loss.item() == pytest.approx(1.75)
    assert meta["unscaled_loss"].item() == pytest.approx(7.0)  # 14 / 2, before / 4
    assert meta["num_response_tokens"].item() == 4
    assert not meta["unscaled_loss"].requires_grad
    # d loss / d lp = -mask / (2 * 4) = -0.125 on supervised positions, 0 elsewhere
    expected_grad = -0.125 * LP_MASK.float()
    torch.testing.assert_close(lp.grad, expected_grad)

    # a second call accumulates into the existing .grad (never zeroes it): grad doubles
    sft_microbatch_train_step(lp, LP_MASK, gradient_accumulation_steps=4)
    torch.testing.assert_close(lp.grad, 2 * expected_grad)


def test_sft_microbatch_train_step_normalize_constant():
    lp = torch.tensor(LP, requires_grad=True)
    # 14 / 2 (constant) / 2 (batch) / 1 (accumulation) = 3.5; grad = -1 / 4 on supervised positions
    loss, _ = sft_microbatch_train_step(lp, LP_MASK, gradient_accumulation_steps=1, normalize_constant=2.0)
    assert loss.item() == pytest.approx(3.5)
    torch.testing.assert_close(lp.grad, -0.25 * LP_MASK.float())


def test_per_example_rule_differs_from_the_loops_by_a_factor_that_changes_per_step():
    """Both rules weigh a step's supervised tokens alike; `sft_microbatch_train_step` divides by rows x
    accumulation steps x normalize_constant, the loop's rule (`accumulation_loss`) by the step's supervised
    tokens: the ratio is the step's supervised tokens per row, which changes from step to step."""
    for mask, tokens in ((LP_MASK, 4), (torch.ones(2, 3, dtype=torch.bool), 6)):
        per_token = torch.tensor(LP, requires_grad=True)
        accumulation_loss(per_token, mask, n_tokens_in_step=tokens).backward()
        per_example = torch.tensor(LP, requires_grad=True)
        sft_microbatch_train_step(per_example, mask, gradient_accumulation_steps=1)
        torch.testing.assert_close(per_example.grad, per_token.grad * tokens / 2)  # 2 rows
        per_example.grad = None  # equal when normalize_constant is that step's tokens per row
        sft_microbatch_train_step(per_example, mask, gradient_accumulation_steps=1, normalize_constant=tokens / 2)
        torch.testing.assert_close(per_example.grad, per_token.grad)


def test_accumulation_loss_by_hand():
    lp = torch.tensor(LP, requires_grad=True)
    # 4 tokens here but 7 in the whole optimizer step: 14 / 7 = 2; grad = -1/7 on supervised positions
    loss = accumulation_loss(lp, LP_MASK, n_tokens_in_step=7)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(lp.grad, -LP_MASK.float() / 7)
    with pytest.raises(ValueError):
        accumulation_loss(lp, LP_MASK, n_tokens_in_step=0)


# ---------------------------------------------------------------- gradient accumulation equivalence


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(cfg).float().train()


def _examples(n: int = 8, turns: int = 1) -> list[dict]:
    """n examples of distinct lengths (so micro-batch padding differs from full-batch padding). With
    `turns=2` each has a follow-up: an unsupervised question of 1-2 tokens between two supervised answers."""
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(n):
        length = 3 + (5 * k) % n + k % 3  # 3..12, varied order
        ids = torch.randint(1, 32, (length + 1,), generator=g).tolist()
        prompt_len = 1 + k % 3
        question = range(0)  # positions of the follow-up question (unsupervised)
        if turns == 2:
            start = prompt_len + (length - prompt_len) // 2
            question = range(start, start + 1 + k % 2)
        mask = [j + 1 >= prompt_len and j not in question for j in range(length)]
        out.append({"input_ids": ids[:-1], "labels": ids[1:], "response_mask": mask})
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run_step(model, examples, micro_batch: int, loss_fn) -> dict[str, torch.Tensor]:
    """One optimizer step's worth of backward passes; returns the accumulated gradients."""
    model.zero_grad(set_to_none=True)
    n_tokens = sum(sum(ex["response_mask"]) for ex in examples)
    gas = len(examples) // micro_batch
    for start in range(0, len(examples), micro_batch):
        batch = pad_collate(examples[start : start + micro_batch], pad_id=0)
        lp = get_response_log_probs(
            model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"]
        )["log_probs"]
        loss_fn(lp, batch["response_mask"], n_tokens, gas)
    return _grads(model)


def _token_rule(lp, mask, n_tokens, gas):
    accumulation_loss(lp, mask, n_tokens).backward()


def _per_example_rule(lp, mask, n_tokens, gas):
    sft_microbatch_train_step(lp, mask, gradient_accumulation_steps=gas)


def _naive_mean_of_means(lp, mask, n_tokens, gas):
    (-masked_mean(lp, mask) / gas).backward()


def _assert_same_grads(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("rule", [_token_rule, _per_example_rule], ids=["global-token-count", "per-example"])
def test_gradient_accumulation_equivalence(tiny_llama, rule):
    examples = _examples(8)
    assert len({len(ex["input_ids"]) for ex in examples[0::2]}) > 1  # padding really differs
    one_batch = _run_step(tiny_llama, examples, micro_batch=8, loss_fn=rule)   # accumulation 1
    four_micro = _run_step(tiny_llama, examples, micro_batch=2, loss_fn=rule)  # accumulation 4
    _assert_same_grads(one_batch, four_micro)


def test_naive_mean_of_micro_batch_means_is_not_equivalent(tiny_llama):
    # sanity check that the equivalence test has teeth: averaging per-micro-batch token means
    # weights tokens differently when micro-batches hold different token counts
    examples = _examples(8)
    a = _run_step(tiny_llama, examples, micro_batch=8, loss_fn=_naive_mean_of_means)
    b = _run_step(tiny_llama, examples, micro_batch=2, loss_fn=_naive_mean_of_means)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4


# ---------------------------------------------------------------- LM head on supervised positions only


def _lora(model):
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, p in lora.named_parameters():  # B = 0 at init would make the adapter a no-op: give it weight
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return lora.train()


@contextmanager
def _head_rows(model):
    """Yields a list that receives the number of rows the LM head is applied to, per forward."""
    rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        yield rows
    finally:
        hook.remove()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_response_token_log_probs_match_the_full_logits_path(tiny_llama, kind):
    model = tiny_llama if kind == "full" else _lora(tiny_llama)
    batch = pad_collate(_examples(8), pad_id=0)  # padded: attention_mask and padding rows
    mask = batch["response_mask"]
    assert accepts_logits_to_keep(model, mask=True)
    assert (frozen_head_weight(model) is not None) == (kind == "lora")  # LoRA leaves the head frozen
    with _head_rows(model) as rows:
        fast = response_token_log_probs(model, batch["input_ids"], batch["labels"], mask,
                                        attention_mask=batch["attention_mask"])
    if kind == "full":
        assert rows == [int(mask.sum())] < [mask.numel()]  # the head ran on the supervised positions only
    else:
        assert rows == [0]  # the head's matmul ran in head_log_probs, on the supervised positions
    full = get_response_log_probs(model, batch["input_ids"], batch["labels"],
                                  attention_mask=batch["attention_mask"])["log_probs"]
    assert fast.dtype == torch.float32 and fast.shape == (int(mask.sum()),)
    torch.testing.assert_close(fast, full[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_training_step_on_supervised_positions_equals_the_full_logits_step(tiny_llama, kind):
    """Token-normalised loss and its gradients: same as accumulation_loss over the full (B, T) log-probs."""
    model = tiny_llama if kind == "full" else _lora(tiny_llama)
    examples = _examples(8)
    n_tokens = sum(sum(ex["response_mask"]) for ex in examples)
    batch = pad_collate(examples, pad_id=0)
    args = (model, batch["input_ids"], batch["labels"])

    model.zero_grad(set_to_none=True)
    lp = response_token_log_probs(*args, batch["response_mask"], attention_mask=batch["attention_mask"])
    fast_loss = -lp.sum() / n_tokens  # what ftlab.train.sft.train_step computes
    fast_loss.backward()
    fast_grads = _grads(model)

    model.zero_grad(set_to_none=True)
    full = get_response_log_probs(*args, attention_mask=batch["attention_mask"])["log_probs"]
    full_loss = accumulation_loss(full, batch["response_mask"], n_tokens)
    full_loss.backward()
    torch.testing.assert_close(fast_loss, full_loss, atol=1e-5, rtol=0)
    _assert_same_grads(fast_grads, _grads(model))
    model.zero_grad(set_to_none=True)


def test_response_token_log_probs_keep_the_models_logit_softcapping():
    """Gemma-2 softcaps its logits after the head: with the mask the model still does it, on N rows."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, final_logit_softcapping=0.5)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    batch = pad_collate(_examples(4), pad_id=0)
    mask = batch["response_mask"]
    fast = response_token_log_probs(model, batch["input_ids"], batch["labels"], mask,
                                    attention_mask=batch["attention_mask"])
    # by hand: final hidden states -> head -> tanh(z / cap) * cap -> log_softmax -> gather
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).last_hidden_state
    z = torch.tanh(model.lm_head(hidden[mask]) / 0.5) * 0.5
    expected = torch.log_softmax(z.float(), -1).gather(-1, batch["labels"][mask].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=0)
    uncapped = torch.log_softmax(model.lm_head(hidden[mask]).float(), -1)
    assert not torch.allclose(uncapped.gather(-1, batch["labels"][mask].unsqueeze(-1)).squeeze(-1), expected)


def test_head_log_probs_by_hand():
    # h = [1, 0] against W rows [0, 0] and [ln 3, 0]: z = [0, ln 3], p = [1/4, 3/4], log p(1) = ln 3 - ln 4;
    # d log p(1) / d h = W[1] - (1/4 W[0] + 3/4 W[1]) = [ln 3 / 4, 0]. h = [0, 1]: z = [0, 0], log p(0) = -ln 2,
    # gradient W[0] - (W[0] + W[1]) / 2 = [-ln 3 / 2, 0]. The loss weights the rows by 2 and -1.
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    weight = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    out = head_log_probs(hidden, weight, torch.tensor([1, 0]))
    torch.testing.assert_close(out, torch.tensor([LN3 - LN4, -LN2]))
    (2 * out[0] - out[1]).backward()
    torch.testing.assert_close(hidden.grad, torch.tensor([[2 * LN3 / 4, 0.0], [LN3 / 2, 0.0]]))


def test_head_log_probs_chunks_give_the_one_matmul_values_and_gradients():
    """More rows than one chunk holds (2**24 // vocab rows with a 2**20 vocabulary: 16): same as log_softmax,
    checked against float64 on the same inputs. The float32 tolerance comes from the size of the sum: a
    softmax over V terms rounds like ~sqrt(V) float32 additions, in an order that differs between CPU kernels
    (one-matmul and chunked gradients differed by 9.8e-5 on one CPU, by < 1e-5 on another)."""
    torch.manual_seed(0)
    vocab = 2**20
    hidden = torch.randn(40, 8, requires_grad=True)
    weight, labels = torch.randn(vocab, 8) / 4, torch.randint(0, vocab, (40,))
    scale = torch.randn(40)
    values = head_log_probs(hidden, weight, labels)
    (values * scale).sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    expected = torch.log_softmax(h64 @ weight.double().T, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (expected * scale.double()).sum().backward()
    tol = 8 * torch.finfo(torch.float32).eps * vocab**0.5  # ~1e-3; a wrong chunk boundary is off by O(1)
    torch.testing.assert_close(values.double(), expected.detach(), rtol=0, atol=tol)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=0, atol=tol)


def test_frozen_head_is_used_only_where_it_gives_the_models_logits():
    """A frozen head of a softcapping model (Gemma-2 with LoRA) stays the model's own; values unchanged."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, final_logit_softcapping=0.5)
    capped = _lora(AutoModelForCausalLM.from_config(cfg).float())
    assert accepts_logits_to_keep(capped, mask=True) and frozen_head_weight(capped) is None
    batch = pad_collate(_examples(4), pad_id=0)
    mask = batch["response_mask"]
    with _head_rows(capped) as rows:
        fast = response_token_log_probs(capped, batch["input_ids"], batch["labels"], mask,
                                        attention_mask=batch["attention_mask"])
    assert rows == [int(mask.sum())]
    full = get_response_log_probs(capped, batch["input_ids"], batch["labels"],
                                  attention_mask=batch["attention_mask"])["log_probs"]
    torch.testing.assert_close(fast, full[mask], atol=1e-5, rtol=0)


def test_response_token_log_probs_falls_back_to_full_logits_for_other_models():
    # TableModel knows nothing of logits_to_keep: it never gets it, and the full logits are sliced after
    model = TableModel(torch.tensor([[0.0, LN3], [0.0, 0.0]]))
    assert not accepts_logits_to_keep(model, mask=True)
    assert accepts_logits_to_keep(model)  # an int may be passed (**kwargs), which says nothing of a mask
    input_ids = torch.tensor([[0, 1, 0]])
    labels = torch.tensor([[1, 0, 0]])
    mask = torch.tensor([[True, False, True]])
    out = response_token_log_probs(model, input_ids, labels, mask)
    torch.testing.assert_close(out, torch.tensor([LN3 - LN4, -LN4]))  # positions 0 and 2, see above
    assert "logits_to_keep" not in model.seen_kwargs and model.seen_kwargs["use_cache"] is False


def test_logits_to_keep_mask_probe_looks_through_wrappers(tiny_llama):
    class Wrapper(torch.nn.Module):  # like DDP / DeepSpeed: the model is `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert accepts_logits_to_keep(Wrapper(tiny_llama), mask=True)
    assert accepts_logits_to_keep(Wrapper(_lora(tiny_llama)), mask=True)


def test_logits_to_keep_int_probe():
    class Plain(torch.nn.Module):  # a forward with neither the argument nor **kwargs
        def forward(self, input_ids):
            return input_ids

    class Named(torch.nn.Module):
        def forward(self, input_ids, logits_to_keep=0):
            return input_ids

    assert not accepts_logits_to_keep(Plain()) and accepts_logits_to_keep(Named())
    assert not accepts_logits_to_keep(Named(), mask=True)  # takes the argument, slices nothing by a mask


# ---------------------------------------------------------------- prompt keys/values without gradient


def _grads_of(log_probs_fn, model, batch) -> dict[str, torch.Tensor]:
    """Gradients of the summed NLL of the batch's supervised tokens under `log_probs_fn`."""
    model.zero_grad(set_to_none=True)
    lp = log_probs_fn(model, batch["input_ids"], batch["labels"], batch["response_mask"],
                      attention_mask=batch["attention_mask"])
    (-lp.sum()).backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(("kind", "turns"), [("full", 1), ("lora", 1), ("lora", 2)])
def test_prompt_detached_log_probs_are_the_values_of_one_forward(tiny_llama, kind, turns):
    """Prompts of 1-3 tokens cut at different places, rows padded to different widths, with or without a
    follow-up turn (its question runs with the answers, after the cut): same log-probs, and the LM head runs
    on the supervised positions only."""
    model = tiny_llama if kind == "full" else _lora(tiny_llama)
    batch = pad_collate(_examples(8, turns), pad_id=0)
    if turns == 2:  # every row has an unsupervised gap after its first supervised token
        lengths = batch["attention_mask"].sum(1).tolist()
        assert all(not m[int(m.nonzero()[0]):n].all() for m, n in zip(batch["response_mask"].bool(), lengths))
    mask = batch["response_mask"]
    frozen_head_weight(model)  # the once-per-model check of the head, before counting its rows
    with _head_rows(model) as rows:
        detached = prompt_detached_log_probs(model, batch["input_ids"], batch["labels"], mask,
                                             attention_mask=batch["attention_mask"])
    # prompt pass: one position a row; then the N supervised (in head_log_probs when the head is frozen)
    assert rows == [len(mask), int(mask.sum()) if kind == "full" else 0]
    full = response_token_log_probs(model, batch["input_ids"], batch["labels"], mask,
                                    attention_mask=batch["attention_mask"])
    torch.testing.assert_close(detached, full, atol=1e-5, rtol=0)


def test_prompt_detached_gradient_leaves_out_the_prompt_path_only(tiny_llama):
    """Weights that cannot change a prompt's keys and values (the last layer after its K/V projections,
    the final norm, the head) get the exact gradient; the first layer's K/V projections do not; and an
    embedding row gets gradient only if its token occurs from the first supervised position on."""
    examples = _examples(8)
    for ex in examples:  # token 31 opens every prompt of 2+ tokens and occurs nowhere else
        ids = [t if t != 31 else 30 for t in ex["input_ids"]]
        ex["input_ids"] = [31] + ids[1:] if ex["response_mask"].index(True) > 0 else ids
    batch = pad_collate(examples, pad_id=0)
    detached = _grads_of(prompt_detached_log_probs, tiny_llama, batch)
    full = _grads_of(response_token_log_probs, tiny_llama, batch)
    exact = [n for n in full if n.startswith(("model.layers.1.mlp", "model.layers.1.post_attention",
                                                "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj",
                                                "model.norm", "lm_head"))]
    assert len(exact) == 8
    for name in exact:
        torch.testing.assert_close(detached[name], full[name], atol=1e-5, rtol=0, msg=name)
    k0 = "model.layers.0.self_attn.k_proj.weight"
    assert (detached[k0] - full[k0]).abs().max() > 1e-4
    after_cut = {t for ex in examples for i, t in enumerate(ex["input_ids"]) if i >= ex["response_mask"].index(True)}
    rows_with_grad = set(detached["model.embed_tokens.weight"].abs().sum(1).nonzero().flatten().tolist())
    assert 31 not in after_cut and rows_with_grad == after_cut
    assert 31 in set(full["model.embed_tokens.weight"].abs().sum(1).nonzero().flatten().tolist())


# ---------------------------------------------------------------- grouped-query attention on CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="ftlab leaves transformers' choice where CUDA runs")
def test_cpu_attention_takes_key_value_groups_as_they_are(tiny_llama, monkeypatch):
    """ftlab lets torch's CPU sdpa read the grouped keys/values (no repeat per query head, which autograd
    would save 2x over here): same log-probs and gradients on padded rows as with the repeated heads."""
    import transformers.integrations.sdpa_attention as sdpa

    import ftlab.models.load  # noqa: F401  (sets the switch on import)

    repeats: list[int] = []
    repeat_kv = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: repeats.append(n) or repeat_kv(x, n))
    batch = pad_collate(_examples(8), pad_id=0)
    assert tiny_llama.config.num_attention_heads == 2 * tiny_llama.config.num_key_value_heads
    assert not batch["attention_mask"].bool().all()  # a padding mask reaches the attention

    def log_probs_and_grads():
        tiny_llama.zero_grad(set_to_none=True)
        lp = response_token_log_probs(tiny_llama, batch["input_ids"], batch["labels"], batch["response_mask"],
                                      attention_mask=batch["attention_mask"])
        (-lp.sum()).backward()
        return lp.detach(), _grads(tiny_llama)

    assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    grouped, grouped_grads = log_probs_and_grads()
    assert repeats == []
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "0")
    repeated, repeated_grads = log_probs_and_grads()
    assert repeats == [2] * 4  # keys and values of both layers
    torch.testing.assert_close(grouped, repeated, atol=1e-5, rtol=0)
    _assert_same_grads(grouped_grads, repeated_grads)
    tiny_llama.zero_grad(set_to_none=True)
