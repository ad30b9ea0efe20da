"""Bad input ends in one line on stderr, exit code 2, and no run directory that looks finished."""
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.cli import main
from tests.helpers import tiny_recipe


def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("ftlab: error:")]
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err


def no_runs(tmp_path: Path) -> bool:
    runs = tmp_path / "runs"
    return not runs.exists() or not any(runs.rglob("summary.json"))


def test_help_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "ftlab.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("train", "eval", "infer", "quickstart", "memory"):
        assert verb in out.stdout


def test_the_parser_imports_no_torch():
    """Every verb is registered at start; importing torch and transformers there cost each command ~1.7 s
    (`ftlab --help`, `ftlab plan`, the process `ftlab launch` starts torchrun from)."""
    code = ("import sys; from ftlab.cli import build_parser; build_parser(); "
            "print(' '.join(m for m in ('torch', 'transformers', 'peft', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("case, overrides, needle", [
    ("missing recipe", None, "recipe file not found"),
    ("unknown key", ["optim.lerning_rate=1"], "unknown key 'optim.lerning_rate'"),
    ("wrong type", ["train.batch_size=abc"], "wrong type for 'train.batch_size'"),
    ("missing model path", ["model.scratch=null", "model.name=./no/such/model"], "does not exist"),
    ("offline hub id", ["model.scratch=null", "model.name=someorg/somemodel"], "cannot reach the Hugging Face Hub"),
    ("malformed jsonl", ["data.train=BAD"], ":2: malformed JSON"),
    ("missing field", ["data.train=NOFIELD"], ":1: missing field 'response'"),
    ("empty dataset", ["data.train=EMPTY"], "file is empty"),
    ("all too long", ["data.max_length=3"], "longer than max_length"),
    ("bad lora target", ["lora.enabled=true", "lora.target_modules=[q_proj,nope_proj]"], "'nope_proj' is not a module"),
    ("qlora on cpu", ["lora.enabled=true", "lora.quantize=nf4"], "needs a CUDA GPU"),
])
def test_train_bad_input(tmp_path, capsys, monkeypatch, case, overrides, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from ftlab import hub
    hub.hub_reachable.cache_clear()
    recipe = tiny_recipe(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    (tmp_path / "nofield.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    subst = {"BAD": "bad.jsonl", "NOFIELD": "nofield.jsonl", "EMPTY": "empty.jsonl"}
    overrides = [o.split("=")[0] + "=" + str(tmp_path / subst[o.split("=")[1]]) if o.split("=")[1] in subst else o
                 for o in (overrides or [])]
    argv = ["train", str(tmp_path / "missing.yaml") if case == "missing recipe" else str(recipe)]
    code, err = run_cli(argv + overrides, capsys)
    assert_one_line_error(code, err, needle)
    assert no_runs(tmp_path)


def test_eval_unknown_task_lists_known_ones(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    code, err = run_cli(["eval", str(recipe), "eval.task=nosuch", f"eval.source={tmp_path / 'train.jsonl'}"], capsys)
    assert_one_line_error(code, err, "unknown task 'nosuch'; known tasks: folio, gsm8k, prontoqa, socsci210, sokrates")


def test_subprocess_exit_code_is_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ftlab.cli", "train", str(tmp_path / "x.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("ftlab: error:") and "Traceback" not in out.stderr


def test_quickstart_finds_its_default_recipe(tmp_path, monkeypatch):
    from ftlab.cli import default_quickstart_recipe

    monkeypatch.chdir(tmp_path)  # not in the checkout: falls back to the checkout ftlab runs from
    found = Path(default_quickstart_recipe())
    assert found.name == "quickstart.yaml" and found.parent.name == "recipes" and found.is_file()
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "quickstart.yaml").write_text("name: mine\n")
    assert Path(default_quickstart_recipe()) == tmp_path / "recipes" / "quickstart.yaml"
