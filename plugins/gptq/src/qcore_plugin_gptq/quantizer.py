"""The ``gptq`` quantizer: the component that qcore's pipelines name."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from qcore.interfaces import QuantizedWeight, Quantizer

if TYPE_CHECKING:
    import torch

    from qcore.scheme import Scheme

log = logging.getLogger("qcore.gptq")


class GPTQQuantizer(Quantizer):
    """GPTQ: column-by-column rounding with inverse-Hessian error compensation."""

    name = "gptq"
    needs = frozenset({"hessian"})
    produces = "int"
    supported_bits = frozenset({2, 3, 4, 5, 6, 7, 8})
    supported_act_bits = frozenset({None})
    sequential = True

    @dataclass(frozen=True)
    class Config:
        #: columns per lazy batch update
        block_size: int = 128
        #: added to the Hessian's diagonal, relative to its mean diagonal
        dampening: float = 0.01
        #: quantize columns by decreasing Hessian diagonal (stores ``g_idx`` unless
        #: static_groups). On by default: on SmolLM2 it is what makes GPTQ beat RTN
        #: (see BENCHMARKS.md), and the peer toolkits default to it too.
        act_order: bool = True
        #: group parameters from the whole weight before any update (with act_order: no
        #: ``g_idx`` needed, groups stay contiguous)
        static_groups: bool = False
        #: each group of linears sees the inputs of the already-quantized earlier ones
        true_sequential: bool = True
        scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
        #: grid search of each group's range when the group is reached: shrink factors
        #: tried from 1 down to 1 - max_shrink, the one with the least error kept (1 =
        #: plain min-max). On by default: on SmolLM2 it takes W3 from 30.9 to 22.4 and W4
        #: from 17.40 to 16.99 (BENCHMARKS.md), at a cost in time
        shrink_steps: int = 20
        max_shrink: float = 0.2

        def __post_init__(self) -> None:
            if self.block_size < 1:
                raise ValueError(f"block_size must be >= 1, got {self.block_size}")
            if not 0 <= self.dampening < 10:
                raise ValueError(f"dampening must be in [0, 10), got {self.dampening}")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.sequential = self.config.true_sequential  # type: ignore[misc]

    def quantize(self, weight: torch.Tensor, stats: Mapping[str, Any], scheme: Scheme) -> QuantizedWeight:
        return self.quantize_group([weight], stats, scheme)[0]

    def quantize_group(self, weights: Sequence[torch.Tensor], stats: Mapping[str, Any],
                       scheme: Scheme) -> list[QuantizedWeight]:
        """The group's linears share one Hessian, and GPTQ treats rows independently given
        it: stacking their rows and solving once is exactly the per-linear result."""
        import torch

        from qcore.ops import make_int_weight
        from qcore_plugin_gptq.solver import gptq

        c = self.config
        stacked = torch.cat([w.float() for w in weights]) if len(weights) > 1 else weights[0].float()
        result = gptq(stacked, stats["hessian"], bits=scheme.bits, group_size=scheme.group_size,
                      symmetric=scheme.symmetric, act_order=c.act_order,
                      static_groups=c.static_groups, block_size=c.block_size,
                      dampening=c.dampening, scale_dtype=getattr(torch, c.scale_dtype),
                      shrink_steps=c.shrink_steps, max_shrink=c.max_shrink)
        out = []
        start = 0
        for w in weights:
            rows = slice(start, start + w.shape[0])
            start += w.shape[0]
            zeros = None if result.zeros is None else result.zeros[rows].contiguous()
            out.append(make_int_weight(result.codes[rows].contiguous(),
                                       result.scales[rows].contiguous(), zeros, scheme, stats,
                                       g_idx=result.g_idx))
        return out
