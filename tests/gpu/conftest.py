"""Tests that need a CUDA GPU: every test in this folder is skipped where there is none.

Run them on a GPU machine with `python -m pytest -q tests/gpu` (the vLLM ones also need the vllm
package, and the embedded model's package for the base model).
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def needs_cuda() -> None:
    """Session scope: it runs before the module fixtures that build CUDA models, and its skip then
    applies to every test here."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
