"""The W4A4 kernels (qk_w4a4.cu) on the CPU (qcore_kernels.harness): the activation codes and
scales bit for bit against qcore.grid.quantize_activation_groups, the low-rank projection
against float64, the GEMM's integer products exactly, and the whole linear (codes, GEMM,
fused low-rank branch, bias) against the torch reference. The int4 and fp16 tensor-core
products run as qk_mma.cuh's SIMT stand-ins, which gather their operands with warp shuffles
(the fragment layouts are exercised); the GPU tests (test_w4a4_gpu.py) cover the tensor
cores themselves."""

from __future__ import annotations

import pytest
import torch

from qcore.grid import quantize_activation_groups
from qcore_kernels.layouts import W4A4_RANK_TILE, to_w4a4
from qcore_kernels.ops import quantize_w4a4_activations, w4a4_linear
from qcore_kernels.sources import W4A4_TILINGS
from qcore_kernels.testing import (
    TOLERANCE,
    W4A4Case,
    assert_close,
    assert_w4a4_codes_are_the_cores,
    assert_w4a4_exact,
    random_w4a4_packed,
    run_w4a4_case,
    w4a4_exact_products,
    w4a4_inputs,
)

F16, BF16 = "float16", "bfloat16"
SMALL, LARGE = W4A4_TILINGS  # (m16 tiles, n8 tiles, warps along N, warps along K)

LINEAR_CASES = [
    # odd M, N not a multiple of the 32-channel tile, K of 3 groups (an odd count for 4 warps)
    W4A4Case(5, 40, 192, dtype=F16),
    W4A4Case(5, 40, 192, dtype=BF16, bias=False),
    # asymmetric weights (zero-point correction with the activations' sums), rank-32 branch
    W4A4Case(3, 24, 128, symmetric=False, rank=32, dtype=F16),
    W4A4Case(3, 24, 128, symmetric=False, rank=32, dtype=BF16),
    # asymmetric activations (correction with the weights' sums), a branch of rank 20
    # (padded to 32), 2 token tiles, the K ranges of the activation kernel split in 2
    W4A4Case(17, 56, 320, act_symmetric=False, rank=20, dtype=F16, splits=2),
    # both asymmetric, no bias, rank 40 (two low-rank tiles of 32), 4 K ranges
    W4A4Case(9, 48, 256, symmetric=False, act_symmetric=False, rank=40, dtype=BF16, bias=False,
             splits=4),
    # the large tiling (32 x 128 blocks): 2 blocks along M (33 = 32 + 1), 136 = 128 + 8
    W4A4Case(33, 136, 128, rank=32, dtype=F16),
    W4A4Case(37, 72, 192, symmetric=False, act_symmetric=False, dtype=BF16, tiling=LARGE),
    # the small tiling past its default range (3 token tiles)
    W4A4Case(37, 40, 128, symmetric=False, rank=16, dtype=F16, tiling=SMALL),
    W4A4Case(1, 8, 64, rank=8, dtype=F16, bias=False),  # one group, one n8 tile, one token
]


@pytest.fixture(scope="module")
def launch():
    from qcore_kernels.harness import CpuHarness, harness_unavailable_reason
    from qcore_kernels.sources import source

    reason = harness_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    harness = CpuHarness("qk_w4a4.cu", instances=source("qk_w4a4.cu").instances)

    def run(file, instance, grid, block, args):
        assert file == "qk_w4a4.cu"
        harness.launch(instance, grid, block, args)

    return run


def _activations(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """x [13, 320] (5 groups): Gaussian rows of different sizes, and groups that test the
    grid's edges: exact halves (ties round to even), a group of zeros (scale 1), a negative
    group (asymmetric: hi = 0), ranges of exactly 7 and 15 steps, one large value."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(13, 320, generator=gen) * torch.logspace(-2, 2, 13)[:, None]
    x[0, :64] = 0
    x[0, :9] = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -6.5])
    x[1, 64:128] = 0  # scale 1
    x[2, 128:192] = -torch.rand(64, generator=gen) - 0.1  # max(x, 0) = 0
    x[3, :64] = 0
    x[3, :5] = torch.tensor([-7.5, 7.5, 0.5, 1.5, -0.5])  # asymmetric: scale 1, zero 8 (a tie)
    x[4, 300] = 3000.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_activation_codes_and_scales_are_the_cores_bit_for_bit(launch, symmetric, dtype):
    x = _activations(dtype)
    act = quantize_w4a4_activations(x, launch, asymmetric=not symmetric, sums=True)
    assert_w4a4_codes_are_the_cores(act, x, symmetric)
    # the edges are in the data: ties, a group of zeros (scale 1), a range of 15 steps
    codes, scales, zeros = quantize_activation_groups(x, 4, 64, symmetric)
    assert float(scales[1, 1]) == 1.0 and not codes[1, 1].any()
    if symmetric:
        assert torch.equal(codes[0, 0, :9], torch.tensor([7.0, 0, 2, 2, 0, -2, -2, 4, -6]))
    else:
        assert float(zeros[3, 0]) == 8 and float(scales[3, 0]) == 1.0


def _down(rank_padded: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    down = torch.randn(rank_padded, k, generator=torch.Generator().manual_seed(9)) * 0.05
    return down.to(dtype)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_rank_projection_is_x_times_down(launch, dtype, splits):
    """x @ down.T in float32 (two low-rank tiles of 32, one K range or three), within
    float32 rounding of the float64 product; the codes do not change with the branch."""
    x = _activations(dtype)
    down = _down(2 * W4A4_RANK_TILE, x.shape[1], dtype)
    act = quantize_w4a4_activations(x, launch, down=down, splits=splits)
    exact = x.double() @ down.double().T
    bound = 1e-6 * (x.double().abs() @ down.double().abs().T)
    assert act.xdown.dtype == torch.float32
    assert bool(((act.xdown.double() - exact).abs() <= bound).all())
    plain = quantize_w4a4_activations(x, launch, splits=splits)
    assert torch.equal(plain.codes, act.codes) and torch.equal(plain.scales, act.scales)


def test_low_rank_projection_does_not_depend_on_which_block_finishes_last(launch, monkeypatch):
    """Three K ranges: the last block of a tile adds the ranges' partial sums in range
    order, so blocks run in reverse (another block is last) give the same sums bit for bit."""
    x = _activations(torch.float16)[:, :256]
    down = _down(W4A4_RANK_TILE, 256, torch.float16)
    monkeypatch.setenv("QK_CPU_BLOCK_ORDER", "forward")
    forward = quantize_w4a4_activations(x, launch, down=down, splits=3).xdown
    monkeypatch.setenv("QK_CPU_BLOCK_ORDER", "reverse")
    backward = quantize_w4a4_activations(x, launch, down=down, splits=3).xdown
    assert torch.equal(forward, backward)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.id)
def test_w4a4_linear_matches_the_reference(case, launch):
    y, ref = run_w4a4_case(case, launch, "cpu")
    assert_close(y, ref, case)


@pytest.mark.parametrize(
    "symmetric, act_symmetric, dtype, tiling",
    [(True, True, F16, SMALL), (False, True, BF16, LARGE), (True, False, F16, LARGE),
     (False, False, F16, SMALL)],
)
def test_gemm_computes_the_integer_products_exactly(launch, symmetric, act_symmetric, dtype,
                                                    tiling):
    """Without bias and branch, y is the exact sum over groups of sa * sw * sum (qa - za)
    (qw - zw), from the core's activation codes and the weight's codes, up to y's rounding
    to float16 / bfloat16: the zero-point corrections and the scales are exactly right."""
    case = W4A4Case(11, 40, 256, symmetric=symmetric, act_symmetric=act_symmetric,
                    dtype=dtype, bias=False)
    packed, x, _ = w4a4_inputs(case, "cpu")
    y = w4a4_linear(x, to_w4a4(packed, "cpu"), None, launch, tiling=tiling)
    assert_w4a4_exact(y, w4a4_exact_products(x, packed))


def test_tokens_alone_equal_tokens_together(launch):
    """Each token's output is the same computed with 16 others or alone (same tiling and K
    ranges), bit for bit: no token's data leaks into another's."""
    case = W4A4Case(17, 24, 192, symmetric=False, act_symmetric=False, rank=32,
                    tiling=SMALL, splits=3)
    packed, x, bias = w4a4_inputs(case, "cpu")
    w = to_w4a4(packed, "cpu")
    together = w4a4_linear(x, w, bias, launch, tiling=SMALL, splits=3)
    alone = torch.cat([w4a4_linear(x[i : i + 1], w, bias, launch, tiling=SMALL, splits=3)
                       for i in (0, 8, 16)])
    assert torch.equal(together[[0, 8, 16]], alone)


def test_fused_branch_matches_the_torch_provider_plus_the_branch(launch):
    """What QuantLinear computes with a non-fusing provider: the torch provider's output,
    then (x down^T) up^T in x's dtype."""
    from qcore.builtin.torch_kernels import TorchKernels

    packed = random_w4a4_packed(40, 256, symmetric=False, rank=32, seed=4)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 256, generator=gen).half()
    bias = (torch.randn(40, generator=gen) * 0.1).half()
    y = w4a4_linear(x, to_w4a4(packed, "cpu"), bias, launch)
    torch_provider = TorchKernels()
    want = torch_provider.linear(x, torch_provider.prepare(packed, torch.device("cpu")), bias)
    want = want + (x @ packed.tensors["lowrank_down"].T) @ packed.tensors["lowrank_up"].T
    err = float((y.float() - want.float()).abs().max() / want.float().abs().max())
    assert err <= TOLERANCE["float16"], err


def test_empty_batch_gives_an_empty_output(launch):
    packed = random_w4a4_packed(16, 64, rank=8)
    y = w4a4_linear(torch.zeros(0, 64, dtype=torch.float16), to_w4a4(packed, "cpu"), None, launch)
    assert y.shape == (0, 16) and y.dtype == torch.float16
