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
  words stream into shared memory by cp.async, 3 chunk steps ahead (or, with
  :data:`LUT_MMA4_REGISTER_INDICES`, into registers, 2 steps ahead); in a block of fewer
  than 4 tokens the lanes of the absent tokens skip their x reads
  (:data:`LUT_MMA4_SKIP_ABSENT_X`). Picked up to 4 tokens,
  above 8 tokens, and from 5 to 8 tokens for at most 4096 output rows
  (:func:`mma4_preferred`).
* ``mma`` (M <= 16, the same weights; 5-8 tokens of more output rows, and what ``mma4``
  cannot hold): the tensor-core GEMV ``qk_lut_mma``, weights as the A operand (up to 8
  tokens) or the B operand (16).
* ``table`` (one token, the same weights; picked by :func:`lut_path` only with
  :data:`LUT_TABLE` on): ``qk_lut_table``, which replaces the codebook reads by dot-product
  tables. A block takes a slice of 32 Q vectors (Q = 2 or 4 per lane) and computes, for each
  of them and each codebook row, the row's dot product with x's 4 columns (float32, 64 or
  128 KB of tables); lane l reads only the tables of its own vectors, all in bank l (no
  conflicts, no copies), 4 bytes per index instead of the codebook row's 8 plus x. The
  slices' partial sums meet in a per-stream workspace, where the warp that completes a
  group of 32 rows adds them in slice order and applies the epilogue.
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
LUT_PATHS = ("mma4", "mma", "table", "gemv", "dequant")
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
#: Programmatic dependent launch of the tensor-core GEMVs and the table GEMV on sm_90+
#: (``launch(..., programmatic=True)``): a launch may start while the kernel before it in the
#: stream still runs, loading its weights (the table GEMV: its codebook only), and waits for that
#: kernel (griddepcontrol) before it reads x, the addend or the epilogue's tensors, and before
#: it writes anything. The weights must therefore not be written by the kernel launched just
#: before a call: ``to_lut`` waits for its own copies, and ``QuantLinear`` prepares its weight
#: again (through ``to_lut``) when one of its tensors was changed in place. On by default:
#: on the H200 it took 0.7-1.9 us off every one-token call in the launch sweeps
#: (BENCHMARKS.md, 2026-11-28; ``qk_lut_mma4``'s default grid at (8192, 8192): 11.7 ->
#: 10.4 us), and every GPU test passed with it.
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
    if LUT_TABLE and table_unsupported_reason(w, m, device) is None:
        return "table"
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
    (v4 i8 weights on the H200, BENCHMARKS.md): above 8 tokens always (``qk_lut_mma``'s
    16-token tile is the slow one, 15-30% behind); at one token, without the L2 requests
    (:data:`LUT_MMA4_L2`), level without programmatic launch and ahead with it ((8192, 8192):
    10.4 against 11.3 us or more for ``qk_lut_mma``); up to 4 tokens (one block of tokens,
    so about the cost of one) with programmatic launch ahead at every shape measured (M = 4:
    (8192, 8192) 13.2 against 14.3 us, 4096 x 14336 12.2 against 13.0) and within about 5%
    either way without it; from 5 to 8 tokens up to ``LUT_MMA4_MAX_ROWS`` output rows
    (14336 x 4096 at M = 8: 22.2 against 25.4 us plainly), and not beyond (8192 x 8192 at
    M = 8: 23.3 against 19.5 us plainly, where ``qk_lut_mma`` reads each index once for all
    8 tokens)."""
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
    warps (:func:`mma4_warps_per_sm` of the stages after the table by default). Persistent
    blocks, as many as fit on the multiprocessors (registers; shared memory) shared by the
    token blocks, each taking tiles of 8 * G rows in turn. G minimises the busiest
    multiprocessor's shared-memory traffic (blocks placed round robin; a tile of G row
    groups reads 2G + 1 units: the table 2 per group, x 1), ties going to 2 groups."""
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
    """One ``qk_lut_mma4`` launch over one part (see :func:`_gemv`)."""
    from qcore_kernels.sources import LUT_MMA4_GROUPS

    m, n, xp, ld, chunks, warps = _mma_setup(x, part, w, LUT_MMA4_WARPS)
    tokens, token_blocks = min(m, LUT_MMA4_TOKENS), _cdiv(m, LUT_MMA4_TOKENS)
    in_table = tokens * chunks * 4 <= LUT_MMA4_X_SLOTS  # x in the table's free halves
    # the index words in registers where asked for; else the index stages in the table
    # too, where asked for and x leaves room
    ri = LUT_MMA4_REGISTER_INDICES
    sh = {g: not ri and LUT_MMA4_STAGES_IN_TABLE
          and mma4_stages_fit_in_table(tokens, part.width, g, warps) for g in LUT_MMA4_GROUPS}
    smem = {g: mma4_smem(tokens, part.width, g, warps, sh[g], ri) for g in LUT_MMA4_GROUPS}
    groups, blocks = lut_mma4_config(n, smem, x.device, token_blocks, warps,
                                     {g: mma4_warps_per_sm(g, sh[g], ri) for g in LUT_MMA4_GROUPS})
    flag = {True: "true", False: "false"}
    launch(
        FILE,
        f"qk_lut_mma4<{_ctype(x.dtype)}, {groups}, {flag[in_table]}, {flag[sh[groups]]}"
        + (", true>" if ri else ">"),
        (blocks, token_blocks, 1),
        (warps * 32, 1, 1),
        [xp, np.int32(ld), np.int32(part.width), *_mma_stage_args(part),
         np.int32(m > 1 if LUT_MMA4_L2 is None else LUT_MMA4_L2),
         np.int32(LUT_MMA4_SKIP_ABSENT_X),
         *_epilogue_args(addend, epilogue, out, m, n)],
        shared_mem=smem[groups],
        **_programmatic(x.device),
    )


def table_unsupported_reason(w: PreparedLUT, m: int, device: torch.device | str) -> str | None:
    """Why the dot-product-table GEMV (``qk_lut_table``) cannot run ``m`` tokens of ``w`` on
    ``device``."""
    reason = mma_unsupported_reason(w)
    if reason is not None:
        return reason
    if m != 1:
        return f"{m} tokens (the table GEMV takes one)"
    limit = _device_limits(torch.device(device))[2]
    need = min(LUT_TABLE_BYTES.values()) + LUT_TABLE_CODEBOOK_BYTES
    if need > limit:
        return f"its tables need {need} bytes of shared memory, the device offers {limit}"
    return None


def lut_table_config(n_vec: int, n: int, device: torch.device) -> tuple[int, int, int, int]:
    """(vectors per lane Q, slices, rows per block, warps per block) of ``qk_lut_table`` for
    ``n_vec`` vectors per row and ``n`` output rows. Blocks of one slice (32 Q vectors) and
    a range of 32-row groups, about one per multiprocessor (the instances' launch bound);
    Q minimises the instructions a block issues over the waves of blocks (the kernel is
    issue-bound on paper): its lookups at :data:`LUT_TABLE_LOOKUP_COST` each and its
    8192 Q table entries at :data:`LUT_TABLE_ENTRY_COST` each. :data:`LUT_TABLE_Q` forces Q
    (the launch sweep)."""
    sms, _, optin = _device_limits(device)
    cuda = device.type == "cuda"
    if not cuda:
        sms = CPU_TABLE_BLOCKS
    groups = _cdiv(n, 32)
    best = None
    for q in sorted(LUT_TABLE_BYTES, reverse=True):
        if LUT_TABLE_Q is not None and q != LUT_TABLE_Q:
            continue
        if LUT_TABLE_BYTES[q] + LUT_TABLE_CODEBOOK_BYTES > optin:
            continue
        slices = max(1, _cdiv(n_vec, 32 * q))  # one (of zero tables) for a part of no columns
        ranges = max(1, min(groups, sms // slices))
        per_range = _cdiv(groups, ranges)
        ranges = _cdiv(groups, per_range)
        waves = _cdiv(slices * ranges, sms)
        lookups = 32 * per_range * 32 * q
        cost = waves * (lookups * LUT_TABLE_LOOKUP_COST[q] + 8192 * q * LUT_TABLE_ENTRY_COST)
        warps = min(LUT_TABLE_WARPS if cuda else CPU_THREADS // 32, per_range)
        if best is None or cost < best[0]:
            best = (cost, q, slices, 32 * per_range, warps)
    if best is None:
        raise ValueError(f"no qk_lut_table instance fits this device (Q = {LUT_TABLE_Q})")
    return best[1:]


class _TableWorkspaces:
    """``qk_lut_table``'s partial sums and row-group counters, one pair per (device, stream):
    calls on one stream run one after another, so they share it (the counters are zero
    between calls: the warp that completes a group resets it), and calls on different
    streams never meet. It grows geometrically; replaced pairs are kept, because a CUDA graph
    captured earlier still writes into them."""

    def __init__(self) -> None:
        self.current: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.retired: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(
        self, device: torch.device, floats: int, groups: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (str(device), stream)
        ws = self.current.get(key)
        if ws is not None and ws[0].numel() >= floats and ws[1].numel() >= groups:
            return ws
        if ws is not None:
            self.retired.append(ws)
            floats = max(floats, 2 * ws[0].numel())
            groups = max(groups, 2 * ws[1].numel())
        ws = (torch.empty(floats, dtype=torch.float32, device=device),
              torch.zeros(groups, dtype=torch.int32, device=device))
        self.current[key] = ws
        return ws


_TABLE_WORKSPACES = _TableWorkspaces()


def _table(
    x: torch.Tensor,
    part: LUTPart,
    w: PreparedLUT,
    launch: Any,
    *,
    addend: torch.Tensor | None,
    epilogue: dict[str, torch.Tensor | None] | None,
    out: torch.Tensor,
) -> None:
    """One ``qk_lut_table`` launch over one part (see :func:`_gemv`)."""
    n = w.out_features
    xp, _ = _part_input(x, part)
    q, slices, rows, warps = lut_table_config(part.n_vec(w.vector_size), n, x.device)
    partial, counters = _TABLE_WORKSPACES.get(x.device, slices * n, _cdiv(n, 32))
    launch(
        FILE,
        f"qk_lut_table<{_ctype(x.dtype)}, {q}>",
        (slices, _cdiv(n, rows), 1),
        (warps * 32, 1, 1),
        [xp, np.int32(part.width), *_mma_stage_args(part), np.int32(rows), partial, counters,
         *_epilogue_args(addend, epilogue, out, 1, n)],
        shared_mem=LUT_TABLE_BYTES[q] + LUT_TABLE_CODEBOOK_BYTES,
        **_programmatic(x.device),
    )


def mma4_smem(
    tokens: int, width: int, groups: int, warps: int, stages_in_table: bool = False,
    register_indices: bool = False,
) -> int:
    """Shared memory of a ``qk_lut_mma4`` block: the table (x in its free halves when 4 slots
    per token and 256-column chunk fit in its 256), two buffers of the warps' partial sums,
    the zero slots, each warp's index stages (unless they are in the table's free halves
    too, or the index words go to registers), and x after them when it does not fit in the
    table."""
    slots = tokens * _cdiv(_cdiv(width, 4), 64) * 4
    x_after = 0 if slots <= LUT_MMA4_X_SLOTS else slots * 128
    stages = 0 if stages_in_table or register_indices else (
        warps * LUT_MMA4_STAGES * groups * LUT_MMA4_STAGE_BYTES)
    return (LUT_MMA4_TABLE_BYTES + 2 * warps * LUT_MMA4_TOKENS * 8 * groups * 4
            + LUT_MMA4_ZERO_BYTES + stages + x_after)


def mma4_stages_fit_in_table(tokens: int, width: int, groups: int, warps: int) -> bool:
    """Whether x and the index stages (2 per warp, 4 free halves per row group) share the
    table's 256 free halves (``qk_lut_mma4<..., SH = true>``)."""
    slots = tokens * _cdiv(_cdiv(width, 4), 64) * 4
    return slots + warps * LUT_MMA4_STAGES_SH * groups * 4 <= LUT_MMA4_X_SLOTS


def mma4_warps_per_sm(
    groups: int, stages_in_table: bool = False, register_indices: bool = False
) -> int:
    """Resident ``qk_lut_mma4`` warps per multiprocessor that the instance's launch bounds
    leave registers for (``qk_lut::mma4_warps_per_sm``): 24 with one row group and index
    stages, or with the stages in the table (80 registers per thread), else 16 (128); also
    the most warps a block may have. Shared memory may allow fewer blocks."""
    return 24 if (groups == 1 and not register_indices) or stages_in_table else 16


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
#: ``qk_lut_mma4``'s asynchronous index stream (``qk_lut::mma4_stages``, ``MMA4_STAGE_BYTES``):
#: stages per warp after the table (3 chunk steps in flight ahead of the one computed), 512
#: bytes of shared memory per row group and stage; whether the tile after the one being
#: loaded is also requested into L2 (``l2``, a launch argument: None = off for one token,
#: where the H200 sweeps ran 8-12% faster without, on for more, where they were measured
#: on; True or False forces it); and, off by default since the H200 sweeps found it no
#: faster, 2 stages per warp in the table's free halves next to x where they fit: a 69 KB
#: block of 8 warps, three per multiprocessor.
LUT_MMA4_STAGES = 4
LUT_MMA4_STAGE_BYTES = 512
LUT_MMA4_L2: bool | None = None
LUT_MMA4_STAGES_IN_TABLE = False
LUT_MMA4_STAGES_SH = 2
#: ``qk_lut_mma4`` with fewer than 4 tokens in a block (one token: a GEMV): the lanes whose
#: mma B columns belong to the absent tokens skip their x reads (a launch argument; the
#: outputs are the same bit for bit). Each 16-byte x read of a warp then costs one
#: shared-memory wavefront per token present instead of four: at one token and 2 row
#: groups, about 42 instead of 48 wavefronts per 512 indices (the codebook rows 32, x 8 ->
#: 2, the index stage 8), where Nsight Compute found L1 the busiest unit (70%). Not yet
#: measured on a GPU.
LUT_MMA4_SKIP_ABSENT_X = True
#: ``qk_lut_mma4<..., RI = true>``: each lane loads its index words straight into registers,
#: 2 chunk steps ahead (``qk_lut::MMA4_RI_AHEAD``), instead of streaming them through
#: shared-memory stages by cp.async: per 512 indices, 4 fewer shared-memory wavefronts (the
#: stage's 16-byte reads) and the stage writes, against 3 steps of latency hiding cut to 2.
#: Off (not yet measured on a GPU); ``benchmarks/kernels_gpu.py --lut-sweep mma4`` times it.
LUT_MMA4_REGISTER_INDICES = False


#: ``qk_lut_table``: its tables' shared memory by vectors per lane (``qk_lut::table_bytes``),
#: warps per block (at most; the instances' launch bound), the pseudo multiprocessors the CPU
#: harness sizes its grid for (several row ranges), and Q forced (None: lut_table_config's
#: choice). Slower than ``qk_lut_mma4`` wherever measured (H200, one token: (4096, 4096) 6.2
#: against 4.4 us at best, (8192, 8192) 11.7 against 10.3; Nsight Compute: a quarter of the
#: warps resident, half the issue slots idle), so :func:`lut_path` picks it only with
#: ``LUT_TABLE``.
LUT_TABLE_BYTES = {2: 64 * 1024, 4: 128 * 1024}
LUT_TABLE_CODEBOOK_BYTES = 256 * 16  # the codebook as float32, after the tables
LUT_TABLE_WARPS = 16
CPU_TABLE_BLOCKS = 4
LUT_TABLE_Q: int | None = None
LUT_TABLE = False
#: ``qk_lut_table``'s instructions per lookup and lane on a full group of 32 rows (the
#: lookups, the index loads, the butterfly and the row-group count), and per table entry,
#: by Q: the sm_90 SASS (``benchmarks/kernels_sass.py``, BENCHMARKS.md).
LUT_TABLE_LOOKUP_COST = {2: 7.7, 4: 5.4}
LUT_TABLE_ENTRY_COST = 6.9


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
    elif path == "table":
        reason = table_unsupported_reason(w, m, x.device)
        run = _table
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
        p for p in LUT_PATHS
        if (p != "mma4" or mma4_unsupported_reason(w, m, device) is None)
        and (p != "table" or table_unsupported_reason(w, m, device) is None)
    )
