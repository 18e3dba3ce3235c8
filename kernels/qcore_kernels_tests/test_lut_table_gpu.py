"""The dot-product-table GEMV (qk_lut_table, path ``table``) on a GPU: numerics against
qcore.codebook.dequantize_vq + F.linear, its per-stream workspace across repeated calls,
CUDA-graph replays and streams, and programmatic dependent launch.

Its own file, which pytest runs after the other kernel tests: the table GEMV is the newest
kernel, and a fault in it (an illegal address poisons the process's CUDA context) must not
fail the other GPU tests. Skipped without CuPy and a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from qcore_kernels.testing import (
    LUTCase,
    assert_close,
    check_programmatic_launch,
    random_vq,
    run_lut_case,
)

pytestmark = pytest.mark.gpu

CASES = [  # (n, k, rows, extra): the benchmark shapes, a partial vector with scale and offset,
    # outliers with a 200-row codebook and rows that end inside a 32-row group, both
    # benchmark shapes of the MLP, and K past one slice per multiprocessor
    (4096, 4096, None, {}),
    (8192, 8192, None, {}),
    (1000, 4100, None, {"scale": True, "offset": True}),
    (1002, 4098, 200, {"outliers": 64, "scale": True, "offset": True}),
    (14336, 4096, None, {"scale": True}),
    (4096, 14336, None, {}),
    (512, 65536, None, {}),
]


@pytest.mark.parametrize("case", [
    LUTCase(1, n, k, 4, 8, rows=rows, dtype=dtype, path="table", **extra)
    for n, k, rows, extra in CASES for dtype in ("float16", "bfloat16")
], ids=lambda c: c.id)
def test_table_gemv_matches_the_reference(case, launcher):
    y, ref = run_lut_case(case, launcher, "cuda")
    assert_close(y, ref, case)


@pytest.mark.parametrize("q", [2, 4])
def test_table_gemv_repeats_in_graphs_and_on_other_streams(q, launcher, monkeypatch):
    """qk_lut_table's slices meet in a per-stream workspace whose row-group counters the
    completing warp resets: repeated calls, CUDA-graph replays and calls on a side stream
    give the first call's outputs bit for bit, and the counters are zero afterwards."""
    import qcore_kernels.lut_ops as lut_ops
    from qcore_kernels.lut_layout import to_lut

    monkeypatch.setattr(lut_ops, "LUT_TABLE_Q", q)
    case = LUTCase(1, 3000, 4100, 4, 8, rows=200, outliers=64, scale=True, offset=True)
    w = to_lut(random_vq(case), "cuda")
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, case.k, generator=gen).half().cuda() for _ in range(3)]
    bias = torch.randn(3000, generator=gen).half().cuda()
    first = [lut_ops.lut_linear(x, w, bias, launcher, path="table") for x in xs]
    again = [lut_ops.lut_linear(x, w, bias, launcher, path="table") for x in xs]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = [lut_ops.lut_linear(x, w, bias, launcher, path="table") for x in xs]
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(first, replayed, strict=True):
            assert torch.equal(a, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        other = [lut_ops.lut_linear(x, w, bias, launcher, path="table") for x in xs]
    side.synchronize()
    for a, b in zip(first, other, strict=True):
        assert torch.equal(a, b)
    torch.cuda.synchronize()
    for _, counters in lut_ops._TABLE_WORKSPACES.current.values():
        assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "outliers-scale-offset"])
def test_table_gemv_programmatic_launch_waits_for_the_kernel_before(extras, launcher):
    """Programmatic dependent launch of the table GEMV (one token): x written late by the
    kernel just before each call, eagerly and in a CUDA graph, equal to plain launches
    (qcore_kernels.testing.check_programmatic_launch)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    check_programmatic_launch("table", extras, launcher)
