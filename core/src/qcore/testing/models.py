"""Tiny random causal language models of the architectures qcore reads, built from
configs (no hub): for plugin authors' tests and qcore's own."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

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
