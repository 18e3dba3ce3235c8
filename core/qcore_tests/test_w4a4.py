"""W4A4 in the core (contract 1.4): activation groups and grids, the scheme that names
them, kernels that declare them, and fused low-rank branches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcore.builtin.int_packer import IntPacker
from qcore.builtin.torch_kernels import TorchKernels
from qcore.errors import ConfigError, PipelineError
from qcore.grid import fake_quantize_activations, quantize_activation_groups
from qcore.interfaces import KernelRequest, KernelSupport
from qcore.pipeline import Pipeline
from qcore.qlinear import QuantLinear
from qcore.scheme import Scheme
from qcore.testing import (
    BaseKernelProviderTests,
    make_plugin,
    random_int_weight,
    reference_linear,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ scheme


def test_scheme_names_activation_groups_and_grids():
    scheme = Scheme(bits=4, group_size=64, symmetric=True, act_bits=4, act_group_size=64)
    assert scheme.label() == "W4A4 g64 sym act-g64"
    assert Scheme(act_bits=4, act_symmetric=False).label() == "W4A4 g64 asym act-asym"
    assert Scheme.from_dict(scheme.to_dict()) == scheme
    # Dicts written before contract 1.4 read as per-token symmetric activations.
    old = {k: v for k, v in scheme.to_dict().items()
           if k not in ("act_group_size", "act_symmetric")}
    assert Scheme.from_dict(old).act_group_size == -1 and Scheme.from_dict(old).act_symmetric


@pytest.mark.parametrize("kwargs, message", [
    (dict(act_group_size=64), "set act_bits too"),
    (dict(act_symmetric=False), "set act_bits too"),
    (dict(act_bits=8, act_dynamic=False, act_group_size=64), "drop --static-act"),
    (dict(act_bits=8, act_dynamic=False, act_symmetric=False), "drop --static-act"),
    (dict(act_bits=4, act_group_size=0), "act_group_size=0 is invalid"),
])
def test_scheme_refuses_contradictions(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Scheme(**kwargs)


# -------------------------------------------------------------------------------- grid


def test_symmetric_groups_use_each_groups_absmax_over_7():
    x = torch.tensor([[1.0, -2.0, 0.5, 3.5, 0.0, 0.0, 0.1, -0.7]])
    codes, scales, zeros = quantize_activation_groups(x, 4, 4)
    assert zeros is None
    torch.testing.assert_close(scales, torch.tensor([[3.5 / 7, 0.7 / 7]]))
    assert torch.equal(codes, torch.round(x.reshape(1, 2, 4) / scales[..., None]))
    assert codes.abs().max() == 7


def test_asymmetric_groups_map_min_max_onto_0_to_15():
    x = torch.tensor([[1.0, 2.0, 4.0, 5.0], [-3.0, -1.0, 0.0, 12.0]])
    codes, scales, zeros = quantize_activation_groups(x, 4, -1, symmetric=False)
    # row 0: range [0, 5] (0 included); row 1: [-3, 12]
    torch.testing.assert_close(scales, torch.tensor([[5.0 / 15], [1.0]]))
    torch.testing.assert_close(zeros, torch.tensor([[0.0], [3.0]]))
    assert torch.equal(codes[1, 0], torch.tensor([0.0, 2.0, 3.0, 15.0]))
    deq = fake_quantize_activations(x, 4, group_size=-1, symmetric=False)
    torch.testing.assert_close(deq[1], x[1])  # integers on a unit grid: exact


def test_last_group_may_be_shorter_and_zero_groups_get_scale_one():
    x = torch.randn(3, 5, 70, generator=_gen(0))
    x[0, 0, :64] = 0
    codes, scales, _ = quantize_activation_groups(x, 4, 64)
    assert codes.shape == (3, 5, 2, 64) and scales.shape == (3, 5, 2)
    assert scales[0, 0, 0] == 1 and codes[0, 0, 0].abs().sum() == 0
    tail = x[..., 64:].float()
    torch.testing.assert_close(scales[..., 1], tail.abs().amax(-1) / 7)
    out = fake_quantize_activations(x, 4, group_size=64)
    assert out.shape == x.shape and out.dtype == x.dtype
    # each group is its own per-token quantization
    torch.testing.assert_close(out[..., 64:], fake_quantize_activations(x[..., 64:], 4))


def test_per_token_symmetric_is_the_existing_grid_bit_for_bit():
    x = torch.randn(6, 96, generator=_gen(1)).to(torch.bfloat16)
    codes, scales, _ = quantize_activation_groups(x, 8, -1)
    want = fake_quantize_activations(x, 8)
    assert torch.equal((codes[..., 0, :] * scales).to(x.dtype), want)


def test_static_scale_with_groups_is_refused():
    with pytest.raises(ValueError, match="dynamic"):
        fake_quantize_activations(torch.ones(2, 8), 4, torch.tensor(0.1), group_size=4)


# ------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("act_symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a4_torch_provider_equals_the_fake_quantization_reference(act_symmetric, dtype):
    qweight = random_int_weight(48, 160, 4, 64, act_bits=4, act_group_size=64,
                                act_symmetric=act_symmetric, seed=3)
    layer = QuantLinear(IntPacker().pack(qweight), kernel="torch").to(dtype)
    x = torch.randn(2, 7, 160, generator=_gen(4)).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert layer.provider_name == "torch"
    dense = IntPacker().dequantize(qweight)
    if dtype == torch.float32:
        # by hand: per-[token, group] fake quantization, then the dense product
        xq = fake_quantize_activations(x, 4, group_size=64, symmetric=act_symmetric)
        assert torch.equal(y, torch.nn.functional.linear(xq, dense))
    ref = reference_linear(x.reshape(-1, 160), dense, None, 4, None, 64, act_symmetric)
    torch.testing.assert_close(y.reshape(-1, 48).float(), ref,
                               rtol=0, atol=1e-4 if dtype == torch.float32 else 0.15)


def test_default_support_refuses_grouped_and_asymmetric_activations():
    class W8A8Only(TorchKernels):
        name = "w8a8-only"
        support = KernelSupport(ops=frozenset({"linear"}), layouts=frozenset({"int-packed"}),
                                act_bits=frozenset({8}))

    base = KernelRequest(op="linear", layout="int-packed", bits=8, group_size=-1,
                         symmetric=True, in_features=64, out_features=8, act_bits=8)
    assert W8A8Only.unsupported_reason(base) is None
    assert W8A8Only.unsupported_reason(dataclasses.replace(base, act_group_size=64)) == (
        "activation group size 64 not in [-1]")
    assert W8A8Only.unsupported_reason(dataclasses.replace(base, act_symmetric=False)) == (
        "asymmetric activations unsupported")
    assert TorchKernels.unsupported_reason(dataclasses.replace(base, act_group_size=64,
                                                               act_symmetric=False)) is None


def test_validate_refuses_w4a4_for_a_quantizer_or_kernel_that_cannot_and_names_who_can(
        qcore_register_plugin, qcore_registry):
    from qcore.builtin.rtn import RTNQuantizer

    class WeightOnly(RTNQuantizer):
        name = "weight-only"
        supported_act_bits = frozenset({None})

    class Int8Kernel(TorchKernels):
        name = "int8-kernel"
        support = KernelSupport(ops=frozenset({"linear"}), layouts=frozenset({"int-packed"}),
                                act_bits=frozenset({None, 8}), priority=10)

    qcore_register_plugin(make_plugin("t", quantizers=[WeightOnly], kernels=[Int8Kernel]))
    w4a4 = Scheme(bits=4, act_bits=4, act_group_size=64)
    with pytest.raises(ConfigError, match=r"'weight-only' does not quantize activations to 4 "
                       r"bits.*Quantizers that can: rtn"):
        Pipeline.from_names("weight-only", scheme=w4a4).validate(qcore_registry)
    with pytest.raises(PipelineError, match=r"'int8-kernel' cannot run .*act_bits=4 "
                       r"unsupported.*Providers that can: torch"):
        Pipeline.from_names("rtn", scheme=w4a4, kernel="int8-kernel").validate(qcore_registry)
    grouped8 = Scheme(bits=8, act_bits=8, act_group_size=64)
    with pytest.raises(PipelineError, match="activation group size 64 not in"):
        Pipeline.from_names("rtn", scheme=grouped8, kernel="int8-kernel").validate(qcore_registry)
    resolved = Pipeline.from_names("rtn", scheme=w4a4).validate(qcore_registry)
    assert resolved.kernel == "torch"


# ------------------------------------------------------------------ low-rank branches


class _FusedBranch(TorchKernels):
    """The torch provider, computing the low-rank branch inside its op."""

    name = "fused-branch"
    support = dataclasses.replace(TorchKernels.support, lowrank=True, priority=5)
    seen: list[tuple[str, ...]] = []

    def prepare(self, packed, device):
        _FusedBranch.seen.append(tuple(sorted(packed.tensors)))
        prepared = super().prepare(packed, device)
        prepared.branch = (packed.tensors.get("lowrank_down"), packed.tensors.get("lowrank_up"))
        return prepared

    def linear(self, x, prepared, bias):
        y = super().linear(x, prepared, bias)
        down, up = prepared.branch
        if down is not None:
            y = y + (x @ down.to(x.dtype).T) @ up.to(x.dtype).T
        return y


def _branched_layer(kernel: str) -> QuantLinear:
    qweight = random_int_weight(24, 64, 4, 32, act_bits=4, act_group_size=32, seed=5)
    down = (torch.randn(4, 64, generator=_gen(6)) * 0.1).half()
    up = (torch.randn(24, 4, generator=_gen(7)) * 0.1).half()
    return QuantLinear(IntPacker().pack(qweight), kernel=kernel, lowrank=(down, up))


def test_the_layer_adds_the_branch_for_providers_that_do_not_fuse_it(qcore_register_plugin):
    layer = _branched_layer("torch")
    x = torch.randn(5, 64, generator=_gen(8))
    with torch.no_grad():
        y = layer(x)
    dense = IntPacker().dequantize(IntPacker().unpack(layer.packed()))
    want = reference_linear(x, dense, None, 4, None, 32, True,
                            (layer.lowrank_down, layer.lowrank_up))
    torch.testing.assert_close(y, want, rtol=0, atol=1e-5)
    assert layer.request(torch.device("cpu"), torch.float32).lowrank_rank == 4
    assert "low-rank r4" in repr(layer)


def test_a_fusing_provider_gets_the_branch_and_the_layer_does_not_add_it_twice(
        qcore_register_plugin):
    qcore_register_plugin(make_plugin("fused", kernels=[_FusedBranch]))
    _FusedBranch.seen.clear()
    fused, plain = _branched_layer("fused-branch"), _branched_layer("torch")
    x = torch.randn(5, 64, generator=_gen(8))
    with torch.no_grad():
        y = fused(x)
        assert torch.equal(y, plain(x))
    assert _FusedBranch.seen == [("lowrank_down", "lowrank_up", "qweight", "scales", "zeros")]
    # A changed branch prepares the weight again (the provider holds the branch).
    with torch.no_grad():
        fused.lowrank_up.mul_(2)
        fused(x)
    assert len(_FusedBranch.seen) == 2


def test_quantize_cli_takes_w4a4_flags(tiny_model_dir, tmp_path):
    from qcore.checkpoint import load
    from qcore.cli import main

    out = tmp_path / "w4a4"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "32",
                 "--act-bits", "4", "--act-group-size", "32", "--act-asym",
                 "--calib", str(tiny_model_dir / "calibration.txt"), "--samples", "4",
                 "--seq-len", "16", "--device", "cpu", "--out", str(out)]) == 0
    layer = load(out).model.layers[0].mlp.down_proj
    assert layer.params["act_group_size"] == 32 and layer.params["act_symmetric"] is False
    assert "W4A4 g32 asym act-g32 act-asym" in repr(layer)
    assert main(["quantize", str(tiny_model_dir), "--act-group-size", "32",
                 "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_later_passes_see_registered_branches(qcore_register_plugin, make_tiny_model, calib_ids):
    """After a transform registers branches, the statistics of the following steps come
    from the block's true function: static input scales equal those of the unsplit
    model (without the core adding the branches, o_proj's and down_proj's inputs would be
    computed from weights missing their branch)."""
    from qcore.interfaces import Transform
    from qcore.ops import set_weight_matrix, weight_matrix
    from qcore.quantize import quantize

    class Split(Transform):
        name = "split-rank2"

        def apply(self, ctx):
            for name, linear in ctx.structure.linears.items():
                w = weight_matrix(linear).detach().float()
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                down, up = vh[:2] * s[:2, None], u[:, :2]
                set_weight_matrix(linear, w - up @ down)
                ctx.add_lowrank_branch(name, down, up)

    qcore_register_plugin(make_plugin("split", transforms=[Split]))
    scheme = Scheme(bits=8, group_size=-1, symmetric=True, act_bits=8, act_dynamic=False)
    scales = {}
    for pipeline in ("rtn", "split-rank2,rtn"):
        model = make_tiny_model("llama")
        quantize(model, Pipeline.from_names(pipeline, scheme=scheme), calib_ids, progress=False)
        scales[pipeline] = {n: float(m.input_scale) for n, m in model.named_modules()
                            if isinstance(m, QuantLinear)}
        if pipeline != "rtn":
            assert all(m.lowrank_down is not None for m in model.modules()
                       if isinstance(m, QuantLinear))
    assert scales["rtn"].keys() == scales["split-rank2,rtn"].keys()
    # Block 0 sees the same inputs in both runs (later blocks see differently quantized
    # ones): each of its linears' input range is the same.
    first = [n for n in scales["rtn"] if n.startswith("model.layers.0.")]
    assert len(first) == 7
    for name in first:
        assert scales["split-rank2,rtn"][name] == pytest.approx(scales["rtn"][name], rel=1e-5), name


class _GroupedOnly(_FusedBranch):
    """A W4A4-only provider fusing the branch (torch code), as a GPU W4A4 kernel declares."""

    name = "grouped-only"
    support = KernelSupport(ops=frozenset({"linear"}), layouts=frozenset({"int-packed"}),
                            bits=frozenset({4}), group_sizes=frozenset({64}),
                            act_bits=frozenset({4}), act_dynamic=frozenset({True}),
                            act_group_sizes=frozenset({64}),
                            act_symmetric=frozenset({True, False}), act_order=False,
                            in_features_multiple=64, lowrank=True, priority=5)


class TestGroupedFusedProviderConformance(BaseKernelProviderTests):
    """The kit builds only requests such a provider declares (activation groups of 64,
    both grids) and checks its fused branch against the reference."""

    @pytest.fixture
    def provider(self):
        return _GroupedOnly()

    def test_requests_cover_the_declaration(self, kernel_requests) -> None:
        assert kernel_requests and all(r.act_group_size == 64 for r in kernel_requests)
        assert {r.act_symmetric for r in kernel_requests} == {True, False}
        assert {r.lowrank_rank for r in kernel_requests} == {0, 1, 8}
