"""Training and generation tokenize prompts alike, and end answers alike (issue 10, defect 11).

A word-level tokenizer whose post-processor adds a BOS by default (as Llama's and Gemma's do), with a
chat template that writes the BOS itself and ends assistant turns with `<eot>`, not the EOS token
(as Gemma's `<end_of_turn>`). Ids: <pad>=0 <eos>=1 <unk>=2 <bos>=3 <eot>=4 user=5 assistant=6 :=7
hello=8 world=9 cat=10 sat=11.
"""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ftlab.data.sft import (
    Conversation,
    adds_bos,
    chat_terminator,
    encode_sft_example,
    encode_sft_turns,
    preflight,
    prompt_ids,
    render_supervision,
    stop_token_ids,
)
from ftlab.data.sources import chat_turns, with_terminators
from ftlab.generate import GenerationConfig, HFEngine

VOCAB = "<pad> <eos> <unk> <bos> <eot> user assistant : hello world cat sat".split()
PAD, EOS, BOS, EOT = 0, 1, 3, 4
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}<eot>{% endif %} {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="module")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>", bos_token="<bos>", extra_special_tokens=["<eot>"])
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    return LlamaForCausalLM(config).eval()


def chat_prompt(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def test_the_fixture_is_what_the_tests_assume(bos_tokenizer):
    assert bos_tokenizer("hello").input_ids == [BOS, 8]  # a BOS by default
    assert chat_prompt(bos_tokenizer, "hello") == "<bos>user : hello assistant : "
    assert bos_tokenizer(chat_prompt(bos_tokenizer, "hello")).input_ids[:2] == [BOS, BOS]  # the old double BOS


def test_templated_prompt_keeps_the_templates_single_bos(bos_tokenizer, model):
    prompt = chat_prompt(bos_tokenizer, "hello world")
    want = [BOS, 5, 7, 8, 9, 6, 7]  # <bos> user : hello world assistant :
    assert adds_bos(bos_tokenizer) and prompt_ids(bos_tokenizer, prompt) == want
    assert HFEngine(model, bos_tokenizer)._encode([prompt], GenerationConfig())[0] == want
    assert encode_sft_example(prompt, "cat", bos_tokenizer, 32)["input_ids"][: len(want)] == want


def test_plain_text_prompt_gets_the_bos_its_tokenizer_expects(bos_tokenizer, model):
    want = [BOS, 8, 9]
    assert prompt_ids(bos_tokenizer, "hello world") == want
    assert HFEngine(model, bos_tokenizer)._encode(["hello world"], GenerationConfig())[0] == want
    assert encode_sft_example("hello world", "cat", bos_tokenizer, 32)["input_ids"] == want + [10]


def test_no_bos_is_added_where_the_tokenizer_adds_none(tiny_tokenizer):
    """conftest's tokenizer has a BOS token but no post-processor: text is tokenized as is."""
    assert not adds_bos(tiny_tokenizer)
    assert prompt_ids(tiny_tokenizer, "hello world") == [4, 5]


def test_generation_sees_the_prompt_training_saw(bos_tokenizer, model):
    """The engine's prompt tokens are the prefix of the SFT sequence: its first new token is scored on
    exactly the context the supervised answer was trained on."""
    prompt = chat_prompt(bos_tokenizer, "cat sat")
    (c,), = HFEngine(model, bos_tokenizer).generate_full([prompt], GenerationConfig(max_new_tokens=1),
                                                         progress=False)
    sft = encode_sft_example(prompt, bos_tokenizer.decode(c.token_ids), bos_tokenizer, 32)
    start = sft["response_mask"].index(True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sft["input_ids"]])).logits[0, start].float()
    assert sft["labels"][start] == c.token_ids[0]
    assert c.logprobs[0] == pytest.approx(logits.log_softmax(-1)[c.token_ids[0]].item(), abs=1e-5)


# ---------------------------------------------------------------- the supervised terminator
def test_terminator_is_what_the_template_writes_after_an_answer(bos_tokenizer):
    assert chat_terminator(bos_tokenizer) == "<eot>"
    assert stop_token_ids(bos_tokenizer) == {EOS, EOT}


def test_sft_supervises_the_template_terminator_not_eos(bos_tokenizer):
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "cat"},
            {"role": "user", "content": "world"}, {"role": "assistant", "content": "sat"}]
    turns = chat_turns(bos_tokenizer, msgs, "test")
    assert turns.terminator == "<eot>"
    assert turns == [("<bos>user : hello assistant : ", "cat"), (" user : world assistant : ", "sat")]
    ex = encode_sft_turns(turns, bos_tokenizer, 64)
    # full: <bos> user : hello assistant : | cat <eot> | user : world assistant : | sat <eot>
    assert ex["input_ids"] + ex["labels"][-1:] == [BOS, 5, 7, 8, 6, 7, 10, EOT, 5, 7, 9, 6, 7, 11, EOT]
    assert [t for t, m in zip(ex["labels"], ex["response_mask"]) if m] == [10, EOT, 11, EOT]
    assert render_supervision(ex, bos_tokenizer).count("«") == 2
    assert preflight([ex], bos_tokenizer).supervised_tokens == 4  # ends with <eot>: accepted


def test_templated_prompt_response_rows_end_with_the_terminator_plain_rows_with_eos(bos_tokenizer):
    templated = with_terminators([[(chat_prompt(bos_tokenizer, "hello"), "cat")]], bos_tokenizer, chat_template=True)
    plain = with_terminators([[("hello", "cat")]], bos_tokenizer, chat_template=False)
    assert encode_sft_turns(templated[0], bos_tokenizer, 32)["labels"][-2:] == [10, EOT]
    assert encode_sft_turns(plain[0], bos_tokenizer, 32)["labels"][-2:] == [10, EOS]
    kept = Conversation([("hello", "cat")], "<eot>")
    assert with_terminators([kept], bos_tokenizer, chat_template=False)[0].terminator == "<eot>"


def test_engine_stops_on_the_template_terminator(bos_tokenizer, model):
    """The model's generation config only knows <eos>, so `model.generate` runs past <eot>; the
    engine stops there (SFT teaches the model to end answers with it). <eot> is made likely by
    aligning its output row with the final norm's weights."""
    eot_likely = LlamaForCausalLM(model.config).eval()
    eot_likely.load_state_dict(model.state_dict())
    with torch.no_grad():
        eot_likely.lm_head.weight[EOT] = eot_likely.model.norm.weight * 50
    assert eot_likely.generation_config.eos_token_id == EOS
    prompt = chat_prompt(bos_tokenizer, "hello")
    ids = torch.tensor([prompt_ids(bos_tokenizer, prompt)])
    with torch.no_grad():
        reference = eot_likely.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert EOT in reference[:-1], reference  # generate went on after <eot>
    (c,), = HFEngine(eot_likely, bos_tokenizer).generate_full([prompt], GenerationConfig(max_new_tokens=8),
                                                              progress=False)
    assert c.token_ids == reference[: reference.index(EOT) + 1] and c.finish_reason == "stop"


def test_smollm2_terminator_is_its_eos_so_its_sft_encoding_is_unchanged(embedded_tokenizer):
    """The quickstart's SFT losses stay the same: SmolLM2's `<|im_end|>` is both terminator and EOS."""
    tok = embedded_tokenizer
    assert chat_terminator(tok) == tok.eos_token == "<|im_end|>"
    assert stop_token_ids(tok) == {tok.eos_token_id} and not adds_bos(tok)
    msgs = [{"role": "user", "content": "Is a cat a mammal?"}, {"role": "assistant", "content": "True"}]
    turns = chat_turns(tok, msgs, "test")
    old = [tok(b, add_special_tokens=False).input_ids + tok(a, add_special_tokens=False).input_ids
           + [tok.eos_token_id] for b, a in turns]  # the encoding before terminators existed
    ex = encode_sft_turns(turns, tok, 512)
    assert ex["input_ids"] + ex["labels"][-1:] == old[0]
