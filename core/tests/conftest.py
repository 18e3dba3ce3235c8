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


TINY_TEXT = " ".join(
    f"The {a} {b} of {c} was {d} in the year {1900 + i}."
    for i, (a, b, c, d) in enumerate(
        zip(["old", "new", "red", "tall"] * 50, ["river", "city", "house", "road"] * 50,
            ["stone", "glass", "wood", "iron"] * 50, ["built", "found", "sold", "named"] * 50)))


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained here (no hub), vocabulary < 128."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100])
    tok.train_from_iterator([TINY_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny Llama (safetensors) with a tokenizer, and a text file to calibrate on."""
    model = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    (tmp_path / "calib.txt").write_text(TINY_TEXT)
    return path
