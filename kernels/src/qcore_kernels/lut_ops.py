"""Host side of the codebook kernels (``qk_lut.cu``): op ``lut_linear`` on a ``qk-lut`` weight.

Like :mod:`qcore_kernels.ops` (which re-exports :func:`lut_linear`), every function takes a
``launch(file, instance, grid, block, args, shared_mem=bytes)`` callable: CuPy on a GPU, the
CPU harness in the tests.

Paths by the number of tokens ``M``:

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
LUT_PATHS = ("gemv", "dequant")
#: Shared memory the CPU harness offers (``QK_LUT_CPU_SMEM`` in ``qk_lut.cu``).
CPU_SMEM = 256 * 1024
#: Threads per GEMV block in the CPU harness (few threads keep the harness fast).
CPU_THREADS = 64
#: Blocks of the persistent GEMV grid in the CPU harness (several channels per warp).
CPU_BLOCKS = 3


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


def lut_path(m: int, w: PreparedLUT, device: torch.device | str) -> str:
    if m <= LUT_GEMV_MAX_M and gemv_unsupported_reason(w, device) is None:
        return "gemv"
    return "dequant"


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
    e = epilogue or {}
    args = [
        xp, np.int32(ld), np.int32(part.width), np.int32(x_shared), *_stage_args(part), addend,
        e.get("scale"), e.get("offset"), e.get("xsum"), e.get("bias"),
        out if epilogue is not None else None, None if epilogue is not None else out,
        np.int32(m), np.int32(n),
    ]
    launch(
        FILE,
        f"qk_lut_gemv<{_ctype(x.dtype)}, {v}, {mt}>",
        (blocks, _cdiv(m, mt), 1),
        (warps * 32, 1, 1),
        args,
        shared_mem=smem,
    )


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
    if path != "gemv":
        raise ValueError(f"unknown path {path!r}; one of {LUT_PATHS}")
    reason = gemv_unsupported_reason(w, x.device)
    if reason is not None:
        raise ValueError(f"the LUT GEMV cannot run this weight: {reason}")
    raw = None
    if w.outliers is not None:
        raw = torch.empty(m, n, dtype=torch.float32, device=x.device)
        _gemv(x, w.outliers, w, launch, addend=None, epilogue=None, out=raw)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    xsum = x.float().sum(1) if w.offset is not None else None
    epilogue = {"scale": w.scale, "offset": w.offset, "xsum": xsum, "bias": bias}
    _gemv(x, w.main, w, launch, addend=raw, epilogue=epilogue, out=y)
    return y


def lut_paths(m: int) -> Sequence[str]:
    """The paths that can run ``m`` tokens (benchmarks and tests compare them)."""
    return ("gemv", "dequant") if m <= LUT_GEMV_MAX_M else ("dequant",)
