"""Blocks, linears, input-sharing groups and scale sources, on tiny random models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import transformers
from qcore.model import (
    BlockStructure,
    LinearGroup,
    StructureError,
    block_linears,
    capture_block_inputs,
    describe_block,
    execution_order_stages,
    find_blocks,
    fold_scales_into_source,
    is_linear,
    linear_shape,
    run_block,
    set_weight_matrix,
    weight_matrix,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead (and spin on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HIDDEN, FFN, VOCAB, SEQ = 32, 48, 64, 8


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    """A two-layer config of ``arch``; ``_gqa`` variants share key/value heads."""
    common: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=4)
    if arch == "llama_gqa":
        return transformers.LlamaConfig(**common, num_key_value_heads=2)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, num_key_value_heads=4)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, num_key_value_heads=4, head_dim=8)
    if arch == "mistral_gqa":
        return transformers.MistralConfig(**common, num_key_value_heads=2)
    if arch in ("opt", "opt_postnorm"):
        return transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            ffn_dim=FFN,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=64,
            do_layer_norm_before=arch == "opt",
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
    raise KeyError(arch)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights large enough to leave the near-linear regime; norm weights and biases nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
    return model


def tiny_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch))
    return randomize(model).eval()


def first_block_call(arch: str) -> tuple[nn.Module, nn.Module, tuple[Any, ...], dict[str, Any]]:
    """(model, block 0, args, kwargs) of a real call of block 0."""
    model = tiny_model(arch)
    blocks = find_blocks(model)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ((args, kwargs),) = capture_block_inputs(model, blocks, ids, batch_size=2)
    return model, blocks.blocks[0], args, kwargs


# ---------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(
    ("arch", "path"),
    [
        ("llama", "model.layers"),
        ("qwen2", "model.layers"),
        ("qwen3", "model.layers"),
        ("mistral_gqa", "model.layers"),
        ("opt", "model.decoder.layers"),
        ("gpt2", "transformer.h"),
    ],
)
def test_find_blocks(arch: str, path: str) -> None:
    model = tiny_model(arch)
    blocks = find_blocks(model)
    assert blocks.path == path
    assert blocks.blocks is model.get_submodule(path)
    assert len(blocks) == 2


class _Block(nn.Module):
    def __init__(self, experts: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        if experts:
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


class _Stack(nn.Module):
    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers


def test_find_blocks_without_module_list_names_model_class() -> None:
    class FlatNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    with pytest.raises(StructureError, match="FlatNet.*no repeated decoder blocks"):
        find_blocks(FlatNet())


def test_find_blocks_without_linears_says_so() -> None:
    class NormStack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norms = nn.ModuleList(nn.LayerNorm(4) for _ in range(3))

    with pytest.raises(StructureError, match=r"NormStack.*'norms' \(3 x LayerNorm\)"):
        find_blocks(NormStack())


def test_find_blocks_skips_mixed_classes_and_nested_lists() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(8, 8), _Block(), nn.Linear(8, 8), _Block()])
            self.decoder = _Stack(nn.ModuleList(_Block(experts=6) for _ in range(2)))

    net = Net()
    # the experts lists (6 linears each) are longer but live inside a block
    assert find_blocks(net).path == "decoder.layers"


def test_find_blocks_prefers_the_longest_list() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.short = nn.ModuleList(_Block() for _ in range(2))
            self.long = nn.ModuleList(_Block() for _ in range(3))

    assert find_blocks(Net()).path == "long"


# --------------------------------------------------------------------------- linears


def test_conv1d_is_a_linear_seen_as_out_in() -> None:
    torch.manual_seed(0)
    conv = Conv1D(nf=6, nx=4)  # weight stored [in=4, out=6]
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    assert is_linear(conv) and is_linear(nn.Linear(4, 6))
    assert not is_linear(nn.LayerNorm(4)) and not is_linear(nn.Embedding(4, 4))
    assert linear_shape(conv) == (6, 4) == linear_shape(nn.Linear(4, 6))
    w = weight_matrix(conv)
    assert w.shape == (6, 4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(conv(x), x @ w.T + conv.bias)

    new = torch.randn(6, 4)
    set_weight_matrix(conv, new)
    assert torch.equal(conv.weight, new.T)
    with pytest.raises(ValueError, match="expected"):
        set_weight_matrix(conv, new.T)
    with torch.no_grad():
        w.mul_(2)  # the view reaches the module
    assert torch.equal(conv.weight, 2 * new.T)


def test_block_linears_in_registration_order() -> None:
    model = tiny_model("llama")
    names = list(block_linears(find_blocks(model).blocks[0]))
    assert names == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]


# ------------------------------------------------------------------- groups, sources

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _llama_like(o_source: str | None) -> list[tuple[tuple[str, ...], str | None, str | None]]:
    return [
        (ATTN, "input_layernorm", "norm"),
        (("self_attn.o_proj",), o_source, "linear" if o_source else None),
        (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", "norm"),
        (("mlp.down_proj",), "mlp.up_proj", "linear"),
    ]


EXPECTED: dict[str, list[tuple[tuple[str, ...], str | None, str | None]]] = {
    "llama": _llama_like("self_attn.v_proj"),
    "llama_gqa": _llama_like(None),  # v's 16 outputs, o's 32 inputs: no source
    "qwen2": _llama_like("self_attn.v_proj"),
    "qwen3": _llama_like("self_attn.v_proj"),
    "mistral_gqa": _llama_like(None),
    "opt": [
        (ATTN, "self_attn_layer_norm", "norm"),
        (("self_attn.out_proj",), "self_attn.v_proj", "linear"),
        (("fc1",), "final_layer_norm", "norm"),
        (("fc2",), "fc1", "linear"),  # ReLU is positively homogeneous
    ],
    "opt_postnorm": [
        (ATTN, None, None),  # reads the block input: nothing in the block precedes it
        (("self_attn.out_proj",), "self_attn.v_proj", "linear"),
        # the norm's output is fc1's input and also the residual: folding would change it
        (("fc1",), None, None),
        (("fc2",), "fc1", "linear"),
    ],
    "gpt2": [
        (("attn.c_attn",), "ln_1", "norm"),
        (("attn.c_proj",), None, None),
        (("mlp.c_fc",), "ln_2", "norm"),
        (("mlp.c_proj",), None, None),  # GELU between c_fc and c_proj
    ],
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_describe_block_groups_and_sources(arch: str) -> None:
    _, block, args, kwargs = first_block_call(arch)
    before = {k: v.clone() for k, v in block.state_dict().items()}

    structure = describe_block(block, args, kwargs)

    got = [(g.names, g.source, g.source_kind) for g in structure.groups]
    assert got == EXPECTED[arch]
    assert list(structure.linears) == [n for g in structure.groups for n in g.names]
    assert structure.not_called == ()
    for group in structure.groups:
        assert group.in_features == linear_shape(structure.linears[group.names[0]])[1]
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "parameters not restored"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_describe_block_in_bfloat16(arch: str) -> None:
    """The default tolerance follows the dtype: half precision finds the same sources."""
    model = tiny_model(arch).to(torch.bfloat16)
    blocks = find_blocks(model)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ((args, kwargs),) = capture_block_inputs(model, blocks, ids, batch_size=2)
    structure = describe_block(blocks.blocks[0], args, kwargs)
    assert [(g.names, g.source, g.source_kind) for g in structure.groups] == EXPECTED[arch]


def test_execution_order_stages_llama() -> None:
    _, block, args, kwargs = first_block_call("llama")
    stages = execution_order_stages(describe_block(block, args, kwargs))
    assert stages == [
        list(ATTN),
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_fold_scales_keeps_block_function(arch: str) -> None:
    """Every found source folds without changing the block (to float32 rounding)."""
    _, block, args, kwargs = first_block_call(arch)
    structure = describe_block(block, args, kwargs)
    with torch.no_grad():
        reference = run_block(block, args, kwargs)
    delta = (reference - args[0]).abs().max().item()
    g = torch.Generator().manual_seed(2)
    folded = 0
    for group in structure.groups:
        if group.source is not None:
            fold_scales_into_source(
                block, group, torch.empty(group.in_features).uniform_(0.25, 4.0, generator=g)
            )
            folded += 1
    assert folded >= 2
    with torch.no_grad():
        out = run_block(block, args, kwargs)
    assert not torch.equal(out, reference)  # the weights did change
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5 * float(delta))


def test_fold_scales_rejects_bad_input() -> None:
    _, block, args, kwargs = first_block_call("gpt2")
    structure = describe_block(block, args, kwargs)
    no_source = structure.group_of("mlp.c_proj")
    with pytest.raises(ValueError, match="no scale source"):
        fold_scales_into_source(block, no_source, torch.ones(no_source.in_features))
    group = structure.group_of("attn.c_attn")
    with pytest.raises(ValueError, match="positive"):
        fold_scales_into_source(block, group, -torch.ones(group.in_features))
    with pytest.raises(ValueError, match="input channels"):
        fold_scales_into_source(block, group, torch.ones(group.in_features + 1))


def test_fold_into_conv1d_norm_and_columns() -> None:
    """GPT-2: ln_2 weight and bias divided by s, c_fc's input columns (Conv1D rows) times s."""
    _, block, args, kwargs = first_block_call("gpt2")
    group = describe_block(block, args, kwargs).group_of("mlp.c_fc")
    names = ("ln_2.weight", "ln_2.bias", "mlp.c_fc.weight")
    ln_w, ln_b, conv_w = (block.get_parameter(n).clone() for n in names)  # conv_w: [in, out]
    s = torch.linspace(0.5, 2.0, group.in_features)
    fold_scales_into_source(block, group, s)
    torch.testing.assert_close(block.get_parameter("ln_2.weight"), ln_w / s)
    torch.testing.assert_close(block.get_parameter("ln_2.bias"), ln_b / s)
    torch.testing.assert_close(block.get_parameter("mlp.c_fc.weight"), conv_w * s[:, None])


# ------------------------------------------------------------ hand-made blocks


class _OffsetNorm(nn.Module):
    """Gemma-style RMSNorm: scales by (1 + weight), so scaling weight does not scale output."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class _Mlp(nn.Module):
    def __init__(self, act: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.fc1 = nn.Linear(8, 16)
        self.act = act
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


@pytest.mark.parametrize(
    ("act", "norm", "fc1_source", "fc2_source"),
    [
        (nn.ReLU(), nn.LayerNorm(8), "norm", "fc1"),
        (nn.GELU(), nn.LayerNorm(8), "norm", None),
        (nn.SiLU(), nn.LayerNorm(8), "norm", None),
        (nn.ReLU(), _OffsetNorm(8), None, "fc1"),
        (nn.Identity(), nn.LayerNorm(8), "norm", "fc1"),
    ],
)
def test_sources_are_confirmed_functionally(
    act: nn.Module, norm: nn.Module, fc1_source: str | None, fc2_source: str | None
) -> None:
    torch.manual_seed(0)
    block = _Mlp(act, norm)
    for p in block.parameters():
        nn.init.normal_(p)
    x = torch.randn(2, 5, 8)
    structure = describe_block(block, (x,), {})
    assert [(g.names, g.source) for g in structure.groups] == [
        (("fc1",), fc1_source),
        (("fc2",), fc2_source),
    ]


def test_parallel_block_shares_one_group() -> None:
    """GPT-J style: one norm feeds attention-like and MLP linears alike."""

    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.q = nn.Linear(8, 8)
            self.fc_in = nn.Linear(8, 16)
            self.fc_out = nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            h = self.ln(x)
            return (x + self.q(h) + self.fc_out(torch.relu(self.fc_in(h))),)

    torch.manual_seed(0)
    structure = describe_block(Parallel(), (torch.randn(1, 4, 8),), {})
    assert structure.groups == [
        LinearGroup(("q", "fc_in"), 8, "ln", "norm"),
        LinearGroup(("fc_out",), 16, "fc_in", "linear"),
    ]


def test_unused_linear_is_reported_not_grouped() -> None:
    block = _Block(experts=2)  # the experts are never called
    structure = describe_block(block, (torch.randn(1, 3, 8),), {})
    assert isinstance(structure, BlockStructure)
    assert list(structure.linears) == ["fc"]
    assert structure.not_called == ("experts.0", "experts.1")


def test_block_without_linear_is_a_structure_error() -> None:
    class NormOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x)

    with pytest.raises(StructureError, match="NormOnly.*no linear"):
        describe_block(NormOnly(), (torch.randn(1, 2, 8),), {})


def test_describe_block_restores_training_mode() -> None:
    block = _Mlp(nn.ReLU(), nn.LayerNorm(8)).train()
    describe_block(block, (torch.randn(1, 3, 8),), {})
    assert all(m.training for m in block.modules())
