"""Conversion from the core's ``int-packed`` layout to the kernels' own layouts.

Pure torch, on any device: the providers run it once per layer in ``prepare``; tests run
it on the CPU. Both layouts are documented at the top of their CUDA sources.

``qk-wq`` (W4A16/W8A16, ``qk_wq.cu``): ``32 / bits`` codes per 32-bit word along each
row, even columns first inside a word (one shift and mask unpacks a pair of adjacent
weights), rows padded to whole chunks of 16 words; scales and zero points in the
activation dtype.
Act-order weights (``g_idx``) are permuted so that groups are contiguous; the
permutation is applied to the activations at run time.

``qk-w8a8`` (``qk_w8a8.cu``): signed int8 codes (code - 128) and float32 per-channel scales.

``qk-w4a4`` (``qk_w4a4.cu``): signed 4-bit values ``code - 8`` (``code ^ 8``) in the core's
bit order (eight per word, column ``8w + i`` in bits ``4i .. 4i+3`` of word ``w``), rows
padded to whole tiles of 8 channels; float32 scales, zero points ``zero - 8`` and each
group's sum of ``code - zero``, all transposed to ``[groups, channels]``; the low-rank branch
padded to a multiple of 32 columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qcore.interfaces import PackedWeight, act_fields
from qcore.ops import IntPacker, zero_points
from qcore_kernels.support import (
    W4A4_GROUP,
    w4a4_unsupported_reason,
    w8a8_unsupported_reason,
    wq_unsupported_reason,
)


class LayoutError(ValueError):
    """A packed weight that the kernels' layouts cannot hold."""


@dataclass
class PreparedWQ:
    qweight: torch.Tensor  # int32 [N, chunks * 16]: pack_wq_codes
    scales: torch.Tensor  # dtype [N, n_groups]
    zeros: torch.Tensor  # dtype [N, n_groups]
    perm: torch.Tensor | None  # int64 [K]: x[:, perm] feeds the kernel (act-order)
    bits: int
    group_size: int  # effective: in_features for per-channel
    in_features: int
    out_features: int

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def dequantize(self) -> torch.Tensor:
        """Reference: the dense weight [N, K] in the kernel's column order, in ``dtype``."""
        codes = unpack_wq_codes(self.qweight, self.bits, self.in_features)
        gi = torch.arange(self.in_features, device=codes.device) // self.group_size
        return (codes.to(self.dtype) - self.zeros[:, gi]) * self.scales[:, gi]


@dataclass
class PreparedW8A8:
    wq: torch.Tensor  # int8 [N, K]
    wscale: torch.Tensor  # float32 [N]
    input_scale: torch.Tensor | None  # float32 [1] for static activation scales
    in_features: int
    out_features: int


def wq_group_size(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 else group_size


def chunk_columns(bits: int) -> int:
    """Columns per chunk of a ``qk-wq`` row: 16 words of ``32 / bits`` codes."""
    return 16 * 32 // bits


def _word_order(bits: int) -> torch.Tensor:
    """int64 [32 / bits]: the column (within its word) of value ``e``: even columns first,
    so that one shift and mask in ``qk_wq.cu`` yields a pair of adjacent columns."""
    vals = 32 // bits
    half = vals // 2
    return torch.tensor([2 * e if e < half else 2 * (e - half) + 1 for e in range(vals)])


def pack_wq_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 [N, ceil(K / chunk) * 16] in the ``qk-wq`` layout,
    columns past K padded with code 0."""
    n, k = codes.shape
    vals = 32 // bits
    chunk = chunk_columns(bits)
    width = -(-k // chunk) * chunk
    padded = torch.zeros(n, width, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    values = padded.view(n, width // vals, vals)[:, :, _word_order(bits).to(codes.device)]
    shifts = torch.arange(vals, device=codes.device, dtype=torch.int64) * bits
    words = (values << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_wq_codes(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_wq_codes`: uint8 [N, in_features]."""
    n = words.shape[0]
    vals = 32 // bits
    shifts = torch.arange(vals, device=words.device, dtype=torch.int64) * bits
    values = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = torch.empty_like(values)
    codes[:, :, _word_order(bits).to(words.device)] = values
    return codes.view(n, -1)[:, :in_features].to(torch.uint8)


def to_wq(packed: PackedWeight, dtype: torch.dtype, device: torch.device | str) -> PreparedWQ:
    """The ``qk-wq`` layout of an ``int-packed`` weight, on ``device``."""
    qw = IntPacker().unpack(packed)
    bits = int(qw.params["bits"])  # type: ignore[arg-type]
    out_f, in_f = qw.shape
    gs = int(qw.params.get("group_size", -1))  # type: ignore[arg-type]
    reason = wq_unsupported_reason(bits, gs, in_f)
    if reason is not None:
        raise LayoutError(f"the qk-wq kernels cannot hold this weight: {reason}")
    group = wq_group_size(gs, in_f)
    t = qw.tensors
    codes = t["codes"].to(device)
    scales = t["scales"].float().to(device)
    zeros = zero_points(scales, None if t.get("zeros") is None else t["zeros"].to(device), bits)
    perm = None
    if "g_idx" in t:
        g_idx = t["g_idx"].long().to(device)
        perm = torch.argsort(g_idx, stable=True)
        expected = torch.arange(in_f, device=device) // group
        if not torch.equal(g_idx[perm], expected):
            raise LayoutError(
                "the qk-wq kernels need act-order groups of exactly group_size columns "
                "(GPTQ's g_idx); this g_idx has groups of other sizes. Use kernel 'torch'."
            )
        codes = codes[:, perm]
        if torch.equal(perm, torch.arange(in_f, device=device)):
            perm = None
    return PreparedWQ(
        qweight=pack_wq_codes(codes.contiguous(), bits),
        scales=scales.to(dtype).contiguous(),
        zeros=zeros.to(dtype).contiguous(),
        perm=perm,
        bits=bits,
        group_size=group,
        in_features=in_f,
        out_features=out_f,
    )


def to_w8a8(packed: PackedWeight, device: torch.device | str) -> PreparedW8A8:
    """The ``qk-w8a8`` layout of an ``int-packed`` W8A8 weight, on ``device``."""
    qw = IntPacker().unpack(packed)
    p = qw.params
    out_f, in_f = qw.shape
    reason = w8a8_unsupported_reason(
        int(p["bits"]),
        int(p.get("group_size", -1)),  # type: ignore[arg-type]
        bool(p.get("symmetric", False)),
        p.get("act_bits"),  # type: ignore[arg-type]
        in_f,
    )
    t = qw.tensors
    if reason is None and ("zeros" in t or "g_idx" in t):
        reason = "zero points or g_idx present"
    if reason is not None:
        raise LayoutError(f"the qk-w8a8 kernels cannot hold this weight: {reason}")
    wq = (t["codes"].to(device).to(torch.int16) - 128).to(torch.int8).contiguous()
    input_scale = t.get(
        "input_scale"
    )  # present = static per-tensor scale, as in the torch provider
    return PreparedW8A8(
        wq=wq,
        wscale=t["scales"].float().reshape(-1).to(device).contiguous(),
        input_scale=None
        if input_scale is None
        else input_scale.float().reshape(1).to(device).contiguous(),
        in_features=in_f,
        out_features=out_f,
    )


# ---------------------------------------------------------------------------- qk-w4a4

#: Channels per tile of the qk-w4a4 layout (rows are padded to whole tiles).
W4A4_N_TILE = 8
#: Low-rank columns per tile of ``qk_w4a4_quantize`` (the branch is padded to whole tiles).
W4A4_RANK_TILE = 32
#: The packed tensors of a layer's low-rank branch (``qcore.qlinear``'s buffer names).
LOWRANK_DOWN, LOWRANK_UP = "lowrank_down", "lowrank_up"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class PreparedW4A4:
    qweight: torch.Tensor  # int32 [n_padded, K / 8]: pack_signed_nibbles(code - 8)
    scales: torch.Tensor  # float32 [groups, n_padded]
    zeros: torch.Tensor | None  # int32 [groups, n_padded]: zero point - 8 (asymmetric)
    sums: torch.Tensor  # int32 [groups, n_padded]: sum over the group of code - zero
    act_symmetric: bool
    lowrank_down: torch.Tensor | None  # [rank_padded, K], 16-bit float, zero rows past rank
    lowrank_up: torch.Tensor | None  # [n_padded, rank_padded], zero-padded
    rank: int  # the branch's rank (0: none)
    in_features: int
    out_features: int
    #: The branch cast to each activation dtype, made on first use.
    _lowrank_cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False)

    @property
    def n_padded(self) -> int:
        return self.qweight.shape[0]

    def lowrank(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The padded branch (down, up) in ``dtype``, the unfused branch's dtype (the
        activations'), or None without a branch."""
        if self.lowrank_down is None or self.lowrank_up is None:
            return None
        cast = self._lowrank_cast.get(dtype)
        if cast is None:
            cast = (self.lowrank_down.to(dtype).contiguous(),
                    self.lowrank_up.to(dtype).contiguous())
            self._lowrank_cast[dtype] = cast
        return cast

    def dequantize(self) -> torch.Tensor:
        """Reference: the dense float32 weight [N, K], ``(code - zero) * scale``."""
        n, k = self.out_features, self.in_features
        gi = torch.arange(k, device=self.qweight.device) // W4A4_GROUP
        levels = unpack_signed_nibbles(self.qweight[:n], k).float()  # code - 8
        if self.zeros is not None:
            levels = levels - self.zeros[:, :n].t().float()[:, gi]  # minus (zero - 8)
        return levels * self.scales[:, :n].t()[:, gi]


def pack_signed_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Integers in -8..7, ``[R, K]`` with K a multiple of 8 -> int32 ``[R, K / 8]``: column
    ``8w + i`` in bits ``4i .. 4i+3`` of word ``w``, two's complement (the operand of the
    int4 tensor-core MMA, in the core's bit order)."""
    r, k = values.shape
    if k % 8:
        raise ValueError(f"{k} columns: 4-bit values pack whole words of 8")
    nibbles = values.to(torch.int64).view(r, k // 8, 8) & 0xF
    shifts = torch.arange(8, device=values.device, dtype=torch.int64) * 4
    words = (nibbles << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_signed_nibbles(words: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_signed_nibbles`: int8 ``[R, columns]`` in -8..7."""
    shifts = torch.arange(8, device=words.device, dtype=torch.int64) * 4
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    values = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return values.reshape(words.shape[0], -1)[:, :columns].to(torch.int8)


def _per_group_transposed(values: torch.Tensor, n_padded: int, dtype: torch.dtype) -> torch.Tensor:
    """``[N, groups]`` -> ``[groups, n_padded]`` in ``dtype``, zero past N."""
    out = torch.zeros(values.shape[1], n_padded, dtype=dtype, device=values.device)
    out[:, : values.shape[0]] = values.t().to(dtype)
    return out.contiguous()


def _padded_lowrank(
    tensors: dict[str, torch.Tensor], in_f: int, out_f: int, n_padded: int,
    device: torch.device | str,
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    down, up = tensors.get(LOWRANK_DOWN), tensors.get(LOWRANK_UP)
    if down is None and up is None:
        return None, None, 0
    if down is None or up is None:
        raise LayoutError(f"a low-rank branch needs both {LOWRANK_DOWN} and {LOWRANK_UP}; "
                          f"got only {LOWRANK_DOWN if up is None else LOWRANK_UP}")
    rank = down.shape[0]
    if tuple(down.shape) != (rank, in_f) or tuple(up.shape) != (out_f, rank):
        raise LayoutError(f"the low-rank branch of a {out_f} x {in_f} weight must be "
                          f"{LOWRANK_DOWN} [rank, {in_f}] and {LOWRANK_UP} [{out_f}, rank]; got "
                          f"{list(down.shape)} and {list(up.shape)}")
    rank_padded = _round_up(max(rank, 1), W4A4_RANK_TILE)
    down_p = torch.zeros(rank_padded, in_f, dtype=down.dtype, device=device)
    down_p[:rank] = down.to(device)
    up_p = torch.zeros(n_padded, rank_padded, dtype=up.dtype, device=device)
    up_p[:out_f, :rank] = up.to(device)
    return down_p, up_p, rank


def to_w4a4(packed: PackedWeight, device: torch.device | str) -> PreparedW4A4:
    """The ``qk-w4a4`` layout of an ``int-packed`` W4A4 weight (groups of 64 on both sides,
    dynamic activations), with its low-rank branch when ``packed`` holds one, on ``device``."""
    qw = IntPacker().unpack(packed)
    p = qw.params
    out_f, in_f = qw.shape
    acts = act_fields(p)
    reason = w4a4_unsupported_reason(
        int(p["bits"]),  # type: ignore[arg-type]
        int(p.get("group_size", -1)),  # type: ignore[arg-type]
        p.get("act_bits"),  # type: ignore[arg-type]
        acts["act_group_size"],
        bool(p.get("act_dynamic", True)),
        in_f,
    )
    t = qw.tensors
    if reason is None and "g_idx" in t:
        reason = "act-order (g_idx): the W4A4 kernels take groups in column order"
    if reason is None and "input_scale" in t:
        reason = "a static input_scale: the W4A4 kernels quantize activations at run time"
    if reason is not None:
        raise LayoutError(f"the qk-w4a4 kernels cannot hold this weight: {reason}")
    n_padded = _round_up(out_f, W4A4_N_TILE)
    groups = in_f // W4A4_GROUP
    codes = torch.full((n_padded, in_f), 8, dtype=torch.int16, device=device)  # padding: 0
    codes[:out_f] = t["codes"].to(device).to(torch.int16)
    zero = t.get("zeros")
    zeros = (torch.full((out_f, groups), 8, dtype=torch.int16, device=device) if zero is None
             else zero.to(device).to(torch.int16))
    levels = codes[:out_f].view(out_f, groups, W4A4_GROUP) - zeros[:, :, None]
    down, up, rank = _padded_lowrank(packed.tensors, in_f, out_f, n_padded, device)
    return PreparedW4A4(
        qweight=pack_signed_nibbles(codes - 8).contiguous(),
        scales=_per_group_transposed(t["scales"].to(device).float(), n_padded, torch.float32),
        zeros=None if zero is None else _per_group_transposed(zeros - 8, n_padded, torch.int32),
        sums=_per_group_transposed(levels.sum(-1), n_padded, torch.int32),
        act_symmetric=acts["act_symmetric"],
        lowrank_down=down,
        lowrank_up=up,
        rank=rank,
        in_features=in_f,
        out_features=out_f,
    )


# Codebook (vq) weights: the qk-lut layout lives in qcore_kernels.lut_layout.
from qcore_kernels.lut_layout import PreparedLUT, to_lut  # noqa: E402,F401
