"""DPO: hand-derived losses, the pair audit, reference log-probs and their cache, and DPO runs on the one loop
(exact accumulation, an all-masked micro-batch adds nothing, resume after SIGKILL, 2 processes = 1)."""
from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import ftlab
from ftlab.cli import main
from ftlab.config import load_recipe
from ftlab.errors import UserError
from ftlab.runs.rundir import read_status
from ftlab.runs.trackers import read_metrics
from tests.helpers import tiny_recipe

LOG2 = math.log(2)


# -- the loss, derived by hand ---------------------------------------------------------------------------
# pc=-1, pr=-2, rc=-1.5, rr=-1.5: chosen log-ratio +0.5, rejected -0.5, margin h = 1
PC, PR, RC, RR = (torch.tensor([x], dtype=torch.float64) for x in (-1.0, -2.0, -1.5, -1.5))


def loss(beta, **kw):
    return ftlab.dpo_loss(PC, PR, RC, RR, beta, **kw)


def test_sigmoid_loss_and_rewards_by_hand():
    losses, chosen, rejected = loss(0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)))  # -logsigmoid(0.5 * 1) = 0.474077
    assert losses.item() == pytest.approx(0.4740769841801067)
    assert chosen.item() == pytest.approx(0.25) and rejected.item() == pytest.approx(-0.25)  # beta * log-ratio
    pc = PC.clone().requires_grad_(True)
    ftlab.dpo_loss(pc, PR, RC, RR, 0.5)[0].sum().backward()
    assert pc.grad.item() == pytest.approx(-0.5 / (1 + math.exp(0.5)))  # -beta * sigmoid(-beta h) = -0.188770


def test_conservative_dpo_by_hand():
    eps = 0.1  # 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.426669 + 0.097408
    losses, _, _ = loss(0.5, label_smoothing=eps)
    assert losses.item() == pytest.approx(0.9 * math.log(1 + math.exp(-0.5)) + 0.1 * math.log(1 + math.exp(0.5)))
    assert losses.item() == pytest.approx(0.5240769841801067)


def test_ipo_by_hand():
    assert loss(0.5, loss_type="ipo")[0].item() == pytest.approx(0.0)  # (1 - 1/(2*0.5))^2
    assert loss(0.25, loss_type="ipo")[0].item() == pytest.approx(1.0)  # (1 - 2)^2
    # per-token log-ratios (2 chosen, 4 rejected tokens): h = 0.5/2 + 0.5/4 = 0.375; (0.375 - 2)^2
    got = loss(0.25, loss_type="ipo", chosen_tokens=torch.tensor([2.0]), rejected_tokens=torch.tensor([4.0]))[0]
    assert got.item() == pytest.approx(2.640625)


def test_hinge_by_hand():
    assert loss(0.5, loss_type="hinge")[0].item() == pytest.approx(0.5)  # relu(1 - 0.5)
    assert loss(2.0, loss_type="hinge")[0].item() == 0.0  # relu(1 - 2)


def test_loss_rejects_unknown_variants():
    with pytest.raises(ValueError, match="loss_type"):
        loss(0.1, loss_type="nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        loss(0.1, loss_type="ipo", label_smoothing=0.1)


# -- helpers -------------------------------------------------------------------------------------------------
def write_pairs(path: Path, n: int = 32, seed: int = 0, extra: list[dict] | None = None) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            f.write(json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.",
                                "rejected": f"{a} plus {b} is {a + b + rng.randint(1, 9)}."}) + "\n")
        for row in extra or []:
            f.write(json.dumps(row) + "\n")
    return path


def dpo_recipe(tmp: Path, **sections) -> Path:
    pairs = tmp / "pairs.jsonl"
    if not pairs.exists():
        write_pairs(pairs)
    data = {"train": str(pairs), "group_by_length": False, **sections.pop("data", {})}
    path = tiny_recipe(tmp, data=data, train={"method": "dpo", **sections.pop("train", {})}, **sections)
    recipe = yaml.safe_load(path.read_text())
    recipe["kind"] = "dpo"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train(recipe, *overrides):
    from ftlab.train import run_training

    return run_training(load_recipe(recipe, list(overrides)))


def rows(run) -> dict[int, dict]:
    path = getattr(run, "path", run)
    return {r["train_step"]: r for r in read_metrics(path / "metrics.jsonl") if "train/loss" in r}


LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


# -- runs ----------------------------------------------------------------------------------------------------
def test_dpo_run_logs_rewards_and_learns_the_preference(tmp_path):
    recipe = dpo_recipe(tmp_path)
    run = train(recipe, "train.max_steps=16", "optim.lr=3e-3", "schedule.name=constant", "train.batch_size=8",
                "dpo.beta=0.5")
    r = rows(run)
    assert read_status(run.path) == "complete"
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "nll", "grad_norm", "lr", "tokens_per_s", "pairs"):
        assert f"train/{key}" in r[1], key
    # step 1: the policy is the reference (no dropout), so every margin is 0 and the loss log 2
    assert r[1]["train/loss"] == pytest.approx(LOG2, abs=1e-5)
    assert r[1]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    def late(key):  # the last 4 steps (one epoch of 32 pairs); single steps of 8 pairs are noisy
        return sum(r[s][f"train/{key}"] for s in range(13, 17)) / 4

    assert late("rewards/margins") > 0.4 and late("rewards/accuracies") > 0.7 and late("loss") < 0.55
    m = r[16]
    assert m["train/rewards/margins"] == pytest.approx(m["train/rewards/chosen"] - m["train/rewards/rejected"],
                                                       abs=1e-5)
    log = (run.path / "run.log").read_text()
    assert log.count("preference pair, supervised spans in «»") == 2
    assert "chosen:   «" in log and "rejected: «" in log
    assert (run.path / "reference_logps.pt").is_file()
    assert json.loads((run.path / "reference_logps.json").read_text())["computed"] == 32


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_bf16_step_1_is_exactly_log_2(tmp_path, lora):
    """Reference pass in the first epoch's micro-batches: under bf16 autocast each pair's reference forward has
    the shapes of its first training forward, so step 1 (policy = reference, no dropout) is log 2 to the bit."""
    recipe = dpo_recipe(tmp_path, data={"group_by_length": True}, **({"lora": LORA} if lora else {}))
    r = rows(train(recipe, "train.max_steps=1", "train.precision=bf16", "train.grad_accum=2"))
    assert r[1]["train/loss"] == LOG2 or abs(r[1]["train/loss"] - LOG2) < 1e-7
    assert r[1]["train/rewards/margins"] == 0.0


def test_accumulation_matches_a_bigger_batch(tmp_path):
    """batch 8 x accumulation 1 and batch 2 x accumulation 4 see the same 8 pairs: same loss, rewards, gradients."""
    recipe = dpo_recipe(tmp_path, lora=LORA)
    common = ["train.max_steps=2", "train.grad_clip=1000", "dpo.nll_weight=0.5", "schedule.name=constant"]
    a = rows(train(recipe, "train.batch_size=8", "train.grad_accum=1", "name=a", *common))
    b = rows(train(recipe, "train.batch_size=2", "train.grad_accum=4", "name=b", *common))
    for step in (1, 2):
        assert a[step]["train/pairs"] == b[step]["train/pairs"] == 8
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "nll"):
            assert a[step][f"train/{key}"] == pytest.approx(b[step][f"train/{key}"], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_prompt_computed_once_equals_two_sequences(tmp_path, lora):
    """The shared-prompt layout (default) gives the two-sequence layout's log-probs, losses and gradients;
    with LoRA the frozen head runs in head_log_probs, where the shared prompt's last position is picked twice."""
    from ftlab.losses import frozen_head_weight
    from ftlab.models.load import load_model_and_tokenizer
    from ftlab.train.dpo import build_objective, sequence_logps

    write_pairs(tmp_path / "pairs.jsonl", extra=[{"prompt": "What is 1 plus 2?", "chosen": "Three, since 1 plus 2 "
                                                  "is 3 and not 4.", "rejected": "4"}])  # rows of unequal widths
    recipe = dpo_recipe(tmp_path, **({"lora": LORA} if lora else {}))
    cfg = load_recipe(recipe)
    model, tok = load_model_and_tokenizer(cfg.model)
    model.requires_grad_(not lora)
    assert (frozen_head_weight(model) is not None) == lora
    objective = build_objective(cfg, tok)
    got = {}
    for share in (True, False):
        objective.share_prompt = share
        with torch.no_grad():
            got[share] = sequence_logps(model, objective.batch([32, 0, 5, 7]))
    assert got[True][0].shape == (8,) and torch.equal(got[True][1], got[False][1])
    assert torch.allclose(got[True][0], got[False][0], rtol=1e-5, atol=1e-5)
    common = ["train.max_steps=3", "train.grad_clip=1000", "dpo.nll_weight=0.5"]
    a = rows(train(recipe, "name=shared", *common))
    b = rows(train(recipe, "name=two", "dpo.share_prompt=false", *common))
    for step in a:
        assert a[step]["train/pairs"] == b[step]["train/pairs"]
        for key in ("loss", "grad_norm", "rewards/margins", "nll"):
            assert a[step][f"train/{key}"] == pytest.approx(b[step][f"train/{key}"], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("share", [True, False], ids=["shared-prompt", "two-sequences"])
def test_all_masked_micro_batch_adds_nothing_but_touches_every_parameter(tmp_path, share):
    from ftlab.models.load import load_model_and_tokenizer
    from ftlab.train.dpo import build_objective

    cfg = load_recipe(dpo_recipe(tmp_path), ["dpo.nll_weight=1", f"dpo.share_prompt={str(share).lower()}"])
    model, tok = load_model_and_tokenizer(cfg.model)
    objective = build_objective(cfg, tok)
    objective.ref_logps = torch.randn(len(objective.pairs), 2)
    micro = objective.collate([])
    assert int(micro["units"]) == 0 and int(micro["n_real_tokens"]) == 0
    total, logged = objective.loss(model, micro)
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in logged.values())
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and not g.any() for g in grads)


def test_resume_after_sigkill_replays_the_same_losses(tmp_path):
    recipe = dpo_recipe(tmp_path, lora={**LORA, "dropout": 0.1})
    steps = ["train.max_steps=8", "train.save_every=2", "train.keep_last=5", "dpo.nll_weight=0.2"]
    reference = rows(train(recipe, "name=ref", *steps))
    proc = subprocess.Popen([sys.executable, "-m", "ftlab.cli", "train", str(recipe), "name=killed", *steps],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, ckpt = time.time() + 300, None
    while time.time() < deadline and ckpt is None:
        found = list((tmp_path / "runs" / "dpo").glob("*_killed/checkpoints/step_000004/state.json"))
        ckpt = found[0] if found else None
        time.sleep(0.02)
    assert ckpt is not None, "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = ckpt.parents[2]
    assert read_status(killed) == "running"
    resumed = train(recipe, "name=resumed", f"train.resume={killed}", *steps)
    got = rows(resumed)
    assert min(got) >= 5 and max(got) == 8
    for step, r in got.items():
        for key in ("train/loss", "train/rewards/margins", "train/grad_norm"):
            assert r[key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-7), (step, key)
    # the resumed run took the killed run's reference log-probs instead of recomputing them
    assert json.loads((resumed.path / "reference_logps.json").read_text())["computed"] == 0


# -- reference log-probs -----------------------------------------------------------------------------------
def saved_policy(tmp: Path, seed: int, out: Path | None = None) -> Path:
    """A full model directory (weights of a random tiny Llama, the embedded tokenizer), as an SFT run leaves one."""
    from ftlab.config.schema import ModelConfig
    from ftlab.models.load import load_model_and_tokenizer
    from tests.helpers import TINY_SCRATCH

    torch.manual_seed(seed)
    model, tok = load_model_and_tokenizer(ModelConfig(scratch=TINY_SCRATCH))
    out = out or tmp / f"sft_model_{seed}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def reference_of(run) -> torch.Tensor:
    return torch.load(run.path / "reference_logps.pt", weights_only=True)["logps"]


def test_lora_reference_is_the_model_with_adapters_disabled(tmp_path, monkeypatch):
    """No second copy: the reference pass runs the policy itself inside `disable_adapter()`; its numbers equal
    the base model's (LoRA starts at zero), i.e. the same as a full fine-tuning run's reference."""
    import peft

    recipe = dpo_recipe(tmp_path)
    entered = []
    original = peft.PeftModel.disable_adapter

    def spy(self):
        entered.append(True)
        return original(self)

    monkeypatch.setattr(peft.PeftModel, "disable_adapter", spy)
    lora = train(recipe, "name=lora", "train.max_steps=1", *[f"lora.{k}={v}" for k, v in LORA.items()
                                                              if k != "target_modules"])
    assert entered
    full = train(recipe, "name=full", "train.max_steps=1")
    assert torch.allclose(reference_of(lora), reference_of(full), atol=1e-4)
    assert rows(lora)[1]["train/loss"] == pytest.approx(LOG2, abs=1e-5)


def test_continuing_an_adapter_keeps_it_in_the_reference(tmp_path):
    """An adapter trained further (the self-improvement loop's way: model.adapter, lora.enabled=false) is part of
    the initial weights, so the reference keeps it: step 1 is log 2 again, and not the base model's numbers."""
    recipe = dpo_recipe(tmp_path, lora=LORA)
    first = train(recipe, "name=first", "train.max_steps=3", "optim.lr=1e-2")
    adapter = first.path / "final"
    cont = train(recipe, "name=cont", "train.max_steps=1", "lora.enabled=false", f"model.adapter={adapter}")
    assert rows(cont)[1]["train/loss"] == pytest.approx(LOG2, abs=1e-5)
    assert not torch.allclose(reference_of(cont), reference_of(first), atol=1e-3)
    # model.name = an adapter directory (base + adapter loaded) with a new LoRA on top: adapters are not disabled
    from ftlab.train.reference import starts_from_adapter

    assert starts_from_adapter(load_recipe(recipe, ["model.scratch=null", f"model.name={adapter}"]))
    assert not starts_from_adapter(load_recipe(recipe))


def test_reference_model_from_a_path_and_the_cache(tmp_path, caplog):
    """dpo.reference: a saved model scores the pairs (not the policy); a later run with the same key reuses the
    cache; another reference or another chat template invalidates it."""
    recipe = dpo_recipe(tmp_path)
    ref_dir = saved_policy(tmp_path, seed=1)
    first = train(recipe, "name=first", "train.max_steps=1", f"dpo.reference={ref_dir}")
    ref_logps = reference_of(first)

    # the stored numbers are the saved model's own log-probs, not the policy's initial ones
    from ftlab.config.schema import ModelConfig
    from ftlab.models.load import load_model_and_tokenizer
    from ftlab.train.dpo import build_objective, sequence_logps

    cfg = load_recipe(recipe, [f"dpo.reference={ref_dir}"])
    model, tok = load_model_and_tokenizer(ModelConfig(name=str(ref_dir)))
    objective = build_objective(cfg, tok)
    with torch.no_grad():
        logps, _ = sequence_logps(model, objective.batch([0, 1, 2]))
    assert torch.allclose(torch.stack(logps.chunk(2), dim=1), ref_logps[:3], atol=1e-4)
    none = train(recipe, "name=none", "train.max_steps=1")
    assert not torch.allclose(reference_of(none), ref_logps, atol=1e-2)

    # same key: reused, nothing computed
    again = train(recipe, "name=again", "train.max_steps=1", f"dpo.reference={ref_dir}",
                  f"dpo.reference_cache={first.path}")
    assert json.loads((again.path / "reference_logps.json").read_text())["computed"] == 0
    assert torch.equal(reference_of(again), ref_logps)

    # a changed reference (another model directory) recomputes everything
    other = saved_policy(tmp_path, seed=2)
    caplog.clear()
    changed = train(recipe, "name=changed", "train.max_steps=1", f"dpo.reference={other}",
                    f"dpo.reference_cache={first.path}")
    assert json.loads((changed.path / "reference_logps.json").read_text())["computed"] == 32
    assert "was made with another reference" in caplog.text

    # a reference rewritten in place (new weights, same path) is another reference too
    saved_policy(tmp_path, seed=3, out=ref_dir)
    rewritten = train(recipe, "name=rewritten", "train.max_steps=1", f"dpo.reference={ref_dir}",
                      f"dpo.reference_cache={first.path}")
    assert json.loads((rewritten.path / "reference_logps.json").read_text())["computed"] == 32


def test_a_changed_chat_template_invalidates_the_cache(tmp_path, caplog):
    """The template is part of the key even where it renders these prompts identically."""
    policy = saved_policy(tmp_path, seed=0)
    recipe = dpo_recipe(tmp_path, model={"name": str(policy), "scratch": None}, data={"chat_template": True})
    first = train(recipe, "name=first", "train.max_steps=1")
    config = policy / "tokenizer_config.json"
    tc = json.loads(config.read_text())
    template_file = policy / "chat_template.jinja"
    if template_file.is_file():
        template_file.write_text("{#- v2 -#}" + template_file.read_text())
    else:
        tc["chat_template"] = "{#- v2 -#}" + tc["chat_template"]
        config.write_text(json.dumps(tc))
    caplog.clear()
    second = train(recipe, "name=second", "train.max_steps=1", f"dpo.reference_cache={first.path}")
    assert "was made with another chat_template" in caplog.text
    assert json.loads((second.path / "reference_logps.json").read_text())["computed"] == 32
    assert torch.allclose(reference_of(second), reference_of(first), atol=1e-5)  # same prompts: same numbers


def test_quantization_and_revision_are_part_of_the_cache_key(tmp_path, embedded_tokenizer):
    """A QLoRA run (4-bit base) reused a bf16 LoRA run's reference log-probs: the key left out lora.quantize
    and model.revision, which change the reference model's numbers."""
    from ftlab.train.reference import cache_key

    policy = saved_policy(tmp_path, seed=0)
    recipe = dpo_recipe(tmp_path, model={"name": str(policy), "scratch": None}, lora={"enabled": True})
    keys = [json.dumps(cache_key(load_recipe(recipe, overrides), embedded_tokenizer), sort_keys=True)
            for overrides in ([], ["lora.quantize=nf4"], ["model.revision=abc123"], [])]
    assert len(set(keys[:3])) == 3 and keys[0] == keys[3]


def test_a_cache_is_reused_pair_by_pair(tmp_path):
    """A loop iteration with some new pairs computes only those (the key is per pair for the token ids)."""
    recipe = dpo_recipe(tmp_path)
    first = train(recipe, "name=first", "train.max_steps=1", "data.limit=20")
    more = train(recipe, "name=more", "train.max_steps=1", f"dpo.reference_cache={first.path}")
    info = json.loads((more.path / "reference_logps.json").read_text())
    assert (info["reused"], info["computed"]) == (20, 12)
    assert torch.allclose(reference_of(more)[:20], reference_of(first), atol=0)


# -- the function API and task-built pairs ----------------------------------------------------------------
def test_run_dpo_as_a_function_with_pairs_in_memory(tmp_path):
    from ftlab.train.dpo import run_dpo

    cfg = load_recipe(dpo_recipe(tmp_path), ["train.max_steps=2", "data.train=null"])
    pairs = [{"prompt": f"What is {i} plus 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}."} for i in range(8)]
    run = run_dpo(cfg, pairs=pairs)
    assert read_status(run.path) == "complete" and rows(run)[2]["train/pairs"] == 4
    assert "pairs[0]" in (run.path / "run.log").read_text()


def test_a_task_builds_its_own_pairs(tmp_path):
    """PrOntoQA from ftlab's generator: the task's proof as chosen, the wrong verdict as rejected."""
    recipe = dpo_recipe(tmp_path, data={"task": "prontoqa", "train": "generate:8,hops=1-2,seed=3",
                                        "task_options": {"proof": "backward"}, "max_length": 512,
                                        "chat_template": True})
    run = train(recipe, "train.max_steps=1")
    log = (run.path / "run.log").read_text()
    assert "generate:8,hops=1-2,seed=3: record 1" in log and "8 preference pairs: 0 dropped" in log
    chosen = next(line for line in log.splitlines() if "chosen:   «" in line)
    rejected = next(line for line in log.splitlines() if "rejected: «" in line)
    assert ("The answer is True" in chosen) == ("The answer is False" in rejected)


def test_the_tiny_recipe_builds_its_pairs(embedded_tokenizer):
    from ftlab.train.dpo import build_objective

    cfg = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "dpo" / "tiny.yaml")
    objective = build_objective(cfg, embedded_tokenizer)
    assert len(objective.pairs) == 48 + 16 and objective.n_train == 48 and not objective.report.dropped
    assert cfg.lora.enabled and cfg.dpo.reference is None


# -- the pair audit --------------------------------------------------------------------------------------------
def audit(tmp_path, extra, *overrides, n=8):
    from ftlab.models.load import load_tokenizer, resolve_model_path
    from ftlab.train.dpo import build_objective

    write_pairs(tmp_path / "pairs.jsonl", n=n, extra=extra)
    cfg = load_recipe(dpo_recipe(tmp_path), list(overrides))
    return build_objective(cfg, load_tokenizer(resolve_model_path("smollm2-135m-instruct")))


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "the chosen response is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, "the rejected response is empty"),
    ({"prompt": "word " * 80, "chosen": "c", "rejected": "r"},
     "the prompt has 81 tokens, more than data.max_length=64"),
], ids=["identical", "empty-chosen", "empty-rejected", "prompt-too-long"])
def test_audit_stops_on_too_many_bad_pairs_naming_the_first(tmp_path, row, reason):
    with pytest.raises(UserError) as e:
        audit(tmp_path, [row], n=3)  # 1 of 4 = 25% > 5%
    msg = str(e.value)
    assert "1 of 4 preference pairs (25.0%) are bad" in msg and f"pairs.jsonl:4: {reason}" in msg, msg


def test_audit_drops_a_few_bad_pairs_within_the_threshold(tmp_path, caplog):
    objective = audit(tmp_path, [{"prompt": "p", "chosen": "x", "rejected": "x"}], "data.max_bad_share=0.1", n=19)
    assert len(objective.pairs) == 19 and objective.report.dropped == {"chosen and rejected are identical": 1}
    assert "pairs.jsonl:20: chosen and rejected are identical" in caplog.text


def test_audit_checks_shared_prompt_tokens_and_one_bos(embedded_tokenizer):
    from ftlab.data.preference import TextPair, audit_pairs, encode_pair

    tok = embedded_tokenizer  # its BOS is <|im_start|>, which its template writes first
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    good = encode_pair(TextPair("t:1", prompt, "yes", "no", "<|im_end|>", templated=True), tok, 64)
    assert good["chosen"][0] == tok.bos_token_id and good["chosen"][1] != tok.bos_token_id
    assert good["chosen"][-1] == tok.convert_tokens_to_ids("<|im_end|>")  # end of turn supervised
    kept, _ = audit_pairs([good], tok, 0.0)
    assert kept == [good]
    other_prompt = dict(good, where="t:2", rejected=[good["rejected"][0] + 1] + good["rejected"][1:])
    with pytest.raises(UserError, match="t:2: chosen and rejected do not share the same prompt tokens"):
        audit_pairs([other_prompt], tok, 0.0)
    double = encode_pair(TextPair("t:3", tok.bos_token + prompt, "yes", "no", None, templated=True), tok, 64)
    with pytest.raises(UserError, match="t:3: the prompt starts with 2 BOS tokens"):
        audit_pairs([double], tok, 0.0)
    missing = encode_pair(TextPair("t:4", prompt[len(tok.bos_token):], "yes", "no", None, templated=True), tok, 64)
    with pytest.raises(UserError, match="t:4: the prompt does not start with the BOS token"):
        audit_pairs([missing], tok, 0.0)


def test_chat_rows_share_one_rendered_prompt(tmp_path, embedded_tokenizer):
    from ftlab.data.preference import rows_to_pairs

    msgs = [{"role": "user", "content": "Is 7 prime?"}]
    pairs = rows_to_pairs([("f:1", {"messages": msgs, "chosen": "Yes.", "rejected": "No."}),
                           ("f:2", {"prompt": msgs, "chosen": [{"role": "assistant", "content": "Yes."}],
                                    "rejected": {"role": "assistant", "content": "No."}}),
                           ("f:3", {"prompt": "Is 7 prime?", "chosen": "Yes.", "rejected": "No."})],
                          embedded_tokenizer, chat_template=True)
    assert pairs[0].prompt == pairs[1].prompt == pairs[2].prompt
    assert pairs[0].prompt.endswith("<|im_start|>assistant\n") and pairs[0].terminator == "<|im_end|>"
    assert (pairs[1].chosen, pairs[1].rejected) == ("Yes.", "No.")


def test_bad_pairs_via_the_cli_leave_no_finished_run(tmp_path, capsys):
    recipe = dpo_recipe(tmp_path)
    write_pairs(tmp_path / "bad.jsonl", n=1, extra=[{"prompt": "p", "chosen": "x", "rejected": "x"}])
    code = main(["train", str(recipe), f"data.train={tmp_path / 'bad.jsonl'}"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:2: chosen and rejected are identical" in err and "Traceback" not in err
    assert not list((tmp_path / "runs").rglob("summary.json"))


# -- two processes ------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_two_processes_match_one_with_an_uneven_last_batch(tmp_path):
    """21 pairs, micro-batches of 4 pairs globally, accumulation 2: the last micro-batch holds one pair, so
    rank 1 runs an all-masked one (in training and in the sharded reference pass, 11 vs 10 pairs)."""
    from tests.test_distributed import torchrun

    write_pairs(tmp_path / "pairs.jsonl", n=21)
    recipe = dpo_recipe(tmp_path, lora=LORA, train={"max_steps": None, "epochs": 1})
    common = ["train.grad_clip=1000", "schedule.name=constant", "train.grad_accum=2", "dpo.nll_weight=0.3",
              "optim.lr=1e-2"]
    one = train(recipe, "name=one", "train.batch_size=4", *common)
    proc = torchrun(recipe, "name=two", "train.batch_size=2", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = next((tmp_path / "runs" / "dpo").glob("*_two"))
    a, b = rows(one), rows(two)
    assert sorted(a) == sorted(b) == [1, 2, 3] and [a[s]["train/pairs"] for s in a] == [8, 8, 5]
    for step in a:
        assert b[step]["train/pairs"] == a[step]["train/pairs"]
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/rejected", "nll"):
            assert b[step][f"train/{key}"] == pytest.approx(a[step][f"train/{key}"], rel=1e-5, abs=1e-6), (step, key)
    assert torch.allclose(reference_of(one), torch.load(two / "reference_logps.pt", weights_only=True)["logps"],
                          atol=1e-5)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2 and read_status(two) == "complete"
