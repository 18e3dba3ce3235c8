"""The ``rtn`` quantizer: round-to-nearest on a min-max integer grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

from qcore.interfaces import QuantizedWeight, Quantizer

if TYPE_CHECKING:
    import torch

    from qcore.scheme import Scheme


class RTNQuantizer(Quantizer):
    """Round-to-nearest on a min-max grid, per channel or group-wise (any group size)."""

    name = "rtn"
    produces = "int"
    supported_bits = frozenset({2, 3, 4, 5, 6, 7, 8})
    supported_act_bits = frozenset({None, 8, 4})

    @dataclass(frozen=True)
    class Config:
        #: dtype the scales are stored in (the grid is chosen on the rounded scales).
        scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def needs_for(self, scheme: Scheme) -> frozenset[str]:
        # Static activation scales are fixed from the calibration inputs' range.
        if scheme.act_bits is not None and not scheme.act_dynamic:
            return frozenset({"minmax"})
        return frozenset()

    def quantize(self, weight: torch.Tensor, stats: Mapping[str, Any], scheme: Scheme) -> QuantizedWeight:
        import torch

        from qcore.grid import group_index, minmax_grid, quantize_codes

        scale_dtype = getattr(torch, self.config.scale_dtype)
        scales, zeros = minmax_grid(weight, scheme.bits, scheme.group_size, scheme.symmetric,
                                    scale_dtype)
        g_idx = group_index(weight.shape[1], scheme.group_size, weight.device)
        codes = quantize_codes(weight, scales, zeros, scheme.bits, g_idx)
        return make_int_weight(codes, scales, zeros, scheme, stats)


def make_int_weight(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, scheme: Scheme,
    stats: Mapping[str, Any], g_idx: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Assemble an ``"int"``-format weight, with the static input scale if the scheme
    asks for one (from the ``minmax`` statistic)."""
    tensors = {"codes": codes, "scales": scales}
    if zeros is not None:
        tensors["zeros"] = zeros
    if g_idx is not None:
        tensors["g_idx"] = g_idx.to("cpu").int() if g_idx.device.type == "cpu" else g_idx.int()
    if scheme.act_bits is not None and not scheme.act_dynamic:
        tensors["input_scale"] = static_input_scale(stats["minmax"], scheme.act_bits)
    params = {"bits": scheme.bits, "group_size": scheme.group_size,
              "symmetric": scheme.symmetric, "act_bits": scheme.act_bits,
              "act_dynamic": scheme.act_dynamic}
    if scheme.act_bits is not None:
        params.update(act_group_size=scheme.act_group_size, act_symmetric=scheme.act_symmetric)
    return QuantizedWeight(format="int", shape=(codes.shape[0], codes.shape[1]),
                           tensors=tensors, params=params)


def static_input_scale(minmax: Mapping[str, torch.Tensor], act_bits: int) -> torch.Tensor:
    """One symmetric per-tensor scale covering the calibration inputs' range."""
    import torch

    absmax = torch.maximum(minmax["min"].abs(), minmax["max"].abs()).max().float()
    qmax = (1 << (act_bits - 1)) - 1
    return torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax)).reshape(())
