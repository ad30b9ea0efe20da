"""grpo.engine=vllm on a GPU (needs CUDA and the vllm package): vLLM in the training process, fed the policy's
weights every round (`ftlab.train.grpo_vllm`).

1. After a push, the log-probs vLLM reports for its own sampled tokens equal the trainer's teacher-forced
   log-probs of those tokens (`completion_logps`, the function the GRPO loss uses), for a LoRA policy (the adapter
   saved and loaded under a new LoRA id) and a full model (`load_weights`), before and after a change of the
   weights as large as many optimizer steps; and against the weights from before that change they do not (so the
   check would catch a push that did not happen).

   Tolerance: 1e-2 nats, the largest per-token difference over all sampled tokens. Both sides run in fp32 on the
   same weights, so what remains is kernel arithmetic: vLLM's attention backend, fused RMSNorm and SiLU-and-mul,
   and for LoRA its punica kernels sum in other orders than transformers' sdpa and plain matmuls, ~1e-4 to 1e-3
   per logit over 30 layers (tests/gpu/test_vllm_adapters.py holds vLLM to the same 1e-2 against HF for
   adapters). The change of weights moves log-probs by far more than that (asserted > 0.1), so 1e-2 separates
   "synced" from "stale" with room on both sides.
2. Two GRPO steps of recipes/grpo/prontoqa_tiny.yaml with grpo.engine=vllm, LoRA and full fine-tuning, each in
   a child process (so its vLLM gives the GPU back when it ends).

Each check runs in its own process: one vLLM engine per process, as in training.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-2
QUESTIONS = ["What is 2 plus 3?", "Name a colour.", "Is a cat a mammal?"]
VLLM_ARGS = "grpo.vllm={dtype: float32, gpu_memory_utilization: 0.3, enforce_eager: true}"


def teacher_forced_gap(model, tok, prompts: list[str], results: list[list]) -> float:
    """Largest |vLLM's log-prob - the trainer's| over every sampled token of `results`."""
    from ftlab.data.collate import pad_collate
    from ftlab.data.preference import shifted
    from ftlab.data.sft import prompt_ids
    from ftlab.train.grpo import completion_logps

    gap = 0.0
    for prompt, completions in zip(prompts, results):
        ids = prompt_ids(tok, prompt)
        for c in completions:
            micro = pad_collate([shifted(ids + c.token_ids, len(ids))], tok.pad_token_id)
            micro["completion_mask"] = torch.ones(1, len(c.token_ids), dtype=torch.bool)
            micro = {k: v.cuda() for k, v in micro.items() if isinstance(v, torch.Tensor)}
            with torch.no_grad():
                logps, _ = completion_logps(model, micro)
            gap = max(gap, (logps[0].float().cpu() - torch.tensor(c.logprobs)).abs().max().item())
    return gap


def logprob_gaps(kind: str) -> dict[str, float]:
    """(run in a child process) vLLM vs teacher forcing after pushes of a LoRA or a full policy."""
    from peft import LoraConfig, get_peft_model

    from ftlab.config import load_recipe
    from ftlab.generate import GenerationConfig
    from ftlab.models.load import load_model_and_tokenizer
    from ftlab.train.grpo_vllm import VLLMRollouts

    torch.manual_seed(0)
    cfg = load_recipe(None, ["data.max_length=512", "train.precision=fp32", VLLM_ARGS])
    model, tok = load_model_and_tokenizer(cfg.model)
    if kind == "lora":  # random A and B: the adapter changes the outputs from the first push on
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    model.to("cuda").eval()
    rollouts = VLLMRollouts(cfg, model, tok)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    gen = GenerationConfig(max_new_tokens=24, temperature=1.0, n=2, seed=5)
    out = {"round1": teacher_forced_gap(model, tok, prompts, rollouts.generate(model, prompts, gen, "round 1"))}
    changed = [p for n, p in model.named_parameters() if ("lora_B" in n if kind == "lora" else "proj" in n)]
    before = [p.detach().clone() for p in changed]
    with torch.no_grad():  # what many optimizer steps would do
        for p in changed:
            p.add_(torch.randn_like(p) * (0.05 if kind == "lora" else 0.05 * p.std()))
    second = rollouts.generate(model, prompts, gen, "round 2")
    out["round2"] = teacher_forced_gap(model, tok, prompts, second)
    with torch.no_grad():
        for p, old in zip(changed, before):
            p.copy_(old)
    out["stale"] = teacher_forced_gap(model, tok, prompts, second)
    out["pushes"] = rollouts.pushes
    rollouts.close()
    return out


def child(code: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, check=False)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_after_a_push_vllm_logprobs_equal_the_trainers(kind):
    code = ("import json, sys; from tests.gpu.test_grpo_vllm import logprob_gaps; "
            "print('GAPS', json.dumps(logprob_gaps(sys.argv[1])))")
    done = child(code, kind)
    assert done.returncode == 0, done.stderr[-3000:]
    gaps = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("GAPS ")).split(" ", 1)[1])
    assert gaps["pushes"] == 2
    assert gaps["round1"] < TOLERANCE and gaps["round2"] < TOLERANCE, gaps
    assert gaps["stale"] > 0.1, gaps  # the second round was sampled from the changed weights, not the old ones


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_grpo_steps_sample_on_vllm(tmp_path, lora):
    args = ["train", str(REPO / "recipes" / "grpo" / "prontoqa_tiny.yaml"), f"output_dir={tmp_path / 'runs'}",
            "model.adapter=null", f"lora.enabled={str(lora).lower()}", "data.train=generate:8,hops=1,seed=3",
            "data.val=null", "train.max_steps=2", "train.batch_size=4", "train.grad_accum=1",
            "grpo.num_generations=4", "grpo.max_completion_length=32", "train.precision=fp32", "train.eval_every=null",
            "train.save_every=null", "grpo.engine=vllm", VLLM_ARGS]
    done = child("import sys; from ftlab.cli import main; sys.exit(main(sys.argv[1:]))", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "using the HF engine" not in done.stderr
    run = max((tmp_path / "runs" / "grpo").glob("2*_grpo-prontoqa-tiny"))
    assert "grpo.engine=vllm: vLLM in this process" in (run / "run.log").read_text()
    rows = {r["train_step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}
    assert sorted(rows) == [1, 2] and all(torch.isfinite(torch.tensor(r["train/grad_norm"])) for r in rows.values())
    for step in (1, 2):
        completions = (run / "completions" / f"step_{step:06d}.jsonl").read_text().splitlines()
        assert len(completions) == 4
    assert (run / "final").is_dir()
