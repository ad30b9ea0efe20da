"""Loss and log-prob utilities for supervised fine-tuning (pure tensor functions).

Conventions used throughout:

* `labels` are *already shifted*: `labels[:, t]` is the token that should follow `input_ids[:, t]`,
  so `labels` has the same shape as `input_ids` and no `-100` sentinels are needed. Positions that
  must not be trained are excluded by a boolean `response_mask` instead; the label there must
  still be a valid token id (padding uses the pad id) because it is gathered before masking.
* Log-probs and entropies are computed in float32 whatever the model dtype: a bf16 log-softmax
  over a 150k vocabulary loses most of its mantissa.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch
from torch import Tensor


def compute_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) over the last dim; shape `logits.shape[:-1]`, float32.

    Uses H = logsumexp(z) - sum(softmax(z) * z) on max-shifted logits z, so it stays finite and
    accurate for huge logits (1e4) where exp() would overflow and the unshifted difference of two
    ~1e4 numbers would cancel catastrophically. `-inf` logits (banned tokens) contribute 0.
    """
    z = logits.float()
    z = z - z.amax(dim=-1, keepdim=True)  # max of each row is 0: no overflow, small magnitudes
    p = torch.softmax(z, dim=-1)
    p_times_z = torch.where(p > 0, p * z, torch.zeros_like(z))  # 0 * -inf would be NaN
    return torch.logsumexp(z, dim=-1) - p_times_z.sum(dim=-1)


def token_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """log_softmax(logits) gathered at `labels`, float32, without a second full-vocab tensor.

    log p(y) = z_y - logsumexp(z): only the gathered logit and one logsumexp per position are kept,
    instead of materialising (and saving for backward) a full (B, T, V) log-softmax.
    """
    logits = logits.float()
    picked = torch.gather(logits, dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def get_response_log_probs(
    model: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    return_token_entropy: bool = False,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-token log-probs of `labels` under `model` given `input_ids`.

    Returns {"log_probs": (B, T) float32} and, when asked, {"token_entropy": (B, T) float32}.
    The entropy is a diagnostic, computed without gradient so it does not keep a second full-vocab
    activation alive for backward.

    `use_cache=False` is passed on purpose: with the config default (`use_cache=True`) transformers
    5.x creates an empty KV cache, and its packed-sequence detection from `position_ids` is skipped
    whenever a cache exists, so packed examples would silently attend to each other (see
    `ftlab.data.collate.packed_collate`). A training forward never needs a cache anyway.
    """
    kwargs: dict[str, Any] = {"use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    logits = model(input_ids=input_ids, **kwargs).logits
    out = {"log_probs": token_log_probs(logits, labels)}
    if return_token_entropy:
        with torch.no_grad():
            out["token_entropy"] = compute_entropy(logits)
    return out


def response_token_log_probs(
    model: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    response_mask: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
) -> Tensor:
    """Log-probs of the supervised tokens only: shape (N,) float32, N = response_mask.sum(), row-major order.

    Equal to `get_response_log_probs(...)["log_probs"][response_mask]`, but faster for training. Why:
    the LM head (a vocab x hidden matmul, ~21% of SmolLM2-135M's forward FLOPs) and the full-vocab
    log-softmax are paid per position, yet only response positions carry loss. transformers accepts a
    boolean (B, T) `logits_to_keep`: the model then slices its final hidden states at the mask *before*
    its own head, so the head and whatever the model does to its logits (Gemma-2's softcapping, a
    logit_scale) run on the N kept positions only, inside the model's ordinary forward - DDP gradient
    sync, FSDP/ZeRO-3 parameter hooks and PEFT see nothing unusual. A model whose forward does not
    support the mask gets the full logits, sliced afterwards: same values, no speed-up.
    """
    mask = response_mask.bool()
    kwargs: dict[str, Any] = {"use_cache": False}  # see get_response_log_probs for why
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return log_probs_at(model, mask, labels[mask], input_ids=input_ids, **kwargs)


def log_probs_at(model: torch.nn.Module, mask: Tensor, labels: Tensor, select: Tensor | None = None,
                 **forward_kwargs: Any) -> Tensor:
    """log p(labels) at the True positions of `mask` (row-major), or at `select`, indices into those
    positions (one may be picked more than once): (len(labels),) float32.

    When the model's head is a frozen plain linear layer (LoRA, QLoRA) the head and the log-softmax run
    chunk by chunk on the final hidden states (`head_log_probs`), so no (N, vocab) logits are kept for
    backward; otherwise through the model's own head (`logits_at`). Same values either way.
    """
    weight = frozen_head_weight(model)
    if weight is None:
        logits = logits_at(model, mask, **forward_kwargs)
        return token_log_probs(logits if select is None else logits[select], labels)
    out = model(**forward_kwargs, logits_to_keep=torch.zeros_like(mask), output_hidden_states=True)
    hidden = out.hidden_states[-1][mask]
    return head_log_probs(hidden if select is None else hidden[select], weight, labels)


def logits_at(model: torch.nn.Module, mask: Tensor, **forward_kwargs: Any) -> Tensor:
    """The model's logits at the True positions of `mask` (N, vocab): sliced inside the model when it
    honours a boolean `logits_to_keep`, else sliced from the full logits (same values)."""
    if accepts_logits_to_keep(model, mask=True):
        return model(**forward_kwargs, logits_to_keep=mask).logits
    return model(**forward_kwargs).logits[mask]


def prompt_detached_log_probs(
    model: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    response_mask: Tensor,
    attention_mask: Tensor,
) -> Tensor:
    """`response_token_log_probs` with the prompt's keys and values computed without gradient.

    Each row is cut at its first supervised position: the prompt before it runs once under
    `no_grad` (left-padded, into a KV cache), the rest runs with gradient on top of that cache. The
    log-probs are the same values as a single forward gives (up to float rounding), but the gradient
    leaves out how the trainable weights change the prompt's representations, so the backward pass
    and the saved activations cover the response tokens only. When prompts are most of each example
    (PrOntoQA's contexts: ~190 of ~280 tokens), a step costs about two thirds of a full one. It is an
    approximation of the true gradient: measure what it costs on the task (docs/BENCHMARKS.md).

    Needs right-padded rows without packing (one example per row). Returns (N,) float32 in the same
    row-major order as `response_token_log_probs`.
    """
    mask = response_mask.bool()
    lengths = attention_mask.sum(1).tolist()
    cuts = [int(m.nonzero()[0]) if m.any() else n for m, n in zip(mask, lengths)]  # first supervised position
    rows, device = len(lengths), input_ids.device
    width_p = max(cuts)
    width_r = max(1, max(n - c for n, c in zip(lengths, cuts)))
    pad = int(input_ids[0, 0])  # any valid id: masked out
    prompt = torch.full((rows, width_p), pad, dtype=torch.long, device=device)
    prompt_mask = torch.zeros((rows, width_p), dtype=torch.long, device=device)
    rest = torch.full((rows, width_r), pad, dtype=torch.long, device=device)
    rest_mask = torch.zeros((rows, width_r), dtype=torch.long, device=device)
    rest_labels = torch.full((rows, width_r), pad, dtype=torch.long, device=device)
    kept = torch.zeros((rows, width_r), dtype=torch.bool, device=device)
    for i, (n, c) in enumerate(zip(lengths, cuts)):
        prompt[i, width_p - c:], prompt_mask[i, width_p - c:] = input_ids[i, :c], 1  # left padding
        rest[i, :n - c], rest_mask[i, :n - c] = input_ids[i, c:n], 1                # right padding
        rest_labels[i, :n - c], kept[i, :n - c] = labels[i, c:n], mask[i, c:n]
    cache_arg = cache_kwarg(model)
    with torch.no_grad():
        cache = getattr(model(input_ids=prompt, attention_mask=prompt_mask,
                              position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
                              use_cache=True, logits_to_keep=1), cache_arg)
    positions = torch.tensor(cuts, device=device).unsqueeze(1) + torch.arange(width_r, device=device)
    return log_probs_at(model, kept, rest_labels[kept], input_ids=rest,
                        attention_mask=torch.cat([prompt_mask, rest_mask], 1), position_ids=positions,
                        use_cache=True, **{cache_arg: cache})


class _HeadLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T) at `labels`, chunk by chunk, for a frozen `weight`.

    The gradient with respect to each row of `hidden` is computed in the forward pass, while that
    chunk's logits exist: d log p(y) / d h = W[y] - softmax(h W^T) W. Each row's log-prob depends on
    its own row only, so backward just scales these rows by the incoming gradient. Saved for backward:
    (N, hidden) instead of (N, vocab) logits; the matmul work is that of the ordinary forward and backward.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        rows = head_chunk_rows(weight.shape[0])
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                z = (hidden[start:start + rows].to(weight.dtype) @ weight.T).float()
                y = labels[start:start + rows].long()
                lse = torch.logsumexp(z, dim=-1)
                out[start:start + rows] = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse
                if grad is not None:
                    p = z.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place of the chunk's logits
                    p[torch.arange(len(y), device=p.device), y] -= 1.0
                    grad[start:start + rows] = -(p.to(weight.dtype) @ weight).float()
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad_out.unsqueeze(-1) * grad).to(ctx.hidden_dtype), None, None


def head_chunk_rows(vocab: int) -> int:
    """Rows of logits `head_log_probs` computes at a time: ~64 MB of float32 (341 rows of SmolLM2's 49,152)."""
    return max(16, 2**24 // vocab)


def head_log_probs(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """log_softmax(hidden @ weight.T) gathered at `labels`: (N,) float32, gradient to `hidden` only."""
    return _HeadLogProbs.apply(hidden, weight, labels)


_PLAIN_HEADS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def frozen_head_weight(model: torch.nn.Module) -> Tensor | None:
    """The output layer's weight when `head_log_probs` gives the model's own log-probs, else None.

    That needs a bias-free linear head that is not trained (LoRA leaves it frozen), held whole on this
    process (not sharded by FSDP or ZeRO-3), a model that honours a boolean `logits_to_keep`, and
    logits that are exactly the last hidden state times the weight: checked once per model on two
    tokens, so a model that rescales or softcaps its logits (Gemma-2, Cohere, Granite) keeps its head.
    """
    inner = _unwrapped(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if (not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.requires_grad
            or type(head.weight.data) is not torch.Tensor  # a DTensor or a quantized weight
            or tuple(head.weight.shape) != (head.out_features, head.in_features)  # ZeRO-3 keeps a shard
            or not accepts_logits_to_keep(model, mask=True)):
        return None
    if inner not in _PLAIN_HEADS:
        training = model.training
        model.eval()  # no dropout: the check draws nothing from the random streams a resumed run replays
        try:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([[1, 2]], device=head.weight.device), use_cache=False,
                            output_hidden_states=True)
        finally:
            model.train(training)
        hidden = out.hidden_states[-1] if out.hidden_states is not None else None
        _PLAIN_HEADS[inner] = hidden is not None and torch.allclose(
            (hidden.to(head.weight.dtype) @ head.weight.T).float(), out.logits.float(), rtol=1e-4, atol=1e-4)
    return head.weight if _PLAIN_HEADS[inner] else None


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward argument and output field of the KV cache: `cache` in recent transformers (where
    `past_key_values` is deprecated, to go in 5.40), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT forwards **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def accepts_logits_to_keep(model: Any, *, mask: bool = False) -> bool:
    """Whether `model`'s forward may be given `logits_to_keep`: the one probe of that feature.

    Callers need one of two different things, so the parameter picks which is checked:

    * `mask=False` - an int (`logits_to_keep=k`: the last k positions; generation's prefill and scoring).
      True when the forward names the argument or takes `**kwargs` (or the model says so through
      `_supports_logits_to_keep()`). A forward that takes `**kwargs` but ignores it returns every
      position's logits, which is harmless there: those callers slice the last positions themselves.
    * `mask=True` - a boolean (B, T) mask (`logits_at`, `response_token_log_probs`, `frozen_head_weight`),
      whose callers rely on getting only the N kept positions back. True only when the underlying
      transformers model's forward slices through `slice_logits_to_keep` (every text causal LM in
      transformers 5.2x) and this transformers' helper takes a mask; looks through DDP/FSDP/DeepSpeed
      (`.module`), torch.compile (`._orig_mod`) and PEFT wrappers.

    The two differ on purpose: a forward that takes the int may not honour a mask, and handing a mask to
    one that does not would give (B, T, vocab) logits where (N, vocab) are expected, or fail.
    """
    if mask:
        inner = _unwrapped(model)
        forward = inspect.unwrap(type(inner).forward)
        code = getattr(forward, "__code__", None)
        return code is not None and "slice_logits_to_keep" in code.co_names and _bool_logits_to_keep_supported()
    supports = getattr(model, "_supports_logits_to_keep", None)
    if callable(supports):
        return bool(supports())
    params = inspect.signature(model.forward).parameters
    return "logits_to_keep" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/FSDP/DeepSpeed (`.module`), torch.compile and PEFT wrappers."""
    for _ in range(8):  # wrappers nest a few levels at most
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            break
    return model


@functools.cache
def _bool_logits_to_keep_supported() -> bool:
    """transformers' `slice_logits_to_keep` takes a boolean (B, T) mask (checked once, on a toy tensor)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep

        kept = slice_logits_to_keep(torch.zeros(1, 3, 1), torch.tensor([[True, False, True]]))
    except (ImportError, IndexError, TypeError, RuntimeError):  # older transformers: no helper or no mask
        return False
    return tuple(kept.shape) == (2, 1)


def masked_normalize(
    tensor: Tensor,
    mask: Tensor,
    normalize_constant: float = 1.0,
    dim: int | None = None,
) -> Tensor:
    """Sum of `tensor` where `mask` is true, divided by `normalize_constant`; dim=None sums all.

    Uses `where` rather than multiplication so a -inf/NaN at a masked-out position cannot leak in
    (0 * -inf is NaN) and masked-out positions get exactly zero gradient.
    """
    kept = torch.where(mask.bool(), tensor, torch.zeros_like(tensor))
    total = kept.sum() if dim is None else kept.sum(dim=dim)
    return total / normalize_constant


def masked_mean(tensor: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `tensor` over positions where `mask` is true; dim=None averages everything.

    A slice with no masked element yields NaN (0/0) on purpose: an empty average is undefined, and
    clamping the count would report a misleading 0.
    """
    mask = mask.bool()
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_normalize(tensor, mask, 1.0, dim) / count


def sft_microbatch_train_step(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example-normalised SFT loss for one micro-batch; calls `loss.backward()` itself.

    A public building block of the CS336-style SFT API (`from ftlab import sft_microbatch_train_step`);
    the training loop (`ftlab.train.loop`) does not use it, and its normalisation is not the loop's:

    loss = -sum(log_probs * mask) / normalize_constant / batch_size / gradient_accumulation_steps,
    with batch_size = policy_log_probs.shape[0] (rows, however many supervised tokens each has): the
    mean over examples of each example's *summed* token loss. The loop divides each micro-batch's summed
    loss by the supervised tokens of the whole optimizer step over all processes (see
    `accumulation_loss`): a mean over tokens. Both weigh a step's supervised tokens alike, but their
    ratio is the step's supervised tokens per row / normalize_constant, which changes from step to step
    (here a step of longer answers gets a proportionally larger gradient); they agree only when
    normalize_constant is that number. Dividing by the accumulation steps makes the accumulated
    gradient that of the mean over the optimizer step's examples when all micro-batches have the same
    number of rows (and, under DDP, which averages gradients, on every process). Gradients
    *accumulate* into existing `.grad` (never zeroed).

    Returns (scaled loss, metadata) where metadata holds detached tensors: `unscaled_loss` (the
    micro-batch loss before dividing by the accumulation steps) and `num_response_tokens`.
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    batch_size = policy_log_probs.shape[0]
    unscaled = -masked_normalize(policy_log_probs, response_mask, normalize_constant) / batch_size
    loss = unscaled / gradient_accumulation_steps
    loss.backward()
    metadata = {
        "unscaled_loss": unscaled.detach(),
        "num_response_tokens": response_mask.bool().sum().detach(),
    }
    return loss, metadata


def accumulation_loss(log_probs: Tensor, response_mask: Tensor, n_tokens_in_step: int | Tensor) -> Tensor:
    """Token-normalised loss contribution of one micro-batch (torchtitan-style); no backward here.

    Each micro-batch returns sum(-log_probs over its supervised tokens) / n_tokens_in_step, where
    n_tokens_in_step counts the supervised tokens of the *whole optimizer step* (all micro-batches).
    Summing the micro-batch gradients then gives exactly the gradient of the mean token loss over
    the step, independent of how examples are split into micro-batches or padded. (Averaging
    per-micro-batch means instead over-weights tokens in micro-batches with few tokens.)

    This is the loop's rule for one process, as a standalone function; the loop does not call it. Its
    objectives return the summed loss of a micro-batch (SFT: -sum of the supervised tokens' log-probs,
    computed on those positions only), and `ftlab.train.loop` multiplies that by
    world_size / (supervised tokens of the step summed over all processes), because DDP averages
    gradients across ranks. Here, under data parallelism, n_tokens_in_step must likewise be the
    all-reduced global count and the loss be multiplied by the world size. Kept as a building block
    (public in `ftlab.losses`, not re-exported by `ftlab`) and as the reference the tests check the
    trainer's token-normalised loss against.
    """
    if isinstance(n_tokens_in_step, int) and n_tokens_in_step < 1:
        raise ValueError(f"n_tokens_in_step must be >= 1, got {n_tokens_in_step}")
    return -masked_normalize(log_probs, response_mask) / n_tokens_in_step


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO losses and implicit rewards: (losses, chosen_rewards, rejected_rewards), each of shape (B,).

    Inputs are per-pair sequence log-probs (summed over the response tokens) under the policy and the
    reference. With h = (pc - rc) - (pr - rr), the policy's log-ratio margin over the reference:

    * sigmoid (DPO):  -logsigmoid(beta * h)
    * sigmoid with label_smoothing = eps > 0 (conservative DPO, the preference label flipped with
      probability eps):  -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
    * ipo:  (h - 1 / (2 * beta)) ** 2; with `chosen_tokens`/`rejected_tokens` (response token counts)
      each log-ratio is first divided by its count, as TRL and the IPO authors do (per-token scale)
    * hinge (SLiC):  relu(1 - beta * h)

    Rewards are beta * (pc - rc) and beta * (pr - rr), detached (they are logged, not trained on).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' (conservative DPO), not {loss_type!r}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        h = beta * (chosen_ratio - rejected_ratio)
        losses = -torch.nn.functional.logsigmoid(h)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * torch.nn.functional.logsigmoid(-h)
    elif loss_type == "ipo":
        if chosen_tokens is not None and rejected_tokens is not None:
            h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        else:
            h = chosen_ratio - rejected_ratio
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
