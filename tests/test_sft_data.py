"""Tests for ftlab.data.sft and ftlab.data.collate.

Token ids come from the tiny tokenizer in conftest.py (id = position in TINY_VOCAB):
<pad>=0 <eos>=1 <unk>=2 <bos>=3 hello=4 world=5 the=6 cat=7 sat=8 on=9 mat=10 user=11
assistant=12 :=13 a=14 b=15 c=16 d=17
"""
from __future__ import annotations

import pytest
import torch

from ftlab.data.collate import length_grouped_batches, pack_examples, packed_collate, pad_collate
from ftlab.data.sft import encode_sft_example, preflight, render_supervision, tokenize_prompt_and_output
from ftlab.errors import UserError
from ftlab.losses import get_response_log_probs

F, T = False, True
PROMPT = "user : hello assistant :"  # [11, 13, 4, 12, 13]


# ---------------------------------------------------------------- tokenize_prompt_and_output


def test_tokenize_prompt_and_output_by_hand(tiny_tokenizer):
    out = tokenize_prompt_and_output(["hello world", "the"], ["cat sat", "a b c d"], tiny_tokenizer)
    # full row 0: [4, 5 | 7, 8] + pad -> [4, 5, 7, 8, 0]   (L = 5, the longest)
    # full row 1: [6 | 14, 15, 16, 17]  -> [6, 14, 15, 16, 17]
    assert out["input_ids"].tolist() == [[4, 5, 7, 8], [6, 14, 15, 16]]  # full[:, :-1]
    assert out["labels"].tolist() == [[5, 7, 8, 0], [14, 15, 16, 17]]  # full[:, 1:]
    # labels that are output tokens: row 0 -> 7, 8 (positions 1, 2); row 1 -> all four
    assert out["response_mask"].tolist() == [[F, T, T, F], [T, T, T, T]]
    assert out["response_mask"].dtype == torch.bool and out["input_ids"].dtype == torch.long


def test_tokenize_prompt_and_output_adds_no_special_tokens(tiny_tokenizer):
    out = tokenize_prompt_and_output(["hello"], ["world"], tiny_tokenizer)
    assert out["input_ids"].tolist() == [[4]] and out["labels"].tolist() == [[5]]  # no BOS / EOS
    assert out["response_mask"].tolist() == [[T]]


# ---------------------------------------------------------------- encode_sft_example


def test_encode_sft_example_supervises_response_and_eos(tiny_tokenizer):
    ex = encode_sft_example(PROMPT, "cat sat", tiny_tokenizer, max_length=10)
    # full = [11, 13, 4, 12, 13 | 7, 8, <eos>=1], 8 tokens <= max_length + 1
    assert ex == {
        "input_ids": [11, 13, 4, 12, 13, 7, 8],
        "labels": [13, 4, 12, 13, 7, 8, 1],
        "response_mask": [F, F, F, F, T, T, T],  # labels 7, 8, 1: response + EOS
        "truncated": False,
    }


def test_encode_sft_example_exact_fit_is_not_truncated(tiny_tokenizer):
    ex = encode_sft_example(PROMPT, "cat sat", tiny_tokenizer, max_length=7)  # 8 tokens = 7 + 1
    assert ex["truncated"] is False and ex["labels"][-1] == 1


def test_encode_sft_example_truncation_drops_eos(tiny_tokenizer):
    ex = encode_sft_example(PROMPT, "cat sat", tiny_tokenizer, max_length=6)
    # keep max_length + 1 = 7 tokens: [11, 13, 4, 12, 13, 7, 8]; the EOS is cut and not re-added
    assert ex == {
        "input_ids": [11, 13, 4, 12, 13, 7],
        "labels": [13, 4, 12, 13, 7, 8],
        "response_mask": [F, F, F, F, T, T],
        "truncated": True,
    }
    # room for exactly one response token
    ex = encode_sft_example(PROMPT, "cat sat", tiny_tokenizer, max_length=5)
    assert ex["labels"] == [13, 4, 12, 13, 7] and ex["response_mask"] == [F, F, F, F, T]
    assert ex["truncated"] is True


def test_encode_sft_example_drops_when_prompt_fills_max_length(tiny_tokenizer):
    # 5 prompt tokens, max_length 4 -> 5 tokens kept = the prompt only -> nothing to learn
    assert encode_sft_example(PROMPT, "cat sat", tiny_tokenizer, max_length=4) is None
    assert encode_sft_example(PROMPT, "cat sat", tiny_tokenizer, max_length=2) is None


def test_encode_sft_example_keeps_bos_only_from_text(tiny_tokenizer):
    ex = encode_sft_example("<bos> user :", "hello", tiny_tokenizer, max_length=16)
    assert ex["input_ids"] == [3, 11, 13, 4]  # BOS from the text, none added by the tokenizer
    assert ex["labels"] == [11, 13, 4, 1] and ex["response_mask"] == [F, F, T, T]


def test_encode_sft_example_empty_response_supervises_eos(tiny_tokenizer):
    ex = encode_sft_example("hello", "", tiny_tokenizer, max_length=8)
    assert ex["input_ids"] == [4] and ex["labels"] == [1] and ex["response_mask"] == [T]


# ---------------------------------------------------------------- preflight


def _good(tok, n=3):
    return [encode_sft_example(PROMPT, "cat sat", tok, max_length=16) for _ in range(n)]


def test_preflight_counts_and_renders(tiny_tokenizer):
    report = preflight(_good(tiny_tokenizer, 4), tiny_tokenizer, n_show=2)
    assert (report.n, report.truncated, report.dropped) == (4, 0, 0)
    assert report.supervised_tokens == 4 * 3  # cat, sat, <eos> per example
    assert report.total_tokens == 4 * 7
    assert report.samples == ["user : hello assistant :«cat sat <eos>»"] * 2
    assert "4 examples" in report.summary()


def test_render_supervision_marks_truncated_span(tiny_tokenizer):
    ex = encode_sft_example(PROMPT, "cat sat", tiny_tokenizer, max_length=6)
    assert render_supervision(ex, tiny_tokenizer) == "user : hello assistant :«cat sat»"  # no EOS


def _raises_one_line(match, *args, **kwargs):
    with pytest.raises(UserError, match=match) as info:
        preflight(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_preflight_rejects_empty_and_fully_dropped(tiny_tokenizer):
    _raises_one_line("empty", [], tiny_tokenizer)
    _raises_one_line("all 2 examples were dropped", [None, None], tiny_tokenizer)


def test_preflight_rejects_example_without_supervision(tiny_tokenizer):
    bad = {"input_ids": [4, 5], "labels": [5, 1], "response_mask": [F, F], "truncated": False}
    _raises_one_line("#1 has no supervised token", [_good(tiny_tokenizer, 1)[0], bad], tiny_tokenizer)


def test_preflight_rejects_complete_example_not_ending_in_eos(tiny_tokenizer):
    # e.g. a template bug that forgot the EOS: last supervised label is 'sat' (8), not EOS (1)
    bad = {"input_ids": [4, 7], "labels": [7, 8], "response_mask": [T, T], "truncated": False}
    _raises_one_line("#0: the last supervised token is id 8, not EOS", [bad], tiny_tokenizer)


def test_preflight_share_of_truncated_and_dropped(tiny_tokenizer):
    good = _good(tiny_tokenizer, 8)
    truncated = encode_sft_example(PROMPT, "cat sat", tiny_tokenizer, max_length=6)
    data = good + [truncated, None]  # 2 of 10 bad = 20%
    _raises_one_line(r"2 of 10 examples \(20.0%\).*1 truncated, 1 dropped", data, tiny_tokenizer)
    report = preflight(data, tiny_tokenizer, max_bad_share=0.2)  # a truncated example is fine if allowed
    assert (report.n, report.truncated, report.dropped) == (10, 1, 1)
    assert report.supervised_tokens == 8 * 3 + 2 and report.total_tokens == 8 * 7 + 6


# ---------------------------------------------------------------- pad_collate


def _ex(ids, labels, mask):
    return {"input_ids": ids, "labels": labels, "response_mask": mask, "truncated": False}


def test_pad_collate_by_hand():
    batch = pad_collate([_ex([4, 5, 6], [5, 6, 1], [F, T, T]), _ex([7], [1], [T])], pad_id=0)
    assert batch["input_ids"].tolist() == [[4, 5, 6], [7, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 1], [1, 0, 0]]
    assert batch["response_mask"].tolist() == [[F, T, T], [T, F, F]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------- packing


def _sized(*lengths):
    return [_ex([1] * n, [1] * n, [T] * n) for n in lengths]


def test_pack_examples_best_fit_decreasing_by_hand():
    # lengths 5, 3, 4, 2, 6 into rows of 8, longest first:
    # 6 -> new row A (2 free); 5 -> new row B (3 free); 4 -> new row C (4 free);
    # 3 -> tightest fit is B (3 free -> 0); 2 -> tightest fit is A (2 free -> 0)
    assert pack_examples(_sized(5, 3, 4, 2, 6), max_tokens=8) == [[4, 3], [0, 1], [2]]


def test_pack_examples_skips_dropped_and_rejects_too_long():
    assert pack_examples([None, *_sized(2, 2)], max_tokens=4) == [[1, 2]]
    with pytest.raises(UserError, match="example #1 has 9 tokens"):
        pack_examples(_sized(2, 9), max_tokens=8)


def test_packed_collate_by_hand():
    a = _ex([4, 5, 6], [5, 6, 1], [F, T, T])
    b = _ex([7, 8], [8, 1], [T, T])
    c = _ex([9, 10], [10, 1], [F, T])
    batch = packed_collate([[a, b], [c]], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "response_mask", "position_ids"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7, 8], [9, 10, 0, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 1, 8, 1], [10, 1, 0, 0, 0]]  # no label crosses a boundary
    assert batch["response_mask"].tolist() == [[F, T, T, T, T], [F, T, F, F, F]]
    # positions restart for every example and for the padding filler
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]


def _tiny_model(arch: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    sizes = dict(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    cfg = LlamaConfig(**sizes) if arch == "llama" else Qwen2Config(**sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().train()  # training mode, as in the trainer
    assert model.config._attn_implementation == "sdpa"
    return model


def _random_examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 32, (n + 1,), generator=g).tolist()
        out.append(_ex(ids[:-1], ids[1:], [j >= 1 for j in range(n)]))
    return out


def _alone(model, ex):
    ids = torch.tensor([ex["input_ids"]])
    return get_response_log_probs(model, ids, torch.tensor([ex["labels"]]))["log_probs"][0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_rows_are_isolated(arch):
    """The packed log-probs of every example equal its log-probs run alone (sdpa, fp32)."""
    model = _tiny_model(arch)
    examples = _random_examples([5, 7, 3, 6, 2])
    rows = [[examples[0], examples[1], examples[2]], [examples[3], examples[4]]]  # row 2 gets a filler
    batch = packed_collate(rows, pad_id=0)
    packed = get_response_log_probs(
        model, batch["input_ids"], batch["labels"], position_ids=batch["position_ids"]
    )["log_probs"]
    for r, row in enumerate(rows):
        start = 0
        for ex in row:
            n = len(ex["input_ids"])
            torch.testing.assert_close(packed[r, start : start + n], _alone(model, ex), atol=1e-5, rtol=0)
            start += n


def test_packing_leaks_when_a_kv_cache_is_used():
    """Evidence for use_cache=False: transformers (5.23) only detects packed sequences from
    position_ids when there is no KV cache, and a plain forward creates one (config.use_cache=True).
    If this ever fails, transformers changed its packing detection: re-read masking_utils."""
    model = _tiny_model("llama")
    examples = _random_examples([5, 7])
    batch = packed_collate([examples], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]])).logits
    assert (logits[0, 5:] - alone[0]).abs().max() > 1e-3  # the 2nd example saw the 1st


def test_packed_and_padded_gradients_match():
    """Training on packed rows gives the same gradients as training on padded rows."""
    model = _tiny_model("llama")
    examples = _random_examples([5, 7, 3, 6])

    def grads(batch, **kw):
        model.zero_grad(set_to_none=True)
        lp = get_response_log_probs(model, batch["input_ids"], batch["labels"], **kw)["log_probs"]
        (-(lp * batch["response_mask"]).sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = pad_collate(examples, pad_id=0)
    a = grads(padded, attention_mask=padded["attention_mask"])
    packed = packed_collate([examples[:2], examples[2:]], pad_id=0)
    b = grads(packed, position_ids=packed["position_ids"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)


# ---------------------------------------------------------------- length grouping


def test_length_grouped_batches_by_hand_without_shuffle():
    # one mega-chunk holds everything; sorted longest first: idx 5 (6), 0 (5), 2 (4), 4 (3), 3 (2), 1 (1)
    assert length_grouped_batches([5, 1, 4, 2, 3, 6], batch_size=2, seed=0, shuffle=False) == [
        [5, 0], [2, 4], [3, 1],
    ]


def test_length_grouped_batches_properties():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (1000,), generator=g).tolist()
    batches = length_grouped_batches(lengths, batch_size=8, seed=3, mega_chunk=10)
    assert sorted(i for b in batches for i in b) == list(range(1000))  # each index exactly once
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=3, mega_chunk=10)  # deterministic
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=4, mega_chunk=10)

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    random_batches = [list(range(s, min(s + 8, 1000))) for s in range(0, 1000, 8)]
    assert padding(batches) < 0.2 * padding(random_batches)


# ---------------------------------------------------------------- conversations with several answers


def test_encode_sft_turns_supervises_every_answer_and_its_eos(tiny_tokenizer):
    from ftlab.data.sft import encode_sft_turns

    ex = encode_sft_turns([(PROMPT, "cat sat"), ("user : the", "a b")], tiny_tokenizer, max_length=20)
    # full = [11, 13, 4, 12, 13 | 7, 8, 1 | 11, 13, 6 | 14, 15, 1]
    assert ex["input_ids"] == [11, 13, 4, 12, 13, 7, 8, 1, 11, 13, 6, 14, 15]
    assert ex["labels"] == [13, 4, 12, 13, 7, 8, 1, 11, 13, 6, 14, 15, 1]
    assert ex["response_mask"] == [F, F, F, F, T, T, T, F, F, F, T, T, T]
    assert ex["truncated"] is False
    # one turn is exactly encode_sft_example
    assert encode_sft_turns([(PROMPT, "cat sat")], tiny_tokenizer, 10) == encode_sft_example(
        PROMPT, "cat sat", tiny_tokenizer, 10)


def test_encode_sft_turns_truncation_keeps_earlier_answers(tiny_tokenizer):
    from ftlab.data.sft import encode_sft_turns

    ex = encode_sft_turns([(PROMPT, "cat sat"), ("user : the", "a b")], tiny_tokenizer, max_length=9)
    # 10 tokens kept: [11, 13, 4, 12, 13, 7, 8, 1, 11, 13]; the second turn's text is cut, no answer of it left
    assert ex["truncated"] is True and ex["labels"] == [13, 4, 12, 13, 7, 8, 1, 11, 13]
    assert ex["response_mask"] == [F, F, F, F, T, T, T, F, F]


def test_chat_turns_split_a_real_chat_template_exactly(embedded_tokenizer):
    """Concatenating the turns (answers followed by EOS) gives the template's rendering of the whole
    conversation, and every answer is supervised."""
    from ftlab.data.sources import chat_turns

    msgs = [{"role": "user", "content": "Is 2 even?"}, {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "And 3?"}, {"role": "assistant", "content": "No."}]
    turns = chat_turns(embedded_tokenizer, msgs, "test")
    assert [answer for _, answer in turns] == ["Yes.", "No."]
    joined = "".join(before + answer + embedded_tokenizer.eos_token for before, answer in turns)
    whole = embedded_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert whole.startswith(joined) and whole[len(joined):].strip() == ""
    assert turns[1][0].count("And 3?") == 1 and "Is 2 even?" not in turns[1][0]


def test_generic_messages_supervise_every_assistant_turn(tmp_path, embedded_tokenizer):
    import json

    from ftlab.data.sft import encode_sft_turns
    from ftlab.data.sources import generic_conversations

    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye now"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"prompt": "Hi", "response": "Hey"}) + "\n")
    samples = generic_conversations(str(path), embedded_tokenizer, chat_template=True)
    assert [len(s) for s in samples] == [2, 1]
    enc = encode_sft_turns(samples[0], embedded_tokenizer, 512)
    supervised = [t for t, m in zip(enc["labels"], enc["response_mask"]) if m]
    eos = embedded_tokenizer.eos_token
    assert embedded_tokenizer.decode(supervised) == f"Hello there{eos}Goodbye now{eos}"


def test_generic_messages_must_end_with_an_assistant_turn(tmp_path, embedded_tokenizer):
    from ftlab.data.sources import generic_conversations

    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    with pytest.raises(UserError, match=r"chat.jsonl:1: 'messages' must be a list ending with an assistant"):
        generic_conversations(str(path), embedded_tokenizer, chat_template=True)


def test_task_followups_without_a_chat_template_use_the_plain_layout(tiny_tokenizer):
    """The tiny tokenizer has no chat template: follow-ups continue the plain 'Answer:' layout."""
    from ftlab.data.sources import task_turns
    from ftlab.tasks import get_task
    from ftlab.tasks.base import Example

    task = get_task("gsm8k")
    ex = Example(id="x", question="the cat", target="a b", gold="1", followups=[("the mat", "c d")])
    turns = task_turns(task, ex, tiny_tokenizer, shots=0, chat_template=True)
    assert turns[0] == (task.render_prompt(ex, tokenizer=tiny_tokenizer), "a b")
    assert turns[1] == ("\n\nthe mat\nAnswer: ", "c d")
