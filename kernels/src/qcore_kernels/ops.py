"""The kernels' host side: argument lists, grids and the choice of path per shape.

Every function takes a ``launch(file, instance, grid, block, args)`` callable, so the same
code runs the kernels on a GPU (:class:`qcore_kernels.runtime.CupyLauncher`) and on the
CPU in the test harness (:mod:`qcore_kernels.harness`).

Paths of the weight-only linear, by the number of tokens ``M``:

* ``mma`` (M < ``DEQUANT_MIN_M``, default 33): tensor-core products (mma.sync m16n8k16)
  on weights dequantized in registers; the warps of a block split K and share 16 or 32
  output channels, tokens in tiles of 16 or 32 (:func:`mma_config`). It reads the packed
  weight once: the decode path, and small batches.
* ``dequant`` (M >= ``DEQUANT_MIN_M``): dequantize the weight to a temporary dense matrix
  and use torch's GEMM (cuBLAS); at large M the GEMM's cost dwarfs the dequantization.

Paths of the W8A8 linear: ``gemv`` (M <= 16, dp4a), ``intmm`` (cuBLASLt's int8 GEMM through
``torch._int_mm``, then ``qk_w8a8_scale``'s epilogue; M > 16 and N a multiple of 8) and
``gemm`` (int8 wmma tiles; the other shapes).

The W4A4 linear is two launches at every M: ``qk_w4a4_quantize`` (4-bit codes, scales and
zero points per [token, group of 64], and x L1^T for a low-rank branch) and
``qk_w4a4_gemm`` (int4 tensor-core products per group, the branch's second product and the
bias in the epilogue); :func:`w4a4_tiling` picks the GEMM's tiles by M.

``DEQUANT_MIN_M`` is set from the ``QCORE_KERNELS_DEQUANT_MIN_M`` environment variable
(default 1024); ``path=`` forces a path (benchmarks and tests compare them).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qcore_kernels.layouts import PreparedW4A4, PreparedW8A8, PreparedWQ
from qcore_kernels.sources import MMA_TILINGS, W4A4_TILINGS
from qcore_kernels.support import W4A4_GROUP

Launch = Callable[[str, str, Sequence[int], Sequence[int], Sequence[Any]], None]

CTYPES = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
GEMV_TILES = (1, 4, 8, 16)
GEMV_MAX_M = 16
DEQUANT_MIN_M = int(os.environ.get("QCORE_KERNELS_DEQUANT_MIN_M", "33"))
WQ_PATHS = ("mma", "dequant")
W8A8_PATHS = ("gemv", "gemm", "intmm")


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
    return "dequant" if m >= DEQUANT_MIN_M else "mma"


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


#: Warps per multiprocessor that the ``mma`` path aims to keep busy: K is split over the
#: grid (``gridDim.z``) only where the tiles' blocks bring fewer (long K, few channels).
#: benchmarks/kernels_gpu_tune.py measured 16 best on an H200; splitting further costs more
#: in partial sums than it gains in loads in flight.
MMA_WARPS_PER_SM = int(os.environ.get("QCORE_KERNELS_MMA_WARPS_PER_SM", "16"))
#: Weights (n * k) from which a block takes 32 output channels instead of 16.
MMA_WIDE_FROM = 1 << 25


@dataclass(frozen=True)
class MmaConfig:
    m_tiles: int  # m16 tiles per block
    n_tiles: int  # n8 tiles per block
    warps: int  # warps per block
    splits: int  # blocks along K (gridDim.z)


def mma_config(
    m: int, n: int, k: int, bits: int, device: torch.device, warps_per_sm: int | None = None,
    warps: int | None = None, n_tiles: int | None = None,
) -> MmaConfig:
    """The ``mma`` path's tiling for an ``m x k`` by ``k x n`` product: one token tile of 16
    (8 warps) up to 16 tokens, else two (4 warps); 32 channels per block for large weights,
    else 16; K split until ``warps_per_sm`` warps per multiprocessor are busy, each warp
    keeping at least one chunk of 16 words per row. Explicit ``warps``/``n_tiles`` (tuning)
    fall back to the nearest compiled tiling."""
    mt = 1 if m <= 16 else 2
    nt = n_tiles or (4 if n * k >= MMA_WIDE_FROM else 2)
    kw = warps or (8 if mt == 1 else 4)
    if (mt, nt, kw) not in MMA_TILINGS:
        kw = 8 if mt == 1 else 4
    tiles = _cdiv(n, 8 * nt) * _cdiv(m, 16 * mt)
    chunks = _cdiv(k, 16 * 32 // bits)
    want = (warps_per_sm or MMA_WARPS_PER_SM) * _multiprocessors(device)
    splits = max(1, min(round(want / (tiles * kw)), chunks // kw))
    return MmaConfig(mt, nt, kw, splits)


_TICKETS: dict[tuple[str, int], torch.Tensor] = {}


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed counters for the split-K blocks, one per output tile; each launch leaves them
    zero again. One buffer per device and stream, so that concurrent launches on other
    streams never share a counter."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _TICKETS[key] = buf
    return buf


def wq_linear(
    x: torch.Tensor,
    w: PreparedWQ,
    bias: torch.Tensor | None,
    launch: Launch,
    path: str | None = None,
    config: MmaConfig | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W.T + bias`` for a ``qk-wq`` weight; ``x`` in the weight's dtype.
    ``config`` overrides the ``mma`` path's tiling (benchmarks compare them)."""
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
    if path == "dequant":
        dense = torch.empty(n, k, dtype=x.dtype, device=x.device)
        lane_chunks = w.qweight.numel() // 4
        launch(
            "qk_wq.cu",
            f"qk_wq_dequant<{bits}, {t}>",
            (min(_cdiv(lane_chunks, 256), 65535), 1, 1),
            (256, 1, 1),
            [w.qweight, w.scales, w.zeros, dense, np.int32(n), np.int32(k), np.int32(g)],
        )
        return F.linear(x, dense, bias)
    if path != "mma":
        raise ValueError(f"unknown path {path!r}; one of {WQ_PATHS}")
    cfg = config or mma_config(m, n, k, bits, x.device)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (_cdiv(n, 8 * cfg.n_tiles), _cdiv(m, 16 * cfg.m_tiles), cfg.splits)
    partial = tickets = None
    if cfg.splits > 1:
        partial = torch.empty(cfg.splits, m, n, dtype=torch.float32, device=x.device)
        tickets = _tickets(x.device, grid[0] * grid[1])
    launch(
        "qk_wq.cu",
        f"qk_wq_mma<{bits}, {t}, {cfg.m_tiles}, {cfg.n_tiles}, {cfg.warps}>",
        grid,
        (32 * cfg.warps, 1, 1),
        [x, w.qweight, w.scales, w.zeros, bias, y, partial, tickets, *map(np.int32, (m, n, k, g))],
    )
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
    path = path or w8a8_path(m, n)
    if path == "intmm":
        if not intmm_applies(m, n):
            raise ValueError(f"path 'intmm' needs M > 16 and N a multiple of 8; got {m} x {n}")
        acc = torch._int_mm(xq, w.wq.t())
        launch(
            "qk_w8a8.cu",
            f"qk_w8a8_scale<{t}>",
            (min(_cdiv(m * n // 2, 256), 65535), 1, 1),
            (256, 1, 1),
            [acc, xs, w.wscale, bias, y, np.int32(m), np.int32(n)],
        )
    elif path == "gemv":
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


def intmm_applies(m: int, n: int) -> bool:
    """torch._int_mm (cuBLASLt int8) takes more than 16 rows and N a multiple of 8."""
    return m > GEMV_MAX_M and n % 8 == 0


def w8a8_path(m: int, n: int) -> str:
    if m <= GEMV_MAX_M:
        return "gemv"
    return "intmm" if intmm_applies(m, n) else "gemm"


# ------------------------------------------------------------------------------- W4A4

W4A4_FILE = "qk_w4a4.cu"
#: Warps per qk_w4a4_quantize block (``QUANT_WARPS`` in qk_w4a4.cu) and its low-rank tile.
W4A4_QUANT_WARPS = 4
W4A4_RANK_TILE = 32
#: Blocks per multiprocessor that qk_w4a4_quantize's K ranges aim for; not yet timed on a
#: GPU (a guess: enough blocks in flight for one token's row).
W4A4_QUANT_BLOCKS_PER_SM = 2
#: Up to this many tokens the GEMM takes W4A4_TILINGS[0] (16 x 32 tiles, K split over
#: 4 warps), above it W4A4_TILINGS[1] (32 x 128); not yet timed on a GPU.
W4A4_SMALL_M = 32


@dataclass
class W4A4Activations:
    """What ``qk_w4a4_quantize`` writes for ``x [M, K]``; layouts in ``qk_w4a4.cu``."""

    codes: torch.Tensor  # int32 [M, K / 8]: signed 4-bit (asymmetric: code - 8)
    scales: torch.Tensor  # float32 [M, groups]
    zeros: torch.Tensor | None  # int32 [M, groups]: zero point - 8 (asymmetric)
    sums: torch.Tensor | None  # int32 [M, groups]: sum of the stored codes (when asked)
    xdown: torch.Tensor | None  # float32 [M, rank_padded]: x L1^T (with a branch)


def w4a4_quant_splits(m: int, k: int, rank_tiles: int, device: torch.device) -> int:
    """K ranges (``gridDim.y``) of ``qk_w4a4_quantize``: enough blocks for
    ``W4A4_QUANT_BLOCKS_PER_SM`` per multiprocessor, each warp keeping at least one group."""
    tiles = _cdiv(m, 16) * rank_tiles
    want = W4A4_QUANT_BLOCKS_PER_SM * _multiprocessors(device)
    return max(1, min(round(want / tiles), k // W4A4_GROUP // W4A4_QUANT_WARPS))


def quantize_w4a4_activations(
    x: torch.Tensor,
    launch: Launch,
    *,
    asymmetric: bool = False,
    sums: bool = False,
    down: torch.Tensor | None = None,
    splits: int | None = None,
) -> W4A4Activations:
    """4-bit codes of ``x [M, K]`` (float16/bfloat16, K a multiple of 64) per [token, group
    of 64], with exactly :func:`qcore.grid.quantize_activation_groups`' levels and scales;
    ``sums``: also each group's sum of stored codes; ``down`` ([rank_padded, K] in x's
    dtype, rank_padded a multiple of 32): also ``x @ down.T`` in float32. ``splits``
    overrides the number of K ranges (tests compare them)."""
    t = _ctype(x.dtype)
    x = _aligned(x)
    m, k = x.shape
    if k % W4A4_GROUP:
        raise ValueError(f"in_features {k} is not a multiple of {W4A4_GROUP}")
    groups = k // W4A4_GROUP
    dev = x.device
    out = W4A4Activations(
        codes=torch.empty(m, k // 8, dtype=torch.int32, device=dev),
        scales=torch.empty(m, groups, dtype=torch.float32, device=dev),
        zeros=torch.empty(m, groups, dtype=torch.int32, device=dev) if asymmetric else None,
        sums=torch.empty(m, groups, dtype=torch.int32, device=dev) if sums else None,
        xdown=None,
    )
    rank_tiles = 1
    partial = tickets = None
    if down is not None:
        if down.dtype != x.dtype or down.shape[1] != k or down.shape[0] % W4A4_RANK_TILE:
            raise ValueError(f"down must be [a multiple of {W4A4_RANK_TILE}, {k}] in {x.dtype}; "
                             f"got {list(down.shape)} in {down.dtype}")
        down = _aligned(down)
        rank_tiles = down.shape[0] // W4A4_RANK_TILE
        out.xdown = torch.empty(m, down.shape[0], dtype=torch.float32, device=dev)
    splits = splits or w4a4_quant_splits(m, k, rank_tiles, dev)
    grid = (_cdiv(m, 16), splits, rank_tiles)
    if down is not None and splits > 1:
        partial = torch.empty(splits, m, down.shape[0], dtype=torch.float32, device=dev)
        tickets = _tickets(dev, grid[0] * grid[2])
    launch(
        W4A4_FILE,
        f"qk_w4a4_quantize<{t}, {'true' if asymmetric else 'false'}>",
        grid,
        (32 * W4A4_QUANT_WARPS, 1, 1),
        [x, out.codes, out.scales, out.zeros, out.sums, down, out.xdown, partial, tickets,
         np.int32(m), np.int32(k), np.int32(0 if down is None else down.shape[0])],
    )
    return out


def w4a4_tiling(m: int) -> tuple[int, int, int, int]:
    """The GEMM's (m16 tiles, n8 tiles, warps along N, warps along K) for M tokens."""
    return W4A4_TILINGS[0] if m <= W4A4_SMALL_M else W4A4_TILINGS[1]


def w4a4_linear(
    x: torch.Tensor,
    w: PreparedW4A4,
    bias: torch.Tensor | None,
    launch: Launch,
    tiling: tuple[int, int, int, int] | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """``fake_quant(x) @ W.T + (x @ down.T) @ up.T + bias`` for a ``qk-w4a4`` weight:
    activations in groups of 64 (the weight's ``act_symmetric`` grid), the branch when the
    weight holds one. ``tiling`` (one of ``W4A4_TILINGS``) and ``splits`` (the activation
    kernel's K ranges) override the defaults (tests compare them)."""
    t = _ctype(x.dtype)
    m, k = x.shape
    if k != w.in_features:
        raise ValueError(f"x has {k} columns but the weight takes {w.in_features}")
    n = w.out_features
    if m == 0:
        return torch.empty(0, n, dtype=x.dtype, device=x.device)
    branch = w.lowrank(x.dtype)
    act = quantize_w4a4_activations(
        x, launch, asymmetric=not w.act_symmetric, sums=w.zeros is not None,
        down=None if branch is None else branch[0], splits=splits)
    zero = w.zeros is not None or not w.act_symmetric
    mt, nt, wn, kw = tiling or w4a4_tiling(m)
    if (mt, nt, wn, kw) not in W4A4_TILINGS:
        raise ValueError(f"tiling {(mt, nt, wn, kw)} is not compiled; one of {W4A4_TILINGS}")
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    launch(
        W4A4_FILE,
        f"qk_w4a4_gemm<{t}, {'true' if zero else 'false'}, {mt}, {nt}, {wn}, {kw}>",
        (_cdiv(n, wn * nt * 8), _cdiv(m, mt * 16), 1),
        (32 * wn * kw, 1, 1),
        [act.codes, act.scales, act.zeros, act.sums, w.qweight, w.scales, w.zeros,
         w.sums if not w.act_symmetric else None, act.xdown,
         None if branch is None else branch[1], bias, y,
         *map(np.int32, (m, n, k, 0 if branch is None else branch[0].shape[0], w.n_padded))],
    )
    return y


# Codebook (vq) linears: host side in qcore_kernels.lut_ops.
from qcore_kernels.lut_ops import LUT_PATHS, lut_linear, lut_path  # noqa: E402,F401
