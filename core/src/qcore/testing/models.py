"""Tiny random causal language models of the architectures qcore reads, built from
configs (no hub): for plugin authors' tests and qcore's own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "qwen2", "mistral", "opt", "gpt2")


def tiny_causal_lm(arch: str = "llama", *, layers: int = 2, hidden: int = 64,
                   intermediate: int = 96, vocab_size: int = 128, heads: int = 4,
                   kv_heads: int = 2, seed: int = 0, tie_word_embeddings: bool = True) -> nn.Module:
    """A randomly initialised (``torch.manual_seed(seed)``) model in eval mode.

    ``arch``: one of :data:`ARCHITECTURES`. Llama-family models use grouped-query
    attention with ``kv_heads``; OPT and GPT-2 have no such option."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings)
    if arch in ("llama", "qwen2", "mistral"):
        config_cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
        config = config_cls(hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, max_position_embeddings=128, **common)
    elif arch == "opt":
        config = tf.OPTConfig(hidden_size=hidden, ffn_dim=intermediate, num_hidden_layers=layers,
                              num_attention_heads=heads, word_embed_proj_dim=hidden,
                              max_position_embeddings=128, **common)
    elif arch == "gpt2":
        config = tf.GPT2Config(n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=heads,
                               n_positions=128, **common)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return tf.AutoModelForCausalLM.from_config(config).eval()


#: A few hundred words of plain English: enough text to train :func:`tiny_tokenizer` and to
#: cut a handful of calibration windows of a few dozen tokens.
TINY_CORPUS = " ".join(
    f"The {a} {b} of {c} was {d} in the year {1900 + i}."
    for i, (a, b, c, d) in enumerate(
        zip(["old", "new", "red", "tall"] * 50, ["river", "city", "house", "road"] * 50,
            ["stone", "glass", "wood", "iron"] * 50, ["built", "found", "sold", "named"] * 50,
            strict=True)))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :data:`TINY_CORPUS` (no hub), with fewer
    than 128 tokens, so it fits :func:`tiny_causal_lm`'s default vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<eos>"],
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:100])
    tok.train_from_iterator([TINY_CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_tiny_model(directory: str | os.PathLike[str], arch: str = "llama", **options: Any) -> Path:
    """Write a model directory that ``qcore quantize DIRECTORY`` reads: a
    :func:`tiny_causal_lm` (``options`` go to it) saved with safetensors, its
    :func:`tiny_tokenizer`, and :data:`TINY_CORPUS` as ``calibration.txt`` (for
    ``--calib``). Returns the directory."""
    path = Path(directory)
    tiny_causal_lm(arch, **options).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    (path / "calibration.txt").write_text(TINY_CORPUS)
    return path
