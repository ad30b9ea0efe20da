"""Traces, then filter (seed 002): `ftlab sample` and `ftlab filter` on a tiny random model, the kept rows
training as generic data, and hub datasets with a config name (`hf:org/name:config:split`) on local files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftlab.cli import main
from ftlab.config import load_recipe
from ftlab.config.schema import DataConfig
from ftlab.data.sources import load_conversations
from ftlab.errors import UserError
from ftlab.runs.rundir import read_status
from ftlab.tasks import get_task
from ftlab.tasks.base import HubSpec, parse_hub_spec
from ftlab.tasks.gsm8k import EXTRACTION_RULE
from tests.helpers import TINY_SCRATCH, tiny_recipe

REPO = Path(__file__).resolve().parents[1]
GSM8K_DATA = REPO.parent / "shared" / "data" / "gsm8k"
GSM = [{"question": f"Ann has {a} pens and buys {b}. How many pens?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
       for a, b in [(1, 2), (3, 4), (5, 6)]]
INSTRUCTION = "\nSolve the problem step by step, then give the final answer on the last line in the form \"#### <number>\"."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def gsm_recipe(tmp_path: Path, rows: list[dict] = GSM, **data) -> Path:
    """A tiny random model whose task data is GSM8K rows; sampling at temperature 1, 4 new tokens."""
    src = write_jsonl(tmp_path / "gsm.jsonl", rows)
    return tiny_recipe(tmp_path, data={"task": "gsm8k", "train": str(src), "max_length": 128, **data},
                       eval={"max_new_tokens": 4, "temperature": 1.0})


def by_key(rows: list[dict]) -> dict[tuple[int, int], dict]:
    return {(r["index"], r["sample"]): r for r in rows}


# -- sample ---------------------------------------------------------------------------------------
def test_sample_writes_training_shaped_rows_and_resumes_to_the_same_file(tmp_path, capsys, embedded_tokenizer):
    recipe, out = gsm_recipe(tmp_path), tmp_path / "traces.jsonl"
    argv = ["sample", str(recipe), "--out", str(out), "--samples", "2"]
    assert main(argv) == 0
    full = by_key(read_jsonl(out))
    assert sorted(full) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    for (i, s), row in full.items():
        assert (row["question"], row["answer"], row["id"]) == (GSM[i]["question"], GSM[i]["answer"], f"gsm8k-{i}")
        # without the chat template the prompt is the task's whole plain-text prompt
        assert row["prompt"] == GSM[i]["question"] + INSTRUCTION + "\nAnswer: "
        assert isinstance(row["response"], str)
    assert all(full[(i, 0)]["response"] != full[(i, 1)]["response"] for i in range(3))  # two samples, not one twice
    settings = json.loads((tmp_path / "traces.jsonl.settings.json").read_text())
    assert (settings["n"], settings["task"], settings["temperature"]) == (2, "gsm8k", 1.0)

    # generic training renders the same conversations as the task does from these rows
    cfg = DataConfig(task="gsm8k", train=str(out), chat_template=False)
    as_task = load_conversations(cfg, str(out), "train", embedded_tokenizer, None)
    as_generic = load_conversations(DataConfig(task="generic", train=str(out), chat_template=False), str(out),
                                    "train", embedded_tokenizer, None)
    assert [list(c) for c in as_generic] == [list(c) for c in as_task]

    # killed after question 0, one sample of question 1 and half a row of question 2
    kept = [dict(full[(0, s)], response="kept") for s in (0, 1)]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept + [full[(1, 0)]]) + json.dumps(full[(2, 0)])[:30])
    assert main(argv) == 0
    resumed = by_key(read_jsonl(out))
    assert sorted(resumed) == sorted(full)
    assert [resumed[(0, s)]["response"] for s in (0, 1)] == ["kept", "kept"]   # complete: not sampled again
    # seeds per (prompt, sample): the resumed rows are the rows an uninterrupted run wrote
    assert all(resumed[k]["response"] == full[k]["response"] for k in full if k[0] > 0)
    before = out.read_text()
    assert main(argv) == 0 and out.read_text() == before   # nothing left to do

    capsys.readouterr()
    assert main(argv + ["eval.max_new_tokens=5"]) == 2
    err = capsys.readouterr().err
    assert f"{out}:1: written with another model" in err and "max_new_tokens 4 -> 5" in err
    assert out.read_text() == before


@pytest.mark.parametrize("data, extra, needle", [
    ({"task": "generic"}, ["--samples", "2"], "task 'generic' has no answer checker"),
    ({}, ["--samples", "3", "eval.temperature=0"], "would write 3 identical responses"),
    ({}, ["--samples", "0"], "--samples must be >= 1"),
    ({"chat_template": True, "shots": 1}, ["--samples", "1"], "must be one user message"),
])
def test_sample_refusals_are_one_line_and_write_nothing(tmp_path, capsys, data, extra, needle):
    recipe, out = gsm_recipe(tmp_path, **data), tmp_path / "traces.jsonl"
    assert main(["sample", str(recipe), "--out", str(out)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftlab: error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_sample_from_the_eval_source_takes_its_offset_and_limit(tmp_path):
    recipe, out = gsm_recipe(tmp_path), tmp_path / "traces.jsonl"
    evals = write_jsonl(tmp_path / "eval.jsonl", GSM[::-1])
    argv = ["sample", str(recipe), "--out", str(out), "--from", "eval", "--samples", "1", "eval.task=gsm8k",
            f"eval.source={evals}", "eval.offset=1", "eval.limit=1"]
    assert main(argv) == 0
    assert [(r["index"], r["sample"], r["question"]) for r in read_jsonl(out)] == [(0, 0, GSM[1]["question"])]


# -- filter ---------------------------------------------------------------------------------------
def traces(responses: dict[tuple[int, int], str]) -> list[dict]:
    """Rows in the shape `ftlab sample` writes, with the given responses."""
    return [{**GSM[i], "id": f"gsm8k-{i}", "index": i, "sample": s, "prompt": GSM[i]["question"] + INSTRUCTION,
             "response": text, "settings": "x"} for (i, s), text in responses.items()]


TRACES = traces({
    (0, 0): "1 + 2 = 3\n#### 3",                 # strict 3 = gold 3: kept
    (0, 1): "1 + 2 = 4\n#### 4",                 # strict 4: dropped
    (1, 0): "3 plus 4 is 7",                     # no strict form, last number 7: kept
    (1, 1): "The answer is 8. Check: 3 + 4 = 7",  # strict 8 wins over the later 7: dropped
    (2, 0): "#### 12",                           # gold 11: dropped
    (2, 1): "no number at all",                  # unparsed: dropped
})


def test_filter_keeps_what_the_checker_scores_correct_and_states_the_rule(tmp_path, capsys):
    recipe = gsm_recipe(tmp_path)
    inp, out = write_jsonl(tmp_path / "traces.jsonl", TRACES), tmp_path / "kept.jsonl"
    assert main(["filter", str(recipe), "--input", str(inp), "--out", str(out)]) == 0
    assert read_jsonl(out) == [TRACES[0], TRACES[2]]   # the rows as they were, nothing added
    stats = json.loads((tmp_path / "kept.stats.json").read_text())
    assert (stats["original"], stats["kept"], stats["questions"], stats["questions_with_kept"]) == (6, 2, 3, 2)
    assert stats["retention"] == pytest.approx(2 / 6)
    assert stats["rule"] == {"task": "gsm8k", "primary_rule": "strict, else flexible",
                             "extraction_rule": EXTRACTION_RULE}
    assert stats["sampled_with"] is None   # no settings file beside the input
    printed = capsys.readouterr().out
    assert "kept 2 of 6 traces (retention 33.3%); 2 of 3 questions keep at least one" in printed
    assert str(tmp_path / "kept.stats.json") in printed


@pytest.mark.parametrize("case, needle", [
    ("generic", "task 'generic' has no answer checker"),
    ("infer_rows", "traces.jsonl:2: missing field 'response'"),
    ("no_gold", "traces.jsonl:1: missing field 'answer'"),
    ("response_type", "traces.jsonl:2: field 'response' must be a string; got a number"),
    ("bad_gold", "traces.jsonl:1: cannot read as gsm8k"),
    ("malformed", "traces.jsonl:2: malformed JSON"),
    ("missing", "traces.jsonl: file not found"),
])
def test_filter_errors_name_the_line_and_write_nothing(tmp_path, capsys, case, needle):
    recipe = gsm_recipe(tmp_path, **({"task": "generic"} if case == "generic" else {}))
    inp, out = tmp_path / "traces.jsonl", tmp_path / "kept.jsonl"
    lines = [json.dumps(r) for r in TRACES[:2]]
    if case == "infer_rows":     # what `ftlab infer` writes: no response, no gold
        lines[1] = json.dumps({"index": 1, "prompt": "p", "output": "o", "settings": "x"})
    elif case == "no_gold":
        lines[0] = json.dumps({k: v for k, v in TRACES[0].items() if k != "answer"})
    elif case == "response_type":
        lines[1] = json.dumps({**TRACES[1], "response": 4})
    elif case == "bad_gold":
        lines[0] = json.dumps({**TRACES[0], "answer": "no final line"})
    elif case == "malformed":
        lines[1] = lines[1][:-1]
    if case != "missing":
        inp.write_text("\n".join(lines) + "\n")
    assert main(["filter", str(recipe), "--input", str(inp), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftlab: error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "kept.stats.json").exists()


def test_sampled_then_filtered_traces_train_as_generic_rows(tmp_path, embedded_tokenizer):
    """The whole path on the chat template: sample, a model's answers (written here, so that some are right),
    filter, then SFT with data.task: generic on exactly the prompts the task renders."""
    recipe, out = gsm_recipe(tmp_path, chat_template=True), tmp_path / "traces.jsonl"
    assert main(["sample", str(recipe), "--out", str(out), "--samples", "2", "data.limit=2"]) == 0
    rows = read_jsonl(out)
    assert all(r["prompt"] == GSM[r["index"]]["question"] + INSTRUCTION for r in rows)  # the user message
    answers = {(0, 0): "#### 3", (0, 1): "#### 4", (1, 0): "#### 8", (1, 1): "3 + 4 = 7"}
    write_jsonl(out, [{**r, "response": answers[(r["index"], r["sample"])]} for r in rows])
    kept = tmp_path / "kept.jsonl"
    assert main(["filter", str(recipe), "--input", str(out), "--out", str(kept)]) == 0
    assert [(r["index"], r["sample"]) for r in read_jsonl(kept)] == [(0, 0), (1, 1)]
    assert json.loads((tmp_path / "kept.stats.json").read_text())["sampled_with"]["n"] == 2

    generic = DataConfig(task="generic", train=str(kept), chat_template=True)
    as_generic = load_conversations(generic, str(kept), "train", embedded_tokenizer, None)
    as_task = load_conversations(DataConfig(task="gsm8k", train=str(kept), chat_template=True), str(kept), "train",
                                 embedded_tokenizer, None)
    assert [list(c) for c in as_generic] == [list(c) for c in as_task]
    assert [c.terminator for c in as_generic] == [c.terminator for c in as_task]
    assert main(["train", str(recipe), "data.task=generic", f"data.train={kept}", "train.max_steps=2"]) == 0
    assert read_status(tmp_path / "runs" / "sft" / "latest") == "complete"


# -- hub datasets with a config name -------------------------------------------------------------------
def test_hub_spec_parsing_by_hand():
    assert parse_hub_spec("hf:openai/gsm8k:socratic:train") == HubSpec("openai/gsm8k", "socratic", "train")
    assert parse_hub_spec("hf:openai/gsm8k:socratic", "train") == HubSpec("openai/gsm8k", "socratic", "train")
    assert parse_hub_spec("hf:openai/gsm8k:socratic:test", "train") == HubSpec("openai/gsm8k", "socratic", "test")
    assert parse_hub_spec("openai/gsm8k") == HubSpec("openai/gsm8k", None, "test")
    assert parse_hub_spec("hf:openai/gsm8k::train") == HubSpec("openai/gsm8k", None, "train")
    assert str(parse_hub_spec("hf:openai/gsm8k:main", "train")) == "hf:openai/gsm8k:main:train"
    for bad in ("hf:a/b:c:d:e", "hf:", "hf: a/b", "hf:a/b: c"):
        with pytest.raises(UserError, match="a hub dataset is 'hf:org/name'"):
            parse_hub_spec(bad)


README_CONFIGS = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
---
"""


@pytest.fixture
def hub_layout(tmp_path, monkeypatch) -> Path:
    """A dataset repository as openai/gsm8k lays it out on the Hub (parquet per config and split, configs named
    in the README), written by `datasets` itself; its cache goes to tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    repo = tmp_path / "gsm8k"
    socratic = [{"question": "Q1?", "answer": "How many? ** 1 + 2 = <<1+2=3>>3\n#### 3"},
                {"question": "Q2?", "answer": "How many? ** 2 + 2 = 4\n#### 4"}]
    for config, split, rows in (("main", "train", GSM[:2]), ("main", "test", GSM[2:]), ("socratic", "train", socratic)):
        (repo / config).mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(repo / config / f"{split}-00000-of-00001.parquet"))
    (repo / "README.md").write_text(README_CONFIGS)
    return repo


def test_hub_configs_reach_load_dataset(hub_layout, tmp_path):
    task = get_task("gsm8k")
    soc = task.load(f"hf:{hub_layout}:socratic:train")
    assert [(e.gold, e.meta["format"]) for e in soc] == [("3", "socratic"), ("4", "socratic")]
    assert soc[0].target == "How many? ** 1 + 2 = 3\n#### 3"
    assert [e.gold for e in task.load(f"hf:{hub_layout}:main", split="test")] == ["11"]  # the split key
    assert [e.gold for e in task.load(f"hf:{hub_layout}:main:train", split="test")] == ["3", "7"]  # named split wins
    located = task.load_records(f"hf:{hub_layout}:socratic:train")
    assert located[1][0] == f"hf:{hub_layout}:socratic:train: record 2"
    for spec, needle in ((f"hf:{hub_layout}:nope:train", "'nope' not found"),
                         (f"hf:{hub_layout}:socratic:test", "Unknown split \"test\"")):
        with pytest.raises(UserError, match=needle) as e:
            task.load(spec)
        assert "\n" not in str(e.value) and str(e.value).startswith(spec)
    # a training run reads the socratic config's rows as its data
    recipe = tiny_recipe(tmp_path, data={"task": "gsm8k", "train": f"hf:{hub_layout}:socratic:train",
                                         "max_length": 128})
    assert main(["train", str(recipe), "train.max_steps=1", "train.batch_size=2"]) == 0


@pytest.mark.skipif(not (GSM8K_DATA / "test_socratic.jsonl").is_file(), reason="../shared/data/gsm8k not available")
def test_socratic_toy_recipe_trains_a_couple_of_steps(tmp_path, monkeypatch, embedded_tokenizer):
    monkeypatch.chdir(REPO)   # the recipe's data paths are relative to the checkout
    variant = tmp_path / "toy.yaml"
    variant.write_text(yaml.safe_dump({
        "base": str(REPO / "recipes" / "gemma_gsm8k" / "toy_full_socratic.yaml"), "output_dir": str(tmp_path / "runs"),
        "model": {"scratch": TINY_SCRATCH}, "data": {"limit": 8}, "train": {"max_steps": 2, "batch_size": 4}}))
    cfg = load_recipe(variant)
    conversations = load_conversations(cfg.data, cfg.data.train, cfg.data.train_split, embedded_tokenizer, cfg.data.limit)
    assert len(conversations) == 8 and all(" ** " in c[0][1] for c in conversations)   # socratic targets
    assert main(["train", str(variant)]) == 0
    assert read_status(tmp_path / "runs" / "sft" / "latest") == "complete"
