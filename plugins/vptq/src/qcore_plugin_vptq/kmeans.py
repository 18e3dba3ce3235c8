"""Weighted k-means on short weight vectors, and nearest-centroid search.

Every distance is a weighted squared Euclidean distance ``sum_d w_d (x_d - c_d)^2`` with a
weight per vector and dimension (VPTQ weights a weight's error by the Hessian diagonal of
its input column; a zero weight drops a dimension, which is how a part's last, partial
vector is handled). Expanded, ``-2 (w*x)·c + w·(c*c)`` plus a term that does not depend
on the centroid, so the search over all centroids is two matrix products, done in chunks
of vectors to bound memory. Nothing loops over vectors in Python.
"""

from __future__ import annotations

import torch

#: Vectors x centroids per chunk of a distance matrix: 1 MiB of float32, which stays in
#: the CPU's cache between the product and the argmin (faster than 64 MiB chunks).
CHUNK_ELEMENTS = 1 << 18


def nearest_centroid(vectors: torch.Tensor, codebook: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Index (int64 ``[n]``) of the centroid of ``codebook`` ``[k, v]`` nearest to each of
    ``vectors`` ``[n, v]`` under the weighted distance (``weights`` ``[n, v]`` or
    ``[v]``; None: plain Euclidean)."""
    n, k = vectors.shape[0], codebook.shape[0]
    codebook = codebook.float()
    out = torch.empty(n, dtype=torch.int64, device=vectors.device)
    rows = max(1, CHUNK_ELEMENTS // max(k, 1))
    if weights is None or weights.dim() == 1:
        w = None if weights is None else weights.float()
        scaled = codebook if w is None else codebook * w
        norms = (scaled * codebook).sum(1)  # [k]: w·(c*c)
        for start in range(0, n, rows):
            x = vectors[start:start + rows].float()
            scores = torch.addmm(norms, x, scaled.T, alpha=-2.0)
            out[start:start + rows] = scores.argmin(1)
        return out
    squares = (codebook * codebook).T  # [v, k]
    for start in range(0, n, rows):
        x = vectors[start:start + rows].float()
        w = weights[start:start + rows].float()
        scores = torch.addmm(w @ squares, x * w, codebook.T, alpha=-2.0)
        out[start:start + rows] = scores.argmin(1)
    return out


def weighted_distances(vectors: torch.Tensor, centroids: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """``sum_d w_d (x_d - c_d)^2`` of each vector to its own centroid (``[n]``)."""
    return ((vectors - centroids).square() * weights).sum(1)


def kmeans(vectors: torch.Tensor, k: int, weights: torch.Tensor | None = None, *,
           iterations: int = 10, seed: int = 0, max_samples: int | None = None,
           init_rounds: int = 32) -> torch.Tensor:
    """A codebook (float32 ``[k', v]``, ``k' <= k``) for ``vectors`` ``[n, v]`` by weighted
    k-means (Lloyd's iterations), deterministic for a given ``seed``.

    ``weights`` ``[n, v]`` (default: ones) weight each vector's dimensions in the
    distance and in the centroid means (a centroid's coordinate is the weighted mean of
    its vectors' coordinates); ``[n, 1]`` weighs whole vectors (the distance is then
    plain Euclidean, one matrix product cheaper). When there are at most ``k`` distinct
    vectors, they are the codebook (exact). ``max_samples``: cluster a seeded subsample
    of that many vectors, drawn by weight (:func:`_importance_sample`), which keeps large
    layers fast. The initial centroids are drawn by k-means++ (D² sampling),
    ``ceil(k / init_rounds)`` at a time, so the initialisation costs ``init_rounds``
    passes instead of ``k``; an empty cluster is re-seeded at the vector that the current
    centroids fit worst. Centroids that coincide are returned once.
    """
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ValueError(f"k-means needs vectors [n, v] with n >= 1, got {tuple(vectors.shape)}")
    if k < 1:
        raise ValueError(f"k-means needs k >= 1 centroids, got {k}")
    x = vectors.float()
    w = torch.ones(x.shape[0], 1, device=x.device) if weights is None else weights.float()
    if w.shape[1] != 1:
        w = w.expand_as(x)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if x.shape[0] <= k:
        return torch.unique(x, dim=0)
    # More vectors than k but at most k distinct ones: k-means++ runs out of vectors
    # away from every centroid and returns exactly the distinct ones.
    if max_samples is not None and x.shape[0] > max_samples:
        x, w = _importance_sample(x, w, max_samples, gen)
    centroids, exhausted = _kmeans_plus_plus(x, w, k, gen, init_rounds)
    if exhausted:  # every vector is one of the centroids: exact
        return torch.unique(centroids, dim=0)
    assignment = None
    search_weights = w if w.shape[1] > 1 else None  # a weight per vector: argmin unchanged
    for _ in range(iterations):
        new_assignment = nearest_centroid(x, centroids, search_weights)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        centroids = _update_centroids(x, w, assignment, centroids)
    # Two centroids that met are one entry (a re-seeded cluster may land on another).
    return torch.unique(centroids, dim=0)


def _importance_sample(x: torch.Tensor, w: torch.Tensor, n: int,
                       gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` vectors drawn without replacement with probability proportional to their
    total weight, each then weighted by ``w / total`` (the importance correction of that
    draw): heavy vectors, which k-means must fit well and a uniform draw often misses,
    are kept, and the clustering objective stays the weighted one in expectation."""
    total = w.sum(1) if w.shape[1] > 1 else w[:, 0]
    total = total.clamp_min(0)
    if int((total > 0).sum()) < n:
        pick = torch.randperm(x.shape[0], generator=gen)[:n].to(x.device)
        return x[pick], w[pick]
    pick = torch.multinomial(total.double().cpu(), n, replacement=False, generator=gen).to(x.device)
    return x[pick], w[pick] / total[pick, None]


def _kmeans_plus_plus(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator,
                      rounds: int) -> tuple[torch.Tensor, bool]:
    """k-means++ seeding: each round draws ``ceil(k / rounds)`` new centroids, without
    replacement, with probability proportional to the weighted squared distance to the
    nearest centroid chosen so far (the first by the vectors' total weights). Also
    returns whether the draws ran out: every vector coincides with a centroid."""
    per_round = max(1, -(-k // max(rounds, 1)))
    chosen = torch.empty(0, dtype=torch.int64, device=x.device)
    probability = w.sum(1)  # the first draw: by weight alone
    closest: torch.Tensor | None = None
    while chosen.numel() < k:
        available = int((probability > 0).sum())
        if available == 0:
            return x[chosen].clone(), True
        take = min(per_round, k - chosen.numel(), available)
        new = torch.multinomial(probability.double().cpu(), take, replacement=False,
                                generator=gen).to(x.device)
        chosen = torch.cat([chosen, new])
        new_centroids = x[new]
        nearest = nearest_centroid(x, new_centroids, w if w.shape[1] > 1 else None)
        distance = weighted_distances(x, new_centroids[nearest], w)
        closest = distance if closest is None else torch.minimum(closest, distance)
        closest[new] = 0.0
        probability = closest.clamp_min(0)
    return x[chosen].clone(), False


def _update_centroids(x: torch.Tensor, w: torch.Tensor, assignment: torch.Tensor,
                      centroids: torch.Tensor) -> torch.Tensor:
    """Weighted means of each cluster; empty clusters (and dimensions no vector of a
    cluster weighs) are re-seeded or kept."""
    k, v = centroids.shape
    sums = torch.zeros(k, v, dtype=x.dtype, device=x.device).index_add_(0, assignment, x * w)
    totals = torch.zeros(k, w.shape[1], dtype=x.dtype, device=x.device).index_add_(
        0, assignment, w).expand(k, v)
    updated = torch.where(totals > 0, sums / totals.clamp_min(1e-30), centroids)
    empty = torch.nonzero(torch.bincount(assignment, minlength=k) == 0).flatten()
    if empty.numel():
        # Re-seed at the worst-fitted vectors: each takes a point that costs the most now.
        errors = weighted_distances(x, updated[assignment], w)
        worst = torch.topk(errors, min(empty.numel(), x.shape[0])).indices
        updated[empty[:worst.numel()]] = x[worst]
    return updated
