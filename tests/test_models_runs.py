import json
import os
import time

import pytest
import torch

from ftlab.config.schema import ModelConfig
from ftlab.errors import UserError
from ftlab.models.load import embedded_gguf, load_model_and_tokenizer, resolve_model_path
from ftlab.runs.rundir import RunDir, read_status


def test_offline_hub_id_fails_fast_with_one_line(monkeypatch):
    from ftlab import hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    started = time.time()
    with pytest.raises(UserError) as e:
        resolve_model_path("some-org/some-model")
    assert time.time() - started < 5
    assert "cannot reach the Hugging Face Hub" in str(e.value) and "smollm2-135m-instruct" in str(e.value)


def test_missing_local_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_scratch_model_uses_config_and_embedded_tokenizer():
    cfg = ModelConfig(scratch={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})
    model, tok = load_model_and_tokenizer(cfg)
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tok)
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_embedded_model_cache_matches_the_gguf_and_loads_fast():
    """The cached safetensors model gives the GGUF model's logits, and a load from the cache is < 5 s. The
    session's own cache: converting into an empty one is what the first-use and damaged-cache tests do."""
    model, tok = load_model_and_tokenizer(name="smollm2-135m-instruct")
    started = time.time()
    again, _ = load_model_and_tokenizer(name="smollm2-135m-instruct")
    assert time.time() - started < 5
    from transformers import AutoModelForCausalLM
    gguf = embedded_gguf("smollm2-135m-instruct")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tok("Every wumpus is a yumpus. Sam is a wumpus.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, reference(ids).logits, atol=1e-5)
    assert tok.chat_template and "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_adapter_copied_from_another_machine_finds_the_embedded_base(tmp_path):
    """peft records the base as the training machine's cache path (.../models/smollm2-135m-instruct); on
    another machine (or FTLAB_CACHE) that path is gone and the embedded name must be used instead."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from ftlab.models.adapters import peft_wrapping
    base, tok = load_model_and_tokenizer(name="smollm2-135m-instruct")
    ids = tok("Every wumpus is a yumpus.", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
    with peft_wrapping():
        lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "/home/someone-else/.cache/ftlab/models/smollm2-135m-instruct"
    cfg_path.write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # issue 11.17: adapter loads warned on every run
        merged, _ = load_model_and_tokenizer(name=str(adapter))
    with torch.no_grad():
        merged_logits, lora_logits = merged(ids).logits, lora(ids).logits
    # Merging B@A into the weights rounds differently from adding it per token: allow a few float32 ulps per
    # layer at the logits' scale (CPU kernels differ), far below what the adapter itself changes.
    tol = 64 * torch.finfo(torch.float32).eps * merged.config.num_hidden_layers * lora_logits.abs().max().item()
    assert (merged_logits - lora_logits).abs().max().item() < tol
    assert (base_logits - lora_logits).abs().max().item() > 100 * tol


def test_lora_wrapping_warns_nothing():
    """peft reads transformers' deprecated is_gradient_checkpointing: no FutureWarning reaches the user."""
    import warnings

    from ftlab.config.schema import LoraConfig
    from ftlab.models.adapters import apply_lora
    model, _ = load_model_and_tokenizer(ModelConfig(scratch={"model_type": "llama", "hidden_size": 32,
                                                             "intermediate_size": 64, "num_hidden_layers": 1,
                                                             "num_attention_heads": 4, "num_key_value_heads": 2}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        apply_lora(model, LoraConfig(enabled=True), gradient_checkpointing=True)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]], ids=["projections", "lm-head"])
def test_an_adapter_saves_without_asking_the_hub_and_keeps_targeted_embeddings(tmp_path, targets):
    """An adapter names the embedded base, which is no Hub repo: peft's default asked the Hub for its config.json at
    every save (two warnings offline). The head's own weights go into the adapter exactly when LoRA adapts it."""
    import warnings

    from safetensors import safe_open

    from ftlab.config.schema import LoraConfig
    from ftlab.models.adapters import apply_lora
    from ftlab.train.checkpoint import save_model
    from tests.helpers import TINY_SCRATCH
    model, _ = load_model_and_tokenizer(ModelConfig(scratch=TINY_SCRATCH))
    model = apply_lora(model, LoraConfig(enabled=True, target_modules=targets))
    model.peft_config["default"].base_model_name_or_path = "smollm2-135m-instruct"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_model(model, None, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        head_weights = [k for k in f.keys() if "lm_head" in k and "lora_" not in k]
    assert bool(head_weights) == ("lm_head" in targets)


def test_lora_last_layers_adapts_only_the_top_layers_and_backward_stops_there():
    """lora.last_layers=2 of 4: adapters in layers 2-3 only; a backward pass never reaches layers 0-1 (the
    point of the option: their activations need no gradient), and more layers than the model has is a UserError."""
    from ftlab.config.schema import LoraConfig
    from ftlab.errors import UserError
    from ftlab.models.adapters import apply_lora

    def tiny():
        return load_model_and_tokenizer(ModelConfig(scratch={
            "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2}))[0]
    model = apply_lora(tiny(), LoraConfig(enabled=True, target_modules=["q_proj", "down_proj"], last_layers=2))
    adapted = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {2, 3}
    reached = []
    for i, layer in enumerate(model.base_model.model.model.layers):
        layer.register_full_backward_hook(lambda m, gi, go, i=i: reached.append(i))
    model(torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    assert sorted(set(reached)) == [2, 3]
    with pytest.raises(UserError, match="lora.last_layers=5 but the model has 4 layers"):
        apply_lora(tiny(), LoraConfig(enabled=True, last_layers=5))


def test_a_gguf_file_is_parsed_once_during_a_conversion_and_gguf_is_restored_after(tmp_path):
    """convert_gguf's speed-up: inside the block the same file gives the same reader (one parse) and the same
    arguments the same tensor-name table; after it, even after an error, `gguf` is untouched."""
    import gguf

    from ftlab.models.load import gguf_parsed_once
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("ftlab.test", 7)
    writer.add_tensor("tok", torch.arange(6, dtype=torch.float32).numpy())
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError), gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(tmp_path / "." / "tiny.gguf")) is first
        assert int(first.fields["ftlab.test"].contents()) == 7
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        raise RuntimeError("a failed conversion")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader_cls, name_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_a_conversion_finished_second_leaves_the_first_in_place(tmp_path):
    """Two processes converting into one empty cache (the test workers do): the second rename meets a full
    directory; the first copy stays whole and the second's temporary directory is removed."""
    from ftlab.models.load import publish_conversion
    first, second, target = tmp_path / ".m.first", tmp_path / ".m.second", tmp_path / "m"
    for tmp, text in ((first, "first"), (second, "second")):
        tmp.mkdir()
        (tmp / "config.json").write_text(text)
    publish_conversion(first, target)
    publish_conversion(second, target)
    assert (target / "config.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.slow
def test_damaged_embedded_cache_is_converted_again(tmp_path, monkeypatch):
    """A truncated cached conversion (a killed copy, a full disk) is rebuilt, not loaded or reported."""
    import shutil

    from ftlab.models.load import embedded_model_dir
    converted = embedded_model_dir("smollm2-135m-instruct")  # the session's cache, copied: one conversion here
    shutil.copytree(converted, tmp_path / "models" / converted.name)
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path))
    weights = tmp_path / "models" / converted.name / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    assert embedded_model_dir("smollm2-135m-instruct") == weights.parent
    assert weights.stat().st_size == size


def test_run_dirs_never_overwrite_and_hide_secrets(tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue")
    monkeypatch.setenv("WANDB_API_KEY", "wandbsecret123")
    cfg = OmegaConf.create({"name": "x", "note": "token is hf_supersecretvalue", "api_key": "abc"})
    a = RunDir.create(tmp_path, "sft", "same", cfg, seed=3)
    b = RunDir.create(tmp_path, "sft", "same", cfg, seed=3)
    assert a.path != b.path and a.path.exists() and b.path.exists()
    assert os.readlink(tmp_path / "sft" / "latest") == b.path.name
    for f in a.path.iterdir():
        text = f.read_text()
        assert "hf_supersecretvalue" not in text and "wandbsecret123" not in text, f
    assert "abc" not in (a.path / "config.yaml").read_text()
    assert read_status(a.path) == "running"
    a.finish("complete", loss=1.5)
    assert json.loads((a.path / "summary.json").read_text())["loss"] == 1.5
    assert json.loads((a.path / "env.json").read_text())["seed"] == 3


def test_resolved_config_yaml_loads_back_as_the_same_recipe(tmp_path, monkeypatch):
    """config.yaml must run again: keys such as max_new_tokens, tokenizer or pad_token_id are not secrets."""
    from omegaconf import OmegaConf

    from ftlab.config import load_recipe
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: {tokenizer: some/tokenizer, scratch: {model_type: llama, pad_token_id: 0}}\n"
                      "eval: {max_new_tokens: 7}\njob: {eos_token: '</s>', max_tokens: 9}\n")
    cfg = load_recipe(recipe, ["eval.stop=[x]", "data.task_options={max_tokens: 3}"])
    run = RunDir.create(tmp_path / "runs", "sft", "r", cfg, seed=0)
    again = load_recipe(run.path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert again.eval.max_new_tokens == 7 and again.model.tokenizer == "some/tokenizer"


def test_secret_override_is_hidden_in_config_and_argv(tmp_path, monkeypatch):
    from ftlab.config import load_recipe
    argv = ["ftlab", "train", "r.yaml", "job.hf_token=hf_plainsecret", "--api-key", "k3y", "eval.max_new_tokens=5"]
    monkeypatch.setattr("sys.argv", argv)
    cfg = load_recipe(None, ["job.hf_token=hf_plainsecret", "eval.max_new_tokens=5"])
    run = RunDir.create(tmp_path, "sft", "s", cfg, seed=0)
    for f in ("config.yaml", "env.json"):
        text = (run.path / f).read_text()
        assert "hf_plainsecret" not in text and "k3y" not in text, f
    recorded = json.loads((run.path / "env.json").read_text())["argv"]
    assert recorded == ["ftlab", "train", "r.yaml", "job.hf_token=***", "--api-key", "***", "eval.max_new_tokens=5"]


def test_trackers_write_jsonl_and_tensorboard(tmp_path):
    from omegaconf import OmegaConf
    from ftlab.runs.trackers import Trackers, read_metrics
    run = RunDir.create(tmp_path, "sft", "t")
    tr = Trackers(run, OmegaConf.create({"wandb": False, "tensorboard": True, "project": "p"}))
    tr.log({"loss": 2.0, "bad": float("nan")}, step=1)
    tr.log({"loss": 1.5}, step=1, axis="eval")
    tr.close()
    rows = read_metrics(run.metrics_path)
    assert rows[0]["train_step"] == 1 and rows[0]["train/loss"] == 2.0 and rows[0]["train/bad"] == "nan"
    assert rows[1]["eval_step"] == 1 and rows[1]["eval/loss"] == 1.5
    assert list((run.path / "tensorboard").glob("events.*"))


def test_metrics_of_a_killed_run_read_without_the_torn_last_line(tmp_path):
    from ftlab.runs.trackers import read_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"train_step": 1, "train/loss": 2.0}\n{"train_step": 2, "train/lo')
    assert read_metrics(path) == [{"train_step": 1, "train/loss": 2.0}]
    path.write_text('{"train_step": 1}\ngarbage\n{"train_step": 3}\n')
    with pytest.raises(UserError, match="metrics.jsonl:2: damaged metrics line"):
        read_metrics(path)


def test_wandb_offline_uses_separate_step_axes(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from omegaconf import OmegaConf
    from ftlab.runs.trackers import Trackers
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir.create(tmp_path, "sft", "w")
    tr = Trackers(run, OmegaConf.create({"wandb": True, "tensorboard": False, "project": "p"}))
    tr.log({"loss": 2.0}, step=1)
    tr.log({"accuracy": 0.5}, step=1, axis="eval")
    tr.close()
    assert list((run.path / "wandb").rglob("*.wandb"))


def test_a_finished_run_stops_logging(tmp_path):
    """What the next run logs before its directory exists must not land in the finished run's run.log."""
    import logging

    log = logging.getLogger("ftlab")
    first = RunDir.create(tmp_path, "sft", "first")
    log.info("line of the first run")
    first.finish("complete")
    log.info("logged between the runs")
    second = RunDir.create(tmp_path, "sft", "second")
    log.info("line of the second run")
    second.finish("complete")
    first_log = (first.path / "run.log").read_text()
    second_log = (second.path / "run.log").read_text()
    assert "line of the first run" in first_log and "between the runs" not in first_log
    assert "line of the second run" in second_log and "between the runs" not in second_log
    assert "line of the first run" not in second_log
