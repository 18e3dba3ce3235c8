"""The math of AWQ's searches, on one input-sharing group of weights.

Both searches score a candidate by the output error it causes on the calibration inputs,
``‖X Wᵀ − X Ŵᵀ‖²`` summed over all calibration tokens, which equals
``Σ_rows (W − Ŵ) H (W − Ŵ)ᵀ`` with ``H = XᵀX`` (up to a constant: the ``hessian``
observer's running mean of ``2·XᵀX``). So one pass of observation serves every candidate,
and each costs a quantize-dequantize and one matrix product instead of a forward pass.
"""

from __future__ import annotations

import torch

from qcore.ops import grid_from_range, max_code, n_groups, zero_points
from qcore.scheme import PER_CHANNEL, Scheme


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """``w`` ``[rows, in]`` as ``[rows, groups, size]`` (zero-padded), and the pad."""
    rows, in_f = w.shape
    size = in_f if group_size == PER_CHANNEL else group_size
    groups = n_groups(in_f, group_size)
    pad = groups * size - in_f
    if pad:  # zeros change neither min(w, 0), max(w, 0) nor max|w|: the grid is unchanged
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(rows, groups, size), pad


def fake_quantize(
    w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, shrink: torch.Tensor | None = None
) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w`` ``[rows, in]`` on the scheme's min-max
    grid (the built-in ``rtn`` quantizer's grid), with each ``[row, group]`` range
    multiplied by ``shrink`` ``[rows, groups]`` when given (clipping)."""
    wg, pad = _grouped(w.float(), scheme.group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    if shrink is not None:
        lo, hi = lo * shrink, hi * shrink
    scale, zero = grid_from_range(lo, hi, scheme.bits, scheme.symmetric, scale_dtype)
    zf = zero_points(scale, zero, scheme.bits)[..., None]
    sf = scale.float()[..., None]
    q = torch.clamp(torch.round(wg / sf) + zf, 0, max_code(scheme.bits))
    out = ((q - zf) * sf).reshape(w.shape[0], -1)
    return out[:, : w.shape[1]] if pad else out


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``Σ_rows δ H δᵀ``: the summed squared output error of a weight error ``δ``."""
    return ((delta @ hessian) * delta).sum()


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scales ``s = s_x^α``, normalised so that
    ``max(s) · min(s) = 1``; ``α = 0`` gives all ones."""
    s = x_mean.float().clamp_min(1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def search_alpha(
    weight: torch.Tensor,
    x_mean: torch.Tensor,
    hessian: torch.Tensor,
    grid: int,
    quantize,
    score=None,
) -> tuple[float, torch.Tensor, list[float]]:
    """The α in ``{0, 1/grid, ..., (grid-1)/grid}`` whose scales minimise the group's output
    error when ``weight · s`` is quantized by ``quantize(weight · s, s)`` (and divided
    back by ``s``); ``score(ŵ)``, when given, replaces the output error (e.g. the block's).
    Returns (α, scales, the error of every α)."""
    w = weight.float()
    h = hessian.float()
    errors = []
    best = (float("inf"), 0.0, torch.ones_like(x_mean, dtype=torch.float32))
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(x_mean, alpha)
        w_hat = quantize(w * s, s) / s
        err = float(output_error(w - w_hat, h)) if score is None else score(w_hat)
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2], errors


def search_clip(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    scale_dtype: torch.dtype,
    grid: int,
    max_shrink: float,
) -> torch.Tensor:
    """Per ``[row, group]`` shrink factor of the range (from 1 down to ``1 - max_shrink``,
    ``grid`` steps) that minimises that group's output error ``δ H_gg δᵀ`` (the error its
    inputs alone cause, as in AWQ). Returns ``[rows, groups]`` factors."""
    w = weight.float()
    wg, pad = _grouped(w, scheme.group_size)
    rows, groups, size = wg.shape
    h = torch.nn.functional.pad(hessian.float(), (0, pad, 0, pad))
    blocks = torch.stack(
        [h[g * size : (g + 1) * size, g * size : (g + 1) * size] for g in range(groups)]
    )
    best_err = torch.full((rows, groups), float("inf"))
    best = torch.ones(rows, groups)
    for i in range(grid):
        factor = 1.0 - max_shrink * i / grid
        shrink = torch.full((rows, groups), factor)
        delta = wg - _grouped(fake_quantize(w, scheme, scale_dtype, shrink), scheme.group_size)[0]
        err = torch.einsum("rgi,gij,rgj->rg", delta, blocks, delta)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, factor), best)
    return best
