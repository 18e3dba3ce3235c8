"""The math of SVDQuant on one weight: randomized SVD, the low-rank split, smoothing.

A weight ``W`` ``[out, in]`` becomes ``L + R`` with ``L = up @ down`` of rank ``r`` kept in
16 bits and the residual ``R`` quantized. The branch is refitted to what the quantized
residual misses, ``L ← SVD_r(W − Q(W − L))``, from ``L = SVD_r(W)``, and the split with
the smallest ``‖W − L − Q(W − L)‖`` is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qcore.ops import (
    dequantize_codes,
    fake_quantize_activations,
    group_index,
    minmax_grid,
    quantize_codes,
)
from qcore.scheme import Scheme

Quantize = Callable[[torch.Tensor], torch.Tensor]


def randomized_svd(a: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2,
                   seed: int = 0, start: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading singular triplets ``U [m, k]``, ``S [k]``, ``Vh [k, n]`` of ``a``
    (float32), ``k = rank + oversample`` (at most the matrix's smaller side; the first
    ``rank`` are the ones asked for, the rest serve as ``start`` of a later call), by a
    seeded randomized range finder (Halko et al.): a Gaussian sketch of ``k`` columns (or
    the given ``start`` ``[n, k]``, e.g. the previous call's ``Vhᵀ`` for a matrix that
    changed a little), ``power_iters`` re-orthonormalised power steps, then the exact SVD
    of the small projected matrix. Where the sketch would cover the whole matrix, the
    exact SVD is taken instead."""
    a = a.float()
    m, n = a.shape
    k = min(rank + oversample, m, n)
    if k >= min(m, n) or rank == 0:
        return torch.linalg.svd(a, full_matrices=False)
    if start is None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        start = torch.randn(n, k, generator=g).to(a.device)
    q, _ = torch.linalg.qr(a @ start)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ q)
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return q @ u_small, s, vh


def branch_of(w: torch.Tensor, rank: int, dtype: torch.dtype, seed: int = 0,
              start: torch.Tensor | None = None, power_iters: int = 2,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(down [r, in], up [out, r])`` in ``dtype`` with ``up @ down`` the best rank-``r``
    approximation of ``w`` (the singular values split evenly between the factors), and
    the right singular basis found (``start`` of a later call)."""
    u, s, vh = randomized_svd(w, rank, seed=seed, start=start, power_iters=power_iters)
    root = s[:rank].sqrt()
    return ((root[:, None] * vh[:rank]).to(dtype), (u[:, :rank] * root[None, :]).to(dtype),
            vh.T)


@dataclass
class Split:
    """A weight split into a branch and a residual, ``w = up @ down + residual`` exactly
    (the residual is taken against the branch as stored, rounded to its dtype)."""

    down: torch.Tensor
    up: torch.Tensor
    residual: torch.Tensor
    #: ‖W − L − Q(W − L)‖_F of the initial SVD and of each refit, in order.
    errors: list[float] = field(default_factory=list)
    #: the refit kept (0 = the plain SVD).
    chosen: int = 0


def lowrank_split(w: torch.Tensor, rank: int, quantize: Quantize, *, iters: int = 100,
                  tol: float = 1e-3, dtype: torch.dtype = torch.float16, seed: int = 0) -> Split:
    """Split ``w`` (float32 ``[out, in]``) into a rank-``rank`` branch in ``dtype`` and a
    residual for ``quantize`` (a quantize-dequantize of a weight).

    From ``L = SVD_r(W)``, up to ``iters`` refits ``L ← SVD_r(W − Q(W − L))``; each step's
    total error ``‖W − L − Q(W − L)‖_F`` is measured, the best split is kept, and the
    refits stop early once an error is not ``tol`` (relative) below the best so far."""
    w = w.float()
    if rank == 0:
        empty = w.new_zeros(0, w.shape[1]).to(dtype), w.new_zeros(w.shape[0], 0).to(dtype)
        return Split(*empty, residual=w.clone(), errors=[float((w - quantize(w)).norm())])
    best: Split | None = None
    target, basis = w, None
    for step in range(iters + 1):
        # The target moves little between refits: one power step from the last basis
        # tracks its leading subspace.
        down, up, basis = branch_of(target, rank, dtype, seed=seed, start=basis,
                                    power_iters=2 if step == 0 else 1)
        residual = w - up.float() @ down.float()
        quantized = quantize(residual)
        err = float((residual - quantized).norm())
        if best is None:
            best = Split(down, up, residual, [err], 0)
        else:
            best.errors.append(err)
            improved = err < best.errors[best.chosen] * (1 - tol)
            if err < best.errors[best.chosen]:
                best.down, best.up, best.residual, best.chosen = down, up, residual, step
            if not improved:
                break
        target = w - quantized
    assert best is not None
    return best


def rtn_quantizer(scheme: Scheme, scale_dtype: torch.dtype) -> Quantize:
    """Round-to-nearest quantize-dequantize on the scheme's min-max grid (the built-in
    ``rtn`` quantizer's grid: ``minmax_grid`` and ``quantize_codes``)."""
    def quantize(w: torch.Tensor) -> torch.Tensor:
        scales, zeros = minmax_grid(w, scheme.bits, scheme.group_size, scheme.symmetric,
                                    scale_dtype)
        g_idx = group_index(w.shape[1], scheme.group_size, w.device)
        codes = quantize_codes(w, scales, zeros, scheme.bits, g_idx)
        return dequantize_codes(codes, scales, zeros, scheme.bits, g_idx)
    return quantize


def quantize_inputs(x: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The activations as the quantized layer will see them (dynamic scales; unchanged
    for weight-only schemes)."""
    if scheme.act_bits is None:
        return x
    return fake_quantize_activations(x, scheme.act_bits, None, scheme.act_group_size,
                                     scheme.act_symmetric)


def smoothing_scales(x_span: torch.Tensor, w_span: torch.Tensor, alpha: float,
                     beta: float) -> torch.Tensor:
    """Per-input-channel scales ``s = span_x^α / span_w^β`` (spans clamped away from zero),
    normalised so that ``max(s) · min(s) = 1``. The layer computes ``(x / s) (W s)ᵀ``."""
    s = x_span.float().clamp_min(1e-5).pow(alpha) / w_span.float().clamp_min(1e-5).pow(beta)
    s = s.clamp_min(1e-5)
    return s / (s.max() * s.min()).sqrt()


def output_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor | None,
                 rank: int, quantize: Quantize, scheme: Scheme, *, iters: int,
                 dtype: torch.dtype, reference: torch.Tensor) -> float:
    """‖reference − ŷ‖² on the sample ``x`` for the linears ``weights`` (sharing ``x``),
    each smoothed by ``s`` (None: not smoothed), split with a rank-``rank`` branch
    (``iters`` refits), its residual quantized by ``quantize`` and its input by the
    scheme's activation grid; the branch sees the unquantized input."""
    xs = x if s is None else x / s
    xq = quantize_inputs(xs, scheme)
    outs = []
    for w in weights:
        ws = w if s is None else w * s
        split = lowrank_split(ws, rank, quantize, iters=iters, dtype=dtype)
        y = xq @ quantize(split.residual).T
        if rank:
            y = y + (xs @ split.down.float().T) @ split.up.float().T
        outs.append(y)
    return float((torch.cat(outs, dim=1) - reference).pow(2).sum())
