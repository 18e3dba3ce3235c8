"""The W4A4 kernels (qk_w4a4.cu) on a GPU: the activation codes bit for bit against the core
(the GPU's IEEE division), the int4 tensor-core products exactly, the whole linear with and
without its fused low-rank branch against the torch reference, and the provider inside
QuantLinear (the branch computed once, by the kernel).

Skipped without CuPy and a CUDA device; ``kernels/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from qcore_kernels.sources import W4A4_TILINGS
from qcore_kernels.testing import (
    W4A4Case,
    assert_close,
    assert_w4a4_codes_are_the_cores,
    assert_w4a4_exact,
    random_w4a4_packed,
    run_w4a4_case,
    w4a4_exact_products,
    w4a4_inputs,
)

pytestmark = pytest.mark.gpu

SMALL, LARGE = W4A4_TILINGS
F16, BF16 = "float16", "bfloat16"


def _cases() -> list[W4A4Case]:
    shapes = [  # (m, n, k, weights symmetric, activations symmetric, rank, tiling)
        (1, 4096, 4096, True, True, 32, None),  # decode: K split over the activation kernel
        (1, 1000, 4160, False, True, 0, None),  # n not a multiple of 32; 65 groups
        (7, 3000, 1024, True, False, 32, None),
        (33, 1000, 4096, False, False, 32, None),  # the large tiling, a partial token tile
        (255, 384, 768, True, True, 128, None),  # 4 low-rank tiles of 32
        (300, 512, 1024, False, True, 20, SMALL),  # the small tiling over 19 token tiles
        (20, 136, 128, True, True, 32, LARGE),
    ]
    return [
        W4A4Case(m, n, k, sym, act_sym, rank, dtype, tiling=tiling)
        for m, n, k, sym, act_sym, rank, tiling in shapes
        for dtype in (F16, BF16)
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_w4a4_linear_matches_the_reference(case, launcher):
    y, ref = run_w4a4_case(case, launcher, "cuda")
    assert_close(y, ref, case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_activation_codes_are_the_cores_bit_for_bit(launcher, symmetric, dtype):
    """The GPU divides as IEEE float32 does (NVRTC's default -prec-div=true): every code,
    scale and zero point of 8 x 4096 Gaussian activations of widely different sizes, plus
    exact ties, equals the core's."""
    from qcore_kernels.ops import quantize_w4a4_activations

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4096, generator=gen) * torch.logspace(-3, 3, 9)[:, None]
    x[8, :64] = 0
    x[8, :8] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -2.5, -7.5, 7.5])
    x = x.to(dtype).cuda()
    act = quantize_w4a4_activations(x, launcher, asymmetric=not symmetric, sums=True)
    assert_w4a4_codes_are_the_cores(act, x, symmetric)


@pytest.mark.parametrize(
    "symmetric, act_symmetric, dtype, tiling",
    [(True, True, F16, SMALL), (False, True, BF16, LARGE), (True, False, F16, LARGE),
     (False, False, BF16, SMALL)],
)
def test_int4_products_are_exact(launcher, symmetric, act_symmetric, dtype, tiling):
    """The tensor cores' int4 products (mma.sync m16n8k64 .s4) with the zero-point
    corrections and scales equal the float64 sum of the core's integer codes, up to y's
    rounding: the fragment layout of the hardware is the one qk_mma.cuh documents."""
    from qcore_kernels.layouts import to_w4a4
    from qcore_kernels.ops import w4a4_linear

    case = W4A4Case(37, 520, 1024, symmetric=symmetric, act_symmetric=act_symmetric,
                    dtype=dtype, bias=False)
    packed, x, _ = w4a4_inputs(case, "cuda")
    y = w4a4_linear(x, to_w4a4(packed, "cuda"), None, launcher, tiling=tiling)
    assert_w4a4_exact(y, w4a4_exact_products(x, packed))


def test_outputs_repeat_bit_for_bit(launcher):
    """The K ranges of the activation kernel meet through global memory (a ticket per tile):
    ten calls give the same outputs bit for bit, whichever block finishes last."""
    from qcore_kernels.layouts import to_w4a4
    from qcore_kernels.ops import w4a4_linear

    case = W4A4Case(3, 1024, 4096, symmetric=False, rank=64, splits=16)
    packed, x, bias = w4a4_inputs(case, "cuda")
    w = to_w4a4(packed, "cuda")
    first = w4a4_linear(x, w, bias, launcher, splits=16)
    for _ in range(9):
        assert torch.equal(w4a4_linear(x, w, bias, launcher, splits=16), first)


@pytest.mark.parametrize("rank", [0, 32])
def test_quant_linear_selects_cupy_w4a4_and_fuses_the_branch(launcher, rank):
    """A QuantLinear of a W4A4 g64 weight picks cupy-w4a4 and hands it the branch; the
    output matches the same layer on the torch provider, which adds the branch itself."""
    from qcore.qlinear import QuantLinear

    packed = random_w4a4_packed(512, 1024, symmetric=False, rank=rank, seed=7)
    branch = None
    if rank:
        branch = (packed.tensors.pop("lowrank_down"), packed.tensors.pop("lowrank_up"))
    layer = QuantLinear(packed, op="linear", lowrank=branch).half().cuda()
    x = torch.randn(4, 6, 1024, generator=torch.Generator().manual_seed(1)).half().cuda()
    with torch.no_grad():
        y = layer(x)
        assert layer.provider_name == "cupy-w4a4"
        assert "kernel=cupy-w4a4" in repr(layer)
        layer.kernel = "torch"
        layer._providers.clear()
        want = layer(x)
    assert layer.provider_name == "torch"
    assert_close(y.reshape(24, 512), want.reshape(24, 512).float(),
                 W4A4Case(24, 512, 1024, rank=rank))


def test_w4a4_kernels_launch_on_torchs_current_stream(launcher):
    """The input is written on a side stream after a long sleep; a kernel launched on any
    other stream would read it before it is written."""
    from qcore_kernels.layouts import to_w4a4
    from qcore_kernels.ops import w4a4_linear

    w = to_w4a4(random_w4a4_packed(512, 1024, rank=32, seed=6), "cuda")
    src = torch.randn(4, 1024, generator=torch.Generator().manual_seed(1)).half().cuda()
    expected = w4a4_linear(src, w, None, launcher)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.zeros_like(src)
        torch.cuda._sleep(200_000_000)
        x.copy_(src)
        y = w4a4_linear(x, w, None, launcher)
    side.synchronize()
    assert torch.equal(y, expected)
