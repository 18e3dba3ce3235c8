"""The VPTQ solver (Liu et al., 2024) on one weight matrix and its Hessian.

A weight ``[out, in]`` is cut along the input dimension into vectors of ``v`` consecutive
columns; each row's vector is replaced by an entry of a learned codebook (k-means on the
weight's vectors, weighted by the Hessian diagonal of their columns). Quantization is
GPTQ's optimal-brain-surgeon procedure with a vector in place of a scalar
("channel-independent second-order optimisation", the paper's section 4.1): with ``U``
the upper Cholesky factor of ``H⁻¹`` (columns in processing order) and ``S`` the ``v``
columns of one vector position,

- each row's vector ``w_S`` takes the entry ``c`` minimising the loss increase
  ``|| (w_S - c) U_SS⁻¹ ||²`` (the exact OBS cost of fixing those columns: the
  Mahalanobis distance of ``[H⁻¹]_SS``, computed on the transformed codebook
  ``c U_SS⁻¹``, so the search is still one matrix product per position);
- the error ``E = (w_S - c) U_SS⁻¹`` is spread over the columns not yet quantized:
  ``W_R -= E U_SR`` (GPTQ's update, Eq. 3 of the GPTQ paper, for a block of columns),
  applied lazily per block of ``block_size`` columns.

Options: a residual stage (a second codebook, fitted on the residuals of the first,
searched on the residual of each vector: the paper's residual VQ), outlier columns (the
columns with the largest Hessian diagonal, cut into vectors with their own codebook and
quantized first), a per-output-channel normalisation (the format's ``scale`` and
``offset``: the codebook then serves rows of different magnitudes) and "act-order" over
vector positions (most important positions first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from qcore.ops import HessianFactorError, inverse_hessian_factor
from qcore_plugin_vptq.kmeans import kmeans, nearest_centroid

Normalization = Literal["none", "scale", "scale_offset"]
#: How each vector picks its entry: ``"obs"`` the second-order procedure above; the others
#: assign every vector to its nearest entry with no error feedback, under the Hessian
#: diagonal of the columns (``"diagonal"``) or plainly (``"euclidean"``).
Search = Literal["obs", "diagonal", "euclidean"]
#: k-means weights: per element (its column's Hessian diagonal times its row's scale²)
#: or per vector (their sum; plain Euclidean assignment, cheaper).
KMeansWeighting = Literal["element", "vector"]


class VPTQError(HessianFactorError):
    """The Hessian could not be used (NaN, or not positive definite with any dampening)."""


@dataclass
class Part:
    """The columns of one part of the weight (main or outliers) and what encodes them."""

    columns: torch.Tensor  # int64 [n_cols], increasing
    vector_size: int
    codebook: torch.Tensor | None = None  # float32 [k, v], values representable in fp16
    res_codebook: torch.Tensor | None = None
    indices: torch.Tensor | None = None  # int32 [out, n_vec]
    res_indices: torch.Tensor | None = None

    @property
    def n_vectors(self) -> int:
        return -(-self.columns.numel() // self.vector_size)

    def vector_columns(self, j: int) -> torch.Tensor:
        return self.columns[j * self.vector_size:(j + 1) * self.vector_size]


@dataclass
class VPTQResult:
    """The ``"vq"`` format's tensors (see docs/codebook-format.md) and the settings used."""

    tensors: dict[str, torch.Tensor]
    index_bits: int
    res_index_bits: int
    outlier_index_bits: int
    n_outliers: int
    dampening: float


def row_normalization(weight: torch.Tensor, mode: Normalization
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-output-channel ``scale`` and ``offset`` (float16, as the format stores them)
    so that ``(W - offset) / scale`` has rows of zero mean (with an offset) and unit RMS."""
    if mode == "none":
        return None, None
    offset = weight.mean(1) if mode == "scale_offset" else weight.new_zeros(weight.shape[0])
    offset16 = offset.to(torch.float16)
    centred = weight - offset16.float()[:, None]
    rms = centred.square().mean(1).sqrt()
    # A constant row has nothing to scale; fp16 cannot hold what underflows it.
    scale16 = torch.where(rms > 0, rms, torch.ones_like(rms)).to(torch.float16)
    scale16 = torch.where(scale16 > 0, scale16, torch.ones_like(scale16))
    return scale16, (offset16 if mode == "scale_offset" else None)


def part_vectors(weight: torch.Tensor, part: Part) -> torch.Tensor:
    """The part's vectors ``[out, n_vec, v]``; a partial last vector is zero-padded."""
    out_f = weight.shape[0]
    v = part.vector_size
    cols = weight[:, part.columns]
    pad = part.n_vectors * v - part.columns.numel()
    if pad:
        cols = torch.nn.functional.pad(cols, (0, pad))
    return cols.reshape(out_f, part.n_vectors, v)


def part_weights(column_weight: torch.Tensor, row_weight: torch.Tensor, part: Part) -> torch.Tensor:
    """Per-element k-means weights ``[out, n_vec, v]``: row weight × column weight; zero
    on the padding of a partial last vector (it is not stored)."""
    v = part.vector_size
    cw = column_weight[part.columns]
    pad = part.n_vectors * v - part.columns.numel()
    if pad:
        cw = torch.nn.functional.pad(cw, (0, pad))
    return row_weight[:, None, None] * cw.reshape(1, part.n_vectors, v)


def fp16_values(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to float16 (what the format stores), kept in float32."""
    return t.to(torch.float16).float()


def fit_codebooks(part: Part, vectors: torch.Tensor, weights: torch.Tensor, *, index_bits: int,
                  res_index_bits: int, iterations: int, max_samples: int, seed: int,
                  weighting: KMeansWeighting = "element") -> None:
    """Weighted k-means codebook(s) of a part, rounded to float16; the residual codebook
    is fitted on the residuals of the vectors' nearest main entries. ``weighting``:
    each element by its own weight, or each vector by the sum of its elements' weights."""
    v = part.vector_size
    flat, flat_w = vectors.reshape(-1, v), weights.reshape(-1, v)
    if weighting == "vector":
        flat_w = flat_w.sum(1, keepdim=True)
    part.codebook = fp16_values(kmeans(flat, 1 << index_bits, flat_w, iterations=iterations,
                                       seed=seed, max_samples=max_samples))
    if res_index_bits:
        if flat.shape[0] > max_samples:
            gen = torch.Generator().manual_seed(seed + 1)
            pick = torch.randperm(flat.shape[0], generator=gen)[:max_samples].to(flat.device)
            flat, flat_w = flat[pick], flat_w[pick]
        residual = flat - part.codebook[nearest_centroid(
            flat, part.codebook, flat_w if weighting == "element" else None)]
        part.res_codebook = fp16_values(kmeans(residual, 1 << res_index_bits, flat_w,
                                               iterations=iterations, seed=seed + 2,
                                               max_samples=max_samples))


def bits_for(codebook: torch.Tensor | None) -> int:
    """Index bits that address every entry of ``codebook`` (at least 1)."""
    return 0 if codebook is None else max(1, math.ceil(math.log2(codebook.shape[0])))


def vptq(weight: torch.Tensor, hessian: torch.Tensor, *, vector_size: int, index_bits: int,
         res_index_bits: int = 0, n_outliers: int = 0, outlier_index_bits: int = 0,
         normalization: Normalization = "scale", search: Search = "obs",
         act_order: bool = True, kmeans_iterations: int = 10, kmeans_samples: int = 32768,
         seed: int = 0, block_size: int = 128, dampening: float = 0.01,
         kmeans_weighting: KMeansWeighting = "element") -> VPTQResult:
    """Quantize ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` (neither is
    modified) into the ``"vq"`` format (``index_bits`` etc. are the largest widths:
    a codebook has fewer entries when the part has fewer distinct vectors, and its
    indices then take fewer bits)."""
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} for a weight with {in_f} inputs")
    if not 0 <= n_outliers < in_f:
        raise ValueError(f"n_outliers={n_outliers} must leave main columns (in_features={in_f})")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    if not torch.isfinite(H).all():
        raise VPTQError("VPTQ: the Hessian holds NaN or inf; the calibration activations "
                        "overflowed")
    # As in GPTQ: an input that never saw a non-zero activation cannot matter to the
    # output, so its weights are zeroed and it gets a unit diagonal.
    diag = torch.diagonal(H).clone()
    dead = diag == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale, offset = row_normalization(W, normalization)
    if scale is not None:
        W = (W - (0.0 if offset is None else offset.float()[:, None])) / scale.float()[:, None]
    # The loss of row r is scale_r² (w - q)ᵀ H (w - q): k-means weighs each element by
    # its row's scale² and its column's Hessian diagonal.
    row_weight = W.new_ones(out_f) if scale is None else scale.float().square()
    row_weight = row_weight / row_weight.mean()

    main, outliers = split_columns(diag, vector_size, n_outliers)
    parts = [main] if outliers is None else [outliers, main]
    for i, part in enumerate(parts):
        fit_codebooks(part, part_vectors(W, part), part_weights(diag, row_weight, part),
                      index_bits=outlier_index_bits if part is outliers else index_bits,
                      res_index_bits=0 if part is outliers else res_index_bits,
                      iterations=kmeans_iterations, max_samples=kmeans_samples,
                      seed=seed + 1000 * i, weighting=kmeans_weighting)
        part.indices = torch.empty(out_f, part.n_vectors, dtype=torch.int32, device=W.device)
        if part.res_codebook is not None:
            part.res_indices = torch.empty_like(part.indices)

    order = processing_order(parts, diag, act_order)
    perm = torch.cat([part.vector_columns(j) for part, j in order])
    if search == "obs":
        upper, used_damp = inverse_hessian_factor(H[perm][:, perm], dampening, method="VPTQ",
                                                  option="vptq.dampening", error=VPTQError)
        quantize_second_order(W[:, perm], upper, order, block_size)
    else:
        used_damp = 0.0
        quantize_nearest(W[:, perm], diag[perm] if search == "diagonal" else None, order)

    assert main.indices is not None and main.codebook is not None
    tensors = {"indices": main.indices, "codebook": main.codebook.to(torch.float16)}
    if main.res_codebook is not None:
        tensors["res_indices"] = main.res_indices  # type: ignore[assignment]
        tensors["res_codebook"] = main.res_codebook.to(torch.float16)
    if outliers is not None:
        assert outliers.indices is not None and outliers.codebook is not None
        tensors["outlier_cols"] = outliers.columns.to(torch.int32)
        tensors["outlier_indices"] = outliers.indices
        tensors["outlier_codebook"] = outliers.codebook.to(torch.float16)
    if scale is not None:
        tensors["scale"] = scale
    if offset is not None:
        tensors["offset"] = offset
    return VPTQResult(tensors=tensors, index_bits=bits_for(main.codebook),
                      res_index_bits=bits_for(main.res_codebook),
                      outlier_index_bits=0 if outliers is None else bits_for(outliers.codebook),
                      n_outliers=n_outliers, dampening=used_damp)


def split_columns(diag: torch.Tensor, vector_size: int,
                  n_outliers: int) -> tuple[Part, Part | None]:
    """The main part and the outlier part (the ``n_outliers`` columns with the largest
    Hessian diagonal, in increasing order as the format stores them; None if none)."""
    if not n_outliers:
        return Part(torch.arange(diag.numel(), device=diag.device), vector_size), None
    outlier_cols = torch.sort(torch.topk(diag, n_outliers).indices).values
    is_main = torch.ones(diag.numel(), dtype=torch.bool, device=diag.device)
    is_main[outlier_cols] = False
    return Part(torch.nonzero(is_main).flatten(), vector_size), Part(outlier_cols, vector_size)


def processing_order(parts: list[Part], diag: torch.Tensor,
                     act_order: bool) -> list[tuple[Part, int]]:
    """Vector positions in the order they are quantized: part by part (outliers first),
    each by decreasing Hessian diagonal with ``act_order`` (GPTQ's act-order, by vector:
    the most important columns are fixed first, while many columns remain to absorb
    their error), else in column order."""
    order: list[tuple[Part, int]] = []
    for part in parts:
        positions = list(range(part.n_vectors))
        if act_order:
            importance = part_weights(diag, diag.new_ones(1), part).sum(-1).flatten()
            positions = torch.argsort(importance, descending=True, stable=True).tolist()
        order += [(part, j) for j in positions]
    return order


def quantize_second_order(W: torch.Tensor, upper: torch.Tensor, order: list[tuple[Part, int]],
                          block_size: int) -> None:
    """The OBS procedure over vector positions (module doc) on ``W`` (columns in
    processing order, modified in place) with ``upper`` the Cholesky factor of ``H⁻¹``
    in the same order; the parts' indices are filled in."""
    in_f = W.shape[1]
    start = 0
    block_start = 0
    errors: list[torch.Tensor] = []
    for n, (part, j) in enumerate(order):
        end = start + part.vector_columns(j).numel()
        cols = slice(start, end)
        w = W[:, cols]
        # The exact OBS cost of fixing these columns: the metric of [H⁻¹]_SS = U_SSᵀ U_SS.
        transform = torch.linalg.solve_triangular(
            upper[cols, cols], torch.eye(end - start, device=W.device), upper=True)
        err = (w - assign(part, j, w, transform)) @ transform
        block_end = _block_end(order, n, block_start, block_size, end)
        W[:, end:block_end] -= err @ upper[cols, end:block_end]
        errors.append(err)
        if end == block_end and end < in_f:
            # Lazy batch update of everything after the block (GPTQ's section 3.2).
            W[:, end:] -= torch.cat(errors, 1) @ upper[block_start:end, end:]
            errors = []
            block_start = end
        start = end


def quantize_nearest(W: torch.Tensor, diag: torch.Tensor | None,
                     order: list[tuple[Part, int]]) -> None:
    """Every vector to its nearest entry, no error feedback: Euclidean, or weighted by
    the columns' Hessian diagonal ``diag`` (in ``W``'s column order)."""
    start = 0
    for part, j in order:
        end = start + part.vector_columns(j).numel()
        transform = None if diag is None else torch.diag(diag[start:end].sqrt())
        assign(part, j, W[:, start:end], transform)
        start = end


def _block_end(order: list[tuple[Part, int]], n: int, block_start: int, block_size: int,
               end: int) -> int:
    """End column of the lazy-update block holding position ``n`` (which ends at ``end``):
    blocks close at the first vector boundary at or after ``block_size`` columns."""
    position_end = end
    for part, j in order[n + 1:]:
        if position_end - block_start >= block_size:
            break
        position_end += part.vector_columns(j).numel()
    return position_end


def assign(part: Part, j: int, w: torch.Tensor, transform: torch.Tensor | None) -> torch.Tensor:
    """Choose the entries of vector position ``j`` for every row (written into the part's
    indices) and return the decoded vectors ``[out, width]``: the distance is
    ``||(w - c) T||²`` with ``T = transform`` (Euclidean without one)."""
    width = w.shape[1]
    codebook = part.codebook[:, :width]  # type: ignore[index]

    def search(target: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        if transform is None:
            return nearest_centroid(target, entries)
        return nearest_centroid(target @ transform, entries @ transform)

    idx = search(w, codebook)
    part.indices[:, j] = idx.to(torch.int32)  # type: ignore[index]
    q = codebook[idx]
    if part.res_codebook is not None:
        res_codebook = part.res_codebook[:, :width]
        res_idx = search(w - q, res_codebook)
        part.res_indices[:, j] = res_idx.to(torch.int32)  # type: ignore[index]
        q = q + res_codebook[res_idx]
    return q
