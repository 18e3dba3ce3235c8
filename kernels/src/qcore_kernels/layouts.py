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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcore.interfaces import PackedWeight
from qcore.ops import IntPacker, zero_points
from qcore_kernels.support import w8a8_unsupported_reason, wq_unsupported_reason


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


# Codebook (vq) weights: the qk-lut layout lives in qcore_kernels.lut_layout.
from qcore_kernels.lut_layout import PreparedLUT, to_lut  # noqa: E402,F401
