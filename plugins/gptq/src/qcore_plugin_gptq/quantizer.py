"""The ``gptq`` quantizer: the component that qcore's pipelines name."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcore.interfaces import QuantizedWeight, Quantizer
from qcore_plugin_gptq.options import GPTQOptions

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
    #: Activations are the kernel's business: GPTQ solves the weights on the float inputs'
    #: Hessian and records the scheme's activation grid (static scales from ``minmax``).
    supported_act_bits = frozenset({None, 8, 4})
    sequential = True

    @dataclass(frozen=True)
    class Config(GPTQOptions):
        """The solver's options (:class:`~qcore_plugin_gptq.options.GPTQOptions`, their
        defaults included), and how the core feeds the linears."""

        #: each group of linears sees the inputs of the already-quantized earlier ones
        true_sequential: bool = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.sequential = self.config.true_sequential  # type: ignore[misc]

    def needs_for(self, scheme: Scheme) -> frozenset[str]:
        if scheme.act_bits is not None and not scheme.act_dynamic:
            return self.needs | {"minmax"}
        return self.needs

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
                      symmetric=scheme.symmetric, options=c)
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
