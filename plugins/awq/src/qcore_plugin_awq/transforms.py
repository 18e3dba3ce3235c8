"""The ``awq`` (scale search) and ``awq-clip`` (clipping search) transforms."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qcore.interfaces import Transform

if TYPE_CHECKING:
    import torch

    from qcore.context import BlockContext


def _scale_dtype(ctx: BlockContext) -> torch.dtype:
    import torch

    name = getattr(ctx.quantizer.config, "scale_dtype", "float16")
    return getattr(torch, name)


class AWQScales(Transform):
    """AWQ: scale salient input channels by s = s_x^α (α searched), fold 1/s upstream."""

    name = "awq"
    needs = frozenset({"absmean", "hessian"})
    provides = frozenset({"awq-scaled"})
    # A group's inputs become x / s: its absmean and Hessian are rescaled to match, so
    # awq-clip after it needs no second observation pass.
    updates_stats = True

    @dataclass(frozen=True)
    class Config:
        #: α is searched over {0, 1/grid, ..., (grid-1)/grid}
        grid: int = 20
        #: a fixed α instead of the search (None = search)
        alpha: float | None = None
        #: how candidates are quantized during the search: "rtn" (the pipeline's bits,
        #: group size and symmetry on a round-to-nearest grid; fast) or "quantizer" (the
        #: pipeline's quantizer itself, e.g. GPTQ; one solve per candidate, slow)
        search_with: Literal["rtn", "quantizer"] = "rtn"
        #: what a candidate is scored by: "group" (the output error of the group's own
        #: linears over all calibration tokens, through the Hessian: one matrix product
        #: per candidate) or "block" (the block's output error, running the block with
        #: the candidate quantized on the first block_samples calibration sequences)
        objective: Literal["group", "block"] = "group"
        block_samples: int = 16

        def __post_init__(self) -> None:
            if self.grid < 1:
                raise ValueError(f"grid must be >= 1, got {self.grid}")
            if self.alpha is not None and not 0 <= self.alpha <= 1:
                raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
            if self.block_samples < 1:
                raise ValueError(f"block_samples must be >= 1, got {self.block_samples}")

    def apply(self, ctx: BlockContext) -> None:
        import torch

        from qcore.ops import fold_scales_into_source, weight_matrix
        from qcore_plugin_awq.search import awq_scales, search_alpha

        start = time.perf_counter()
        scale_dtype = _scale_dtype(ctx)
        chosen = []
        for group in ctx.structure.groups:
            if group.source is None:
                ctx.log.warning(
                    "awq: block %d, linears %s: no preceding norm or linear scales their "
                    "input alone (e.g. grouped-query attention's v -> o); quantized "
                    "without AWQ scales",
                    ctx.index,
                    ", ".join(group.names),
                )
                continue
            stats = ctx.stats[group.names[0]]
            weights = [
                weight_matrix(ctx.structure.linears[n]).detach().float() for n in group.names
            ]
            w = torch.cat(weights)
            x_mean = stats["absmean"].to(w.device)
            if self.config.alpha is not None:
                alpha, s = self.config.alpha, awq_scales(x_mean, self.config.alpha)
            else:
                hessian = stats["hessian"].to(w.device)
                quantize = self._quantizer(ctx, weights, hessian, scale_dtype)
                score = None
                if self.config.objective == "block":
                    score = _BlockScore(ctx, group.names, self.config.block_samples)
                alpha, s, errors = search_alpha(
                    w, x_mean, hessian, self.config.grid, quantize, score
                )
                ctx.log.debug(
                    "awq: block %d %s: output error %.4g at alpha 0 -> %.4g at %.2f",
                    ctx.index,
                    "/".join(group.names),
                    errors[0],
                    min(errors),
                    alpha,
                )
            chosen.append(f"{'/'.join(group.names)} α={alpha:.2f}")
            if alpha > 0:
                fold_scales_into_source(ctx.block, group, s.to(w.dtype))
                rescaled = dict(stats)  # the dicts are shared by the group: replace, not edit
                rescaled["absmean"] = stats["absmean"] / s.to(stats["absmean"].device)
                if "hessian" in stats:
                    inv = (1.0 / s).to(stats["hessian"].device)
                    rescaled["hessian"] = stats["hessian"] * inv[:, None] * inv[None, :]
                for name in group.names:
                    ctx.stats[name] = rescaled
        ctx.log.info(
            "awq: block %d in %.1f s: %s",
            ctx.index,
            time.perf_counter() - start,
            "; ".join(chosen) or "no group with a scale source",
        )

    def _quantizer(
        self,
        ctx: BlockContext,
        weights: list[torch.Tensor],
        hessian: torch.Tensor,
        scale_dtype: torch.dtype,
    ) -> Any:
        import torch

        from qcore_plugin_awq.search import fake_quantize

        if self.config.search_with == "rtn":
            return lambda w_scaled, s: fake_quantize(w_scaled, ctx.scheme, scale_dtype)
        sizes = [w.shape[0] for w in weights]

        def with_quantizer(w_scaled: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            # The scaled weights see inputs x / s: their Hessian is diag(1/s) H diag(1/s).
            stats = {"hessian": hessian / s[:, None] / s[None, :]}
            parts = torch.split(w_scaled, sizes)
            return torch.cat([ctx.fake_quantize(p, stats) for p in parts])

        return with_quantizer


class _BlockScore:
    """Scores candidate weights of one group by the block's output error: the group's
    linears hold the candidate while the block runs on the first calibration sequences."""

    def __init__(self, ctx: BlockContext, names: tuple[str, ...], samples: int) -> None:
        import torch

        from qcore.ops import forward

        self.ctx, self.names = ctx, names
        self.calls, rows = [], 0
        for call in ctx.inputs:
            if rows >= samples:
                break
            self.calls.append(call)
            rows += call[0][0].shape[0] if call[0] else next(iter(call[1].values())).shape[0]
        with torch.no_grad():
            self.reference = [forward(ctx.block, a, k, ctx.device) for a, k in self.calls]

    def __call__(self, w_hat: torch.Tensor) -> float:
        import torch

        from qcore.ops import forward, set_weight_matrix, weight_matrix

        linears = [self.ctx.structure.linears[n] for n in self.names]
        originals = [weight_matrix(m).detach().clone() for m in linears]
        parts = torch.split(w_hat, [o.shape[0] for o in originals])
        try:
            for m, part, o in zip(linears, parts, originals, strict=True):
                set_weight_matrix(m, part.to(o.dtype))
            with torch.no_grad():
                return sum(
                    float((forward(self.ctx.block, a, k, self.ctx.device) - r).pow(2).sum())
                    for (a, k), r in zip(self.calls, self.reference, strict=True)
                )
        finally:
            for m, o in zip(linears, originals, strict=True):
                set_weight_matrix(m, o)


class AWQClip(Transform):
    """AWQ's clipping: per output channel and group, shrink the weight range to the
    factor that minimises the group's output error, and clip the weights to it."""

    name = "awq-clip"
    needs = frozenset({"hessian"})
    provides = frozenset({"awq-clipped"})

    @dataclass(frozen=True)
    class Config:
        #: shrink factors tried: 1, 1 - max_shrink/grid, ..., 1 - max_shrink (grid steps)
        grid: int = 20
        max_shrink: float = 0.5

        def __post_init__(self) -> None:
            if self.grid < 1:
                raise ValueError(f"grid must be >= 1, got {self.grid}")
            if not 0 <= self.max_shrink < 1:
                raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink}")

    def apply(self, ctx: BlockContext) -> None:
        """Not function-preserving by design: clipping trades the largest weights'
        accuracy for a finer grid, which the search shows lowers the output error once
        quantized (a no-op factor of 1 is among the candidates)."""
        import torch

        from qcore.ops import set_weight_matrix, weight_matrix
        from qcore_plugin_awq.search import _grouped, search_clip

        start = time.perf_counter()
        scale_dtype = _scale_dtype(ctx)
        shrunk = total = 0
        for group in ctx.structure.groups:
            hessian = ctx.stats[group.names[0]]["hessian"]
            for name in group.names:
                linear = ctx.structure.linears[name]
                w = weight_matrix(linear).detach().float()
                factors = search_clip(
                    w,
                    hessian.to(w.device),
                    ctx.scheme,
                    scale_dtype,
                    self.config.grid,
                    self.config.max_shrink,
                )
                wg, pad = _grouped(w, ctx.scheme.group_size)
                lo = wg.amin(-1, keepdim=True).clamp(max=0) * factors[..., None]
                hi = wg.amax(-1, keepdim=True).clamp(min=0) * factors[..., None]
                clipped = torch.maximum(torch.minimum(wg, hi), lo).reshape(w.shape[0], -1)
                clipped = clipped[:, : w.shape[1]] if pad else clipped
                set_weight_matrix(linear, clipped.to(weight_matrix(linear).dtype))
                shrunk += int((factors < 1).sum())
                total += factors.numel()
        ctx.log.info(
            "awq-clip: block %d in %.1f s: %d of %d groups clipped",
            ctx.index,
            time.perf_counter() - start,
            shrunk,
            total,
        )
