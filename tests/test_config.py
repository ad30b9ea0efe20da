from pathlib import Path

import pytest

from ftlab.config import load_recipe
from ftlab.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_inheritance_overrides_and_interpolation(tmp_path):
    write(tmp_path / "base.yaml", "name: b\noptim: {lr: 1.0e-4, eps: 1.0e-6}\ntrain:\n  batch_size: 4\n  grad_accum: ${train.batch_size}\n")
    sub = tmp_path / "variants"
    sub.mkdir()
    write(sub / "v.yaml", "base: ../base.yaml\noptim: {lr: 3.0e-4}\n")
    cfg = load_recipe(sub / "v.yaml", ["train.batch_size=6", "model.name=some/model"])
    assert cfg.optim.lr == pytest.approx(3e-4)       # variant wins over base
    assert cfg.optim.eps == pytest.approx(1e-6)      # untouched base value survives
    assert cfg.train.batch_size == 6                 # command line wins over both
    assert cfg.train.grad_accum == 6                 # interpolation resolved after overrides
    assert cfg.model.name == "some/model"


def test_yaml_1_1_exponent_without_dot_is_a_float(tmp_path):
    cfg = load_recipe(write(tmp_path / "r.yaml", "optim: {lr: 1e-5}\n"))
    assert cfg.optim.lr == pytest.approx(1e-5)


@pytest.mark.parametrize("text, overrides, expected", [
    ("optim:\n  lrr: 1\n", [], "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("trian: {}\n", [], "unknown key 'trian'; did you mean 'train'?"),
    ("train:\n  batch_size: many\n", [], "wrong type for 'train.batch_size'"),
    ("optim: {name: sgd}\n", [], "'optim.name' must be one of adamw"),
    ("name: x\n", ["model.nmae=foo"], "unknown key 'model.nmae'; did you mean 'model.name'?"),
    ("name: x\n", ["train.batch_size"], "must look like key=value"),
    ("train: {batch_size: 0}\n", [], "'train.batch_size' must be >= 1"),
])
def test_bad_recipes_name_the_key(tmp_path, text, overrides, expected):
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(UserError) as e:
        load_recipe(path, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "r.yaml", "name: x\noptim:\n  lr: [1\n  eps: 2\n")
    with pytest.raises(UserError, match=r"r\.yaml:4: YAML syntax error"):
        load_recipe(path)


def test_missing_file_and_circular_base(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(UserError, match="circular"):
        load_recipe(tmp_path / "a.yaml")


def test_every_recipe_in_the_repo_validates():
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert recipes, "no recipes found"
    for path in recipes:
        cfg = load_recipe(path)
        assert cfg.name, path


def test_auto_precision_follows_the_cpus_bf16_support():
    """`auto` is resolved when the recipe loads (config.yaml records what ran): bf16 autocast only where the CPU
    computes bf16 in hardware (its flags name AVX512-BF16 or AMX-BF16), fp32 elsewhere; decoding fp32 on a CPU."""
    import torch

    from ftlab.config.load import native_bf16

    if torch.cuda.is_available():
        pytest.skip("checks the CPU rule")
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("reads the CPU flags from /proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    hardware_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert native_bf16() == hardware_bf16
    cfg = load_recipe(None, ["train.precision=auto", "eval.precision=auto"])
    assert cfg.train.precision == ("bf16" if hardware_bf16 else "fp32")
    assert cfg.eval.precision == "fp32"
    assert load_recipe(None, ["train.precision=bf16"]).train.precision == "bf16"  # an explicit choice stays
