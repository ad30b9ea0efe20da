"""Shared test fixtures: a tiny offline tokenizer with known ids, so expectations can be written by hand."""
from __future__ import annotations

import os

import pytest

# The suite runs in 2 worker processes (pyproject's addopts): each worker computes with one thread, as the
# subprocesses they start do, instead of two workers' torch thread pools contending for the same cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# id = position in this list; every test can compute token ids by hand from it.
TINY_VOCAB = "<pad> <eos> <unk> <bos> hello world the cat sat on mat user assistant : a b c d".split()


def build_tiny_tokenizer():
    """A whitespace word-level tokenizer (no network): pad=0, eos=1, unk=2, bos=3, hello=4, world=5, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # decodes words joined by single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded SmolLM2-135M-Instruct tokenizer (real chat template; converted once, then cached)."""
    from ftlab.models.load import EMBEDDED_MODEL, load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(EMBEDDED_MODEL))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The random test order's seed at the end of every run (`-q` hides pytest-randomly's header line)."""
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.hasplugin("randomly") and isinstance(seed, int):
        terminalreporter.write_line(f"random test order, seed {seed}: repeat it with --randomly-seed={seed}")
