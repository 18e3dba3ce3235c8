"""The ``svdquant`` transform: smoothing searched per input-sharing group, then a 16-bit
low-rank branch split off every linear, whose residual the pipeline's quantizer takes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qcore.errors import ConfigError
from qcore.interfaces import Transform

if TYPE_CHECKING:
    import torch

    from qcore.context import BlockContext


class SVDQuant(Transform):
    """SVDQuant: per input-sharing group, smoothing scales ``s = span_x^α / span_w^β``
    (α searched on a grid, each candidate scored by the group's output error on sampled
    calibration inputs, with its 4-bit activations, its quantized residual and its
    low-rank branch), ``1/s`` folded into the group's scale source; then each linear's
    weight ``W·s = L + R`` with a rank-``rank`` branch ``L`` kept in 16 bits
    (``ctx.add_lowrank_branch``) and ``R`` left for the quantizer."""

    name = "svdquant"
    needs = frozenset({"minmax", "input-sample"})
    provides = frozenset({"smoothed", "lowrank"})

    @dataclass(frozen=True)
    class Config:
        #: rank of each linear's branch (0: no branch, smoothing only)
        rank: int = 32
        #: False: no smoothing (the branch only)
        smooth: bool = True
        #: α is searched over {1/grid, 2/grid, ..., 1}, next to no smoothing at all
        grid: int = 20
        #: the weight span's exponent; None: 1 - α (SmoothQuant's migration strength)
        beta: float | None = None
        #: a fixed α instead of the search (None = search)
        alpha: float | None = None
        #: refits of the branch, L = SVD_r(W - Q(W - L)), after the first SVD
        iters: int = 100
        #: the refits stop once one improves the total error by less than this (relative)
        tol: float = 1e-3
        #: refits per candidate during the smoothing search (0: the plain SVD)
        search_iters: int = 0
        #: sampled calibration rows (tokens) that score the candidates
        search_rows: int = 512
        #: dtype the branch is stored in
        lowrank_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

        def __post_init__(self) -> None:
            for name in ("rank", "iters", "search_iters"):
                if getattr(self, name) < 0:
                    raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
            if self.grid < 1:
                raise ValueError(f"grid must be >= 1, got {self.grid}")
            if self.search_rows < 1:
                raise ValueError(f"search_rows must be >= 1, got {self.search_rows}")
            if self.alpha is not None and not 0 <= self.alpha <= 1:
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
            if not 0 <= self.tol < 1:
                raise ValueError(f"tol must be in [0, 1), got {self.tol}")

    def apply(self, ctx: BlockContext) -> None:
        import torch

        from qcore.ops import set_weight_matrix, weight_matrix
        from qcore_plugin_svdquant.lowrank import lowrank_split, rtn_quantizer

        start = time.perf_counter()
        c = self.config
        linears = ctx.structure.linears
        for name, linear in linears.items():
            out_f, in_f = weight_matrix(linear).shape
            if c.rank > min(out_f, in_f):
                raise ConfigError(
                    f"svdquant: rank {c.rank} exceeds linear {name!r} of block {ctx.index} "
                    f"([{out_f} x {in_f}], rank at most {min(out_f, in_f)}); choose "
                    f"--set svdquant.rank=N with N <= {min(out_f, in_f)}")
        scale_dtype = getattr(torch, getattr(ctx.quantizer.config, "scale_dtype", "float16"))
        quantize = rtn_quantizer(ctx.scheme, scale_dtype)
        dtype = getattr(torch, c.lowrank_dtype)
        chosen = []
        if c.smooth:
            for group in ctx.structure.groups:
                label = "/".join(group.names)
                if group.source is None:
                    chosen.append(f"{label} no source")
                    continue
                alpha = self._smooth_group(ctx, group, quantize, dtype)
                chosen.append(f"{label} α={'none' if alpha is None else f'{alpha:.2f}'}")
        refits = []
        for name, linear in linears.items():
            w = weight_matrix(linear).detach()
            split = lowrank_split(w.float(), c.rank, quantize, iters=c.iters, tol=c.tol,
                                  dtype=dtype, seed=ctx.index)
            set_weight_matrix(linear, split.residual.to(w.dtype))
            if c.rank:
                ctx.add_lowrank_branch(name, split.down, split.up)
                refits.append(split.chosen)
        ctx.log.info("svdquant: block %d in %.1f s: %s; rank %d, refits kept %s",
                     ctx.index, time.perf_counter() - start, "; ".join(chosen) or "no smoothing",
                     c.rank, refits)

    def _smooth_group(self, ctx: BlockContext, group: Any, quantize: object,
                      dtype: torch.dtype) -> float | None:
        """Search and fold the smoothing scales of ``group`` (one of
        ``ctx.structure.groups``); the α chosen (None: none)."""
        import torch

        from qcore.ops import fold_scales_into_source, weight_matrix
        from qcore_plugin_svdquant.lowrank import output_error, smoothing_scales

        c = self.config
        stats = ctx.stats[group.names[0]]
        x_span = torch.maximum(stats["minmax"]["min"].abs(), stats["minmax"]["max"].abs())
        sample = stats["input-sample"]
        if sample.shape[0] > c.search_rows:  # evenly spaced rows of the sample
            pick = torch.linspace(0, sample.shape[0] - 1, c.search_rows).round().long()
            sample = sample[pick]
        weights = [weight_matrix(ctx.structure.linears[n]).detach().float() for n in group.names]
        w_span = torch.cat(weights).abs().amax(0)
        x = sample.to(weights[0].device).float()
        reference = torch.cat([x @ w.T for w in weights], dim=1)
        alphas = [c.alpha] if c.alpha is not None else [i / c.grid for i in range(1, c.grid + 1)]
        candidates: list[tuple[float | None, torch.Tensor | None]] = [(None, None)]
        for alpha in alphas:
            beta = 1.0 - alpha if c.beta is None else c.beta
            candidates.append((alpha, smoothing_scales(x_span.to(x.device), w_span, alpha, beta)))
        best = (float("inf"), None, None)
        for alpha, s in candidates:
            err = output_error(x, weights, s, c.rank, quantize, ctx.scheme,  # type: ignore[arg-type]
                               iters=c.search_iters, dtype=dtype, reference=reference)
            if err < best[0]:
                best = (err, alpha, s)
        _, alpha, s = best
        if s is not None:
            w_dtype = weight_matrix(ctx.structure.linears[group.names[0]]).dtype
            fold_scales_into_source(ctx.block, group, s.to(w_dtype))
        return alpha
