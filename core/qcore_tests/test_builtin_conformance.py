"""The built-in components pass the conformance kit that plugin authors use."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from qcore.builtin.int_packer import IntPacker
from qcore.builtin.observers import MinMaxObserver
from qcore.builtin.rtn import RTNQuantizer
from qcore.builtin.torch_kernels import TorchKernels
from qcore.builtin.torch_lut_kernels import TorchLUTKernels
from qcore.codebook import VQPacker
from qcore.interfaces import KernelRequest, Transform
from qcore.scheme import Scheme
from qcore.testing import (
    BaseKernelProviderTests,
    BaseObserverTests,
    BasePackerTests,
    BaseQuantizerTests,
    BaseTransformTests,
)


class TestRTN(BaseQuantizerTests):
    @pytest.fixture
    def quantizer(self) -> RTNQuantizer:
        return RTNQuantizer()


class TestRTNFloat32Scales(BaseQuantizerTests):
    @pytest.fixture
    def quantizer(self) -> RTNQuantizer:
        return RTNQuantizer(RTNQuantizer.Config(scale_dtype="float32"))


class TestIntPacker(BasePackerTests):
    @pytest.fixture
    def packer(self) -> IntPacker:
        return IntPacker()

    def test_default_weights_cover_odd_widths_and_shapes(self, quantized_weights) -> None:
        bits = {q.params["bits"] for q in quantized_weights}
        assert bits == set(range(1, 9))
        assert any(q.shape[1] % q.params["group_size"] for q in quantized_weights
                   if q.params["group_size"] > 0)
        assert any("g_idx" in q.tensors for q in quantized_weights)


class TestTorchKernels(BaseKernelProviderTests):
    @pytest.fixture
    def provider(self) -> TorchKernels:
        return TorchKernels()

    def test_requests_cover_the_declaration(self, kernel_requests: list[KernelRequest]) -> None:
        assert {r.bits for r in kernel_requests} == {2, 3, 4, 8}
        assert {r.group_size for r in kernel_requests} == {-1, 32, 64}
        assert {r.dtype for r in kernel_requests} == {"float32", "float16", "bfloat16"}
        assert {r.act_bits for r in kernel_requests} == {None, 4, 8}
        assert any(r.act_order for r in kernel_requests)
        assert any(r.in_features % r.group_size for r in kernel_requests if r.group_size > 0)
        # grouped activations (with a shorter last group) on both grids
        grouped = [r for r in kernel_requests if r.act_group_size == 64]
        assert {r.act_symmetric for r in grouped} == {True, False}
        assert any(r.in_features % 64 for r in grouped)
        assert any(not r.act_symmetric and r.act_group_size == -1 for r in kernel_requests)


class TestTorchLUTKernels(BaseKernelProviderTests):
    @pytest.fixture
    def provider(self) -> TorchLUTKernels:
        return TorchLUTKernels()

    def test_requests_cover_the_declaration(self, kernel_requests: list[KernelRequest]) -> None:
        assert {r.op for r in kernel_requests} == {"lut_linear"}
        assert {r.layout for r in kernel_requests} == {"vq-packed"}
        assert {r.dtype for r in kernel_requests} == {"float32", "float16", "bfloat16"}
        assert len(kernel_requests) >= 8  # every structure of the default vq weights

    def test_kit_catches_a_kernel_that_ignores_the_offset(
            self, kernel_requests, make_quantized_weight, dequantize) -> None:
        class NoOffset(TorchLUTKernels):
            name = "no-offset"

            def prepare(self, packed, device):
                prepared = super().prepare(packed, device)
                prepared.offset = None
                return prepared

        with pytest.raises(AssertionError, match="exceeds"):
            self.test_op_matches_reference(NoOffset(), [VQPacker()], kernel_requests[:4],
                                           make_quantized_weight, dequantize)


class TestMinMaxObserver(BaseObserverTests):
    @pytest.fixture
    def observer(self) -> MinMaxObserver:
        return MinMaxObserver()

    def test_values(self, observer: MinMaxObserver, observer_batches) -> None:
        stat = self.observe(observer, observer_batches)
        x = torch.cat([x for x, _ in observer_batches])
        assert torch.equal(stat["min"], x.amin(0)) and torch.equal(stat["max"], x.amax(0))


class RandomSmooth(Transform):
    """Folds random positive scales into each input-sharing group's scale source (AWQ's
    mechanism without its search): the block's function is kept."""

    name = "random-smooth"
    needs = frozenset({"minmax"})

    @dataclass(frozen=True)
    class Config:
        seed: int = 0
        spread: float = 4.0

    def apply(self, ctx: Any) -> None:
        from qcore.model import fold_scales_into_source

        g = torch.Generator().manual_seed(self.config.seed)
        for group in ctx.structure.groups:
            if group.source is None:
                continue
            stats = ctx.stats[group.names[0]]["minmax"]  # the observer ran: its range is here
            assert stats["max"].shape == (group.in_features,)
            s = torch.exp(torch.rand(group.in_features, generator=g) * math.log(self.config.spread))
            fold_scales_into_source(ctx.block, group, s)


class TestToyTransform(BaseTransformTests):
    @pytest.fixture
    def transform(self) -> RandomSmooth:
        return RandomSmooth(RandomSmooth.Config(seed=3))

    def test_transform_changed_the_weights(self, transform, block_context) -> None:
        q_proj = block_context.block.get_submodule("self_attn.q_proj")
        before = q_proj.weight.detach().clone()
        transform.apply(block_context)
        assert not torch.equal(before, q_proj.weight)


class _ScalesWithoutFolding(RandomSmooth):
    """Scales the group's weights but forgets to divide the source."""

    name = "broken-smooth"

    def apply(self, ctx: Any) -> None:
        group = next(g for g in ctx.structure.groups if g.source is not None)
        with torch.no_grad():
            for name in group.names:
                ctx.block.get_submodule(name).weight.mul_(1.5)


class TestBrokenTransformIsCaught(BaseTransformTests):
    @pytest.fixture
    def transform(self) -> _ScalesWithoutFolding:
        return _ScalesWithoutFolding()

    def test_function_preserved(self, transform, block_context, block_forward) -> None:
        with pytest.raises(AssertionError, match="changed the block's output"):
            super().test_function_preserved(transform, block_context, block_forward)


# ------------------------------------------------------- the kit catches broken components


class _OffByOneRTN(RTNQuantizer):
    """Stores codes one level too high: dequantize is off by a whole step."""

    name = "rtn-off-by-one"

    def quantize(self, weight, stats, scheme):
        qweight = super().quantize(weight, stats, scheme)
        codes = qweight.tensors["codes"]
        shifted = torch.clamp(codes.int() + 1, max=(1 << scheme.bits) - 1)
        qweight.tensors["codes"] = shifted.to(torch.uint8)
        return qweight


class _LossyPacker(IntPacker):
    """Drops the zero points."""

    name = "lossy"

    def pack(self, qweight):
        packed = super().pack(qweight)
        packed.tensors.pop("zeros", None)
        return packed


class _SloppyKernels(TorchKernels):
    """Ignores the bias."""

    name = "sloppy"

    def linear(self, x, prepared, bias):
        return super().linear(x, prepared, None)


def test_kit_catches_a_quantizer_off_by_one_step(qcore_plugin_manager) -> None:
    kit = BaseQuantizerTests()
    weight = torch.randn(16, 160, generator=torch.Generator().manual_seed(0))
    schemes = [Scheme(bits=4, group_size=32)]
    with pytest.raises(AssertionError, match="grid steps"):
        kit.test_dequantize_error_within_grid_step(_OffByOneRTN(), weight, {}, schemes)


def test_kit_catches_a_lossy_packer() -> None:
    from qcore.testing import random_int_weight

    kit = BasePackerTests()
    with pytest.raises(AssertionError, match="zeros"):
        kit.test_round_trip_is_exact(_LossyPacker(), [random_int_weight(4, 64, 3, 32)])


def test_kit_catches_a_kernel_that_drops_the_bias() -> None:
    from qcore.grid import dequantize_int
    from qcore.testing import random_int_weight

    kit = BaseKernelProviderTests()
    provider = _SloppyKernels()
    requests = kit.declared_requests(provider.support, [IntPacker()])[:1]

    def make(request, packer, seed):
        return random_int_weight(request.out_features, request.in_features, request.bits,
                                 request.group_size, request.symmetric, seed=seed)

    with pytest.raises(AssertionError, match="exceeds"):
        kit.test_op_matches_reference(provider, [IntPacker()], requests, make, dequantize_int)


def test_declared_requests_on_a_machine_with_a_gpu(monkeypatch) -> None:
    # No GPU here: the device list is what the kit would find on an Ampere machine.
    import qcore.testing.base as base
    from qcore.interfaces import KernelSupport

    monkeypatch.setattr(base, "_available_devices", lambda: {"cpu": None, "cuda": (8, 0)})
    kit = BaseKernelProviderTests()
    torch_requests = kit.declared_requests(TorchKernels.support, [IntPacker()])
    cuda = [r for r in torch_requests if r.device == "cuda"]
    assert len(cuda) == 1 and cuda[0].compute_capability == (8, 0)

    hopper_only = KernelSupport(ops=frozenset({"linear"}), layouts=frozenset({"int-packed"}),
                                bits=frozenset({4}), group_sizes=frozenset({128}),
                                dtypes=frozenset({"float16"}), devices=frozenset({"cuda"}),
                                min_compute_capability=(9, 0), in_features_multiple=64)
    assert kit.declared_requests(hopper_only, [IntPacker()]) == []
    ampere = dataclasses.replace(hopper_only, min_compute_capability=(8, 0))
    requests = kit.declared_requests(ampere, [IntPacker()])
    assert {(r.device, r.dtype, r.bits, r.group_size) for r in requests} == {
        ("cuda", "float16", 4, 128)}
    assert all(r.in_features % 64 == 0 and r.in_features % 128 == 0 for r in requests)
    assert all(TorchKernels.unsupported_reason(r) is None for r in requests)
