"""NaN forensics of pretraining: the bad batch as text with documents and offsets, the non-finite parameters
and gradients, and `ftlab replay RUN --step N` (rebuild the step from (seed, step), rerun it from the newest
checkpoint before it with anomaly detection and forward hooks)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ftlab.cli import main
from ftlab.config import load_recipe
from ftlab.data.corpus import Corpus
from ftlab.data.windows import WindowSampler
from ftlab.runs.trackers import read_metrics
from tests.pretrain_helpers import make_corpus, pretrain_recipe


def train(recipe: Path, *overrides: str):
    from ftlab.train import run_training

    return run_training(load_recipe(recipe, list(overrides)))


def rows(run: Path) -> dict[int, dict]:
    return {r["train_step"]: r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


# -- NaN forensics and replay -------------------------------------------------------------------------------
def poisoned_model(tmp: Path, word: str) -> Path:
    """A tiny model whose embedding rows for `word`'s tokens are inf: any window holding it has a NaN loss."""
    from ftlab.models.load import EMBEDDED_MODEL, build_scratch_model, load_tokenizer, resolve_model_path
    from tests.helpers import TINY_SCRATCH

    tok = load_tokenizer(resolve_model_path(EMBEDDED_MODEL))
    torch.manual_seed(0)
    model = build_scratch_model(TINY_SCRATCH, tok)
    rows = tok(f" {word}", add_special_tokens=False).input_ids
    model.get_input_embeddings().weight.data[rows] = float("inf")
    out = tmp / "poisoned"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_nonfinite_step_is_explained_and_replayed(tmp_path, capsys):
    poison = {"id": "zebra-doc", "category": "astro", "text": " ".join(["zebra"] * 60)}
    corpus = make_corpus(tmp_path, n=30, extra=[poison])
    model = poisoned_model(tmp_path, "zebra")
    recipe = pretrain_recipe(tmp_path, corpus, model={"name": str(model), "scratch": None},
                             train={"max_steps": 6, "nan_policy": "skip", "save_final": False})
    run = train(recipe).path
    c = Corpus.open(corpus)
    zebra = c.ids.index("zebra-doc")
    sampler = WindowSampler(c, "train", None, 16, seed=0)
    bad_steps = [s + 1 for s in range(6) if zebra in sampler.windows(s, 4)[0].tolist()]
    assert bad_steps, "the test corpus should put the poisoned document in some step"
    assert sorted(rows(run)) == sorted(set(range(1, 7)) - set(bad_steps))  # those steps were skipped
    n = bad_steps[0]
    report = json.loads((run / "nonfinite" / f"step_{n:06d}_rank0.json").read_text())
    assert report["what"] == "loss" and report["first_nonfinite_param"] == "model.embed_tokens.weight"
    assert "model.embed_tokens.weight" in report["nonfinite_grads"] or report["nonfinite_grads"]
    zebra_windows = [w for w in report["windows"] if w["id"] == "zebra-doc"]
    assert zebra_windows and "zebra" in zebra_windows[0]["text"]
    # each window's own loss says which one it is
    assert all(math.isnan(w["loss"]) == (w["id"] == "zebra-doc") for w in report["windows"])
    docs, offsets = sampler.windows(n - 1, 4)
    assert {(w["doc"], w["offset"]) for w in report["windows"]} <= set(zip(docs.tolist(), offsets.tolist()))
    assert "zebra" in (run / "nonfinite" / f"step_{n:06d}_rank0.txt").read_text()
    assert (run / "nonfinite" / f"step_{n:06d}_rank0.pt").is_file()  # the loop's own dump

    capsys.readouterr()
    assert main(["replay", str(run), "--step", str(n)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["outcome"] == "non-finite" and out["started_from"] == "initial weights"
    first = out["first_nonfinite_output"]
    assert first["module"] == "model.embed_tokens" and first["inputs_finite"] and not first["weights_finite"]
    assert "model.embed_tokens.weight" in out["nonfinite_params"]
    assert any(w["id"] == "zebra-doc" for w in out["windows"])
    assert (Path(out["replay_run"]) / "replay.json").is_file()


def test_replay_of_a_finite_step_reproduces_its_loss_from_a_checkpoint(tmp_path, corpus, capsys):
    recipe = pretrain_recipe(tmp_path, corpus, train={"max_steps": 5, "save_every": 2, "keep_last": 5})
    run = train(recipe).path
    capsys.readouterr()
    assert main(["replay", str(run), "--step", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["started_from"].endswith("step_000004") and out["outcome"] == "finite"
    assert out["loss"] == pytest.approx(out["logged_loss"], rel=1e-6) and out["first_nonfinite_output"] is None
    assert out["grad_norm"] == pytest.approx(out["logged_grad_norm"], rel=1e-6)
    assert len(out["windows"]) == 4 and all(w["text"] for w in out["windows"])
