"""Capturing block-0 inputs and replaying the blocks, on tiny random models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import transformers
from qcore.model import (
    StructureError,
    capture_block_inputs,
    find_blocks,
    move_to,
    replace_hidden,
    run_block,
)
from torch import nn

transformers.logging.set_verbosity_error()

HIDDEN, VOCAB, SEQ = 32, 64, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead (and spin on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=8)
    if arch == "mistral":
        return transformers.MistralConfig(**common)
    if arch == "opt":
        return transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            ffn_dim=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=64,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=3,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise KeyError(arch)


def tiny_model(arch: str, attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_config(arch), attn_implementation=attn
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough for the blocks to matter
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def input_ids(n: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))


def replay(blocks: nn.ModuleList, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """All blocks in sequence from a captured block-0 call."""
    hidden = args[0] if args else kwargs["hidden_states"]
    for block in blocks:
        hidden = run_block(block, args, kwargs)
        args, kwargs = replace_hidden(args, kwargs, hidden)
    return hidden


HEADS = {  # test-side knowledge of where each model's head is (the code under test has none)
    "llama": lambda m, h: m.lm_head(m.model.norm(h)),
    "gpt2": lambda m, h: m.lm_head(m.transformer.ln_f(h)),
}


@pytest.mark.parametrize(
    ("arch", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager")]
)
def test_replayed_blocks_reproduce_logits(arch: str, attn: str) -> None:
    model = tiny_model(arch, attn)
    blocks = find_blocks(model)
    ids = input_ids(5)
    calls = capture_block_inputs(model, blocks, ids, batch_size=2)
    assert len(calls) == 3
    if attn == "eager":  # a 4-D mask: a kwarg for Llama, the third positional for GPT-2
        args, kwargs = calls[0]
        mask = kwargs["attention_mask"] if arch == "llama" else args[2]
        assert isinstance(mask, torch.Tensor) and mask.shape == (2, 1, SEQ, SEQ)
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(calls):
            batch = ids[2 * i : 2 * i + 2]
            expected = model(input_ids=batch, use_cache=False).logits
            got = HEADS[arch](model, replay(blocks.blocks, args, kwargs))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "opt", "gpt2"])
def test_replayed_blocks_reproduce_last_block_output(arch: str) -> None:
    model = tiny_model(arch)
    blocks = find_blocks(model)
    ids = input_ids(4)
    calls = capture_block_inputs(model, blocks, ids, batch_size=2)

    seen: list[torch.Tensor] = []

    def keep(_m: nn.Module, _a: Any, out: Any) -> None:
        seen.append(out if isinstance(out, torch.Tensor) else out[0])

    handle = blocks.blocks[-1].register_forward_hook(keep)
    try:
        with torch.no_grad():
            for start in range(0, 4, 2):
                model(input_ids=ids[start : start + 2], use_cache=False)
    finally:
        handle.remove()
    with torch.no_grad():
        for (args, kwargs), expected in zip(calls, seen, strict=True):
            torch.testing.assert_close(replay(blocks.blocks, args, kwargs), expected)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_captured_calls_are_on_cpu_without_cache(arch: str) -> None:
    model = tiny_model(arch)
    blocks = find_blocks(model)
    calls = capture_block_inputs(model, blocks, input_ids(5), batch_size=2)
    assert [c[0][0].shape for c in calls] == [(2, SEQ, HIDDEN), (2, SEQ, HIDDEN), (1, SEQ, HIDDEN)]
    for args, kwargs in calls:
        assert all(t.device.type == "cpu" and not t.requires_grad for t in _tensors((args, kwargs)))
        assert kwargs.get("use_cache", False) is False
        for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
            assert kwargs.get(key) is None
    if arch == "llama":  # rotary cos/sin come as a kwarg in transformers 5
        cos, sin = calls[0][1]["position_embeddings"]
        assert cos.shape[-2:] == sin.shape[-2:] == (SEQ, HIDDEN // 4)


def test_capture_restores_hooks_and_training_mode() -> None:
    model = tiny_model("gpt2").train()
    blocks = find_blocks(model)
    first = blocks.blocks[0]
    calls = capture_block_inputs(model, blocks, input_ids(2), batch_size=2)
    assert not first._forward_pre_hooks and all(m.training for m in model.modules())
    # dropout was off during capture: the same as an eval-mode capture
    again = capture_block_inputs(model.eval(), blocks, input_ids(2), batch_size=2)
    assert torch.equal(calls[0][0][0], again[0][0][0])


def test_capture_restores_on_error() -> None:
    model = tiny_model("llama").train()
    blocks = find_blocks(model)
    bad = torch.full((2, SEQ), VOCAB + 5)  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        capture_block_inputs(model, blocks, bad, batch_size=2)
    assert not blocks.blocks[0]._forward_pre_hooks
    assert all(m.training for m in model.modules())


def test_capture_rejects_bad_arguments() -> None:
    model = tiny_model("gpt2")
    blocks = find_blocks(model)
    with pytest.raises(ValueError, match=r"\[n, seq\]"):
        capture_block_inputs(model, blocks, input_ids(2)[0], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        capture_block_inputs(model, blocks, input_ids(2), batch_size=0)


def test_capture_when_block_zero_never_runs() -> None:
    model = tiny_model("gpt2")
    blocks = find_blocks(model)
    stray = type(blocks)(path="elsewhere", blocks=nn.ModuleList([nn.Linear(2, 2)]))
    with pytest.raises(StructureError, match="never reached block 0"):
        capture_block_inputs(model, stray, input_ids(2), batch_size=2)


class _TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, None]:
        return hidden_states + scale * self.fc(hidden_states), None


def test_run_block_and_replace_hidden() -> None:
    torch.manual_seed(0)
    block = _TupleBlock()
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)

    out = run_block(block, (x,), {"scale": 2.0})
    torch.testing.assert_close(out, x + 2.0 * block.fc(x))

    args, kwargs = replace_hidden((x, "keep"), {"scale": 2.0}, y)
    assert args[0] is y and args[1] == "keep" and kwargs == {"scale": 2.0}
    args, kwargs = replace_hidden((), {"hidden_states": x, "scale": 3.0}, y)
    assert args == () and kwargs["hidden_states"] is y and kwargs["scale"] == 3.0
    torch.testing.assert_close(run_block(block, args, kwargs), y + 3.0 * block.fc(y))
    with pytest.raises(ValueError, match="hidden_states"):
        replace_hidden((), {"scale": 1.0}, y)


def test_move_to_keeps_structure() -> None:
    t = torch.ones(2, requires_grad=True)
    moved = move_to({"a": (t, 3), "b": [t], "c": None, "d": "x"}, "cpu")
    assert moved["a"][1] == 3 and moved["c"] is None and moved["d"] == "x"
    assert not moved["a"][0].requires_grad and isinstance(moved["b"], list)
