"""Pretraining as an objective of the one loop: presets, token budget, logged metrics (bits per byte, parameter
norm, MFU), validation and best checkpoint, exact resume, loss spikes."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftlab.config import load_recipe
from ftlab.errors import UserError
from ftlab.runs.rundir import read_status
from ftlab.runs.trackers import read_metrics
from tests.pretrain_helpers import make_corpus, pretrain_recipe


def train(recipe: Path, *overrides: str):
    from ftlab.train import run_training

    return run_training(load_recipe(recipe, list(overrides)))


def rows(run: Path, axis: str = "train") -> dict[int, dict]:
    return {r[f"{axis}_step"]: r for r in read_metrics(run / "metrics.jsonl") if f"{axis}/loss" in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


# -- presets ---------------------------------------------------------------------------------------------------
def test_presets_fill_model_scratch_and_count_like_pythia():
    from ftlab.models.load import build_scratch_model
    from ftlab.models.presets import flops_per_token, param_counts

    cfg = load_recipe(None, ["model.preset=pythia-70m", "model.scratch.num_hidden_layers=1"])
    assert cfg.model.scratch.model_type == "gpt_neox" and cfg.model.scratch.hidden_size == 512
    assert cfg.model.scratch.num_hidden_layers == 1  # the recipe's own scratch keys win
    tok = type("Tok", (), {"pad_token_id": None, "eos_token_id": 0, "bos_token_id": 0, "__len__": lambda s: 50304})()
    model = build_scratch_model(load_recipe(None, ["model.preset=pythia-14m"]).model.scratch, tok)
    assert param_counts(model)["params"] == 14_067_712  # EleutherAI/pythia-14m's published size
    f = flops_per_token(model, 2048)
    linear = f["params_matmul"]  # 6 x matmul weights + 12 x layers x d x T (PaLM)
    assert f["flops_per_token"] == 6 * linear + 12 * 6 * 128 * 2048
    with pytest.raises(UserError, match="'model.preset' must be one of"):
        load_recipe(None, ["model.preset=gpt-5"])


# -- training --------------------------------------------------------------------------------------------------
def test_pretraining_learns_with_a_token_budget_and_logs_everything(tmp_path, corpus):
    recipe = pretrain_recipe(tmp_path, corpus, train={"max_steps": None, "token_budget": 700, "epochs": 100,
                                                      "eval_every": 5, "best_metric": "eval/loss", "save_every": 4,
                                                      "keep_last": 2},
                             pretrain={"num_categories": 2, "peak_tflops": 1.0})
    run = train(recipe).path
    train_rows, eval_rows = rows(run), rows(run, "eval")
    assert sorted(train_rows) == list(range(1, 12))  # ceil(700 / (4 windows x 16 tokens)) = 11: wins over epochs
    first, last = train_rows[1], train_rows[11]
    assert last["train/loss"] < first["train/loss"] - 1.0
    for key in ("train/bits_per_byte", "train/param_norm", "train/mfu", "train/grad_norm", "train/grad_norm_clipped",
                "train/tokens_per_s", "train/lr"):
        assert math.isfinite(last[key]), key
    assert last["train/predicted_tokens"] == 64
    # bits per byte = nats per token / ln 2 / bytes per token; MFU = tokens/s x FLOPs per token / peak
    assert last["train/bits_per_byte"] == pytest.approx(last["train/loss"] / math.log(2) / last["train/bytes_per_token"])
    summary = json.loads((run / "summary.json").read_text())
    assert last["train/mfu"] == pytest.approx(last["train/step_tokens_per_s"] * summary["model_size"]["flops_per_token"] / 1e12)
    assert sorted(eval_rows) == [5, 10, 11] and "eval/bits_per_byte" in eval_rows[11]
    assert summary["best"]["metric"] == "eval/loss" and (run / "best" / "model.safetensors").is_file()
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == ["step_000004", "step_000008"]
    info = json.loads((run / "categories.json").read_text())
    assert len(info["categories"]) == 2 and set(info["train"]["categories"]) == set(info["categories"])
    assert summary["categories"] == info["categories"] and read_status(run) == "complete"
    # max_steps still wins over the budget
    assert sorted(rows(train(recipe, "name=capped", "train.max_steps=3").path)) == [1, 2, 3]


def test_resume_replays_the_same_losses_and_spike_decisions(tmp_path, corpus):
    recipe = pretrain_recipe(tmp_path, corpus, pretrain={"spike_factor": 1.05, "spike_window": 4},
                             train={"max_steps": 8, "save_every": 2, "keep_last": 10})
    ref = train(recipe, "name=ref").path
    resumed = train(recipe, "name=resumed", f"train.resume={ref / 'checkpoints' / 'step_000004'}").path
    a, b = rows(ref), rows(resumed)
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:
        for key in ("train/loss", "train/grad_norm", "train/param_norm", "train/spike"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-9), (step, key)
    hist = [json.loads(line) for line in (resumed / "loss_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == list(range(1, 9))  # the first 4 copied from the run it resumed


def test_spikes_are_logged_or_skipped(tmp_path):
    from ftlab.train.pretrain import PretrainObjective

    obj = PretrainObjective.__new__(PretrainObjective)
    loop = SimpleNamespace(resumed_from=None, run=None)
    for action, expect_skip in (("log", False), ("skip", True)):
        obj.p = SimpleNamespace(spike_factor=2.0, spike_window=20, spike_action=action)
        obj.history = None
        decisions = [obj.skip_update(loop, i, v) for i, v in enumerate([3.0, 2.9, 3.1] * 4 + [7.0, 3.0])]
        assert decisions == [False] * 12 + [expect_skip, False]
        assert (7.0 in obj.history) is (not expect_skip)  # a skipped loss never becomes the new normal


def test_spike_skip_leaves_the_weights_alone(tmp_path, corpus):
    """With a factor barely above 1 every rising loss is a spike: skipped steps log nothing and change nothing."""
    recipe = pretrain_recipe(tmp_path, corpus, pretrain={"spike_factor": 1.0001, "spike_window": 1,
                                                         "spike_action": "skip"},
                             optim={"lr": 0.5}, train={"max_steps": 8, "grad_clip": None})
    run = train(recipe).path
    hist = [json.loads(line) for line in (run / "loss_history.jsonl").read_text().splitlines()]
    skipped = [h["step"] for h in hist if h["skipped"]]
    assert skipped and sorted(set(range(1, 9)) - set(skipped)) == sorted(rows(run))


# -- the recipe on real data ---------------------------------------------------------------------------------
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (DATA / "arxiv").is_dir(), reason="needs ../shared/data/arxiv")
def test_arxiv_tiny_recipe_runs_on_real_abstracts(tmp_path):
    from ftlab.data.corpus import PrepareSettings, prepare_corpus

    corpus = tmp_path / "arxiv"
    prepare_corpus(PrepareSettings(input=str(DATA / "arxiv" / "abstracts_2007_first2000.jsonl"), out=str(corpus),
                                   workers=0, max_examples_per_split=150, val_fraction=0.1, test_fraction=0.1))
    run = train(REPO / "recipes" / "arxiv" / "tiny.yaml", f"pretrain.corpus={corpus}", f"output_dir={tmp_path}/runs",
                "train.max_steps=2", "train.eval_every=2", "train.save_every=null", "pretrain.num_categories=2",
                "pretrain.min_category_docs=10").path
    info = json.loads((run / "categories.json").read_text())
    assert len(info["categories"]) == 2 and info["train"]["documents"] > 10
    r = rows(run)
    assert abs(r[1]["train/loss"] - math.log(49152)) < 1.0  # a random model: about ln(vocabulary)
    assert 3 < r[1]["train/bytes_per_token"] < 6  # English scientific prose in a 49k BPE vocabulary
    assert math.isfinite(rows(run, "eval")[2]["eval/bits_per_byte"])
