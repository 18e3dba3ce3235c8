"""AWQ GEMM checkpoints (``version: "gemm"``), as AutoAWQ writes them and vLLM,
transformers and GPTQModel read them.

Per linear (``in`` input, ``out`` output features, ``G`` groups), 4 bits only:

- ``qweight`` int32 ``[in, out/8]``: each input row's codes packed along the output
  dimension, 8 to a word; the nibble at bits ``4*i`` of word ``w`` holds output column
  ``8*w + ORDER[i]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (AutoAWQ's ``AWQ_ORDER``);
- ``qzeros`` int32 ``[G, out/8]``: zero points packed the same way, stored as they are (a
  symmetric grid stores its implicit zero point 8);
- ``scales`` float16 ``[G, out]``.

Groups are contiguous and equal (``in % group_size == 0``; ``group_size`` -1 is one group
per output channel, which AutoAWQ's ``WQLinear_GEMM`` reads as a group of ``in``): AWQ
has no ``g_idx``, so act-order weights are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from qcore.errors import CheckpointError
from qcore.interfaces import CheckpointFormat
from qcore_plugin_interop._common import (
    PER_CHANNEL,
    LayerScheme,
    check_weight,
    expect_dtype,
    expect_shape,
    first_refusal,
    float16_scales,
    int_weight,
    modules_with,
    pack_stream,
    record_scheme,
    take,
    uniform,
    unpack_stream,
    unsupported,
)

if TYPE_CHECKING:
    import torch

    from qcore.interfaces import QuantizedWeight

NAME = "awq"
BITS = 4
#: Output column of each nibble of a packed word (AutoAWQ's ``AWQ_ORDER``).
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: Nibble of each output column: the inverse permutation (``AWQ_REVERSE_ORDER``).
REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def _limit(scheme: LayerScheme) -> str | None:
    """Why AWQ GEMM cannot hold a layer of ``scheme`` (None: it can)."""
    if scheme.bits != BITS:
        return "the awq format (GEMM) stores 4 bits"
    if scheme.act_order:
        return "act-order (g_idx): the awq format has no g_idx"
    if scheme.act_bits is not None:
        return f"{scheme.act_bits}-bit activations: the awq format is weight-only"
    if scheme.scale_dtype not in (None, "float16"):
        return (f"{scheme.scale_dtype} scales: the awq format stores float16 scales, and "
                f"{scheme.scale_dtype} ones do not in general convert to float16 exactly")
    if scheme.out_features % 8:
        return (f"out_features {scheme.out_features} is not a multiple of 8: qweight packs 8 "
                "output columns to a word")
    if scheme.group_size != PER_CHANNEL and scheme.in_features % scheme.group_size:
        return (f"group size {scheme.group_size} does not divide in_features "
                f"{scheme.in_features}: awq's groups are all equal")
    return None


def _interleave(columns: torch.Tensor) -> torch.Tensor:
    """``[rows, out]`` in output order -> the order AWQ packs (``ORDER`` within each 8)."""
    rows, out_f = columns.shape
    return columns.reshape(rows, out_f // 8, 8)[:, :, list(ORDER)].reshape(rows, out_f)


def _deinterleave(packed_order: torch.Tensor) -> torch.Tensor:
    rows, out_f = packed_order.shape
    return packed_order.reshape(rows, out_f // 8, 8)[:, :, list(REVERSE)].reshape(rows, out_f)


class AWQFormat(CheckpointFormat):
    """AWQ GEMM (AutoAWQ; read by vLLM, transformers, GPTQModel): 4-bit, grouped or per
    channel, zero points always stored."""

    name = NAME
    quant_methods = frozenset({"awq"})

    # ------------------------------------------------------------------------- export

    def cannot_express(self, layers: Mapping[str, Mapping[str, Any]]) -> str | None:
        return (first_refusal(layers, NAME, _limit)
                or uniform(layers, NAME, "group size", lambda s: s.group_size))

    def export_layer(self, qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
        import torch

        check_weight(qweight, NAME, _limit)
        t = qweight.tensors
        scales = float16_scales(t["scales"], NAME)
        zeros = t.get("zeros")
        if zeros is None:
            zeros = torch.full(scales.shape, 1 << (BITS - 1), dtype=torch.uint8)
        return {
            "qweight": pack_stream(_interleave(t["codes"].t()), BITS),
            "qzeros": pack_stream(_interleave(zeros.t()), BITS),
            "scales": scales.t().contiguous(),
        }

    def export_config(self, layers: Mapping[str, Mapping[str, Any]],
                      ignore: Sequence[str]) -> dict[str, Any]:
        group_size = record_scheme(next(iter(layers.values()))).group_size
        return {"quant_method": "awq", "version": "gemm", "bits": BITS,
                "group_size": group_size, "zero_point": True,
                "modules_to_not_convert": list(ignore) or None}

    # ------------------------------------------------------------------------- import

    def import_layers(self, qconfig: Mapping[str, Any],
                      tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
        version = str(qconfig.get("version") or qconfig.get("format") or "gemm").lower()
        if version != "gemm":
            raise unsupported(NAME, "version", qconfig.get("version") or qconfig.get("format"),
                              "'gemm'")
        bits = qconfig.get("bits", qconfig.get("w_bit", BITS))
        if bits != BITS or isinstance(bits, bool):
            raise unsupported(NAME, "bits", bits, "4")
        group_size = qconfig.get("group_size", qconfig.get("q_group_size", 128))
        if (isinstance(group_size, bool) or not isinstance(group_size, int)
                or (group_size != PER_CHANNEL and group_size < 1)):
            raise unsupported(NAME, "group_size", group_size, "-1 or a positive group size")
        if qconfig.get("zero_point", True) is not True:
            raise unsupported(NAME, "zero_point", qconfig.get("zero_point"), "true")
        return {module: _read_layer(module, group_size, tensors)
                for module in modules_with(tensors, "qweight")}


def _read_layer(module: str, group_size: int,
                tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    import torch

    key = f"{module}."
    qweight = take(tensors, key + "qweight", NAME)
    qzeros = take(tensors, key + "qzeros", NAME)
    scales = take(tensors, key + "scales", NAME)
    for name, tensor in (("qweight", qweight), ("qzeros", qzeros)):
        expect_dtype(tensor, (torch.int32,), key + name, NAME)
    in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
    if group_size != PER_CHANNEL and in_f % group_size:
        raise CheckpointError(f"{NAME} checkpoint: {key}qweight has {in_f} input rows, not a "
                              f"multiple of group_size {group_size}")
    groups = 1 if group_size == PER_CHANNEL else in_f // group_size
    expect_shape(scales, (groups, out_f), key + "scales", NAME)
    expect_shape(qzeros, (groups, out_f // 8), key + "qzeros", NAME)
    codes = _deinterleave(unpack_stream(qweight, BITS, out_f)).t()
    zeros = _deinterleave(unpack_stream(qzeros, BITS, out_f)).t()
    return int_weight(f"{NAME} {module}", (out_f, in_f), BITS, group_size, codes,
                      scales.t(), zeros)
