"""Generation engine: greedy identity with `model.generate`, order, stop strings, sampling, truncation, fallback,
log-probs against a teacher-forced forward pass, shared prefill of n samples.

Everything runs on a tiny random Llama (hidden 32, 2 layers) and an in-memory word-level tokenizer,
so the whole file takes seconds on a CPU.
"""
from __future__ import annotations

import logging
import random
import warnings

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ftlab.errors import UserError
from ftlab.generate import GenerationConfig, HFEngine, make_engine
from ftlab.generate.base import cut_at_stop
from ftlab.generate.batch import Batch
from ftlab.generate.prefill import Prefiller, shared_prefix_length

WORDS = [f"w{i}" for i in range(60)]
PAD, EOS = 0, 1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second OpenMP thread only adds barriers, which a busy shared CPU makes ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Very different lengths (1 to 40 tokens), so padding, eviction and refill all happen."""
    rnd = random.Random(0)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.choice([1, 3, 8, 20, 40]))) for _ in range(11)]


def plain_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """The reference: file-order batches through `model.generate(do_sample=False)` with left padding."""
    tokenizer.padding_side = "left"
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            new = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)[:, enc.input_ids.shape[1] :]
        out += [row[: row.index(EOS) + 1] if EOS in row else row for row in new.tolist()]
    return out


@pytest.mark.parametrize("refill", [True, False])
def test_greedy_tokens_identical_to_plain_generate(model, tokenizer, prompts, refill):
    cfg = GenerationConfig(max_new_tokens=24, batch_size=3)  # fewer slots than prompts: rows get refilled
    engine = HFEngine(model, tokenizer, refill=refill)
    got = [samples[0] for samples in engine.generate_tokens(prompts, cfg, progress=False)]
    want = plain_generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=24)
    assert got == want
    assert any(len(w) < 24 for w in want), "no sequence stopped at EOS: eviction was not exercised"
    assert engine.stats["new_tokens"] == sum(len(w) for w in want)


def test_more_slots_than_the_plain_batch_gives_the_same_tokens(model, tokenizer, prompts):
    """The default engine decodes many rows per step (64); the tokens must not depend on it."""
    assert GenerationConfig().batch_size == 64
    engine = HFEngine(model, tokenizer)
    got = [samples[0] for samples in engine.generate_tokens(prompts, GenerationConfig(max_new_tokens=24),
                                                           progress=False)]
    assert engine.stats["decode_steps"] <= 24  # all 11 prompts decoded side by side
    assert got == plain_generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=24)


def test_shared_prefix_is_computed_once_and_tokens_still_match(model, tokenizer, prompts):
    """Chat templates give every prompt the same start; its K/V are computed once and reused."""
    with_prefix = ["w1 w2 w3 w4 w5 w6 " + p for p in prompts]
    cfg = GenerationConfig(max_new_tokens=20, batch_size=4)
    engine = HFEngine(model, tokenizer)
    got = [s[0] for s in engine.generate_tokens(with_prefix, cfg, progress=False)]
    assert engine.stats["shared_prefix_tokens"] == 6
    assert got == plain_generate(model, tokenizer, with_prefix, batch_size=4, max_new_tokens=20)


def test_pads_between_prefix_and_text_are_masked(model, tokenizer):
    """One chunk, same first column for every row, but pads after the shared prefix: the mask must stay."""
    prefix = "w1 w2 w3 w4 w5 w6 "
    prompts = [prefix + " ".join(WORDS[:40]), prefix + " ".join(WORDS[20:57])]  # 40 and 37 text tokens
    cfg = GenerationConfig(max_new_tokens=12, batch_size=2)
    got = [s[0] for s in HFEngine(model, tokenizer).generate_tokens(prompts, cfg, progress=False)]
    assert got == plain_generate(model, tokenizer, prompts, batch_size=2, max_new_tokens=12)


def short_long_interleaved(encoded: list[list[int]]) -> list[int]:
    """Admission order shortest, longest, 2nd shortest, ...: a newcomer is often longer than the window."""
    ascending = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    return [ascending[j // 2] if j % 2 == 0 else ascending[-1 - j // 2] for j in range(len(ascending))]


def test_window_moves_keep_tokens_identical(model, tokenizer, prompts, monkeypatch):
    """Newcomers longer than the running window make it move right; many steps in few slots make it
    wrap back to column 0. Neither may change a token."""
    moves: list[int] = []
    shift = Batch._shift
    monkeypatch.setattr(Batch, "_shift", lambda self, delta: (moves.append(delta), shift(self, delta))[1])
    monkeypatch.setattr(HFEngine, "_admission_order", staticmethod(short_long_interleaved))
    cfg = GenerationConfig(max_new_tokens=30, batch_size=4)
    got = [s[0] for s in HFEngine(model, tokenizer).generate_tokens(prompts, cfg, progress=False)]
    assert any(d > 0 for d in moves) and any(d < 0 for d in moves), moves
    assert got == plain_generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=30)


def test_fallback_path_also_matches(model, tokenizer, prompts):
    """Models the slot cache cannot mimic go through `model.generate` on sorted batches."""
    engine = HFEngine(model, tokenizer)
    engine._plain_cache = False
    cfg = GenerationConfig(max_new_tokens=16, batch_size=4)
    got = [s[0] for s in engine.generate_tokens(prompts, cfg, progress=False)]
    # sorted batches differ from file-order batches, but a tiny fp32 model gives the same argmax
    assert got == plain_generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=16)


def test_order_preserved_and_streamed(model, tokenizer, prompts):
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4)
    engine = HFEngine(model, tokenizer)
    streamed: dict[int, list[str]] = {}
    forward = engine.generate(prompts, cfg, on_result=lambda i, texts: streamed.setdefault(i, texts), progress=False)
    backward = engine.generate(prompts[::-1], cfg, progress=False)
    assert backward == forward[::-1]
    assert streamed == dict(enumerate(forward))
    assert engine.stats["prompts"] == len(prompts) and engine.stats["seconds"] > 0


def test_decoded_text_is_new_text_only(model, tokenizer, prompts):
    cfg = GenerationConfig(max_new_tokens=10, batch_size=4)
    engine = HFEngine(model, tokenizer)
    tokens = engine.generate_tokens(prompts[:3], cfg, progress=False)
    texts = engine.generate(prompts[:3], cfg, progress=False)
    assert texts == [[tokenizer.decode(t[0], skip_special_tokens=True)] for t in tokens]


def test_stop_strings_cut_before_first_occurrence(model, tokenizer, prompts):
    engine = HFEngine(model, tokenizer, stop_check_every=3)
    free = engine.generate(prompts, GenerationConfig(max_new_tokens=20, batch_size=4), progress=False)
    words = free[0][0].split()
    stop = words[len(words) // 2]  # a word from the middle of the first completion
    cut = engine.generate(prompts, GenerationConfig(max_new_tokens=20, batch_size=4, stop=[stop, "w-never"]),
                          progress=False)
    assert cut[0][0] == free[0][0][: free[0][0].index(stop)]
    assert stop not in cut[0][0]
    for full, short in zip(free, cut):  # every prompt: the same text, cut at its own first occurrence
        assert short[0] == cut_at_stop(full[0], [stop])[0]


def test_sampling_is_seeded_and_samples_differ(model, tokenizer, prompts):
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4, temperature=1.0, top_p=0.95, n=3, seed=7)
    engine = HFEngine(model, tokenizer)
    first = engine.generate(prompts, cfg, progress=False)
    assert first == engine.generate(prompts, cfg, progress=False)
    assert all(len(samples) == 3 for samples in first)
    assert any(len(set(samples)) > 1 for samples in first)
    # per-(prompt, sample) generators: the batch size does not change what is sampled
    assert first == engine.generate(prompts, GenerationConfig(**{**vars(cfg), "batch_size": 9}), progress=False)
    other_seed = engine.generate(prompts, GenerationConfig(**{**vars(cfg), "seed": 8}), progress=False)
    assert other_seed != first


def test_greedy_n_returns_identical_copies(model, tokenizer, prompts):
    engine = HFEngine(model, tokenizer)
    out = engine.generate(prompts[:4], GenerationConfig(max_new_tokens=8, n=2), progress=False)
    assert all(len(s) == 2 and s[0] == s[1] for s in out)


def test_long_prompts_truncated_from_left_with_warning(model, tokenizer, prompts, caplog):
    engine = HFEngine(model, tokenizer)
    cfg = GenerationConfig(max_new_tokens=8, batch_size=4, max_prompt_tokens=5)
    with caplog.at_level(logging.WARNING, logger="ftlab.generate.hf"):
        got = engine.generate(prompts, cfg, progress=False)
    n_long = sum(len(p.split()) > 5 for p in prompts)
    assert n_long > 0 and engine.stats["truncated_prompts"] == n_long
    assert "truncated from the left" in caplog.text
    kept_tails = [" ".join(p.split()[-5:]) for p in prompts]
    assert got == engine.generate(kept_tails, GenerationConfig(max_new_tokens=8, batch_size=4), progress=False)


def test_context_limit_truncates_too(model, tokenizer):
    """Prompt + new tokens must fit max_position_embeddings (128 here)."""
    engine = HFEngine(model, tokenizer)
    out = engine.generate([" ".join(["w1"] * 200)], GenerationConfig(max_new_tokens=8), progress=False)
    assert engine.stats["truncated_prompts"] == 1 and len(out[0]) == 1


def test_empty_prompt_is_a_user_error(model, tokenizer):
    with pytest.raises(UserError, match="no tokens"):
        HFEngine(model, tokenizer).generate(["w1", ""], GenerationConfig(max_new_tokens=2), progress=False)


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError):
        GenerationConfig(temperature=-1)
    with pytest.raises(UserError):
        GenerationConfig(top_p=0)
    assert GenerationConfig(stop="###").stop == ["###"]


def test_make_engine_vllm_falls_back_on_cpu(model, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="ftlab.generate"):
        engine = make_engine("vllm", model, tokenizer, model_path="unused", adapter_path="unused")
    assert isinstance(engine, HFEngine)
    assert "vLLM needs a CUDA GPU and the vllm package; using the HF engine" in caplog.text
    assert isinstance(make_engine("hf", model, tokenizer), HFEngine)
    with pytest.raises(UserError):
        make_engine("tgi", model, tokenizer)


def test_prefill_chunks_and_shared_prefix():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # every prompt keeps >= 1 token of its own
    assert shared_prefix_length([[1, 2, 3]]) == 0
    lengths = [40, 39, 38, 10, 9, 1]
    prefiller = Prefiller.__new__(Prefiller)
    prefiller.max_pad_fraction, prefiller.max_chunk_tokens = 0.1, 4096
    assert prefiller.chunks([[0] * n for n in lengths]) == [[0, 1, 2], [3, 4], [5]]


# ---------------------------------------------------------------- completions: token ids and log-probs
def teacher_forced_logprobs(model, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """The reference: one forward pass over prompt + completion, log-softmax at each completion token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return [logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(tokens)]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_p": 0.9, "n": 2}], ids=["greedy", "sampled"])
def test_logprobs_equal_a_teacher_forced_forward_pass(model, tokenizer, prompts, sampling):
    """Raw log-probs of the chosen tokens (before temperature / top-p), whatever the sampling settings."""
    cfg = GenerationConfig(max_new_tokens=10, batch_size=4, seed=3, **sampling)
    results = HFEngine(model, tokenizer).generate_full(prompts, cfg, progress=False)
    for prompt, completions in zip(prompts, results):
        assert len(completions) == cfg.n
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        for c in completions:
            assert len(c.logprobs) == len(c.token_ids) > 0
            assert c.logprobs == pytest.approx(teacher_forced_logprobs(model, ids, c.token_ids), abs=1e-4)
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert c.finish_reason == ("stop" if c.token_ids[-1] == EOS else "length")
            assert c.finish_reason == "stop" or len(c.token_ids) == 10
    if sampling:  # temperature 0.7 makes unlikely tokens likelier: some chosen token is not the argmax
        greedy = HFEngine(model, tokenizer).generate_tokens(prompts, GenerationConfig(max_new_tokens=10),
                                                            progress=False)
        assert any(c.token_ids != g[0] for cs, g in zip(results, greedy) for c in cs)


def test_generate_full_agrees_with_generate_and_streams_completions(model, tokenizer, prompts):
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4, stop=["w7"])
    engine = HFEngine(model, tokenizer)
    streamed = {}
    full = engine.generate_full(prompts, cfg, on_result=lambda i, cs: streamed.setdefault(i, cs), progress=False)
    assert [[c.text for c in cs] for cs in full] == engine.generate(prompts, cfg, progress=False)
    assert streamed == dict(enumerate(full))


def test_fallback_path_returns_logprobs_too(model, tokenizer, prompts):
    engine = HFEngine(model, tokenizer)
    engine._plain_cache = False  # the `model.generate` path, for caches the slot cache cannot mimic
    results = engine.generate_full(prompts[:4], GenerationConfig(max_new_tokens=8, batch_size=2), progress=False)
    for prompt, (c,) in zip(prompts, results):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert c.logprobs == pytest.approx(teacher_forced_logprobs(model, ids, c.token_ids), abs=1e-4)


# ---------------------------------------------------------------- n samples per prompt
def count_prefill_positions(model) -> tuple[list[int], object]:
    """Positions the model runs in prefill forwards (more than one input token), counted by a hook."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            seen.append(ids.numel())

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_samples_of_a_prompt_share_its_prefill(model, tokenizer):
    """n samples per prompt: each prompt is prefilled once and its K/V copied into n rows."""
    # equal lengths (no padding) and different first words (no shared prefix): positions = 3 x 6
    prompts = ["w1 w2 w3 w4 w5 w6", "w9 w2 w8 w4 w5 w6", "w12 w2 w3 w30 w5 w6"]
    cfg = GenerationConfig(max_new_tokens=6, batch_size=12, temperature=1.0, n=4, seed=1)
    engine = HFEngine(model, tokenizer)
    seen, handle = count_prefill_positions(model)
    try:
        out = engine.generate_full(prompts, cfg, progress=False)
    finally:
        handle.remove()
    assert sum(seen) == 18 and engine.stats["prefill_tokens"] == 18  # not 4 x 18
    assert all(len(cs) == 4 for cs in out)
    assert any(len({tuple(c.token_ids) for c in cs}) > 1 for cs in out), "the 4 rows did not sample separately"
    # each sample's tokens are what its own row drew: log-probs still match a forward pass
    for prompt, cs in zip(prompts, out):
        ids = tokenizer(prompt).input_ids
        for c in cs:
            assert c.logprobs == pytest.approx(teacher_forced_logprobs(model, ids, c.token_ids), abs=1e-4)


def test_a_prompts_samples_do_not_depend_on_batch_size_order_or_company(model, tokenizer, prompts):
    cfg = GenerationConfig(max_new_tokens=10, batch_size=4, temperature=1.0, n=3, seed=5)
    engine = HFEngine(model, tokenizer)
    reference = dict(zip(prompts, engine.generate(prompts, cfg, progress=False)))
    shuffled = prompts[::-1][3:] + prompts[::-1][:3]
    again = engine.generate(shuffled, GenerationConfig(**{**vars(cfg), "batch_size": 7}), progress=False)
    assert dict(zip(shuffled, again)) == reference
    alone = engine.generate(prompts[4:6], GenerationConfig(**{**vars(cfg), "batch_size": 3}), progress=False)
    assert alone == [reference[p] for p in prompts[4:6]]
    # a repeated prompt is a new draw, not a copy of the first one
    twice = engine.generate([prompts[0], prompts[0]], cfg, progress=False)
    assert twice[0] == reference[prompts[0]] and twice[1] != twice[0]


# ---------------------------------------------------------------- transformers API
def test_generation_emits_no_future_warning(model, tokenizer, prompts):
    """The cache goes in under the argument name the model's forward declares (`cache` in transformers
    5.2x; `past_key_values` there warns that it goes away in 5.40)."""
    engine = HFEngine(model, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        engine.generate(["w1 w2 w3 w4 w5 " + p for p in prompts[:4]], GenerationConfig(max_new_tokens=4),
                        progress=False)  # shared prefix, chunked prefill, decoding
        engine._plain_cache = False
        engine.generate(prompts[:2], GenerationConfig(max_new_tokens=4), progress=False)  # fallback


def test_one_seeding_rule_for_both_engines():
    """`request_seeds` is the rule the HF engine samples by and the vLLM engine sends as each request's seed:
    one seed per (prompt tokens, copy, sample). Before, vLLM sent every prompt the call's seed, so sample j of
    every prompt drew from one random stream (pass@k and pair diversity biased)."""
    from ftlab.generate.sampling import request_seeds, row_seed
    from ftlab.generate.vllm_engine import _seed_key

    prompts = [[5, 6, 7], [5, 6, 8], [5, 6, 7]]
    seeds = request_seeds(3, prompts, n=2)
    assert seeds[0] == [row_seed(3, [5, 6, 7], 0, 0), row_seed(3, [5, 6, 7], 0, 1)]
    assert seeds[2] == [row_seed(3, [5, 6, 7], 1, 0), row_seed(3, [5, 6, 7], 1, 1)]  # a second copy differs
    assert len({s for row in seeds for s in row}) == 6  # no two rows share a stream
    assert request_seeds(3, prompts[1:2], n=2) == [seeds[1]]  # a prompt's seeds ignore its company
    assert _seed_key({"prompt_token_ids": [5, 6, 7]}) == [5, 6, 7] and _seed_key("ab") == [97, 98]


def test_a_row_that_loops_stops_at_its_nth_repeated_line():
    """A hook forces rows to write "a b" lines (or numbered ones: "a 7", "a 8", ...): with stop_line_repeats=3
    a row stops once one line, digits ignored, has come 3 times; an unforced row runs to max_new_tokens."""
    from tokenizers import decoders

    from ftlab.generate.base import repeats_a_line

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, "a ": 3, "b": 4, "<nl>": 5, "7": 6, "8": 7, "9": 8}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.Replace("<nl>", "\n")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    tiny = LlamaForCausalLM(config).eval()
    cycles = {0: [3, 4, 5], 1: [3, 6, 5, 3, 7, 5, 3, 8, 5], 2: [3, 4, 3, 4]}  # prompt 2: no line ever ends

    def force(logits, requests, generated):
        out = torch.full_like(logits, float("-inf"))
        for i, (request, done) in enumerate(zip(requests, generated)):
            cycle = cycles[request]
            out[i, cycle[len(done) % len(cycle)]] = 0.0
        return out

    engine = HFEngine(tiny, tok, stop_check_every=1, logits_processor=force)
    cfg = GenerationConfig(max_new_tokens=30, batch_size=4, stop_line_repeats=3)
    got = engine.generate_full(["b", "b b", "b b b"], cfg, progress=False)
    plain, numbered, endless = (c[0] for c in got)
    assert plain.text == "a b\na b\na b\n" and plain.finish_reason == "stop"  # the 3rd "a b" line ends it
    assert numbered.text == "a 7\na 8\na 9\n" and numbered.finish_reason == "stop"  # numbers are ignored
    assert len(endless.token_ids) == 30 and endless.finish_reason == "length"
    assert repeats_a_line("x 1\n\n\nx 2\ny\n", 2) and not repeats_a_line("x\n\n\ny\n", 2)  # blank lines not counted
    with pytest.raises(UserError, match="stop_line_repeats must be 0"):
        GenerationConfig(stop_line_repeats=1)
