"""The HF generation engine and evaluation with a model on a CUDA GPU.

References as on the CPU (tests/test_generate.py): `model.generate` for greedy tokens, a
teacher-forced forward pass for log-probs, all on the same GPU model.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ftlab.generate import GenerationConfig, HFEngine

WORDS = [f"w{i}" for i in range(60)]
PAD, EOS = 0, 1
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    return LlamaForCausalLM(config).eval().to(CUDA)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    rnd = random.Random(0)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.choice([1, 3, 8, 20, 40]))) for _ in range(11)]


def generate_reference(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    tokenizer.padding_side = "left"
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(CUDA)
        with torch.no_grad():
            new = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)[:, enc.input_ids.shape[1] :]
        out += [row[: row.index(EOS) + 1] if EOS in row else row for row in new.tolist()]
    return out


def teacher_forced_logprobs(model, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + tokens], device=CUDA)).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return [logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(tokens)]


@pytest.mark.parametrize("prefix", ["", "w1 w2 w3 w4 w5 w6 "], ids=["plain", "shared-prefix"])
def test_greedy_on_cuda_is_model_generate(model, tokenizer, prompts, prefix):
    texts = [prefix + p for p in prompts]
    engine = HFEngine(model, tokenizer)
    got = [s[0] for s in engine.generate_tokens(texts, GenerationConfig(max_new_tokens=24, batch_size=3),
                                                progress=False)]
    assert got == generate_reference(model, tokenizer, texts, batch_size=3, max_new_tokens=24)
    assert engine.stats["shared_prefix_tokens"] == (6 if prefix else 0)


def test_sampling_on_cuda_is_seeded_and_its_logprobs_are_the_models(model, tokenizer, prompts):
    cfg = GenerationConfig(max_new_tokens=10, batch_size=4, temperature=0.8, top_p=0.9, n=3, seed=2)
    engine = HFEngine(model, tokenizer)
    first = engine.generate_full(prompts, cfg, progress=False)
    assert [[c.token_ids for c in cs] for cs in first] == engine.generate_tokens(prompts, cfg, progress=False)
    assert any(len({tuple(c.token_ids) for c in cs}) > 1 for cs in first)
    for prompt, cs in zip(prompts, first):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        for c in cs:
            assert c.logprobs == pytest.approx(teacher_forced_logprobs(model, ids, c.token_ids), abs=1e-4)


def test_caller_rng_untouched_on_cuda(model, tokenizer, prompts):
    """Sampling draws from the rows' own generators, never from the global CUDA RNG."""
    torch.cuda.manual_seed(123)
    expected = torch.rand(4, device=CUDA)
    torch.cuda.manual_seed(123)
    HFEngine(model, tokenizer).generate(prompts[:3], GenerationConfig(max_new_tokens=4, temperature=1.0, n=2),
                                        progress=False)
    assert torch.equal(torch.rand(4, device=CUDA), expected)


# ---------------------------------------------------------------- evaluation with a CUDA model
GSM = [{"question": f"Ann has {a} pens and buys {b}. How many pens?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
       for a, b in [(1, 2), (3, 4), (5, 6), (10, 20)]]


@pytest.fixture(scope="module")
def scratch_model_and_tokenizer():
    from ftlab.config.schema import ModelConfig
    from ftlab.models.load import load_model_and_tokenizer
    from tests.helpers import TINY_SCRATCH

    torch.manual_seed(0)
    return load_model_and_tokenizer(ModelConfig(scratch=TINY_SCRATCH))


def gsm_examples(tmp_path):
    from ftlab.tasks import get_task

    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    task = get_task("gsm8k")
    return task, task.load(str(path))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_in_training_evaluation_on_a_cuda_model(tmp_path, scratch_model_and_tokenizer, precision):
    """What training does every eval_every steps: evaluate_examples and log_generations on the
    training device (the model stays where it is)."""
    from ftlab.config.schema import EvalConfig
    from ftlab.evaluate import evaluate_examples, log_generations

    cpu_model, tok = scratch_model_and_tokenizer
    gpu_model = type(cpu_model)(cpu_model.config).to(CUDA).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    task, examples = gsm_examples(tmp_path)
    ecfg = OmegaConf.structured(EvalConfig(max_new_tokens=8, precision=precision))
    rows, metrics = evaluate_examples(gpu_model, tok, task, examples, ecfg, progress=False)
    assert len(rows) == 4 and metrics["n"] == 4 and next(gpu_model.parameters()).is_cuda
    if precision == "fp32":  # same weights on the CPU: the same greedy outputs
        cpu_rows, _ = evaluate_examples(cpu_model, tok, task, examples, ecfg, progress=False)
        assert [r["output"] for r in rows] == [r["output"] for r in cpu_rows]
    gpu_model.train()
    logged = log_generations(gpu_model, tok, task, examples, ecfg, step=1)
    assert gpu_model.training  # restored
    assert len(logged["samples"]) == 4 and all(math.isfinite(s["mean_token_entropy"]) for s in logged["samples"])


def test_ftlab_eval_puts_the_model_on_the_gpu(tmp_path):
    from ftlab.cli import main
    from ftlab.runs.rundir import read_status
    from tests.helpers import tiny_recipe

    recipe = tiny_recipe(tmp_path)
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    torch.cuda.reset_peak_memory_stats()
    assert main(["eval", str(recipe), "eval.task=gsm8k", f"eval.source={path}", "eval.max_new_tokens=6"]) == 0
    assert torch.cuda.max_memory_allocated() > 0  # the model's weights and cache were on the GPU
    run = next((tmp_path / "runs" / "eval").glob("2*"))
    assert read_status(run) == "complete"
