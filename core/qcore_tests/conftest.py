"""Shared fixtures: tiny random causal LMs of the architectures qcore must read."""

from __future__ import annotations

import pytest
import torch


def tiny_model(arch: str, layers: int = 2) -> torch.nn.Module:
    from qcore.testing.models import tiny_causal_lm

    return tiny_causal_lm(arch, layers=layers, tie_word_embeddings=arch in ("opt", "gpt2"))


@pytest.fixture
def make_tiny_model():
    """Factory of tiny random causal LMs: ``make_tiny_model("llama", layers=2)``."""
    return tiny_model


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny Llama (safetensors) with a tokenizer, and a text file to calibrate on."""
    from qcore.testing.models import TINY_CORPUS, save_tiny_model

    path = save_tiny_model(tmp_path / "tiny-llama", tie_word_embeddings=False)
    (tmp_path / "calib.txt").write_text(TINY_CORPUS)
    return path
