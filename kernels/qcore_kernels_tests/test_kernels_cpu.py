"""The kernels' unchanged CUDA sources run on the CPU (qcore_kernels.harness) against the
torch reference: every path, both dtypes, shapes that are and are not multiples of the
tiles. The tensor-core products run as qk_mma.cuh's SIMT stand-ins (mma_16816 gathers its
operands with warp shuffles; WarpTile computes wmma's contract); the GPU tests
(test_kernels_gpu.py) cover the tensor cores themselves."""

from __future__ import annotations

import pytest
import torch

from qcore_kernels.testing import Case, assert_close, run_w8a8_case, run_wq_case

WQ_SHAPES = [  # (path, m, n, k, group, symmetric, act_order)
    ("mma", 1, 42, 96, 32, False, False),  # n not a multiple of 16; k less than a 4-bit chunk
    ("mma", 5, 40, 320, 128, True, True),  # last chunk partial; last group of 64 columns
    ("mma", 13, 36, 160, 64, False, False),
    ("mma", 33, 42, 160, 64, False, False),  # two blocks along M, 31 rows past M
    ("mma", 20, 136, 96, -1, True, True),  # 2 token tiles; per channel
    ("mma", 70, 20, 64, 32, False, True),  # three blocks along M
    ("dequant", 20, 42, 320, 128, False, False),
]
W8A8_SHAPES = [
    ("gemv", 1, 42, 96),
    ("gemv", 6, 40, 160),
    ("gemm", 33, 42, 160),
    ("gemm", 130, 136, 96),
    ("intmm", 33, 40, 160),  # torch._int_mm's products, qk_w8a8_scale's epilogue
    ("intmm", 130, 136, 96),
]


MMA_TILINGS = [  # (m, n, k, group, (m16 tiles, n8 tiles, warps, K splits)) of the mma path
    (3, 40, 1056, 64, (1, 2, 8, 2)),  # K split over 2 blocks of 8 warps; a partial last chunk
    (16, 70, 640, 128, (1, 4, 8, 1)),  # 32 channels per block; more warps than chunks at 4 bits
    (20, 36, 1024, 32, (2, 2, 4, 3)),  # 3 uneven K ranges
    (30, 20, 640, -1, (2, 4, 4, 2)),  # 2 token tiles, per-channel scales
]


def _wq_cases() -> list[Case]:
    return [
        Case(m, n, k, bits, group, sym, act, dtype, path)
        for path, m, n, k, group, sym, act in WQ_SHAPES
        for bits in (4, 8)
        for dtype in ("float16", "bfloat16")
    ] + [
        Case(m, n, k, bits, group, False, False, "float16", "mma", mma=tiling)
        for m, n, k, group, tiling in MMA_TILINGS
        for bits in (4, 8)
    ]


def _w8a8_cases() -> list[Case]:
    return [
        Case(m, n, k, 8, -1, True, False, dtype, path, static=static)
        for path, m, n, k in W8A8_SHAPES
        for dtype in ("float16", "bfloat16")
        for static in (False, True)
    ]


@pytest.fixture(scope="module")
def launch():
    from qcore_kernels.harness import CpuHarness, harness_unavailable_reason
    from qcore_kernels.sources import source

    reason = harness_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    harnesses: dict[str, CpuHarness] = {}

    def run(file, instance, grid, block, args):
        if file not in harnesses:
            harnesses[file] = CpuHarness(file, instances=source(file).instances)
        harnesses[file].launch(instance, grid, block, args)

    return run


@pytest.mark.parametrize("case", _wq_cases(), ids=lambda c: c.id)
def test_weight_only_kernels_on_the_cpu_match_the_reference(case, launch):
    y, ref = run_wq_case(case, launch, "cpu")
    assert_close(y, ref, case)


@pytest.mark.parametrize("case", _w8a8_cases(), ids=lambda c: c.id)
def test_w8a8_kernels_on_the_cpu_match_the_reference(case, launch):
    y, ref = run_w8a8_case(case, launch, "cpu")
    assert_close(y, ref, case)


@pytest.mark.parametrize("tiling", [t for t in MMA_TILINGS if t[4][3] > 1], ids=str)
def test_split_k_does_not_depend_on_which_block_finishes_last(tiling, launch, monkeypatch):
    """qk_wq_mma with K split over blocks: the last block of a tile adds the splits' partial
    sums in split order, so blocks run in reverse (another block is last) give the same
    outputs bit for bit."""
    m, n, k, group, mma = tiling
    case = Case(m, n, k, 4, group, False, False, "float16", "mma", mma=mma)
    monkeypatch.setenv("QK_CPU_BLOCK_ORDER", "forward")
    y, ref = run_wq_case(case, launch, "cpu")
    monkeypatch.setenv("QK_CPU_BLOCK_ORDER", "reverse")
    y_reversed, _ = run_wq_case(case, launch, "cpu")
    assert torch.equal(y, y_reversed)
    assert_close(y, ref, case)


def test_activation_quantization_equals_the_cores_fake_quantization(launch):
    """qk_quantize_rows gives exactly the levels and scales of qcore.grid's reference."""
    import torch

    from qcore.grid import fake_quantize_activations
    from qcore_kernels.ops import quantize_rows

    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(4)).half()
    x[3] = 0  # an all-zero row takes scale 1
    xq, xs = quantize_rows(x, None, launch)
    assert torch.equal((xq.float() * xs[:, None]).half(), fake_quantize_activations(x, 8))
    assert float(xs[3]) == 1.0
    static = torch.tensor([0.02])
    xq, xs = quantize_rows(x, static, launch)
    assert torch.equal((xq.float() * 0.02).half(), fake_quantize_activations(x, 8, static))
    assert int(xq.abs().max()) == 127


def test_token_tiles_agree_with_single_tokens(launch):
    import torch

    from qcore_kernels.layouts import to_wq
    from qcore_kernels.ops import wq_linear
    from qcore_kernels.testing import random_int_packed

    w = to_wq(random_int_packed(12, 64, 4, 32, seed=5), torch.float16, "cpu")
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0)).half()
    together = wq_linear(x, w, None, launch, path="mma")  # 16-token tile, 7 rows past M
    alone = torch.cat([wq_linear(x[i : i + 1], w, None, launch, path="mma") for i in range(9)])
    assert torch.equal(together, alone)
