"""Conversion from the core's ``int-packed`` layout to the kernels' own layouts.

Pure torch, on any device: the providers run it once per layer in ``prepare``; tests run
it on the CPU. Both layouts are documented at the top of their CUDA sources.

``qk-wq`` (W4A16/W8A16, ``qk_wq.cu``): codes repacked so that each 32-bit word holds
``32 / bits`` consecutive codes of one row (the int packer's stream format straddles
words at 3 bits and interleaves bit planes per 32 codes); scales and zero points in the
activation dtype. Act-order weights (``g_idx``) are permuted so that groups are
contiguous; the permutation is applied to the activations at run time.

``qk-w8a8`` (``qk_w8a8.cu``): signed int8 codes (code - 128) and float32 per-channel scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcore.builtin.int_packer import IntPacker
from qcore.grid import zero_points
from qcore.interfaces import PackedWeight
from qcore_kernels.support import w8a8_unsupported_reason, wq_unsupported_reason


class LayoutError(ValueError):
    """A packed weight that the kernels' layouts cannot hold."""


@dataclass
class PreparedWQ:
    qweight: torch.Tensor  # int32 [N, K * bits / 32]
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
        codes = unpack_words(self.qweight, self.bits, self.in_features)
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


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 [N, K * bits / 32]: ``32 / bits`` codes per word, low
    bits first."""
    per_word = 32 // bits
    n, k = codes.shape
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (codes.view(n, k // per_word, per_word).to(torch.int64) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_words(words: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_words`: uint8 [N, in_features]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    codes = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :in_features].to(torch.uint8)


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
        qweight=pack_words(codes.contiguous(), bits),
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
