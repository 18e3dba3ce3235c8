"""The packed CPU providers (``cpu-int4``, ``cpu-int8``, ``cpu-w8a8``): the conformance
kit, outputs against exact references on the shapes and formats a real model has,
selection, and the ``torch`` provider's cache of dequantized weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcore.builtin.int_packer import IntPacker
from qcore.builtin.torch_kernels import TorchKernels
from qcore.grid import fake_quantize_activations, grid_from_range, quantize_codes
from qcore.interfaces import KernelRequest, QuantizedWeight
from qcore.qlinear import QuantLinear
from qcore.testing import BaseKernelProviderTests
from qcore.testing.base import _TOLERANCE
from qcore_kernels.cpu_packed import CpuInt4Kernels, CpuInt8Kernels, CpuW8A8Kernels


class TestCpuInt4Kernels(BaseKernelProviderTests):
    @pytest.fixture
    def provider(self) -> CpuInt4Kernels:
        return CpuInt4Kernels()

    def test_requests_cover_the_declaration(self, kernel_requests: list[KernelRequest]) -> None:
        assert {r.bits for r in kernel_requests} == {4}
        assert {r.group_size for r in kernel_requests} == set(CpuInt4Kernels.support.group_sizes)
        assert {r.dtype for r in kernel_requests} == {"bfloat16"}
        assert any(r.act_order for r in kernel_requests)


class TestCpuInt8Kernels(BaseKernelProviderTests):
    @pytest.fixture
    def provider(self) -> CpuInt8Kernels:
        return CpuInt8Kernels()

    def test_requests_cover_the_declaration(self, kernel_requests: list[KernelRequest]) -> None:
        assert {r.bits for r in kernel_requests} == {8}
        assert {r.act_bits for r in kernel_requests} == {None}
        assert {r.symmetric for r in kernel_requests} == {True, False}


class TestCpuW8A8Kernels(BaseKernelProviderTests):
    @pytest.fixture
    def provider(self) -> CpuW8A8Kernels:
        return CpuW8A8Kernels()

    def test_requests_cover_the_declaration(self, kernel_requests: list[KernelRequest]) -> None:
        assert {r.act_bits for r in kernel_requests} == {8}
        assert {r.dtype for r in kernel_requests} == {"float32", "float16", "bfloat16"}


def int_weight(out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool, *,
               act_order: bool = False, act_bits: int | None = None,
               static_scale: bool = False, seed: int = 0) -> QuantizedWeight:
    """A weight on qcore's int grid (codes, float16 scales, zero points), with an act-order
    ``g_idx`` whose groups have unequal sizes when asked, as GPTQ can produce."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[:, :3] *= 8  # a few outlier columns
    span = in_f if group_size == -1 else group_size
    if act_order:
        # Groups of a random column set, sizes uneven (a shorter and a longer group).
        perm = torch.randperm(in_f, generator=g)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // span).to(torch.int32)
        g_idx[perm[0]] = g_idx.max()  # one group gives a column to the last one
    else:
        g_idx = (torch.arange(in_f) // span).to(torch.int32)
    n_groups = int(g_idx.max()) + 1
    wmin = torch.stack([w[:, g_idx == k].amin(1) for k in range(n_groups)], 1)
    wmax = torch.stack([w[:, g_idx == k].amax(1) for k in range(n_groups)], 1)
    scales, zeros = grid_from_range(wmin, wmax, bits, symmetric)
    codes = quantize_codes(w, scales, zeros, bits, g_idx.long())
    tensors = {"codes": codes, "scales": scales}
    if zeros is not None:
        tensors["zeros"] = zeros
    if act_order:
        tensors["g_idx"] = g_idx
    if static_scale:
        tensors["input_scale"] = torch.tensor(3.0 / 127)
    params = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
    if act_bits:
        params["act_bits"] = act_bits
    return QuantizedWeight(format="int", shape=(out_f, in_f), tensors=tensors, params=params)


def compare(provider, qweight: QuantizedWeight, dtype: torch.dtype, rows: int = 3) -> None:
    """Against the ``torch`` provider within the conformance kit's tolerance, and against
    the exact product of the same (rounded) inputs in float64 within the output dtype's
    rounding: a zero point or scale off by a step fails the second."""
    packed = IntPacker().pack(qweight)
    x = torch.randn(rows, qweight.shape[1], generator=torch.Generator().manual_seed(7)).to(dtype)
    bias = torch.randn(qweight.shape[0], generator=torch.Generator().manual_seed(8)).to(dtype)
    reference = TorchKernels().prepare(packed, torch.device("cpu"))
    want = TorchKernels().linear(x, reference, bias)
    got = provider.linear(x, provider.prepare(packed, torch.device("cpu")), bias)
    assert got.dtype == dtype and got.shape == want.shape
    tol = _TOLERANCE[str(dtype).removeprefix("torch.")]
    error = (got.float() - want.float()).abs()
    allowed = tol * want.float().abs().max() + tol * want.float().abs()
    assert bool((error <= allowed).all()), (
        f"max error {float(error.max()):.3g}, max |y| {float(want.abs().max()):.3g}")
    if qweight.params.get("act_bits"):
        x = fake_quantize_activations(x, qweight.params["act_bits"],
                                      qweight.tensors.get("input_scale"))
    w = reference.dequantize(torch.float64)
    exact = x.double() @ w.T + bias.double()
    # bfloat16 rounds the output and, inside torch's operators, each group's scale and zero
    # term ((mid - z) * s, mid the signed codes' offset): at most 2**-8 of |y| and of the
    # sums of |x| |w| and |x| |zero term| it is made of.
    mid = 1 << (int(qweight.params["bits"]) - 1)
    zero_term = dataclasses.replace(reference, codes=torch.full_like(reference.codes, mid))
    magnitude = w.abs() + zero_term.dequantize(torch.float64).abs()
    rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 1e-6
    bound = rounding * (exact.abs() + x.double().abs() @ magnitude.T + bias.double().abs())
    error = (got.double() - exact).abs()
    assert bool((error <= bound).all()), (
        f"max error {float(error.max()):.3g} against the exact product, over the bound by "
        f"{float((error - bound).max()):.3g}")


# SmolLM2's shapes (576, 1536, 49152 rows of the head are too many for a unit test) and odd
# ones: rows not a multiple of 16, columns not a multiple of the group or of 32.
INT4_SHAPES = [(576, 576), (1536, 576), (40, 100), (7, 64), (33, 160)]


@pytest.mark.parametrize("shape", INT4_SHAPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matches_the_torch_provider(shape, group_size, symmetric) -> None:
    qweight = int_weight(*shape, 4, group_size, symmetric, seed=shape[0] + group_size)
    compare(CpuInt4Kernels(), qweight, torch.bfloat16)


@pytest.mark.parametrize("group_size", [32, 128, 512])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_act_order_with_unequal_groups(group_size, symmetric) -> None:
    qweight = int_weight(48, 1024 + 40, 4, group_size, symmetric, act_order=True, seed=3)
    compare(CpuInt4Kernels(), qweight, torch.bfloat16)
    prepared = CpuInt4Kernels().prepare(IntPacker().pack(qweight), torch.device("cpu"))
    assert prepared.columns is not None  # x is gathered into the groups' order


def test_int4_a_batch_of_prompts() -> None:
    compare(CpuInt4Kernels(), int_weight(64, 192, 4, 64, False, seed=5), torch.bfloat16,
            rows=37)


def test_int4_natural_order_needs_no_gather() -> None:
    prepared = CpuInt4Kernels().prepare(IntPacker().pack(int_weight(32, 256, 4, 64, True)),
                                        torch.device("cpu"))
    assert prepared.columns is None and prepared.group == 64


@pytest.mark.parametrize("shape", [(576, 576), (40, 100), (7, 64)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_weight_only_matches_the_torch_provider(shape, symmetric) -> None:
    compare(CpuInt8Kernels(), int_weight(*shape, 8, -1, symmetric, seed=11), torch.bfloat16)


@pytest.mark.parametrize("static_scale", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_matches_the_torch_provider(static_scale, symmetric, rows, dtype) -> None:
    qweight = int_weight(96, 200, 8, -1, symmetric, act_bits=8, static_scale=static_scale,
                         seed=13)
    compare(CpuW8A8Kernels(), qweight, dtype, rows=rows)


def test_w8a8_quantizes_activations_like_the_reference() -> None:
    """Inputs already on the activation grid give the exact integer product."""
    qweight = int_weight(16, 64, 8, -1, True, act_bits=8, static_scale=True, seed=17)
    x = fake_quantize_activations(torch.randn(4, 64) * 2, 8, qweight.tensors["input_scale"])
    prepared = CpuW8A8Kernels().prepare(IntPacker().pack(qweight), torch.device("cpu"))
    codes = (qweight.tensors["codes"].int() - 128)
    xq = torch.round(x / qweight.tensors["input_scale"]).int()
    exact = (xq @ codes.T).double() * qweight.tensors["scales"].double()[:, 0] * 3.0 / 127
    y = CpuW8A8Kernels().linear(x, prepared, None)
    torch.testing.assert_close(y.double(), exact, rtol=1e-6, atol=1e-5)


def qlinear(qweight: QuantizedWeight) -> QuantLinear:
    return QuantLinear(IntPacker().pack(qweight))


@pytest.mark.parametrize(("kwargs", "dtype", "provider"), [
    (dict(bits=4, group_size=64, symmetric=False), torch.bfloat16, "cpu-int4"),
    (dict(bits=4, group_size=-1, symmetric=True, act_order=True), torch.bfloat16, "cpu-int4"),
    (dict(bits=8, group_size=-1, symmetric=True), torch.bfloat16, "cpu-int8"),
    (dict(bits=8, group_size=-1, symmetric=False, act_bits=8), torch.float32, "cpu-w8a8"),
    (dict(bits=8, group_size=-1, symmetric=False, act_bits=8), torch.bfloat16, "cpu-w8a8"),
    # Outside the packed providers' declarations: the torch provider serves them.
    (dict(bits=4, group_size=64, symmetric=False), torch.float32, "torch"),
    (dict(bits=8, group_size=-1, symmetric=True), torch.float16, "torch"),
    (dict(bits=3, group_size=64, symmetric=False), torch.bfloat16, "torch"),
    (dict(bits=4, group_size=16, symmetric=False), torch.bfloat16, "torch"),
    (dict(bits=8, group_size=64, symmetric=True), torch.bfloat16, "torch"),
])
def test_selection_on_cpu(kwargs, dtype, provider) -> None:
    layer = qlinear(int_weight(32, 128, **kwargs))
    layer(torch.randn(2, 128, dtype=dtype))
    assert layer.provider_name == provider


def test_the_reasons_for_falling_back_are_named() -> None:
    from qcore.kernel_select import rank_providers
    from qcore.plugins import get_registry

    layer = qlinear(int_weight(32, 128, 4, 16, False))
    request = layer.request(torch.device("cpu"), torch.bfloat16)
    reasons = {cls.name: reason for cls, reason in rank_providers(get_registry(), request)}
    assert reasons["torch"] is None
    assert reasons["cpu-int4"] == "group size 16 not in [-1, 32, 64, 128, 256, 512, 1024]"
    assert reasons["cpu-int8"] == "bits 4 not in [8]"
    request = qlinear(int_weight(32, 128, 4, 64, False)).request(torch.device("cpu"),
                                                                torch.float32)
    reasons = {cls.name: reason for cls, reason in rank_providers(get_registry(), request)}
    assert reasons["cpu-int4"] == "dtype float32 not in ['bfloat16']"


def test_unavailable_without_the_operators(monkeypatch) -> None:
    import qcore_kernels.cpu_packed as cpu

    monkeypatch.setattr(cpu, "_INT4_OPS", ("_no_such_int4_operator",))
    reason = CpuInt4Kernels.unavailable_reason()
    assert reason is not None and "aten._no_such_int4_operator" in reason
    layer = qlinear(int_weight(32, 128, 4, 64, False))
    layer(torch.randn(2, 128, dtype=torch.bfloat16))
    assert layer.provider_name == "torch"


# ------------------------------------------------- the torch provider's dequantized weights


def test_torch_provider_dequantizes_once_within_the_budget(monkeypatch) -> None:
    import gc

    from qcore.builtin import torch_kernels

    monkeypatch.setenv("QCORE_DEQUANT_CACHE_MB", "0.02")  # 20971 bytes: one 64x64 fp32 weight
    budget = torch_kernels._DequantBudget()  # this test's own, whatever other tests hold
    monkeypatch.setattr(torch_kernels, "DEQUANT_BUDGET", budget)
    provider = TorchKernels()
    layers = [provider.prepare(IntPacker().pack(int_weight(64, 64, 3, 32, False, seed=s)),
                               torch.device("cpu")) for s in range(3)]
    calls = {"n": 0}
    original = torch_kernels.PreparedIntWeight.dequantize

    def counting(self, dtype):
        calls["n"] += 1
        return original(self, dtype)

    monkeypatch.setattr(torch_kernels.PreparedIntWeight, "dequantize", counting)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    first = [provider.linear(x, p, None) for p in layers]
    second = [provider.linear(x, p, None) for p in layers]
    # The first layer fits and is kept; the others are dequantized on every call.
    assert calls["n"] == 3 + 2
    assert [torch.float32 in p.cache for p in layers] == [True, False, False]
    assert budget.used == 64 * 64 * 4
    for a, b, p in zip(first, second, layers, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, torch.nn.functional.linear(x, original(p, torch.float32)))
    del layers, first, second
    gc.collect()
    assert budget.used == 0  # freed layers give their bytes back


def test_torch_provider_cache_off(monkeypatch) -> None:
    monkeypatch.setenv("QCORE_DEQUANT_CACHE_MB", "0")
    provider = TorchKernels()
    prepared = provider.prepare(IntPacker().pack(int_weight(16, 64, 3, 32, True)),
                                torch.device("cpu"))
    provider.linear(torch.randn(1, 64), prepared, None)
    assert prepared.cache == {}


def test_torch_provider_cache_budget_must_be_a_number(monkeypatch) -> None:
    monkeypatch.setenv("QCORE_DEQUANT_CACHE_MB", "lots")
    provider = TorchKernels()
    prepared = provider.prepare(IntPacker().pack(int_weight(16, 64, 3, 32, True)),
                                torch.device("cpu"))
    with pytest.raises(ValueError, match="QCORE_DEQUANT_CACHE_MB='lots' is not a number"):
        provider.linear(torch.randn(1, 64), prepared, None)


def test_torch_provider_cache_made_under_inference_mode_serves_autograd() -> None:
    provider = TorchKernels()
    prepared = provider.prepare(IntPacker().pack(int_weight(16, 64, 3, 32, True)),
                                torch.device("cpu"))
    with torch.inference_mode():
        provider.linear(torch.randn(1, 64), prepared, None)
    x = torch.randn(1, 64, requires_grad=True)
    provider.linear(x, prepared, None).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
