"""vLLM with two different LoRA adapters in one engine, and `ftlab eval` on vLLM (needs vllm + CUDA).

Each adapter must get its own LoRA id: vLLM caches a loaded adapter by id, so a second adapter
sent under the first one's id would generate with the first one's weights. The check scores
vLLM's own completions with the HF model + the same adapter (teacher-forced log-probs), which
tells the adapters apart without depending on near-ties in greedy decoding.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm")

from ftlab.config.schema import EMBEDDED_MODEL
from ftlab.data.sft import prompt_ids
from ftlab.generate import GenerationConfig
from ftlab.models.load import (
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
)

QUESTIONS = ["What is 2 plus 3?", "Name a colour.", "Is a cat a mammal?"]


@pytest.fixture(scope="module")
def base_path() -> str:
    return resolve_model_path(EMBEDDED_MODEL)  # the cached HF directory, not the embedded name


@pytest.fixture(scope="module")
def adapters(base_path, tmp_path_factory) -> list[str]:
    """Two LoRA adapters with different random (non-zero) weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_path)
        lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        path = tmp_path_factory.mktemp(f"adapter{seed}")
        lora.save_pretrained(path)
        paths.append(str(path))
    return paths


def hf_logprobs(base_path: str, adapter: str, prompt: list[int], tokens: list[int]) -> list[float]:
    model, _ = load_model_and_tokenizer(name=base_path, adapter=adapter)
    model.to("cuda")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens], device="cuda")).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return [logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def test_ftlab_eval_on_vllm_with_an_adapter_directory_as_the_model(tmp_path, adapters):
    """`ftlab eval` with eval.engine=vllm and an adapter directory as the model: ftlab loads only the
    tokenizer and vLLM gets the base model's directory + the adapter. In a child process, so that
    its vLLM instance gives the GPU memory back when it ends."""
    from tests.helpers import tiny_recipe

    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {a} plus 1?", "answer": f"#### {a + 1}"}) + "\n"
                           for a in range(4)))
    recipe = tiny_recipe(tmp_path, model={"scratch": None, "name": adapters[1]})
    args = ["eval", str(recipe), "eval.task=gsm8k", f"eval.source={gsm}", "eval.max_new_tokens=8", "eval.engine=vllm"]
    code = "import sys; from ftlab.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "using the HF engine" not in done.stderr
    run = next((tmp_path / "runs" / "eval").glob("2*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["model"] == adapters[1]


def test_two_adapters_in_one_engine(base_path, adapters):
    from ftlab.generate.vllm_engine import VLLMEngine

    tok = load_tokenizer(base_path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    engine = VLLMEngine(base_path, tokenizer=tok, enable_lora=True, dtype="float32", max_model_len=512,
                        gpu_memory_utilization=0.3, enforce_eager=True)
    cfg = GenerationConfig(max_new_tokens=12)
    runs = {}
    for name, adapter in (("a", adapters[0]), ("b", adapters[1]), ("a again", adapters[0])):
        engine.set_adapter(adapter)
        runs[name] = [cs[0] for cs in engine.generate_full(prompts, cfg, progress=False)]
    tokens = {k: [c.token_ids for c in v] for k, v in runs.items()}
    assert tokens["a again"] == tokens["a"]
    assert tokens["b"] != tokens["a"], "adapter b generated like adapter a: its LoRA id was reused"
    assert len(engine._lora_ids) == 2

    ids = prompt_ids(tok, prompts[0])
    b = runs["b"][0]
    under_b = hf_logprobs(base_path, adapters[1], ids, b.token_ids)
    under_a = hf_logprobs(base_path, adapters[0], ids, b.token_ids)
    gap_b = max(abs(x - y) for x, y in zip(b.logprobs, under_b))
    gap_a = max(abs(x - y) for x, y in zip(b.logprobs, under_a))
    assert gap_b < 1e-2 < gap_a, (gap_b, gap_a)  # b's completion was generated with b's weights


def test_vllm_sample_j_of_two_prompts_draws_from_different_streams(base_path):
    """At a temperature that makes the next token nearly uniform, two prompts sampled from one random stream
    draw the same tokens; each (prompt, sample) now has its own seed (the HF engine's rule), and a prompt's
    samples do not depend on the other prompts of the call."""
    from ftlab.generate.vllm_engine import VLLMEngine

    tok = load_tokenizer(base_path)
    engine = VLLMEngine(base_path, tokenizer=tok, dtype="float32", max_model_len=512, gpu_memory_utilization=0.3,
                        enforce_eager=True)
    cfg = GenerationConfig(max_new_tokens=8, temperature=1e4, n=3, seed=11)
    both = engine.generate_full(["Name a colour.", "Name an animal."], cfg, progress=False)
    for j in range(3):
        assert both[0][j].token_ids != both[1][j].token_ids
    alone = engine.generate_full(["Name an animal."], cfg, progress=False)
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in both[1]]
    engine.close()
    assert engine.llm is None
