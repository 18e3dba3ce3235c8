"""The GPTQ solver (Frantar et al., 2022), on one weight matrix and its Hessian.

Columns are quantized one at a time; the rounding error of column ``j``, divided by the
``j``-th diagonal element of the upper Cholesky factor ``U`` of ``H⁻¹``, is spread over the
not-yet-quantized columns through row ``j`` of ``U`` (the optimal brain surgeon update of
the paper, Eq. 3, in its Cholesky form). Updates inside a block of ``block_size``
columns are applied immediately; the accumulated effect on later columns is applied once
per block ("lazy batch" updates), which turns most of the work into one matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcore import ops
from qcore.ops import grid_from_range, max_code, n_groups, zero_points
from qcore.scheme import PER_CHANNEL
from qcore_plugin_gptq.options import GPTQOptions


class GPTQError(ops.HessianFactorError):
    """The Hessian could not be factorised even with strong dampening."""


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [out, in], natural column order
    scales: torch.Tensor  # [out, n_groups]
    zeros: torch.Tensor | None  # uint8 [out, n_groups] or None (symmetric)
    g_idx: torch.Tensor | None  # int32 [in] when columns are not grouped in natural order
    dampening: float  # the relative dampening that was finally used


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λ·mean(diag H)·I)⁻¹``; λ grows ×10 on failure
    (:func:`qcore.ops.inverse_hessian_factor`, raising :class:`GPTQError`)."""
    return ops.inverse_hessian_factor(hessian, dampening, method="GPTQ",
                                      option="gptq.dampening", error=GPTQError)


def search_grid(span: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype,
                shrink_steps: int, max_shrink: float,
                norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row grid over ``span`` ``[rows, cols]``: the range ``[min, max]`` shrunk by the
    factor (from 1 down to ``1 - max_shrink``) that minimises ``sum |w - q(w)|^norm``
    (the error-weighted grid of the GPTQ paper's reference code; ``norm`` 2.4 weighs
    large errors a little more than squares do)."""
    lo, hi = span.amin(1), span.amax(1)
    factors = 1.0 - torch.arange(shrink_steps, device=span.device, dtype=torch.float32) * (
        max_shrink / max(shrink_steps - 1, 1))
    scale, zero = grid_from_range(lo[None] * factors[:, None], hi[None] * factors[:, None],
                                  bits, symmetric, scale_dtype)  # [steps, rows]
    zf = zero_points(scale, zero, bits)[..., None]
    sf = scale.float()[..., None]
    # |(clamp(round(w / s) + z) - z) * s - w| ** norm for every factor, in one
    # [steps, rows, cols] buffer updated in place (a temporary per operation would cost
    # as much as the arithmetic).
    err = torch.div(span, sf)
    err.round_().add_(zf).clamp_(0, max_code(bits)).sub_(zf).mul_(sf).sub_(span)
    best = err.abs_().pow_(norm).sum(-1).argmin(0)
    rows = torch.arange(span.shape[0], device=span.device)
    return scale[best, rows], None if zero is None else zero[best, rows]


def _group_span(block: torch.Tensor, i: int, weight: torch.Tensor, after: int,
                group_size: int) -> torch.Tensor:
    """The ``group_size`` columns from the block's ``i``-th on, as they are now: the rest
    of the block (``block`` holds its columns as rows), then the columns of ``weight``
    from ``after`` on (not yet updated by this block's errors). ``[out, <= group_size]``."""
    inside = block[i:i + group_size].T
    missing = group_size - inside.shape[1]
    if missing > 0 and after < weight.shape[1]:
        return torch.cat([inside, weight[:, after:after + missing]], dim=1)
    return inside.contiguous()


def _group_grid(span: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype,
                shrink_steps: int, max_shrink: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points of one group's columns ``span``: searched, or min-max."""
    if shrink_steps > 1:
        return search_grid(span, bits, symmetric, scale_dtype, shrink_steps, max_shrink)
    return grid_from_range(span.amin(1), span.amax(1), bits, symmetric, scale_dtype)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int,
         symmetric: bool, options: GPTQOptions | None = None) -> GPTQResult:
    """Quantize ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` (not modified),
    with ``options`` (:class:`GPTQOptions`' defaults when None)."""
    o = options if options is not None else GPTQOptions()
    act_order, static_groups, block_size = o.act_order, o.static_groups, o.block_size
    shrink_steps, max_shrink = o.shrink_steps, o.max_shrink
    scale_dtype = getattr(torch, o.scale_dtype)
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} for a weight with "
                         f"{in_f} inputs")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    if not torch.isfinite(H).all():
        raise GPTQError("GPTQ: the Hessian holds NaN or inf; the calibration activations "
                        "overflowed")
    # Input columns that never saw a non-zero activation carry no information: their
    # weights cannot matter to the output, so they are zeroed and given a unit diagonal.
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    gs = in_f if group_size == PER_CHANNEL else group_size
    groups = n_groups(in_f, group_size)
    scales = torch.empty(out_f, groups, dtype=scale_dtype, device=W.device)
    zeros = None if symmetric else torch.empty(out_f, groups, dtype=torch.uint8, device=W.device)
    if static_groups:  # each group's grid from its columns before any update
        for g in range(groups):
            s, z = _group_grid(W[:, g * gs:(g + 1) * gs], bits, symmetric, scale_dtype,
                               shrink_steps, max_shrink)
            scales[:, g] = s
            if zeros is not None and z is not None:
                zeros[:, g] = z

    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    U, used_damp = inverse_hessian_factor(H, o.dampening)
    del H

    # Group of each position in quantization order.
    positions = torch.arange(in_f, device=W.device)
    original = perm if perm is not None else positions
    group_of_position = (original // gs) if static_groups else (positions // gs)
    group_at = group_of_position.tolist()
    # Column j's codes are row j: the per-column work below reads and writes contiguous
    # rows, not strided columns.
    codes_t = torch.empty(in_f, out_f, dtype=torch.uint8, device=W.device)
    maxq = max_code(bits)
    scale_col = zero_col = None
    current_group = -1

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        block = W[:, i1:i2].T.contiguous()  # the block's columns, as rows
        errors = torch.empty_like(block)
        update = torch.empty_like(block)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = group_at[j]
            if g != current_group:
                if not static_groups:
                    # Group parameters from the columns as they are now (already updated
                    # by the errors of every earlier column).
                    s, z = _group_grid(_group_span(block, i, W, i2, gs), bits, symmetric,
                                       scale_dtype, shrink_steps, max_shrink)
                    scales[:, g] = s
                    if zeros is not None and z is not None:
                        zeros[:, g] = z
                scale_col = scales[:, g].float()
                zero_col = zero_points(scales[:, g], None if zeros is None else zeros[:, g], bits)
                current_group = g
            w = block[i]
            q = torch.div(w, scale_col).round_().add_(zero_col).clamp_(0, maxq)
            codes_t[j] = q
            err = torch.sub(w, q.sub_(zero_col).mul_(scale_col), out=errors[i]).div_(U1[i, i])
            if i + 1 < i2 - i1:
                rest = update[:i2 - j - 1]
                torch.mul(U1[i, i + 1:, None], err, out=rest)
                block[i + 1:].sub_(rest)
        if i2 < in_f:
            W[:, i2:].sub_(errors.T @ U[i1:i2, i2:])

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes_t = codes_t[inverse]
        if not static_groups:
            g_idx = group_of_position[inverse].to(torch.int32)
    return GPTQResult(codes=codes_t.T.contiguous(), scales=scales, zeros=zeros, g_idx=g_idx,
                      dampening=used_damp)
