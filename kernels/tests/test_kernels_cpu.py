"""The kernels' unchanged CUDA sources run on the CPU (qcore_kernels.harness) against the
torch reference: every path, both dtypes, shapes that are and are not multiples of the
tiles. The tiled GEMMs run with qk_mma.cuh's SIMT stand-in for the wmma calls; the GPU
tests (test_kernels_gpu.py) cover those."""

from __future__ import annotations

import pytest

from qcore_kernels.testing import Case, assert_close, run_w8a8_case, run_wq_case

WQ_SHAPES = [  # (path, m, n, k, group, symmetric, act_order)
    ("gemv", 1, 42, 96, 32, False, False),  # n not a multiple of the 4 warps of a block
    ("gemv", 5, 40, 320, 128, True, True),  # tile of 8 tokens; last group of 64 columns
    ("gemv", 13, 36, 160, 64, False, False),  # tile of 16 tokens
    ("gemm", 33, 42, 160, 64, False, False),  # one partial 128 x 128 tile, k not a multiple of 128
    ("gemm", 130, 136, 96, -1, True, True),  # 2 x 2 tiles, three of them partial; per channel
    ("dequant", 20, 42, 320, 128, False, False),
]
W8A8_SHAPES = [
    ("gemv", 1, 42, 96),
    ("gemv", 6, 40, 160),
    ("gemm", 33, 42, 160),
    ("gemm", 130, 136, 96),
]


def _wq_cases() -> list[Case]:
    return [
        Case(m, n, k, bits, group, sym, act, dtype, path)
        for path, m, n, k, group, sym, act in WQ_SHAPES
        for bits in (4, 8)
        for dtype in ("float16", "bfloat16")
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


def test_gemv_token_tiles_agree_with_single_tokens(launch):
    import torch

    from qcore_kernels.layouts import to_wq
    from qcore_kernels.ops import wq_linear
    from qcore_kernels.testing import random_int_packed

    w = to_wq(random_int_packed(12, 64, 4, 32, seed=5), torch.float16, "cpu")
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(0)).half()
    together = wq_linear(x, w, None, launch, path="gemv")  # 16-token tile, 7 rows past M
    alone = torch.cat([wq_linear(x[i : i + 1], w, None, launch, path="gemv") for i in range(9)])
    assert torch.equal(together, alone)
