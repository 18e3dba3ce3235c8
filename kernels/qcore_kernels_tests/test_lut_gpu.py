"""The codebook kernels (qk_lut.cu) on a GPU: numerics against qcore.codebook.dequantize_vq
+ F.linear over realistic shapes (full 4096-row codebooks in shared memory beyond 48 KB,
residual, outliers, scale/offset, partial last vectors), both paths, the provider inside
QuantLinear, and stream ordering. The provider conformance suite runs from
test_lut_providers.py (TestCupyLUTConformance) on the same machine.

Skipped without CuPy and a CUDA device; ``kernels/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from qcore_kernels.testing import LUTCase, assert_close, random_vq, run_lut_case

pytestmark = pytest.mark.gpu


def _cases() -> list[LUTCase]:
    shapes = [  # (path, m, n, k, v, bits, rows, extra)
        ("gemv", 1, 1000, 4096, 6, 12, None, {}),  # 2 bits/weight, 48 KB codebook, partial vector
        ("gemv", 1, 4096, 4096, 4, 12, None, {}),  # ~3 bits/weight
        ("gemv", 3, 1002, 4100, 4, 12, None,
         {"res_bits": 8, "outliers": 64, "scale": True, "offset": True}),
        ("gemv", 16, 1000, 800, 8, 12, None, {"scale": True}),  # 64 KB codebook
        ("gemv", 7, 999, 2053, 6, 16, 3000, {"res_bits": 10}),  # 16-bit indices, odd k
        ("gemv", 16, 512, 8192, 6, 12, None, {}),
        ("dequant", 33, 1000, 4100, 6, 12, None,
         {"res_bits": 8, "outliers": 64, "scale": True, "offset": True}),
        ("dequant", 1, 256, 1024, 8, 16, None, {}),  # 65536 x 8 codebook: no GEMV
        (None, 2, 512, 1024, 6, 12, None, {"outliers": 10}),  # auto: gemv
        (None, 300, 512, 1024, 4, 10, None, {"scale": True}),  # auto: dequant
        (None, 5, 300, 1000, 5, 10, None, {}),  # v = 5: auto -> dequant
        # the tensor-core GEMV (v = 4, 8-bit indices): 2 bits/weight at M = 1, a partial
        # 256-column chunk with scale and offset, a partial vector with outliers and a
        # 200-row codebook, 16-token tiles, 32-row tiles (G = 4) and x too large for
        # shared memory (28672 columns: read from global memory)
        ("mma", 1, 4096, 4096, 4, 8, None, {}),
        ("mma", 1, 1000, 4100, 4, 8, None, {"scale": True, "offset": True}),
        ("mma", 5, 1002, 4098, 4, 8, 200, {"outliers": 64, "scale": True, "offset": True}),
        ("mma", 16, 4096, 8192, 4, 8, None, {}),
        ("mma", 8, 14336, 4096, 4, 8, None, {"scale": True}),
        ("mma", 1, 1024, 28672, 4, 8, None, {}),
        (None, 6, 512, 1024, 4, 8, None, {"outliers": 10}),  # auto: mma4 (2 token blocks)
        # the tensor-core GEMV of 4-token blocks (same weights): the benchmark shapes at M = 1, a
        # partial chunk with scale and offset, 4 tokens filling all 256 x slots of the table
        # with outliers and a 200-row codebook, many tiles per block, the longest row of one
        # token in the table (16384 columns), and x after the table (4 x 8192, 3 x 14336)
        ("mma4", 1, 4096, 4096, 4, 8, None, {}),
        ("mma4", 1, 8192, 8192, 4, 8, None, {}),
        ("mma4", 1, 1000, 4100, 4, 8, None, {"scale": True, "offset": True}),
        ("mma4", 4, 1002, 4096, 4, 8, 200, {"outliers": 64, "scale": True, "offset": True}),
        ("mma4", 2, 14336, 4096, 4, 8, None, {"scale": True}),
        ("mma4", 1, 4096, 16384, 4, 8, None, {}),
        ("mma4", 4, 4096, 8192, 4, 8, None, {}),
        ("mma4", 3, 1000, 14336, 4, 8, None, {"offset": True}),
        # blocks of 4 tokens along grid y: 16 tokens (the benchmark's M = 16), 9 = 4 + 4 + 1
        ("mma4", 16, 8192, 8192, 4, 8, None, {}),
        ("mma4", 9, 1002, 4100, 4, 8, 200, {"outliers": 64, "scale": True, "offset": True}),
        (None, 3, 512, 1024, 4, 8, None, {"outliers": 10}),  # auto: mma4
    ]
    return [
        LUTCase(m, n, k, v, bits, rows=rows, dtype=dtype, path=path, **extra)
        for path, m, n, k, v, bits, rows, extra in shapes
        for dtype in ("float16", "bfloat16")
    ]


def _gemv_fits(case: LUTCase) -> bool:
    from qcore_kernels.lut_layout import to_lut
    from qcore_kernels.lut_ops import gemv_unsupported_reason

    return gemv_unsupported_reason(to_lut(random_vq(case), "cpu"), torch.device("cuda")) is None


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_lut_kernels_match_the_reference(case, launcher):
    if case.path == "gemv" and not _gemv_fits(case):
        pytest.skip("the codebooks do not fit this device's shared memory")
    y, ref = run_lut_case(case, launcher, "cuda")
    assert_close(y, ref, case)


def test_auto_paths(launcher):
    from qcore_kernels.lut_layout import to_lut
    from qcore_kernels.lut_ops import lut_path

    small = to_lut(random_vq(LUTCase(1, 64, 600, 6, 12, rows=None)), "cuda")
    assert lut_path(1, small, "cuda") == "gemv" and lut_path(16, small, "cuda") == "gemv"
    assert lut_path(17, small, "cuda") == "dequant"
    huge = to_lut(random_vq(LUTCase(1, 64, 600, 8, 16, rows=None)), "cuda")
    assert lut_path(1, huge, "cuda") == "dequant"


def test_gemv_tiles_agree_with_each_other(launcher):
    """Every token of a 16-token GEMV equals the same token computed alone (M = 1)."""
    from qcore_kernels.lut_layout import to_lut
    from qcore_kernels.lut_ops import lut_linear

    # (no offset: its sum of x comes from torch, whose reduction may depend on M)
    case = LUTCase(16, 256, 1030, 6, 12, rows=None, res_bits=6, outliers=20, scale=True)
    w = to_lut(random_vq(case), "cuda")
    x = torch.randn(16, 1030, generator=torch.Generator().manual_seed(0)).half().cuda()
    together = lut_linear(x, w, None, launcher, path="gemv")
    alone = torch.cat([lut_linear(x[i : i + 1], w, None, launcher, path="gemv") for i in range(16)])
    assert torch.equal(together, alone)


def test_mma_tiles_agree_with_each_other(launcher):
    """A token's outputs do not depend on the other tokens of its tile: up to 8 tokens
    (weights as the mma's A operand) they equal the token computed alone; in a 16-token
    tile (tokens as A) they do not depend on the token's place."""
    from qcore_kernels.lut_layout import to_lut
    from qcore_kernels.lut_ops import lut_linear, lut_path

    case = LUTCase(16, 1000, 4100, 4, 8, rows=None, outliers=20, scale=True)
    w = to_lut(random_vq(case), "cuda")
    assert lut_path(16, w, "cuda") == "mma4"  # (mma forced below)
    x = torch.randn(16, 4100, generator=torch.Generator().manual_seed(0)).half().cuda()
    alone = torch.cat([lut_linear(x[i : i + 1], w, None, launcher, path="mma") for i in range(7)])
    assert torch.equal(lut_linear(x[:7], w, None, launcher, path="mma"), alone)
    y = lut_linear(x, w, None, launcher, path="mma")
    assert torch.equal(lut_linear(x.roll(5, 0), w, None, launcher, path="mma"), y.roll(5, 0))


def _default_and_with(case, launcher, monkeypatch, flag: str):
    """``case`` run with lut_ops' defaults, then with ``flag`` set: (default outputs,
    outputs with the flag, the reference, the instances launched with the flag)."""
    import qcore_kernels.lut_ops as lut_ops

    y_default, ref = run_lut_case(case, launcher, "cuda")
    instances = []

    def spy(file, instance, grid, block, args, shared_mem=0, **kw):  # kw: programmatic
        instances.append(instance)
        launcher(file, instance, grid, block, args, shared_mem=shared_mem, **kw)

    monkeypatch.setattr(lut_ops, flag, True)
    y, _ = run_lut_case(case, spy, "cuda")
    return y_default, y, ref, instances


@pytest.mark.parametrize("case", [
    LUTCase(1, 4096, 4096, 4, 8, rows=None, path="mma4"),
    LUTCase(1, 8192, 8192, 4, 8, rows=None, path="mma4"),
    LUTCase(2, 1000, 4100, 4, 8, rows=200, scale=True, offset=True, outliers=64, path="mma4"),
    LUTCase(6, 14336, 4096, 4, 8, rows=None, scale=True, dtype="bfloat16", path="mma4"),
    LUTCase(1, 64, 20000, 4, 8, rows=None, path="mma4"),  # x after the table
], ids=lambda c: c.id)
def test_mma4_index_words_in_registers(case, launcher, monkeypatch):
    """qk_lut_mma4 with its index words loaded into registers (no stages; an unmeasured
    switch, off) gives the outputs of the default layout bit for bit."""
    y_default, y, ref, instances = _default_and_with(case, launcher, monkeypatch,
                                                     "LUT_MMA4_REGISTER_INDICES")
    assert instances and all(i.endswith(", true>") for i in instances), instances
    assert torch.equal(y, y_default)
    assert_close(y, ref, case)


@pytest.mark.parametrize("case", [
    LUTCase(1, 4096, 4096, 4, 8, rows=None, path="mma4"),
    LUTCase(1, 8192, 8192, 4, 8, rows=None, path="mma4"),
    LUTCase(3, 1000, 4100, 4, 8, rows=200, scale=True, offset=True, outliers=64, path="mma4"),
    LUTCase(6, 14336, 4096, 4, 8, rows=None, scale=True, dtype="bfloat16", path="mma4"),
], ids=lambda c: c.id)
def test_mma4_absent_tokens_skip_their_x_reads(case, launcher, monkeypatch):
    """qk_lut_mma4 with the x reads of a block's absent tokens skipped (an unmeasured switch,
    off) gives the outputs of reading them bit for bit, and the float32 reference's."""
    y_read, y_skip, ref, _ = _default_and_with(case, launcher, monkeypatch,
                                               "LUT_MMA4_SKIP_ABSENT_X")
    assert torch.equal(y_skip, y_read)
    assert_close(y_skip, ref, case)


@pytest.mark.parametrize("groups", [1, 2])
def test_mma4_tilings_and_tokens_agree(launcher, monkeypatch, groups):
    """qk_lut_mma4: 1 and 2 row groups per tile give the same outputs bit for bit, a token's
    outputs equal the token computed alone, and the 16-token tensor-core GEMV agrees far
    inside the tolerance."""
    import qcore_kernels.lut_ops as lut_ops
    from qcore_kernels.lut_layout import to_lut

    case = LUTCase(4, 1000, 4000, 4, 8, rows=None, outliers=20, scale=True)
    w = to_lut(random_vq(case), "cuda")
    assert lut_ops.lut_path(4, w, "cuda") == "mma4"
    x = torch.randn(4, 4000, generator=torch.Generator().manual_seed(0)).half().cuda()
    y_auto = lut_ops.lut_linear(x, w, None, launcher, path="mma4")
    config = lut_ops.lut_mma4_config
    monkeypatch.setattr(lut_ops, "lut_mma4_config", lambda n, smem, device, *rest: (
        groups, min(config(n, smem, device, *rest)[1], lut_ops._cdiv(n, 8 * groups))))
    y = lut_ops.lut_linear(x, w, None, launcher, path="mma4")
    assert torch.equal(y, y_auto)
    alone = torch.cat([lut_ops.lut_linear(x[i : i + 1], w, None, launcher, path="mma4")
                       for i in range(4)])
    assert torch.equal(y, alone)
    mma = lut_ops.lut_linear(x, w, None, launcher, path="mma").float()
    assert float((y.float() - mma).abs().max() / mma.abs().max()) < 2e-3


@pytest.mark.parametrize("path", ["mma4", "mma"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "outliers-scale-offset"])
def test_programmatic_launch_waits_for_the_kernel_before(path, extras, launcher):
    """With LUT_PDL (sm_90+), each call's x is written late by the kernel launched just
    before it, or the main columns' launch adds the sums of the outlier launch before it:
    the outputs equal plain launches bit for bit, eagerly and replayed from a CUDA graph
    (qcore_kernels.testing.check_programmatic_launch)."""
    from qcore_kernels.testing import check_programmatic_launch

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    check_programmatic_launch(path, extras, launcher)


def test_lut_kernels_launch_on_torchs_current_stream(launcher):
    """The input is written on a side stream after a long sleep; a kernel launched on any
    other stream would read it before it is written (the outlier pass included)."""
    from qcore_kernels.lut_layout import to_lut
    from qcore_kernels.lut_ops import lut_linear

    w = to_lut(random_vq(LUTCase(4, 512, 1024, 6, 12, rows=None, outliers=16)), "cuda")
    src = torch.randn(4, 1024, generator=torch.Generator().manual_seed(1)).half().cuda()
    expected = lut_linear(src, w, None, launcher)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.zeros_like(src)
        torch.cuda._sleep(200_000_000)
        x.copy_(src)
        y = lut_linear(x, w, None, launcher)
    side.synchronize()
    assert torch.equal(y, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_linear_selects_cupy_lut_and_matches_torch_lut(launcher, dtype):
    from qcore.codebook import VQPacker
    from qcore.qlinear import QuantLinear

    packed = VQPacker().pack(random_vq(LUTCase(1, 384, 1000, 6, 12, rows=None, res_bits=8,
                                                outliers=24, scale=True, offset=True)))
    bias = torch.randn(384, generator=torch.Generator().manual_seed(3))
    layer = QuantLinear(packed, op="lut_linear", bias=bias).cuda()
    x = torch.randn(2, 3, 1000, generator=torch.Generator().manual_seed(4)).to("cuda", dtype)
    with torch.no_grad():
        y = layer(x).float()
        assert layer.provider_name == "cupy-lut"
        layer.kernel = "torch-lut"
        layer._providers.clear()
        ref = layer(x).float()
    assert layer.provider_name == "torch-lut"
    err = float((y - ref).abs().max() / ref.abs().max())
    assert err < (1e-2 if dtype == torch.float16 else 4e-2), err
