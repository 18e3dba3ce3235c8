"""The codebook kernels (qk_lut.cu) on the CPU (qcore_kernels.harness) against the torch
reference (qcore.codebook.dequantize_vq + F.linear), and the qk-lut layout, bit-exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcore.codebook import VQPacker, dequantize_vq
from qcore_kernels.lut_layout import to_lut, unpack_stream
from qcore_kernels.testing import LUTCase, assert_close, random_vq, run_lut_case

F16, BF16 = "float16", "bfloat16"

GEMV_CASES = [
    # v = 6, 12-bit indices: k a multiple of v, then a partial last vector (100 = 16 * 6 + 4)
    LUTCase(1, 37, 96, 6, 12, dtype=F16),
    LUTCase(1, 37, 100, 6, 12, dtype=BF16),
    LUTCase(3, 29, 130, 4, 8, res_bits=6, dtype=F16),  # residual; 130 = 32 * 4 + 2; 2 ch/warp
    LUTCase(3, 29, 130, 4, 8, res_bits=6, dtype=BF16),
    # 16-bit indices (a 300-row codebook), odd k (203 = 25 * 8 + 3), scale and offset; 16
    # tokens: 3 channels per warp, 22 = 7 * 3 + 1
    LUTCase(16, 22, 203, 8, 16, rows=300, scale=True, offset=True, dtype=BF16),
    LUTCase(16, 22, 203, 8, 16, rows=300, scale=True, offset=True, dtype=F16),
    LUTCase(5, 40, 160, 6, 10, outliers=13, scale=True, dtype=F16),  # outliers; tile of 8
    # every stage at once, a full 4096-row codebook, two warp steps per channel
    LUTCase(9, 35, 1100, 4, 12, rows=None, res_bits=9, outliers=31, scale=True, offset=True,
            dtype=F16, bias=False),
    LUTCase(2, 19, 3000, 6, 13, rows=None, dtype=BF16),  # 8192 x 6 codebook (96 KB)
    LUTCase(1, 64, 512, 8, 8, rows=None, dtype=F16),
]
# The tensor-core GEMV (qk_lut_mma): V = 4, 8-bit indices, <= 256 codebook rows, no residual.
# On the harness: 2 warps per block, 3 persistent blocks, one multiprocessor (so n >= 64
# takes 32-row tiles, G = 4).
MMA_CASES = [
    LUTCase(1, 40, 512, 4, 8, rows=None, dtype=F16),  # 2 chunks of 256 columns, G = 2
    LUTCase(1, 40, 512, 4, 8, rows=None, dtype=BF16),
    # a partial last vector (130 = 32 * 4 + 2) in a single partial chunk; scale and offset
    LUTCase(3, 37, 130, 4, 8, rows=200, scale=True, offset=True, dtype=BF16),
    # 5 chunks over 2 warps (3 + 2), 7 tiles of 32 rows over 3 blocks (the next tile's
    # indices loaded ahead), a codebook of fewer rows than 256
    LUTCase(8, 200, 1030, 4, 8, rows=150, scale=True, dtype=F16),
    # 16-token tiles (A rows 8-15 used), outliers (their own launch into the float buffer)
    LUTCase(16, 33, 300, 4, 8, rows=None, outliers=13, scale=True, offset=True, dtype=BF16),
    LUTCase(11, 70, 257, 4, 8, rows=None, dtype=F16, bias=False),  # n = 70: G = 4, 11 of 16
    LUTCase(2, 9, 8, 4, 8, rows=3, dtype=F16),  # k = 8: 2 vectors in a 64-vector chunk
]
MMA_CASES = [dataclasses.replace(c, path="mma") for c in MMA_CASES] + [
    dataclasses.replace(MMA_CASES[2], path=None),  # auto picks mma
]
# The tensor-core GEMV of 4-token blocks (qk_lut_mma4): the weights of qk_lut_mma, x in the
# table's free halves or after it. On the harness: 2 warps per block, at most 3 persistent
# blocks along the rows.
MMA4_CASES = [
    LUTCase(1, 40, 512, 4, 8, rows=None, dtype=F16),  # 2 chunks, 1 per warp; 3 tiles of 16 rows
    LUTCase(1, 40, 512, 4, 8, rows=None, dtype=BF16),
    # a partial last vector in a single partial chunk (one warp); scale and offset
    LUTCase(3, 37, 130, 4, 8, rows=200, scale=True, offset=True, dtype=BF16),
    # 5 chunks over 2 warps (3 steps each, the last of warp 1 empty); 13 tiles of 16 rows
    # over 3 blocks (the next tile's first chunk loaded ahead), a 150-row codebook
    LUTCase(4, 200, 1030, 4, 8, rows=150, scale=True, dtype=F16),
    # outliers (their own launch into the float buffer), 2 tokens
    LUTCase(2, 33, 300, 4, 8, rows=None, outliers=13, scale=True, offset=True, dtype=BF16),
    LUTCase(2, 9, 8, 4, 8, rows=3, dtype=F16, bias=False),  # k = 8: 2 vectors in a chunk
    # the most x the table holds: one token of 16384 columns (64 chunks, 256 x slots)
    LUTCase(1, 8, 16384, 4, 8, rows=None, dtype=F16),
    # x after the table: 4 tokens of 4100 columns (272 slots), 2 of 8300 (264)
    LUTCase(4, 40, 4100, 4, 8, rows=None, scale=True, dtype=BF16),
    LUTCase(2, 24, 8300, 4, 8, rows=100, outliers=40, offset=True, dtype=F16),
    # more tokens: blocks of 4 along grid y (9 = 4 + 4 + 1; 16 = 4 x 4, x after the table)
    LUTCase(9, 30, 600, 4, 8, rows=None, outliers=7, scale=True, offset=True, dtype=BF16),
    LUTCase(16, 20, 4200, 4, 8, rows=None, dtype=F16),
]
MMA4_CASES = [dataclasses.replace(c, path="mma4") for c in MMA4_CASES] + [
    dataclasses.replace(MMA4_CASES[2], path=None),  # auto picks mma4
    dataclasses.replace(MMA4_CASES[-2], path=None),  # 9 tokens too
]
DEQUANT_CASES = [
    LUTCase(20, 37, 100, 6, 12, res_bits=6, outliers=7, scale=True, offset=True,
            dtype=F16, path="dequant"),
    LUTCase(17, 21, 203, 8, 16, rows=300, dtype=BF16, path="dequant"),
    LUTCase(2, 19, 50, 5, 10, outliers=6, scale=True, dtype=F16),  # v = 5: auto -> dequant
    LUTCase(1, 19, 50, 3, 16, rows=100, res_bits=4, dtype=BF16),  # v = 3: auto -> dequant
]


@pytest.fixture(scope="module")
def launch():
    from qcore_kernels.harness import CpuHarness, harness_unavailable_reason
    from qcore_kernels.lut_ops import CPU_SMEM
    from qcore_kernels.sources import source

    reason = harness_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    harness = CpuHarness("qk_lut.cu", instances=source("qk_lut.cu").instances)

    def run(file, instance, grid, block, args, shared_mem=0):
        assert file == "qk_lut.cu"
        assert shared_mem <= CPU_SMEM, f"{instance} asks for {shared_mem} bytes of shared memory"
        harness.launch(instance, grid, block, args)

    return run


@pytest.mark.parametrize("case", GEMV_CASES + MMA_CASES + MMA4_CASES + DEQUANT_CASES,
                         ids=lambda c: c.id)
def test_lut_kernels_on_the_cpu_match_the_reference(case, launch):
    from qcore_kernels.lut_ops import lut_path

    y, ref = run_lut_case(case, launch, "cpu")
    assert_close(y, ref, case)
    if case.path is None and case.v in (4, 6, 8):
        mma = case.v == 4 and case.bits == 8 and not case.res_bits
        want = ("mma4" if case.m <= 4 or case.m > 8 or case.n <= 4096 else "mma") if mma \
            else "gemv"
        assert lut_path(case.m, to_lut(random_vq(case), "cpu"), "cpu") == want


def test_auto_path_between_the_tensor_core_gemvs():
    """lut_path's choice between qk_lut_mma4 and qk_lut_mma follows the H200 benchmark:
    qk_lut_mma4 up to 4 tokens and above 8, and from 5 to 8 tokens up to 4096 output rows
    only."""
    from qcore_kernels.lut_ops import lut_path

    narrow = to_lut(random_vq(LUTCase(1, 4096, 8, 4, 8, rows=None)), "cpu")
    wide = to_lut(random_vq(LUTCase(1, 4097, 8, 4, 8, rows=None)), "cpu")
    picks = {m: (lut_path(m, narrow, "cpu"), lut_path(m, wide, "cpu"))
             for m in (1, 2, 4, 5, 8, 9, 16)}
    assert picks == {1: ("mma4", "mma4"), 2: ("mma4", "mma4"), 4: ("mma4", "mma4"),
                     5: ("mma4", "mma"), 8: ("mma4", "mma"), 9: ("mma4", "mma4"),
                     16: ("mma4", "mma4")}


def test_mma4_l2_requests_off_for_one_token(launch):
    """qk_lut_mma4's L2 requests of the next tile (a launch argument) are off for one token,
    where the H200 sweeps ran faster without them, and on for more, where they were measured
    on."""
    import qcore_kernels.lut_ops as lut_ops

    seen = []

    def spy(file, instance, grid, block, args, shared_mem=0, **kw):
        if instance.startswith("qk_lut_mma4"):
            seen.append(int(args[3 + len(lut_ops._mma_stage_args(w.main))]))
        launch(file, instance, grid, block, args, shared_mem=shared_mem)

    case = LUTCase(5, 64, 512, 4, 8, rows=None, scale=True, path="mma4")
    w = to_lut(random_vq(case), "cpu")
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(1)).half()
    for m in (1, 5):
        lut_ops.lut_linear(x[:m], w, None, spy, path="mma4")
    assert seen == [0, 1]


def test_every_switch_is_measured_or_listed_as_unmeasured():
    """lut_ops keeps what a GPU measured best: its only boolean switches are LUT_PDL (on,
    measured faster, kept as a correctness escape hatch) and those of UNMEASURED_SWITCHES,
    each off until the GPU run named there decides it."""
    import qcore_kernels.lut_ops as lut_ops

    switches = {name for name, value in vars(lut_ops).items()
                if name.startswith("LUT_") and isinstance(value, bool)}
    assert switches == {"LUT_PDL", *lut_ops.UNMEASURED_SWITCHES}
    assert len(set(lut_ops.UNMEASURED_SWITCHES)) == len(lut_ops.UNMEASURED_SWITCHES)
    assert lut_ops.LUT_PDL is True
    assert all(getattr(lut_ops, name) is False for name in lut_ops.UNMEASURED_SWITCHES)


def test_mma4_absent_tokens_skip_their_x_reads(launch, monkeypatch):
    """With LUT_MMA4_SKIP_ABSENT_X (a launch argument; off until a GPU times it), qk_lut_mma4's
    lanes of the tokens a block lacks skip their x reads: the outputs are the same bit for
    bit with and without, at 1-3 tokens and in a partial second block of 4 (5-7 tokens), with
    outliers, scale and offset."""
    import qcore_kernels.lut_ops as lut_ops

    seen = []

    def spy(file, instance, grid, block, args, shared_mem=0, **kw):
        if instance.startswith("qk_lut_mma4"):
            seen.append(int(args[4 + len(lut_ops._mma_stage_args(w.main))]))
        launch(file, instance, grid, block, args, shared_mem=shared_mem)

    case = LUTCase(7, 72, 700, 4, 8, rows=None, scale=True, offset=True, outliers=12,
                   path="mma4")
    w = to_lut(random_vq(case), "cpu")
    x = torch.randn(7, 700, generator=torch.Generator().manual_seed(3)).half()
    assert lut_ops.LUT_MMA4_SKIP_ABSENT_X is False
    outputs = {}
    for skip in (True, False):
        monkeypatch.setattr(lut_ops, "LUT_MMA4_SKIP_ABSENT_X", skip)
        seen.clear()
        outputs[skip] = [lut_ops.lut_linear(x[:m], w, None, spy, path="mma4") for m in (1, 3, 6)]
        assert seen == [int(skip)] * 6  # the outlier and the main launch of each call
    ref = x.float() @ dequantize_vq(random_vq(case)).float().t()
    for m, a, b in zip((1, 3, 6), outputs[True], outputs[False], strict=True):
        assert torch.equal(a, b)
        assert_close(a, ref[:m], case)


@pytest.mark.parametrize("groups", [1, 2])
def test_mma4_row_groups_and_token_independence(launch, monkeypatch, groups):
    """qk_lut_mma4 with 1 and 2 row groups per tile gives the same outputs bit for bit (a
    row's sums do not depend on the tiling); a token's outputs do not depend on the other
    tokens (single tokens equal a 6-token call, 2 blocks of tokens, bit for bit), and agree
    with the other tensor-core GEMV far inside the tolerance."""
    import qcore_kernels.lut_ops as lut_ops

    w = to_lut(random_vq(LUTCase(6, 44, 700, 4, 8, rows=None, outliers=6, scale=True)), "cpu")
    x = torch.randn(6, 700, generator=torch.Generator().manual_seed(3)).half()
    picked = []
    config = lut_ops.lut_mma4_config

    def forced(n, smem, device, token_blocks=1, warps=8, warps_per_sm=None):
        _, blocks = config(n, smem, device, token_blocks, warps, warps_per_sm)
        picked.append((groups, token_blocks))
        return groups, min(blocks, lut_ops._cdiv(n, 8 * groups))

    y_auto = lut_ops.lut_linear(x, w, None, launch, path="mma4")
    monkeypatch.setattr(lut_ops, "lut_mma4_config", forced)
    y = lut_ops.lut_linear(x, w, None, launch, path="mma4")
    assert picked == [(groups, 2), (groups, 2)]  # outliers, then the main columns
    assert torch.equal(y, y_auto)
    alone = torch.cat([lut_ops.lut_linear(x[i : i + 1], w, None, launch, path="mma4")
                       for i in range(6)])
    assert torch.equal(y, alone)
    mma = lut_ops.lut_linear(x, w, None, launch, path="mma").float()
    assert float((y.float() - mma).abs().max() / mma.abs().max()) < 2e-3


def test_mma4_index_stream_across_tiles(launch):
    """qk_lut_mma4's asynchronous index stream (4 stages per warp, 3 chunk steps ahead)
    matches the reference: one chunk step per tile and 4-5 tiles per block (the first stages
    cross several tiles and run past the block's last one), and 3 steps per tile over 5
    tiles per block."""
    for case in (LUTCase(3, 200, 512, 4, 8, rows=None, scale=True, dtype=F16, path="mma4"),
                 LUTCase(2, 230, 1030, 4, 8, rows=150, offset=True, dtype=BF16, path="mma4")):
        y, ref = run_lut_case(case, launch, "cpu")
        assert_close(y, ref, case)


@pytest.mark.parametrize("threads", [64, 256])
def test_mma4_index_words_in_registers(launch, monkeypatch, threads):
    """qk_lut_mma4 with each lane's index words loaded into registers 2 chunk steps ahead
    (LUT_MMA4_REGISTER_INDICES: no stages) gives the outputs of the default layout bit for
    bit: one chunk step per tile over several tiles per block (the loads ahead cross tiles
    and run past the block's last one), 1-2 row groups, x in the table and after it,
    outliers, scale and offset, a partial second block of tokens, L2 requests off (one
    token) and on."""
    import qcore_kernels.lut_ops as lut_ops

    monkeypatch.setattr(lut_ops, "CPU_THREADS", threads)
    cases = [
        LUTCase(1, 40, 2048, 4, 8, rows=None, dtype=F16, path="mma4"),
        LUTCase(3, 200, 512, 4, 8, rows=None, scale=True, dtype=F16, path="mma4"),
        LUTCase(2, 230, 1030, 4, 8, rows=150, scale=True, offset=True, dtype=BF16, path="mma4"),
        LUTCase(6, 37, 4096, 4, 8, rows=None, outliers=9, dtype=F16, path="mma4"),  # x after
    ]
    instances = []

    def spy(file, instance, grid, block, args, shared_mem=0):
        instances.append((instance, shared_mem))
        launch(file, instance, grid, block, args, shared_mem=shared_mem)

    for case in cases:
        y_default, ref = run_lut_case(case, launch, "cpu")
        instances.clear()
        with monkeypatch.context() as mp:
            mp.setattr(lut_ops, "LUT_MMA4_REGISTER_INDICES", True)
            y, _ = run_lut_case(case, spy, "cpu")
        assert instances and all(i.endswith(", true>") for i, _ in instances), instances
        assert torch.equal(y, y_default), case.id
        assert_close(y, ref, case)
    # 1 token of 2048 columns, 2 row groups, 8 warps: the table, partial sums and zero slots
    assert instances[-1][1] < lut_ops.mma4_smem(4, 4096, 2, 8)


def test_mma4_shared_memory_and_resident_warps():
    """Shared memory and resident warps of qk_lut_mma4 (8 warps, 2 row groups): 103,424
    bytes and 16 warps with the index stages after the table, 24 warps with one row group;
    without stages (the index words in registers) 70,656 bytes, and 16 warps either way."""
    from qcore_kernels.lut_ops import mma4_smem, mma4_warps_per_sm

    assert mma4_smem(1, 8192, 2, 8) == 65536 + 4096 + 1024 + 32768
    assert (mma4_warps_per_sm(2), mma4_warps_per_sm(1)) == (16, 24)
    # the index words in registers: no stages; 128 registers for 1 row group too
    assert mma4_smem(1, 8192, 2, 8, register_indices=True) == 65536 + 4096 + 1024
    assert (mma4_warps_per_sm(1, True), mma4_warps_per_sm(2, True)) == (16, 16)


def test_mma4_refuses_what_it_cannot_run(launch):
    from qcore_kernels.lut_ops import lut_linear, lut_path, lut_paths, mma4_unsupported_reason

    # 30000 columns: 118 chunks of 256, 472 x slots of 128 bytes per token after the table,
    # the partial sums, the zero slots and 8 warps' 4 index stages of 1 KB (103,424 bytes in all):
    # 2 tokens fit the harness's 256 KB of shared memory, 3 do not
    w = to_lut(random_vq(LUTCase(5, 8, 30000, 4, 8, rows=None)), "cpu")
    assert mma4_unsupported_reason(w, 2, "cpu") is None
    why = mma4_unsupported_reason(w, 3, "cpu")
    assert "x of 3 token(s) x 30000 columns: 284672 bytes of shared memory" in why
    assert "17 tokens" in mma4_unsupported_reason(w, 17, "cpu")
    assert lut_path(3, w, "cpu") == "mma" and lut_path(2, w, "cpu") == "mma4"
    assert lut_path(6, w, "cpu") == "mma"  # blocks of 4 tokens
    assert lut_paths(3, w)[0] == "mma" and lut_paths(2, w)[0] == "mma4"
    with pytest.raises(ValueError, match="mma4 path cannot run this weight: x of 3 token"):
        lut_linear(torch.randn(3, 30000).half(), w, None, launch, path="mma4")
    v6 = to_lut(random_vq(LUTCase(1, 8, 64, 6, 8)), "cpu")
    with pytest.raises(ValueError, match="vector size 6"):
        lut_linear(torch.randn(1, 64).half(), v6, None, launch, path="mma4")


def test_programmatic_launch_only_where_asked_for_and_supported(launch, monkeypatch):
    """LUT_PDL asks the launcher for a programmatic dependent launch of the tensor-core
    GEMVs on CUDA devices of compute capability 9.0 and above only; the harness (a CPU
    device) launches as before and gives the same outputs."""
    import qcore_kernels.lut_ops as lut_ops

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert lut_ops._programmatic(cuda) == {"programmatic": True}  # on by default
    monkeypatch.setattr(lut_ops, "LUT_PDL", False)
    assert lut_ops._programmatic(cuda) == {}
    monkeypatch.setattr(lut_ops, "LUT_PDL", True)
    assert lut_ops._programmatic(cuda) == {"programmatic": True}
    assert lut_ops._programmatic(torch.device("cpu")) == {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert lut_ops._programmatic(cuda) == {}

    case = LUTCase(2, 40, 300, 4, 8, rows=None, outliers=8, scale=True)
    calls = []

    def spy(file, instance, grid, block, args, shared_mem=0, **kw):
        calls.append(kw)
        launch(file, instance, grid, block, args, shared_mem=shared_mem)

    for path in ("mma4", "mma"):
        one = dataclasses.replace(case, path=path)
        monkeypatch.setattr(lut_ops, "LUT_PDL", True)
        y_on, ref = run_lut_case(one, spy, "cpu")
        monkeypatch.setattr(lut_ops, "LUT_PDL", False)
        y_off, _ = run_lut_case(one, launch, "cpu")
        assert torch.equal(y_on, y_off)
        assert_close(y_on, ref, one)
    assert calls == [{}] * 4  # outliers and main columns, two paths: no keyword on a CPU


def test_mma_path_rows_equal_the_gemv_path_within_rounding(launch):
    """The two GEMVs on the same weight: the same sums in another order (float32), so they
    agree far inside the tolerance. A token's outputs do not depend on the other tokens:
    8-token tiles (weights as the mma's A operand) equal single tokens bit for bit, and in
    16-token tiles (tokens as A) a token's outputs do not depend on its place."""
    from qcore_kernels.lut_ops import lut_linear

    w = to_lut(random_vq(LUTCase(9, 50, 600, 4, 8, rows=None, outliers=6, scale=True)), "cpu")
    x = torch.randn(9, 600, generator=torch.Generator().manual_seed(5)).half()
    mma = lut_linear(x, w, None, launch, path="mma").float()
    gemv = lut_linear(x, w, None, launch, path="gemv").float()
    assert float((mma - gemv).abs().max() / gemv.abs().max()) < 2e-3
    alone = torch.cat([lut_linear(x[i : i + 1], w, None, launch, path="mma") for i in range(5)])
    assert torch.equal(lut_linear(x[:5], w, None, launch, path="mma"), alone)
    y = lut_linear(x, w, None, launch, path="mma")
    rolled = lut_linear(x.roll(4, 0), w, None, launch, path="mma")
    assert torch.equal(rolled, y.roll(4, 0))


def test_mma_path_refuses_what_it_cannot_run(launch):
    from qcore_kernels.lut_ops import lut_linear, mma_unsupported_reason

    x = torch.randn(2, 64).half()
    for case, why in [
        (LUTCase(2, 8, 64, 6, 8), "vector size 6"),
        (LUTCase(2, 8, 64, 4, 9, rows=300), "9-bit indices"),
        (LUTCase(2, 8, 64, 4, 8, res_bits=4), "residual"),
    ]:
        w = to_lut(random_vq(case), "cpu")
        assert why in mma_unsupported_reason(w)
        with pytest.raises(ValueError, match=why):
            lut_linear(x, w, None, launch, path="mma")
    ok = to_lut(random_vq(LUTCase(17, 8, 64, 4, 8)), "cpu")
    with pytest.raises(ValueError, match="at most 16 tokens"):
        lut_linear(torch.randn(17, 64).half(), ok, None, launch, path="mma")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_mma_reads_x_from_global_memory_when_it_does_not_fit(launch, monkeypatch, dtype):
    import qcore_kernels.lut_ops as lut_ops

    monkeypatch.setattr(lut_ops, "LUT_MMA_X_SHARED_MAX", 0)
    flags = []

    def spy(file, instance, grid, block, args, shared_mem=0):
        flags.append(int(args[3]))
        launch(file, instance, grid, block, args, shared_mem=shared_mem)

    case = LUTCase(5, 30, 1100, 4, 8, rows=None, outliers=9, offset=True, dtype=dtype, path="mma")
    y, ref = run_lut_case(case, spy, "cpu")
    assert_close(y, ref, case)
    assert flags == [0, 0]  # outliers, then the main columns


def test_gemv_token_tiles_agree_with_single_tokens(launch):
    from qcore_kernels.lut_ops import lut_linear

    w = to_lut(random_vq(LUTCase(9, 12, 70, 6, 9, res_bits=5, outliers=5, scale=True,
                                 offset=True)), "cpu")
    x = torch.randn(9, 70, generator=torch.Generator().manual_seed(0)).half()
    together = lut_linear(x, w, None, launch, path="gemv")  # 16-token tile, 7 rows past M
    alone = torch.cat([lut_linear(x[i : i + 1], w, None, launch, path="gemv") for i in range(9)])
    assert torch.equal(together, alone)


def test_dequantize_kernel_equals_the_reference_decode(launch):
    from qcore_kernels.lut_ops import dequantize

    case = LUTCase(1, 23, 77, 6, 11, res_bits=7, outliers=9, scale=True, offset=True)
    qweight = random_vq(case)
    w = to_lut(VQPacker().pack(qweight), "cpu")
    dense = dequantize(w, torch.float16, launch)
    ref = dequantize_vq(qweight)
    # one rounding to fp16 of (codebook + residual) * scale + offset computed in float
    torch.testing.assert_close(dense.float(), ref, rtol=2**-10, atol=1e-6)


# ------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("bits", [1, 3, 8, 12, 13, 16])
def test_stream_decoder_matches_the_bitpack(bits):
    from qcore.bitpack import pack_codes, unpack_codes

    codes = torch.randint(0, 1 << bits, (5, 77), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes.to(torch.int32), bits)
    assert torch.equal(unpack_stream(packed, bits, 77), codes)
    assert torch.equal(unpack_codes(packed, bits, 77, torch.int64), codes)


@pytest.mark.parametrize(
    "case",
    [
        LUTCase(1, 9, 100, 6, 12),
        LUTCase(1, 9, 203, 8, 16, rows=300, scale=True, offset=True),
        LUTCase(1, 9, 130, 4, 8, res_bits=6, outliers=17, scale=True),
        LUTCase(1, 9, 50, 5, 10, res_bits=3, outliers=6, scale=True, offset=True),
    ],
    ids=lambda c: c.id,
)
def test_layout_is_bit_exact(case):
    qweight = random_vq(case)
    packed = VQPacker().pack(qweight)
    from_packed, from_logical = to_lut(packed, "cpu"), to_lut(qweight, "cpu")
    for a, b in zip(from_packed.parts, from_logical.parts, strict=True):
        assert torch.equal(a.stage.codes, b.stage.codes) and a.stage.codes.dtype == torch.int32
        assert a.stage.codes.shape[1] == -(-a.n_vec(case.v) // 32) * a.stage.bits
    # the prepared layout decodes to exactly the format's dense weight
    assert torch.equal(from_packed.dequantize(), dequantize_vq(qweight))
    main = qweight.tensors["indices"]
    assert torch.equal(from_packed.main.stage.indices(main.shape[1]), main.long())


def test_other_layouts_are_refused():
    from qcore_kernels.layouts import LayoutError
    from qcore_kernels.testing import random_int_packed

    with pytest.raises(LayoutError, match="vq-packed"):
        to_lut(random_int_packed(8, 64, 4, 32), "cpu")


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_gemv_reads_x_from_global_memory_when_it_does_not_fit(launch, monkeypatch, dtype):
    """A 32 KB shared-memory device: the codebook fits, 16 rows of 2000 activations do not,
    so the GEMV reads x through L1 (the path large M x K takes on a GPU)."""
    import qcore_kernels.lut_ops as lut_ops

    sizes = []
    monkeypatch.setattr(lut_ops, "_device_limits", lambda device: (1, 32768, 32768))

    def spy(file, instance, grid, block, args, shared_mem=0):
        sizes.append((args[3], shared_mem))  # (x_shared, bytes)
        launch(file, instance, grid, block, args, shared_mem=shared_mem)

    case = LUTCase(16, 21, 2000, 6, 12, res_bits=7, scale=True, dtype=dtype)
    y, ref = run_lut_case(case, spy, "cpu")
    assert_close(y, ref, case)
    assert [int(s) for s, _ in sizes] == [0] and sizes[0][1] <= 32768
    case1 = LUTCase(1, 21, 2000, 6, 12, res_bits=7, dtype=dtype)
    y, ref = run_lut_case(case1, spy, "cpu")  # one row of x fits
    assert_close(y, ref, case1)
    assert int(sizes[-1][0]) == 1


# ---------------------------------------------------- the conformance suite, on the CPU


class _HarnessLUT:
    """cupy-lut with its kernels run by the CPU harness: the core's conformance suite checks
    the real kernels' numerics here (on a GPU, test_lut_providers.py runs it with CuPy)."""

    @staticmethod
    def provider_class():
        import dataclasses

        from qcore_kernels.harness import CpuHarness, harness_unavailable_reason
        from qcore_kernels.providers import CupyLUTLinear
        from qcore_kernels.sources import source

        if harness_unavailable_reason() is not None:
            pytest.skip(harness_unavailable_reason())
        harness = CpuHarness("qk_lut.cu", instances=source("qk_lut.cu").instances)

        def launch(file, instance, grid, block, args, shared_mem=0):
            harness.launch(instance, grid, block, args)

        class HarnessLUT(CupyLUTLinear):
            name = "cupy-lut-on-the-cpu-harness"
            support = dataclasses.replace(
                CupyLUTLinear.support, devices=frozenset({"cpu"}), min_compute_capability=None
            )

            @classmethod
            def unavailable_reason(cls):
                return None

            def lut_linear(self, x, prepared, bias):
                from qcore_kernels.lut_ops import lut_linear

                return lut_linear(x, prepared, bias, launch)

        return HarnessLUT


from qcore.testing import BaseKernelProviderTests  # noqa: E402


class TestConformanceOnTheHarness(BaseKernelProviderTests):
    @pytest.fixture
    def provider(self):
        return _HarnessLUT.provider_class()()

    @pytest.fixture
    def packers(self):
        return [VQPacker()]


def test_mma4_config_balances_the_busiest_multiprocessor():
    """The row-group choice of qk_lut_mma4 on an H200-like device (132 multiprocessors, 3
    blocks of 1 group or 2 of 2 groups each): the busiest multiprocessor's shared-memory
    traffic (tiles x (2G + 1)), blocks placed round robin."""
    from qcore_kernels.lut_ops import _mma4_cost

    # 4096 rows: 512 tiles of 8 on 396 blocks (116 take 2: SMs 0-115 carry 4 tiles) vs
    # 256 tiles of 16 on 256 blocks (2 per SM)
    assert _mma4_cost(4096, 1, 132, 3) == (4 * 3, 396)
    assert _mma4_cost(4096, 2, 132, 2) == (2 * 5, 256)
    # 8192 rows: 1024 tiles on 396 blocks (SMs 0-99 carry 3 + 3 + 2) vs 512 on 264 (2 + 2)
    assert _mma4_cost(8192, 1, 132, 3) == (8 * 3, 396)
    assert _mma4_cost(8192, 2, 132, 2) == (4 * 5, 264)
    # 1000 rows: 125 tiles of 8 (one per SM) beat 63 tiles of 16
    assert _mma4_cost(1000, 1, 132, 3) == (3, 125)
    assert _mma4_cost(1000, 2, 132, 2) == (5, 63)
    # 16 tokens (4 blocks of 4 along grid y), one block per SM: 33 blocks along the rows,
    # 512 tiles of 16 rows, 17 of them taking 16 tiles
    assert _mma4_cost(8192, 2, 132, 1, 4) == (16 * 5, 33)


def test_mma4_block_of_16_warps(launch, monkeypatch):
    """A 512-thread qk_lut_mma4 block (one per multiprocessor: 16 warps, the most its
    launch bound takes for 2 row groups): 16 chunks, one per warp, their partial sums added
    in warp order; equal to 2-warp blocks within float rounding."""
    import qcore_kernels.lut_ops as lut_ops

    case = LUTCase(1, 16, 4096, 4, 8, rows=None, dtype=F16, path="mma4")
    y2, ref = run_lut_case(case, launch, "cpu")
    monkeypatch.setattr(lut_ops, "CPU_THREADS", 512)
    threads = []

    def spy(file, instance, grid, block, args, shared_mem=0):
        threads.append(block[0])
        launch(file, instance, grid, block, args, shared_mem=shared_mem)

    y16, _ = run_lut_case(case, spy, "cpu")
    assert threads == [512]
    assert_close(y16, ref, case)
    assert float((y16.float() - y2.float()).abs().max() / y2.float().abs().max()) < 1e-3
    with pytest.raises(ValueError, match="32 warps per block"):
        lut_ops.lut_mma4_config(64, {1: 0, 2: 0}, torch.device("cpu"), 1, 32)
