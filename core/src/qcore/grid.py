"""Integer grids: scales and zero points from a weight, codes, and back.

Conventions (the ``"int"`` logical format, see :class:`qcore.interfaces.QuantizedWeight`):

- Asymmetric: the range ``[min(w, 0), max(w, 0)]`` of each group maps onto
  ``0 .. 2**bits - 1`` with ``scale = (max - min) / (2**bits - 1)`` and an integer zero
  point ``round(-min / scale)``; ``w ≈ (code - zero) * scale``.
- Symmetric (compressed-tensors' convention): ``scale = max|w| / ((2**bits - 1) / 2)``
  (``max|w| / 7.5`` at 4 bits), signed levels ``-2**(bits-1) .. 2**(bits-1) - 1`` stored
  as unsigned codes offset by ``2**(bits-1)``, the implicit zero point.

Scales are rounded to their storage dtype (float16 by default) *before* the codes are
computed, so the stored grid is the one the codes were chosen on.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from qcore.scheme import PER_CHANNEL

if TYPE_CHECKING:
    from qcore.interfaces import QuantizedWeight


def n_groups(in_features: int, group_size: int) -> int:
    """Groups per row; the last one is shorter when ``group_size`` does not divide."""
    return 1 if group_size == PER_CHANNEL else math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Group of each input column in natural order: ``column // group_size``."""
    cols = torch.arange(in_features, device=device, dtype=torch.int32)
    return torch.zeros_like(cols) if group_size == PER_CHANNEL else cols // group_size


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def _scale_floor(dtype: torch.dtype) -> float:
    """The smallest positive scale ``dtype`` can store. For float16 that is a subnormal
    (2**-24): groups of tiny weights keep a scale near their own, not the smallest normal
    number (6.1e-5), which would flatten every group whose max |w| is below ~5e-4."""
    if not dtype.is_floating_point:
        return 1e-12
    info = torch.finfo(dtype)
    return float(getattr(info, "smallest_subnormal", None) or info.tiny * info.eps)


def grid_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (in ``scale_dtype``) and zero points (uint8, None if symmetric) for groups
    whose weights span ``[wmin, wmax]`` (any matching shapes)."""
    wmin = wmin.float()
    wmax = wmax.float()
    if symmetric:
        absmax = torch.maximum(wmin.abs(), wmax.abs())
        scale = absmax / (max_code(bits) / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale.clamp_min(_scale_floor(scale_dtype)).to(scale_dtype), None
    lo = torch.clamp(wmin, max=0.0)
    hi = torch.clamp(wmax, min=0.0)
    scale = (hi - lo) / max_code(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp_min(_scale_floor(scale_dtype)).to(scale_dtype)
    zero = torch.round(-lo / scale.float()).clamp(0, max_code(bits))
    return scale, zero.to(torch.uint8)


def minmax_grid(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max grid of each ``[row, group]`` of ``weight`` (``[out, in]``): scales
    ``[out, n_groups]`` and zero points ``[out, n_groups]`` (None if symmetric)."""
    out_f, in_f = weight.shape
    w = weight.float()
    if group_size == PER_CHANNEL:
        return grid_from_range(w.amin(1, keepdim=True), w.amax(1, keepdim=True), bits,
                               symmetric, scale_dtype)
    groups = n_groups(in_f, group_size)
    pad = groups * group_size - in_f
    if pad:
        # Padding with zeros changes neither min(w, 0), max(w, 0) nor max|w|.
        w = torch.nn.functional.pad(w, (0, pad))
    w = w.view(out_f, groups, group_size)
    return grid_from_range(w.amin(2), w.amax(2), bits, symmetric, scale_dtype)


def zero_points(scales: torch.Tensor, zeros: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Zero points as float, with the implicit symmetric one filled in."""
    if zeros is None:
        return torch.full_like(scales, float(1 << (bits - 1)), dtype=torch.float32)
    return zeros.float()


def quantize_codes(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
    g_idx: torch.Tensor,
) -> torch.Tensor:
    """Codes (uint8 ``[out, in]``) of ``weight`` on the grid; columns grouped by ``g_idx``."""
    gi = g_idx.long()
    scale = scales.float()[:, gi]
    zero = zero_points(scales, zeros, bits)[:, gi]
    return torch.clamp(torch.round(weight.float() / scale) + zero, 0, max_code(bits)).to(torch.uint8)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
    g_idx: torch.Tensor, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(codes - zero) * scale`` per column group, in ``dtype``."""
    gi = g_idx.long()
    zero = zero_points(scales, zeros, bits)[:, gi]
    return ((codes.float() - zero) * scales.float()[:, gi]).to(dtype)


def effective_g_idx(qweight: QuantizedWeight) -> torch.Tensor:
    g_idx = qweight.tensors.get("g_idx")
    if g_idx is not None:
        return g_idx
    return group_index(qweight.shape[1], int(qweight.params["group_size"]),  # type: ignore[arg-type]
                       qweight.tensors["codes"].device)


def dequantize_int(qweight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight of an ``"int"``-format :class:`QuantizedWeight`."""
    t = qweight.tensors
    return dequantize_codes(t["codes"], t["scales"], t.get("zeros"),
                            int(qweight.params["bits"]), effective_g_idx(qweight), dtype)  # type: ignore[arg-type]


def quantize_activations(x: torch.Tensor, bits: int,
                         scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric activation codes (float32, integer-valued) and their float32 scale: per
    token (``scale`` None, dynamic) or a static per-tensor ``scale``. Levels
    ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1``."""
    qmax = (1 << (bits - 1)) - 1
    if scale is None:
        scale = x.abs().amax(dim=-1, keepdim=True).float() / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round(x.float() / scale), -qmax, qmax), scale


def quantize_activation_groups(
    x: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dynamic activation codes per ``[token, group]`` of ``group_size`` input columns
    (``-1``: the whole token). Returns codes ``[..., groups, group_size]`` (float32,
    integer-valued; columns past the input's end, in the last group, are zero), scales
    ``[..., groups]`` (float32) and zero points (float32, None when symmetric).

    - Symmetric: ``scale = max|x| / (2**(bits-1) - 1)``, codes ``round(x / scale)`` in
      ``±(2**(bits-1) - 1)``, ``x ≈ code * scale``.
    - Asymmetric: the range ``[min(x, 0), max(x, 0)]`` onto ``0 .. 2**bits - 1``,
      ``scale = range / (2**bits - 1)``, zero point ``round(-min / scale)``, codes
      ``clamp(round(x / scale) + zero)``, ``x ≈ (code - zero) * scale``.

    A group of zeros gets scale 1. The division is a true float32 division, so a kernel
    that divides the same way reproduces the codes exactly."""
    in_f = x.shape[-1]
    size = in_f if group_size == PER_CHANNEL else group_size
    groups = math.ceil(in_f / size)
    xf = x.float()
    pad = groups * size - in_f
    if pad:  # zeros change neither max|x| nor min(x, 0), max(x, 0)
        xf = torch.nn.functional.pad(xf, (0, pad))
    xg = xf.reshape(*x.shape[:-1], groups, size)
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = xg.abs().amax(dim=-1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.clamp(torch.round(xg / scale[..., None]), -qmax, qmax), scale, None
    top = max_code(bits)
    lo = xg.amin(dim=-1).clamp(max=0.0)
    hi = xg.amax(dim=-1).clamp(min=0.0)
    scale = (hi - lo) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), 0, top)
    codes = torch.clamp(torch.round(xg / scale[..., None]) + zero[..., None], 0, top)
    return codes, scale, zero


def fake_quantize_activations(
    x: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
    group_size: int = PER_CHANNEL, symmetric: bool = True,
) -> torch.Tensor:
    """Activation quantize-dequantize, in ``x``'s dtype: per token or static per tensor
    (:func:`quantize_activations`), or in groups of ``group_size`` columns with an
    optional asymmetric grid (:func:`quantize_activation_groups`, dynamic only)."""
    if group_size == PER_CHANNEL and symmetric:
        q, scale = quantize_activations(x, bits, scale)
        return (q * scale).to(x.dtype)
    if scale is not None:
        raise ValueError("a static activation scale is one symmetric scale per tensor; "
                         "grouped or asymmetric activation grids are dynamic")
    codes, scales, zeros = quantize_activation_groups(x, bits, group_size, symmetric)
    if zeros is not None:
        codes = codes - zeros[..., None]
    out = (codes * scales[..., None]).reshape(*x.shape[:-1], -1)
    return out[..., : x.shape[-1]].to(x.dtype)
