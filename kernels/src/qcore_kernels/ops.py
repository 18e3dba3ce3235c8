"""The kernels' host side: argument lists, grids and the choice of path per shape.

Every function takes a ``launch(file, instance, grid, block, args)`` callable, so the same
code runs the kernels on a GPU (:class:`qcore_kernels.runtime.CupyLauncher`) and on the
CPU in the test harness (:mod:`qcore_kernels.harness`).

Paths of the weight-only linear, by the number of tokens ``M``:

* ``gemv`` (M <= ``GEMV_MAX_M``): one warp per output channel, up to 16 tokens per block;
  reads the packed weight once per 16 tokens: the decode path.
* ``gemm``: tiled tensor-core GEMM with dequantization fused into the tile loads.
* ``dequant`` (M >= ``DEQUANT_MIN_M``): dequantize the weight to a temporary dense matrix
  and use torch's GEMM (cuBLAS); at large M the GEMM's cost dwarfs the dequantization.

``DEQUANT_MIN_M`` is set from the ``QCORE_KERNELS_DEQUANT_MIN_M`` environment variable
(default 1024); ``path=`` forces a path (benchmarks and tests compare them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qcore_kernels.layouts import PreparedW8A8, PreparedWQ

Launch = Callable[[str, str, Sequence[int], Sequence[int], Sequence[Any]], None]

CTYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
GEMV_TILES = (1, 4, 8, 16)
GEMV_MAX_M = 16
DEQUANT_MIN_M = int(os.environ.get("QCORE_KERNELS_DEQUANT_MIN_M", "1024"))
WQ_PATHS = ("gemv", "gemm", "dequant")
W8A8_PATHS = ("gemv", "gemm")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ctype(dtype: torch.dtype) -> str:
    try:
        return CTYPES[dtype]
    except KeyError:
        raise ValueError(f"the kernels take float16 or bfloat16 activations, got {dtype}") from None


def _aligned(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def gemv_tile(m: int) -> int:
    return next(t for t in GEMV_TILES if t >= min(m, GEMV_TILES[-1]))


def wq_path(m: int) -> str:
    if m <= GEMV_MAX_M:
        return "gemv"
    return "dequant" if m >= DEQUANT_MIN_M else "gemm"


def wq_linear(
    x: torch.Tensor,
    w: PreparedWQ,
    bias: torch.Tensor | None,
    launch: Launch,
    path: str | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W.T + bias`` for a ``qk-wq`` weight; ``x`` in the weight's dtype."""
    if x.dtype != w.dtype:
        raise ValueError(f"activations are {x.dtype} but the weight was prepared for {w.dtype}")
    t = _ctype(x.dtype)
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    x = _aligned(x)
    m, k = x.shape
    n, bits, g = w.out_features, w.bits, w.group_size
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    path = path or wq_path(m)
    shape = [np.int32(m), np.int32(n), np.int32(k), np.int32(g)]
    if path == "dequant":
        dense = torch.empty(n, k, dtype=x.dtype, device=x.device)
        words = w.qweight.numel()
        launch(
            "qk_wq.cu",
            f"qk_wq_dequant<{bits}, {t}>",
            (min(_cdiv(words, 256), 65535), 1, 1),
            (256, 1, 1),
            [w.qweight, w.scales, w.zeros, dense, np.int32(n), np.int32(k), np.int32(g)],
        )
        return F.linear(x, dense, bias)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = [x, w.qweight, w.scales, w.zeros, bias, y, *shape]
    if path == "gemv":
        mt = gemv_tile(m)
        launch(
            "qk_wq.cu",
            f"qk_wq_gemv<{bits}, {t}, {mt}>",
            (_cdiv(n, 4), _cdiv(m, mt), 1),
            (128, 1, 1),
            args,
        )
    elif path == "gemm":
        launch(
            "qk_wq.cu",
            f"qk_wq_gemm<{bits}, {t}>",
            (_cdiv(n, 128), _cdiv(m, 128), 1),
            (256, 1, 1),
            args,
        )
    else:
        raise ValueError(f"unknown path {path!r}; one of {WQ_PATHS}")
    return y


def quantize_rows(
    x: torch.Tensor, input_scale: torch.Tensor | None, launch: Launch
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations and their float32 scales per row (static: ``input_scale`` for all)."""
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    xs = torch.empty(m, dtype=torch.float32, device=x.device)
    launch(
        "qk_w8a8.cu",
        f"qk_quantize_rows<{_ctype(x.dtype)}>",
        (m, 1, 1),
        (256, 1, 1),
        [x, xq, xs, input_scale, np.int32(m), np.int32(k)],
    )
    return xq, xs


def w8a8_linear(
    x: torch.Tensor,
    w: PreparedW8A8,
    bias: torch.Tensor | None,
    launch: Launch,
    path: str | None = None,
) -> torch.Tensor:
    """``fake_quant(x) @ W.T + bias`` computed in int8 with int32 accumulation."""
    t = _ctype(x.dtype)
    x = _aligned(x)
    m, k = x.shape
    n = w.out_features
    xq, xs = quantize_rows(x, w.input_scale, launch)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    args = [xq, xs, w.wq, w.wscale, bias, y, np.int32(m), np.int32(n), np.int32(k)]
    path = path or ("gemv" if m <= GEMV_MAX_M else "gemm")
    if path == "gemv":
        mt = gemv_tile(m)
        launch(
            "qk_w8a8.cu",
            f"qk_w8a8_gemv<{t}, {mt}>",
            (_cdiv(n, 4), _cdiv(m, mt), 1),
            (128, 1, 1),
            args,
        )
    elif path == "gemm":
        launch(
            "qk_w8a8.cu", f"qk_w8a8_gemm<{t}>", (_cdiv(n, 128), _cdiv(m, 128), 1), (256, 1, 1), args
        )
    else:
        raise ValueError(f"unknown path {path!r}; one of {W8A8_PATHS}")
    return y
