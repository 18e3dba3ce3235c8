"""Host side of the codebook kernels (``qk_lut.cu``): op ``lut_linear`` on a ``qk-lut`` weight.

Like :mod:`qcore_kernels.ops` (which re-exports :func:`lut_linear`), every function takes a
``launch(file, instance, grid, block, args, shared_mem=bytes)`` callable: CuPy on a GPU, the
CPU harness in the tests (and ``programmatic=True`` for the tensor-core GEMVs when
:data:`LUT_PDL` is on, on sm_90+).

Paths by the number of tokens ``M``:

* ``mma4`` (M <= 16 in blocks of 4 tokens; vector size 4, 8-bit indices, codebooks of at
  most 256 rows, no residual stage: VPTQ's 2-bit default; a block's x within shared memory:
  in the table's free halves up to 16384 columns for one token, 8192 for two, 4096 for
  four, else after the table, about 16000 columns for four tokens on an H100): the
  tensor-core GEMV ``qk_lut_mma4``, the codebook held 16 times over in shared memory so
  that its random reads never conflict. Each lane's codebook row read is half of an mma A
  operand as is (a vector's two column pairs go to A rows g and g + 8, x's pairs to two B
  columns per token), and a table read costs one byte permutation and one load; the index
  words stream into shared memory by cp.async, 3 chunk steps ahead. Picked up to 4 tokens,
  above 8 tokens, and from 5 to 8 tokens for at most 4096 output rows
  (:func:`mma4_preferred`). Its options not yet timed on a GPU are off
  (:data:`UNMEASURED_SWITCHES`).
* ``mma`` (M <= 16, the same weights; 5-8 tokens of more output rows, and what ``mma4``
  cannot hold): the tensor-core GEMV ``qk_lut_mma``, weights as the A operand (up to 8
  tokens) or the B operand (16).
* ``gemv`` (M <= ``LUT_GEMV_MAX_M``, vector sizes 4, 6, 8, codebooks that fit in shared
  memory): the codebooks in shared memory, indices decoded inside the GEMV, up to 16
  tokens per block. Outlier columns run first (into a float32 buffer), the main columns
  add it before the epilogue (scale, offset times the token's sum of x, bias).
* ``dequant``: each part decoded to the dense weight in the activation dtype (scale and
  offset applied), then torch's GEMM (cuBLAS). Any vector size, any codebook size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qcore_kernels.lut_layout import LUTPart, PreparedLUT
from qcore_kernels.support import lut_gemv_smem, lut_gemv_unsupported_reason

FILE = "qk_lut.cu"
CTYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
LUT_TILES = (1, 4, 8, 16)
LUT_GEMV_MAX_M = 16
LUT_PATHS = ("mma4", "mma", "gemv", "dequant")
#: Shared memory a qk_lut_mma block may use for its copy of x (beyond it, x is read from
#: global memory): the table (32 KB) and this leave room for two blocks per multiprocessor.
LUT_MMA_X_SHARED_MAX = 64 * 1024
#: Warps per qk_lut_mma block (at most; fewer when a row has fewer 256-column chunks).
LUT_MMA_WARPS = 8
#: Resident warps per multiprocessor the persistent qk_lut_mma grid is sized for.
LUT_MMA_WARPS_PER_SM = 16
#: Shared memory the CPU harness offers (``QK_LUT_CPU_SMEM`` in ``qk_lut.cu``).
CPU_SMEM = 256 * 1024
#: Threads per GEMV block in the CPU harness (few threads keep the harness fast).
CPU_THREADS = 64
#: Blocks of the persistent GEMV grid in the CPU harness (several channels per warp).
CPU_BLOCKS = 3
#: Programmatic dependent launch of the tensor-core GEMVs on sm_90+
#: (``launch(..., programmatic=True)``): a launch may start while the kernel before it in the
#: stream still runs, loading its weights, and waits for that kernel (griddepcontrol) before
#: it reads x, the addend or the epilogue's tensors, and before it writes anything. The
#: weights must therefore not be written by the kernel launched just before a call:
#: ``to_lut`` waits for its own copies, and ``QuantLinear`` prepares its weight again
#: (through ``to_lut``) when one of its tensors was changed in place. On by default: it made
#: every one-token call faster in the H200 launch sweeps, and every GPU test passed with it
#: (figures: BENCHMARKS.md, kernels sections). It stays a switch for callers whose weights a
#: kernel may have just written (and for the benchmark's plain per-path columns), not as a
#: tuning option.
LUT_PDL = True


def _programmatic(device: torch.device) -> dict[str, bool]:
    """The launch keyword of :data:`LUT_PDL` on ``device`` (none where it does not apply)."""
    if not LUT_PDL or device.type != "cuda":
        return {}
    return {"programmatic": True} if torch.cuda.get_device_capability(device)[0] >= 9 else {}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lut_tile(m: int) -> int:
    return next(t for t in LUT_TILES if t >= min(m, LUT_TILES[-1]))


def lut_threads(mt: int) -> int:
    """Threads per GEMV block (``qk_lut::threads``: the launch bound of the instance)."""
    return 1024 if mt == 1 else 512 if mt <= 4 else 256


def lut_rows_per_warp(mt: int) -> int:
    """Output channels a warp computes together (``qk_lut::rows_per_warp``)."""
    return 3 if mt >= 16 else 2 if mt >= 4 else 1


@functools.cache
def _device_limits(device: torch.device) -> tuple[int, int, int]:
    """(multiprocessors, shared memory per multiprocessor, opt-in shared memory per block)."""
    if device.type != "cuda":
        return 1, CPU_SMEM, CPU_SMEM
    props = torch.cuda.get_device_properties(device)
    per_sm = int(getattr(props, "shared_memory_per_multiprocessor", 0) or 0)
    try:
        import cupy

        index = device.index if device.index is not None else torch.cuda.current_device()
        optin = int(cupy.cuda.runtime.getDeviceProperties(index)["sharedMemPerBlockOptin"])
    except Exception:  # noqa: BLE001 - no CuPy: the 48 KB every device offers
        optin = 48 * 1024
    return props.multi_processor_count, per_sm or optin, optin


def _stages(part: LUTPart) -> list[tuple[int, int]]:
    stages = [(part.stage.rows, part.stage.bits)]
    if part.residual is not None:
        stages.append((part.residual.rows, part.residual.bits))
    return stages


def _gemv_warps(part: LUTPart, v: int, mt: int, device: torch.device) -> int:
    """Warps per GEMV block: the instance's bound, halved while the staging buffers do not
    fit next to the codebooks (down to 4)."""
    warps = (lut_threads(mt) if device.type == "cuda" else CPU_THREADS) // 32
    limit = _device_limits(device)[2]
    while warps > 4 and lut_gemv_smem(v, _stages(part), warps, lut_rows_per_warp(mt)) > limit:
        warps //= 2
    return warps


def mma_part_unsupported_reason(part: LUTPart, vector_size: int) -> str | None:
    if vector_size != 4:
        return f"vector size {vector_size} (the tensor-core GEMV takes 4)"
    if part.stage.bits != 8:
        return f"{part.stage.bits}-bit indices (the tensor-core GEMV takes 8-bit indices)"
    if part.stage.rows > 256:
        return f"a codebook of {part.stage.rows} rows (at most 256)"
    if part.residual is not None:
        return "a residual stage (the tensor-core GEMV reads one index stream)"
    return None


def mma_unsupported_reason(w: PreparedLUT) -> str | None:
    """Why the tensor-core GEMV (``qk_lut_mma``) cannot run ``w`` (it takes every part)."""
    for part in w.parts:
        reason = mma_part_unsupported_reason(part, w.vector_size)
        if reason is not None:
            return reason
    return None


def gemv_unsupported_reason(w: PreparedLUT, device: torch.device | str) -> str | None:
    """Why the GEMV path cannot run ``w`` on ``device`` (then every M takes ``dequant``)."""
    device = torch.device(device)
    limit = _device_limits(device)[2]
    for part in w.parts:
        # the smallest block (4 warps) of the largest staging (3 channels per warp)
        reason = lut_gemv_unsupported_reason(w.vector_size, _stages(part), 4, limit, 3)
        if reason is not None:
            return reason
    return None


def mma4_unsupported_reason(w: PreparedLUT, m: int, device: torch.device | str) -> str | None:
    """Why the tensor-core GEMV of 4-token blocks (``qk_lut_mma4``) cannot run ``m`` tokens of
    ``w`` on ``device``."""
    reason = mma_unsupported_reason(w)
    if reason is not None:
        return reason
    if m > LUT_GEMV_MAX_M:
        return f"{m} tokens (the tensor-core GEMVs take at most {LUT_GEMV_MAX_M})"
    tokens = min(m, LUT_MMA4_TOKENS)
    width = max(part.width for part in w.parts)
    need = mma4_smem(tokens, width, 2, LUT_MMA4_WARPS)  # (the larger of the row groups)
    limit = _device_limits(torch.device(device))[2]
    if need > limit:
        return (f"x of {tokens} token(s) x {width} columns: {need} bytes of shared memory, the "
                f"device offers {limit} (fewer tokens per call, or the mma path)")
    return None


def lut_path(m: int, w: PreparedLUT, device: torch.device | str) -> str:
    """The fastest path that can run ``m`` tokens of ``w`` (the H200 benchmark's choice
    between the tensor-core GEMVs: :func:`mma4_preferred`)."""
    mma4 = mma4_unsupported_reason(w, m, device) is None
    mma = m <= LUT_GEMV_MAX_M and mma_unsupported_reason(w) is None
    if mma4 and (not mma or mma4_preferred(m, w.out_features)):
        return "mma4"
    if mma:
        return "mma"
    if m <= LUT_GEMV_MAX_M and gemv_unsupported_reason(w, device) is None:
        return "gemv"
    return "dequant"


def mma4_preferred(m: int, n: int) -> bool:
    """Whether ``qk_lut_mma4`` beats ``qk_lut_mma`` at ``m`` tokens and ``n`` output rows
    (v4 i8 weights on the H200; the figures are in BENCHMARKS.md): above 8 tokens always
    (``qk_lut_mma``'s 16-token tile is the slow one); at one token, without the L2 requests
    (:func:`_mma4`), level without programmatic launch and ahead with it; up to 4 tokens
    (one block of tokens, so about the cost of one) ahead with programmatic launch at every
    shape measured and level without it; from 5 to 8 tokens up to ``LUT_MMA4_MAX_ROWS``
    output rows, and not beyond, where ``qk_lut_mma`` reads each index once for all 8
    tokens and ``qk_lut_mma4`` twice."""
    if m > 8 or m <= LUT_MMA4_TOKENS:
        return True
    return n <= LUT_MMA4_MAX_ROWS


def lut_mma_config(m: int, n: int, device: torch.device) -> tuple[int, int]:
    """(token tile, row groups per block tile) of ``qk_lut_mma`` for ``m`` tokens and ``n``
    output rows: up to 8 tokens, groups of 16 weight rows (the mma's A operand), 2 per tile
    (32 rows) when that still gives every multiprocessor a tile, else 1; 9-16 tokens, 2
    groups of 8 rows (tokens are the A operand). The H200 sweep of BENCHMARKS.md chose it."""
    if m > 8:
        return 16, 2
    sms = _device_limits(device)[0]
    return (8, 2) if _cdiv(n, 32) >= sms else (8, 1)


def lut_mma4_config(
    n: int, smem: dict[int, int], device: torch.device, token_blocks: int = 1,
    warps: int = 8, warps_per_sm: dict[int, int] | None = None,
) -> tuple[int, int]:
    """(row groups per block tile, blocks along the rows) of ``qk_lut_mma4`` for ``n``
    output rows, ``token_blocks`` blocks of 4 tokens and ``warps`` warps per block; ``smem``
    maps row groups to a block's shared memory, ``warps_per_sm`` to the instance's resident
    warps (:func:`mma4_warps_per_sm` by default). Persistent blocks, as many as fit on the
    multiprocessors (registers; shared memory) shared by the token blocks, each taking
    tiles of 8 * G rows in turn. G minimises the busiest multiprocessor's shared-memory
    traffic (blocks placed round robin; a tile of G row groups reads 2G + 1 units: the table
    2 per group, x 1), ties going to 2 groups."""
    from qcore_kernels.sources import LUT_MMA4_GROUPS

    if warps_per_sm is None:
        warps_per_sm = {g: mma4_warps_per_sm(g) for g in LUT_MMA4_GROUPS}
    sms, per_sm, _ = _device_limits(device)
    best = None
    for groups in sorted(LUT_MMA4_GROUPS, key=lambda g: (g != 2, -g)):
        if warps > warps_per_sm[groups]:
            continue  # beyond the instance's launch bound
        if device.type == "cuda":
            # 1 KB of every block's shared memory is reserved by the driver
            fit = min(warps_per_sm[groups] // warps, per_sm // (smem[groups] + 1024))
            cost, blocks = _mma4_cost(n, groups, sms, max(1, fit), token_blocks)
        else:
            cost, blocks = _mma4_cost(n, groups, 1, CPU_BLOCKS, token_blocks)
        if best is None or cost < best[0]:
            best = (cost, groups, blocks)
    if best is None:
        raise ValueError(f"{warps} warps per block: more than any qk_lut_mma4 instance takes "
                         f"({max(warps_per_sm.values())})")
    return best[1], best[2]


@functools.cache
def _mma4_cost(
    n: int, groups: int, sms: int, per_sm: int, token_blocks: int = 1
) -> tuple[int, int]:
    """(the busiest multiprocessor's traffic units, blocks along the rows) of ``qk_lut_mma4``
    tiles of ``groups`` row groups, ``token_blocks`` blocks of 4 tokens, over ``sms``
    multiprocessors holding ``per_sm`` blocks each (block (x, y) is block y * blocks + x)."""
    tiles = _cdiv(n, 8 * groups)
    blocks = min(tiles, max(1, sms * per_sm // token_blocks))
    q, r = divmod(tiles, blocks)
    load = [0] * min(sms, blocks * token_blocks)
    for b in range(blocks * token_blocks):
        load[b % sms] += q + (b % blocks < r)
    return max(load) * (2 * groups + 1), blocks


def mma_tile_rows(mt: int, groups: int) -> int:
    """Output rows of a ``qk_lut_mma`` block tile (``qk_lut::mma_tile_rows``)."""
    return (16 if mt == 8 else 8) * groups


def _ctype(dtype: torch.dtype) -> str:
    try:
        return CTYPES[dtype]
    except KeyError:
        raise ValueError(f"the kernels take float16 or bfloat16 activations, got {dtype}") from None


def _part_input(x: torch.Tensor, part: LUTPart) -> tuple[torch.Tensor, int]:
    """The part's columns of x, rows padded to a multiple of 8 elements (16-byte aligned
    vector loads), and the row stride."""
    xp = x if part.cols is None else x.index_select(1, part.cols)
    k = xp.shape[1]
    ld = _cdiv(k, 8) * 8
    if ld != k or not xp.is_contiguous() or xp.data_ptr() % 16:
        padded = torch.zeros(xp.shape[0], ld, dtype=xp.dtype, device=xp.device)
        padded[:, :k] = xp
        xp = padded
    return xp, ld


def _stage_args(part: LUTPart) -> list[Any]:
    s, r = part.stage, part.residual
    return [
        s.codes, np.int32(s.bits), np.int32(s.row_words), s.codebook, np.int32(s.rows),
        None if r is None else r.codes, np.int32(0 if r is None else r.bits),
        np.int32(0 if r is None else r.row_words), None if r is None else r.codebook,
        np.int32(0 if r is None else r.rows),
    ]


def _epilogue_args(
    addend: torch.Tensor | None,
    epilogue: dict[str, torch.Tensor | None] | None,
    out: torch.Tensor,
    m: int,
    n: int,
) -> list[Any]:
    """The GEMVs' trailing arguments: addend, scale, offset, xsum, bias, y, y_raw, M, N
    (``epilogue`` None: raw float32 dot products to ``out``)."""
    e = epilogue or {}
    return [
        addend, e.get("scale"), e.get("offset"), e.get("xsum"), e.get("bias"),
        out if epilogue is not None else None, None if epilogue is not None else out,
        np.int32(m), np.int32(n),
    ]


def _gemv(
    x: torch.Tensor,
    part: LUTPart,
    w: PreparedLUT,
    launch: Any,
    *,
    addend: torch.Tensor | None,
    epilogue: dict[str, torch.Tensor | None] | None,
    out: torch.Tensor,
) -> None:
    """One GEMV launch over one part; ``epilogue`` None: raw float32 dot products to ``out``."""
    m, n, v = x.shape[0], w.out_features, w.vector_size
    xp, ld = _part_input(x, part)
    mt = lut_tile(m)
    warps = _gemv_warps(part, v, mt, x.device)
    rows = lut_rows_per_warp(mt)
    smem = lut_gemv_smem(v, _stages(part), warps, rows)
    # The block's rows of x in shared memory too, when they fit.
    x_shared = smem + mt * ld * x.element_size() <= _device_limits(x.device)[2]
    if x_shared:
        smem += mt * ld * x.element_size()
    if x.device.type == "cuda":
        # One block per multiprocessor: each instance's launch bound makes a block use
        # most of the 64K registers, so a second block would not be resident anyway.
        blocks = min(_cdiv(n, warps * rows), _device_limits(x.device)[0])
    else:
        blocks = min(_cdiv(n, warps * rows), CPU_BLOCKS)
    launch(
        FILE,
        f"qk_lut_gemv<{_ctype(x.dtype)}, {v}, {mt}>",
        (blocks, _cdiv(m, mt), 1),
        (warps * 32, 1, 1),
        [xp, np.int32(ld), np.int32(part.width), np.int32(x_shared), *_stage_args(part),
         *_epilogue_args(addend, epilogue, out, m, n)],
        shared_mem=smem,
    )


def _mma_setup(
    x: torch.Tensor, part: LUTPart, w: PreparedLUT, max_warps: int
) -> tuple[int, int, torch.Tensor, int, int, int]:
    """(M, N, the part's x, its row stride, 256-column chunks, warps per block) of a
    tensor-core LUT GEMV launch: up to ``max_warps`` warps, no more than chunks."""
    xp, ld = _part_input(x, part)
    chunks = _cdiv(part.n_vec(w.vector_size), 64)
    warps = max(1, min(max_warps if x.device.type == "cuda" else CPU_THREADS // 32, chunks))
    return x.shape[0], w.out_features, xp, ld, chunks, warps


def _mma_stage_args(part: LUTPart) -> list[Any]:
    """The index stream and codebook arguments of the tensor-core LUT GEMVs."""
    s = part.stage
    return [s.codes, np.int32(s.row_words), s.codebook, np.int32(s.rows)]


def _mma(
    x: torch.Tensor,
    part: LUTPart,
    w: PreparedLUT,
    launch: Any,
    *,
    addend: torch.Tensor | None,
    epilogue: dict[str, torch.Tensor | None] | None,
    out: torch.Tensor,
) -> None:
    """One ``qk_lut_mma`` launch over one part (see :func:`_gemv`)."""
    from qcore_kernels.sources import LUT_MMA_TILINGS

    m, n, xp, ld, chunks, warps = _mma_setup(x, part, w, LUT_MMA_WARPS)
    mt, groups = lut_mma_config(m, n, x.device)
    assert (mt, groups) in LUT_MMA_TILINGS
    rows_x = min(mt, m)
    x_bytes = rows_x * mma_x_stride(chunks) * x.element_size()
    smem = LUT_MMA_TABLE_BYTES + warps * mt * mma_tile_rows(mt, groups) * 4
    x_shared = x_bytes <= LUT_MMA_X_SHARED_MAX and smem + x_bytes <= _device_limits(x.device)[2]
    if x_shared:
        smem += x_bytes
    tiles = _cdiv(n, mma_tile_rows(mt, groups))
    if x.device.type == "cuda":
        blocks = min(tiles, _device_limits(x.device)[0] * max(1, LUT_MMA_WARPS_PER_SM // warps))
    else:
        blocks = min(tiles, CPU_BLOCKS)
    launch(
        FILE,
        f"qk_lut_mma<{_ctype(x.dtype)}, {mt}, {groups}>",
        (blocks, _cdiv(m, mt), 1),
        (warps * 32, 1, 1),
        [xp, np.int32(ld), np.int32(part.width), np.int32(x_shared), *_mma_stage_args(part),
         *_epilogue_args(addend, epilogue, out, m, n)],
        shared_mem=smem,
        **_programmatic(x.device),
    )


def _mma4(
    x: torch.Tensor,
    part: LUTPart,
    w: PreparedLUT,
    launch: Any,
    *,
    addend: torch.Tensor | None,
    epilogue: dict[str, torch.Tensor | None] | None,
    out: torch.Tensor,
) -> None:
    """One ``qk_lut_mma4`` launch over one part (see :func:`_gemv`). The L2 requests of the
    next tile (launch argument ``l2``) are off for one token, where the H200 launch sweeps
    ran faster without them (BENCHMARKS.md), and on for more tokens, where they were
    measured on."""
    from qcore_kernels.sources import LUT_MMA4_GROUPS

    m, n, xp, ld, chunks, warps = _mma_setup(x, part, w, LUT_MMA4_WARPS)
    tokens, token_blocks = min(m, LUT_MMA4_TOKENS), _cdiv(m, LUT_MMA4_TOKENS)
    in_table = tokens * chunks * 4 <= LUT_MMA4_X_SLOTS  # x in the table's free halves
    ri = LUT_MMA4_REGISTER_INDICES
    smem = {g: mma4_smem(tokens, part.width, g, warps, ri) for g in LUT_MMA4_GROUPS}
    groups, blocks = lut_mma4_config(n, smem, x.device, token_blocks, warps,
                                     {g: mma4_warps_per_sm(g, ri) for g in LUT_MMA4_GROUPS})
    flag = {True: "true", False: "false"}
    launch(
        FILE,
        f"qk_lut_mma4<{_ctype(x.dtype)}, {groups}, {flag[in_table]}, {flag[ri]}>",
        (blocks, token_blocks, 1),
        (warps * 32, 1, 1),
        [xp, np.int32(ld), np.int32(part.width), *_mma_stage_args(part), np.int32(m > 1),
         np.int32(LUT_MMA4_SKIP_ABSENT_X), *_epilogue_args(addend, epilogue, out, m, n)],
        shared_mem=smem[groups],
        **_programmatic(x.device),
    )


def mma4_smem(
    tokens: int, width: int, groups: int, warps: int, register_indices: bool = False
) -> int:
    """Shared memory of a ``qk_lut_mma4`` block: the table (x in its free halves when 4 slots
    per token and 256-column chunk fit in its 256), two buffers of the warps' partial sums,
    the zero slots, each warp's index stages (unless the index words go to registers), and
    x after them when it does not fit in the table."""
    slots = tokens * _cdiv(_cdiv(width, 4), 64) * 4
    x_after = 0 if slots <= LUT_MMA4_X_SLOTS else slots * 128
    stages = 0 if register_indices else warps * LUT_MMA4_STAGES * groups * LUT_MMA4_STAGE_BYTES
    return (LUT_MMA4_TABLE_BYTES + 2 * warps * LUT_MMA4_TOKENS * 8 * groups * 4
            + LUT_MMA4_ZERO_BYTES + stages + x_after)


def mma4_warps_per_sm(groups: int, register_indices: bool = False) -> int:
    """Resident ``qk_lut_mma4`` warps per multiprocessor that the instance's launch bounds
    leave registers for (``qk_lut::mma4_warps_per_sm``): 24 with one row group and index
    stages (80 registers per thread), else 16 (128); also the most warps a block may have.
    Shared memory may allow fewer blocks."""
    return 24 if groups == 1 and not register_indices else 16


def mma_x_stride(chunks: int) -> int:
    """Row stride (values) of x in a ``qk_lut_mma`` block (``qk_lut::mma_x_stride``)."""
    return _cdiv(chunks * 288, 64) * 64 + 32


#: Shared memory of the replicated codebook (``qk_lut::MMA_TABLE_BYTES``).
LUT_MMA_TABLE_BYTES = 256 * 16 * 8
#: ``qk_lut_mma4``: tokens per block (more tokens: more blocks along grid y), the table
#: (rows 256 bytes apart: 16 copies, then an x slot of 128 bytes), its x slots, and the
#: zero slots after the partial sums (``qk_lut::MMA4_*``).
LUT_MMA4_TOKENS = 4
LUT_MMA4_TABLE_BYTES = 256 * 256
LUT_MMA4_X_SLOTS = 256
LUT_MMA4_ZERO_BYTES = 1024
#: Warps per ``qk_lut_mma4`` block (at most; fewer when a row has fewer 256-column chunks).
LUT_MMA4_WARPS = 8
#: The most output rows for which :func:`mma4_preferred` picks ``qk_lut_mma4`` at 5-8 tokens.
LUT_MMA4_MAX_ROWS = 4096
#: ``qk_lut_mma4``'s asynchronous index stream (``qk_lut::MMA4_STAGES``, ``MMA4_STAGE_BYTES``):
#: stages per warp after the table (3 chunk steps in flight ahead of the one computed), 512
#: bytes of shared memory per row group and stage.
LUT_MMA4_STAGES = 4
LUT_MMA4_STAGE_BYTES = 512
#: ``qk_lut_mma4`` with fewer than 4 tokens in a block (one token: a GEMV): the lanes whose
#: mma B columns belong to the absent tokens skip their x reads (a launch argument; the
#: outputs are the same bit for bit). Each 16-byte x read of a warp then costs one
#: shared-memory wavefront per token present instead of four: at one token and 2 row
#: groups, about 42 instead of 48 wavefronts per 512 indices (the codebook rows 32, x 8 ->
#: 2, the index stage 8), where Nsight Compute found L1 the busiest unit (BENCHMARKS.md).
LUT_MMA4_SKIP_ABSENT_X = False
#: ``qk_lut_mma4<..., RI = true>``: each lane loads its index words straight into registers,
#: 2 chunk steps ahead (``qk_lut::MMA4_RI_AHEAD``), instead of streaming them through
#: shared-memory stages by cp.async: per 512 indices, 4 fewer shared-memory wavefronts (the
#: stage's 16-byte reads) and the stage writes, against 3 steps of latency hiding cut to 2.
LUT_MMA4_REGISTER_INDICES = False
#: The switches above that have never run on a GPU: each stays off until a GPU run decides
#: it, and is then made the default or deleted with its code, tests and sweep entry. The
#: command that decides them (about 5 device-minutes):
#:
#:     PYTEST_ARGS="-m gpu -k lut" BENCH_ARGS="--only-lut --lut-sweep mma4" \
#:         bash kernels/gpu_check.sh OUTDIR
#:
#: Its GPU tests check that each switch gives the default's outputs bit for bit, and its
#: ``qk_lut_mma4`` sweep (``benchmarks/_lut_bench.py``) times each one alone against the
#: defaults at one token; record with ``python benchmarks/kernels_gpu.py record
#: OUTDIR/kernels_gpu.json``.
UNMEASURED_SWITCHES: tuple[str, ...] = ("LUT_MMA4_SKIP_ABSENT_X", "LUT_MMA4_REGISTER_INDICES")


def dequantize(w: PreparedLUT, dtype: torch.dtype, launch: Any) -> torch.Tensor:
    """The dense weight [N, K] in ``dtype`` (scale and offset applied), by the kernels."""
    t = _ctype(dtype)
    device = w.main.stage.codes.device
    dense = torch.empty(w.out_features, w.in_features, dtype=dtype, device=device)
    for part in w.parts:
        total = w.out_features * part.n_vec(w.vector_size)
        if not total:
            continue
        launch(
            FILE,
            f"qk_lut_dequant<{t}>",
            (min(_cdiv(total, 256), 65535 if device.type == "cuda" else 64), 1, 1),
            (256, 1, 1),
            [
                *_stage_args(part)[:4], *_stage_args(part)[5:9], np.int32(w.vector_size),
                np.int32(part.width), part.cols32, w.scale, w.offset, dense,
                np.int32(w.in_features), np.int32(w.out_features),
            ],
            shared_mem=0,
        )
    return dense


def lut_linear(
    x: torch.Tensor,
    w: PreparedLUT,
    bias: torch.Tensor | None,
    launch: Any,
    path: str | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W.T + bias`` for a ``qk-lut`` weight; float16 or bfloat16 ``x``."""
    _ctype(x.dtype)
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"x must be [M, {w.in_features}], got {tuple(x.shape)}")
    m, n = x.shape[0], w.out_features
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    path = path or lut_path(m, w, x.device)
    if m == 0:
        return x.new_empty(0, n)
    if path == "dequant":
        return F.linear(x, dequantize(w, x.dtype, launch), bias)
    if path not in LUT_PATHS:
        raise ValueError(f"unknown path {path!r}; one of {LUT_PATHS}")
    if m > LUT_GEMV_MAX_M:
        raise ValueError(f"the {path} path takes at most {LUT_GEMV_MAX_M} tokens, got {m}")
    if path == "mma4":
        reason = mma4_unsupported_reason(w, m, x.device)
        run = _mma4
    elif path == "mma":
        reason = mma_unsupported_reason(w)
        run = _mma
    else:
        reason = gemv_unsupported_reason(w, x.device)
        run = _gemv
    if reason is not None:
        raise ValueError(f"the LUT {path} path cannot run this weight: {reason}")
    raw = None
    if w.outliers is not None:
        raw = torch.empty(m, n, dtype=torch.float32, device=x.device)
        run(x, w.outliers, w, launch, addend=None, epilogue=None, out=raw)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    xsum = x.float().sum(1) if w.offset is not None else None
    epilogue = {"scale": w.scale, "offset": w.offset, "xsum": xsum, "bias": bias}
    run(x, w.main, w, launch, addend=raw, epilogue=epilogue, out=y)
    return y


def lut_paths(m: int, w: PreparedLUT | None = None) -> Sequence[str]:
    """The paths that can run ``m`` tokens (of weight ``w``, when given; benchmarks and
    tests compare them)."""
    if m > LUT_GEMV_MAX_M:
        return ("dequant",)
    if w is None:
        return LUT_PATHS
    if mma_unsupported_reason(w) is not None:
        return ("gemv", "dequant")
    device = w.main.stage.codes.device
    return tuple(
        p for p in LUT_PATHS if p != "mma4" or mma4_unsupported_reason(w, m, device) is None
    )
