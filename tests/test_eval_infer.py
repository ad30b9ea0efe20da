"""`ftlab eval` (run directory naming, predictions, --compare) and resumable `ftlab infer` on a tiny model."""
import json
from pathlib import Path

import pytest

from ftlab.cli import main
from ftlab.evaluate import compare_table
from ftlab.report.stats import paired_difference
from ftlab.runs.rundir import read_status
from tests.helpers import tiny_recipe

GSM = [{"question": f"Ann has {a} pens and buys {b}. How many pens?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
       for a, b in [(1, 2), (3, 4), (5, 6), (10, 20)]]


def gsm_file(tmp_path: Path) -> Path:
    path = tmp_path / "gsm_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    return path


def test_eval_writes_predictions_and_metrics_with_a_descriptive_name(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    src = gsm_file(tmp_path)
    code = main(["eval", str(recipe), "eval.task=gsm8k", f"eval.source={src}", "eval.max_new_tokens=6",
                 "eval.shots=1"])
    assert code == 0
    run = next((tmp_path / "runs" / "eval").glob("2*"))
    assert run.name.endswith("_gsm8k_gsm_test_1shot") and read_status(run) == "complete"
    rows = [json.loads(l) for l in (run / "predictions.jsonl").open()]
    assert [r["gold"] for r in rows] == ["3", "7", "11", "30"]  # dataset order, gold from after '####'
    assert {"prompt", "output", "extracted", "correct", "correct_strict"} <= set(rows[0])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 4 and "extraction_rule" in metrics and metrics["shots"] == 1
    assert metrics["accuracy"] == sum(r["correct"] for r in rows) / 4


def test_eval_offset_and_limit_pick_a_slice(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    src = gsm_file(tmp_path)
    code = main(["eval", str(recipe), "eval.task=gsm8k", f"eval.source={src}", "eval.max_new_tokens=2",
                 "eval.offset=1", "eval.limit=2"])
    assert code == 0
    run = next((tmp_path / "runs" / "eval").glob("2*"))
    assert [json.loads(l)["gold"] for l in (run / "predictions.jsonl").open()] == ["7", "11"]
    code = main(["eval", str(recipe), "eval.task=gsm8k", f"eval.source={src}", "eval.offset=4"])
    err = capsys.readouterr().err
    assert code == 2 and "eval.offset=4 skips every example" in err


def test_compare_evaluates_two_models_on_identical_prompts(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    trained = main(["train", str(recipe), "train.max_steps=1"])
    assert trained == 0
    final = next((tmp_path / "runs" / "sft").glob("2*")) / "final"
    src = gsm_file(tmp_path)
    code = main(["eval", str(recipe), "eval.task=gsm8k", f"eval.source={src}", "eval.max_new_tokens=4",
                 "--compare", str(final), str(final)])
    out = capsys.readouterr().out
    assert code == 0 and out.count(str(final)) == 2 and "| model | accuracy" in out
    runs = sorted((tmp_path / "runs" / "eval").glob("2*"))
    prompts = [[json.loads(l)["prompt"] for l in (r / "predictions.jsonl").open()] for r in runs]
    assert len(runs) == 2 and prompts[0] == prompts[1]
    # the same model twice, greedy: every row's difference is 0, so the interval is [0, 0]
    assert "accuracy = primary rule: strict, else flexible" in out
    assert "tuned - base accuracy: +0.000, 95% CI [+0.000, +0.000], paired bootstrap over 4 rows" in out


def test_compare_checks_both_models_before_evaluating_either(tmp_path, capsys, tiny_tokenizer):
    from ftlab.models.load import build_scratch_model
    from tests.helpers import TINY_SCRATCH

    recipe = tiny_recipe(tmp_path)
    base = tmp_path / "base"
    build_scratch_model(TINY_SCRATCH, tiny_tokenizer).save_pretrained(base)   # a complete local model
    truncated = tmp_path / "truncated"
    build_scratch_model(TINY_SCRATCH, tiny_tokenizer).save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])   # a copy cut short
    src = gsm_file(tmp_path)
    capsys.readouterr()   # drop the save progress bars
    for tuned, message in [(tmp_path / "no_such_model", f"model path '{tmp_path / 'no_such_model'}' does not exist"),
                           (f"{base}+{tmp_path / 'no_adapter'}",
                            f"adapter path '{tmp_path / 'no_adapter'}' does not exist"),
                           (truncated, "truncated safetensors file")]:
        code = main(["eval", str(recipe), "eval.task=gsm8k", f"eval.source={src}", "--compare", str(base), str(tuned)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs" / "eval").exists()   # BASE was not evaluated first


def test_paired_difference_and_table_by_hand():
    # by id: a: 1 -> 1 (0), b: 1 -> 0 (-1), c: 0 -> 1 (+1), d: 0 -> 1 (+1), e: 1 -> 1 (0); f only in base
    base = {"a": [True], "b": [True], "c": [False], "d": [False], "e": [True], "f": [True]}
    tuned = {"e": [True], "d": [True], "c": [True], "b": [False], "a": [True]}
    diff = paired_difference(base, tuned)
    assert diff["accuracy_diff"] == pytest.approx(1 / 5) and diff["n_paired"] == 5 and diff["n_unpaired"] == 1
    lo, hi = diff["accuracy_diff_ci95"]
    assert -1.0 <= lo < 0.2 < hi <= 1.0
    results = [{"model": "base", "accuracy": 0.5, "accuracy_ci95": [0.25, 0.75], "n": 6,
                "primary_rule": "strict, else flexible"},
               {"model": "tuned", "accuracy": 0.8, "accuracy_ci95": [0.4, 1.0], "n": 5,
                "primary_rule": "strict, else flexible", **diff}]
    table = compare_table(results)
    assert "| base | 0.500 | [0.250, 0.750] | 6 |" in table
    assert "accuracy = primary rule: strict, else flexible" in table
    assert f"tuned - base accuracy: +0.200, 95% CI [{lo:+.3f}, {hi:+.3f}], paired bootstrap over 5 rows" in table
    assert "(1 unmatched rows left out)" in table


def test_infer_streams_rows_and_resumes(tmp_path):
    recipe = tiny_recipe(tmp_path)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(5))
                   + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    argv = ["infer", str(recipe), "--input", str(inp), "--output", str(out), "eval.max_new_tokens=3"]
    assert main(argv) == 0
    full = {r["index"]: r for r in map(json.loads, out.open())}
    # as if the run had been killed after two rows and half of a third
    kept = [dict(full[i], output="kept") for i in (0, 3)]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + json.dumps(full[4])[:20])
    assert main(argv) == 0
    rows = [json.loads(l) for l in out.open()]
    assert sorted(r["index"] for r in rows) == [0, 1, 2, 3, 4, 5]
    assert [r["output"] for r in rows if r["index"] in (0, 3)] == ["kept", "kept"]  # not regenerated
    assert all(r["prompt"] == full[r["index"]]["prompt"] for r in rows)
    assert main(argv) == 0  # nothing left to do
    assert len(out.read_text().splitlines()) == 6


def test_infer_refuses_to_resume_another_input_or_settings(tmp_path, capsys):
    """Rows count as done only for the same prompt, model and generation settings (issue: index-only resume
    skipped every prompt of a different --input and exited 0)."""
    recipe = tiny_recipe(tmp_path)
    inp, other = tmp_path / "in.jsonl", tmp_path / "other.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(3)))
    other.write_text("".join(json.dumps({"prompt": f"world {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    assert main(["infer", str(recipe), "--input", str(inp), "--output", str(out), "eval.max_new_tokens=3"]) == 0
    capsys.readouterr()
    before = out.read_text()
    for extra, needle in [([f"--input={other}", "eval.max_new_tokens=3"], f"another prompt than {other}:1"),
                          ([f"--input={inp}", "eval.max_new_tokens=5"], "max_new_tokens 3 -> 5"),
                          ([f"--input={inp}", "eval.max_new_tokens=3", "model.dtype=bf16"], "'dtype': 'bf16'")]:
        code = main(["infer", str(recipe), "--output", str(out)] + extra)
        err = capsys.readouterr().err
        assert code == 2 and needle in err and f"{out}:1:" in err and "Traceback" not in err, err
    assert out.read_text() == before  # nothing appended or dropped
    # an output written by an older ftlab (no settings on record) is refused too, not taken as done
    out.write_text(json.dumps({"index": 0, "prompt": "x", "output": "y"}) + "\n")
    code = main(["infer", str(recipe), "--input", str(inp), "--output", str(out)])
    assert code == 2 and "older ftlab" in capsys.readouterr().err


def test_infer_bad_row_names_file_and_line(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    code = main(["infer", str(recipe), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")])
    assert code == 2 and f"{inp}:2: missing field 'prompt'" in capsys.readouterr().err


def test_vllm_is_given_resolved_model_and_adapter_paths(tmp_path, tiny_tokenizer):
    """vLLM loads by path: the embedded name must become its cached directory, and an adapter
    directory given as the model must become its base model + that adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftlab.config.schema import EMBEDDED_MODEL, ModelConfig
    from ftlab.evaluate import load_eval_tokenizer, vllm_model_paths
    from ftlab.models.load import build_scratch_model, embedded_model_dir
    from tests.helpers import TINY_SCRATCH

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    build_scratch_model(TINY_SCRATCH, tiny_tokenizer).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(adapter)  # its adapter_config.json names `base` as base model

    assert vllm_model_paths(ModelConfig(name=str(adapter))) == (str(base), str(adapter))
    assert vllm_model_paths(ModelConfig(name=str(base), adapter=str(adapter))) == (str(base), str(adapter))
    assert vllm_model_paths(ModelConfig(name=str(base))) == (str(base), None)
    embedded, none = vllm_model_paths(ModelConfig(name=EMBEDDED_MODEL))
    assert embedded == str(embedded_model_dir(EMBEDDED_MODEL)) and none is None
    assert (Path(embedded) / "config.json").is_file()
    # the tokenizer alone, from the base model (the adapter directory has none)
    tok = load_eval_tokenizer(ModelConfig(name=str(adapter)), str(base), str(adapter))
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()


def test_eval_builds_the_recipes_task_with_its_options():
    """`ftlab eval` on a SOKRATES recipe prompts as its policy was trained (data.task_options); another task
    named with eval.task gets none of them."""
    from ftlab.config.load import load_recipe
    from ftlab.evaluate import eval_task

    cfg = load_recipe("recipes/sokrates/tiny.yaml")
    task = eval_task(cfg, "sokrates")
    assert task.backward_plan and task.source == "prontoqa"
    assert "Premises by what they conclude" in task.load(cfg.data.val, limit=1)[0].question
    assert not hasattr(eval_task(cfg, "prontoqa"), "backward_plan")
