"""Shared fixtures: tiny random causal LMs of the architectures qcore must read."""

from __future__ import annotations

import pytest
import torch


def tiny_model(arch: str, layers: int = 2) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=layers,
                           num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64)
        model = tf.OPTForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=64)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


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
