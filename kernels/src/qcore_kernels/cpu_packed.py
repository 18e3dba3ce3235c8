"""Kernel providers for the ``int-packed`` layout on CPU, through torch's packed-weight CPU
operators (AVX-512/AMX builds of torch). They need no CuPy: installing qcore-kernels
makes quantized checkpoints faster than float on CPU.

- ``cpu-int4``: 4-bit weights, per channel or in groups of a multiple of 32, symmetric or
  asymmetric, natural or act-order column order, through
  ``aten._convert_weight_to_int4pack_for_cpu`` and ``aten._weight_int4pack_mm_for_cpu``.
- ``cpu-int8``: 8-bit weights per channel, symmetric or asymmetric, through
  ``aten._weight_int8pack_mm``.
- ``cpu-w8a8``: 8-bit weights per channel with 8-bit activations (static or dynamic
  scales), through ``aten._int_mm`` (int8 × int8 → int32), in any float dtype.

The weight-only providers take bfloat16 activations only (see :class:`CpuInt4Kernels`).

Each repacks once, in ``prepare``; the op then never rebuilds a float weight. Where the
installed torch lacks an operator, the provider reports itself unavailable with the reason
and the core falls back to the ``torch`` provider.

How the formats map (exactly, up to float rounding of the products):

- torch's int4 operator computes ``w = (c - 8) * scale + zero`` per group. qcore's grid is
  ``w = (c - z) * s``, so ``scale = s`` and ``zero = (8 - z) * s``; symmetric weights have
  ``z = 8`` and a zero term of 0.
- The int4 operator takes groups of 32, 64, 128 or 256 columns, a column count divisible by
  the group and a row count divisible by 16. A per-channel weight, or groups of 512 or
  1024, repeat their scale over several operator groups. Missing columns (a shorter last
  group, act-order groups of unequal size) are padded with zero codes that meet zero
  inputs: ``prepare`` records, for each operator column, which input column feeds it, and
  the op gathers ``x`` in that order (no gather when the order is the identity). Missing
  rows are padded and sliced off the output.
- The int8 operators take signed codes ``c - 128``; an asymmetric zero point adds
  ``(128 - z) * s * sum(x)`` per output, computed from the same ``x`` the product used.
  torch's int8 weight operator reads past the row (wrong outputs, or a crash) in 16-bit
  dtypes when the column count is not a multiple of 16, so weights are padded to a
  multiple of 32 columns, with zero codes, and ``x`` with zeros to match.

Speed: see BENCHMARKS.md ("CPU kernels").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcore.interfaces import KernelProvider, KernelSupport, PackedWeight
from qcore.ops import INT_LAYOUT as LAYOUT
from qcore.ops import IntPacker

if TYPE_CHECKING:
    import torch

#: Group sizes of torch's CPU int4 operator, largest first.
INT4_OP_GROUPS = (256, 128, 64, 32)
#: Rows of the int4 operator's packed tiles.
INT4_ROW_MULTIPLE = 16
#: Column multiple of the int8 weight operator's weights (see the module docstring).
INT8_COLUMN_MULTIPLE = 32
#: qcore group sizes that ``cpu-int4`` serves (-1: per channel).
INT4_GROUP_SIZES = frozenset({-1, 32, 64, 128, 256, 512, 1024})

_INT4_OPS = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
_INT8_OPS = ("_weight_int8pack_mm", "_int_mm")


def _missing_ops(names: tuple[str, ...]) -> str | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - qcore depends on torch
        return "torch is not installed"
    missing = [n for n in names if not hasattr(torch.ops.aten, n)]
    if missing:
        return (f"torch {torch.__version__} has no {', '.join('aten.' + n for n in missing)} "
                "(torch 2.6 or newer has them)")
    return None


def _unpacked(packed: PackedWeight) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor]:
    """The int format's tensors and params, and each group's zero point as floats."""
    from qcore.ops import zero_points

    qweight = IntPacker().unpack(packed)
    t = qweight.tensors
    bits = int(qweight.params["bits"])  # type: ignore[arg-type]
    zeros = zero_points(t["scales"].float(), t.get("zeros"), bits)
    return t, dict(qweight.params), zeros


# ------------------------------------------------------------------------------ int4


@dataclass
class PreparedInt4:
    """A weight in torch's CPU int4 layout, with each operator column's input column."""

    weight: torch.Tensor  # uint8, torch's packed layout, [rows_padded, cols_padded / 2]
    scale_zero: dict[str, torch.Tensor]  # dtype name -> [cols_padded / group, rows_padded, 2]
    group: int  # operator group size
    columns: torch.Tensor | None  # [cols_padded] input column, in_features = a zero column
    in_features: int
    out_features: int

    def scale_zero_for(self, dtype: torch.dtype) -> torch.Tensor:
        key = str(dtype)
        found = self.scale_zero.get(key)
        if found is None:
            found = self.scale_zero["torch.float32"].to(dtype)
            self.scale_zero[key] = found
        return found


def _int4_operator_group(group_size: int, in_features: int) -> int:
    """The operator group that tiles a qcore group (or a whole row, per channel)."""
    span = in_features if group_size == -1 else group_size
    for group in INT4_OP_GROUPS:
        if span % group == 0:
            return group
    return 32 if group_size == -1 else 0  # per channel: padded to a multiple of 32


class CpuInt4Kernels(KernelProvider):
    """4-bit weights on CPU through torch's packed int4 operator (no float weight kept).

    bfloat16 activations only: torch's int4 and int8 weight operators are vectorized
    (AVX-512, AMX) for bfloat16 and run a scalar loop, many times slower than a float32
    ``F.linear``, for float32 and float16; computing a float32 layer in bfloat16 would
    change its results beyond float32's tolerance. A model run in bfloat16 (``qcore
    generate --dtype bfloat16``) is served by this provider; in float32, by ``torch``.
    """

    name = "cpu-int4"
    support = KernelSupport(
        ops=frozenset({"linear"}),
        layouts=frozenset({LAYOUT}),
        bits=frozenset({4}),
        group_sizes=INT4_GROUP_SIZES,
        act_bits=frozenset({None}),
        act_order=True,
        dtypes=frozenset({"bfloat16"}),
        devices=frozenset({"cpu"}),
        priority=50,
    )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _missing_ops(_INT4_OPS)

    def prepare(self, packed: PackedWeight, device: torch.device) -> PreparedInt4:
        import torch

        t, params, zeros = _unpacked(packed)
        codes = t["codes"]
        scales = t["scales"].float()
        out_f, in_f = codes.shape
        group_size = int(params["group_size"])
        op_group = _int4_operator_group(group_size, in_f)
        qgroup = in_f if group_size == -1 else group_size
        # Each qcore group occupies a whole number of operator groups: its columns in order
        # (natural, or the act-order columns assigned to it), then padding.
        g_idx = t.get("g_idx")
        if g_idx is None:
            gi = torch.arange(in_f) // qgroup
        else:
            gi = g_idx.long().cpu()
        n_groups = scales.shape[1]
        order = torch.sort(gi, stable=True).indices
        counts = torch.bincount(gi, minlength=n_groups)
        width = -(-int(counts.max()) // op_group) * op_group  # operator columns per group
        slot = torch.arange(in_f) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts)  # position within its group (sorted)
        target = gi[order] * width + slot  # operator column of each sorted input column
        cols_padded = n_groups * width
        columns = torch.full((cols_padded,), in_f, dtype=torch.long)
        columns[target] = order
        # Codes in operator order; padding columns get code 8 and meet a zero input.
        op_codes = torch.full((out_f, cols_padded), 8, dtype=torch.int32)
        op_codes[:, target] = codes[:, order].to(torch.int32)
        rows = -(-out_f // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE
        if rows != out_f:
            op_codes = torch.nn.functional.pad(op_codes, (0, 0, 0, rows - out_f), value=8)
        reps = width // op_group
        s = scales.repeat_interleave(reps, dim=1)  # [out, op groups]
        z = zeros.repeat_interleave(reps, dim=1)
        scale_zero = torch.stack([s, (8.0 - z) * s], dim=-1)  # [out, op groups, 2]
        if rows != out_f:
            scale_zero = torch.nn.functional.pad(scale_zero, (0, 0, 0, 0, 0, rows - out_f))
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(op_codes.contiguous(), 1)
        identity = cols_padded == in_f and bool(
            torch.equal(columns, torch.arange(in_f)))
        return PreparedInt4(
            weight=weight.to(device),
            scale_zero={"torch.float32": scale_zero.transpose(0, 1).contiguous().to(device)},
            group=op_group, columns=None if identity else columns.to(device),
            in_features=in_f, out_features=out_f)

    def linear(self, x: torch.Tensor, prepared: PreparedInt4,
               bias: torch.Tensor | None) -> torch.Tensor:
        import torch

        if prepared.columns is not None:
            x = torch.nn.functional.pad(x, (0, 1)).index_select(-1, prepared.columns)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.contiguous(), prepared.weight, prepared.group, prepared.scale_zero_for(x.dtype))
        if y.shape[-1] != prepared.out_features:
            y = y[..., : prepared.out_features]
        return y if bias is None else y + bias.to(y.dtype)


# ------------------------------------------------------------------------------ int8


@dataclass
class PreparedInt8:
    """Signed 8-bit codes per channel, with the asymmetric correction's factor."""

    codes: torch.Tensor  # int8: [out, in padded] (weight-only) or [in, out] (W8A8)
    scales: torch.Tensor  # float32 [out]
    offset: torch.Tensor | None  # float32 [out]: (128 - z) * s, None when symmetric
    act_bits: int | None
    input_scale: torch.Tensor | None
    in_features: int
    cast: dict[str, torch.Tensor]

    def scales_for(self, dtype: torch.dtype) -> torch.Tensor:
        key = str(dtype)
        found = self.cast.get(key)
        if found is None:
            found = self.cast[key] = self.scales.to(dtype)
        return found


def _prepare_int8(packed: PackedWeight, device: torch.device, transposed: bool) -> PreparedInt8:
    import torch

    t, params, zeros = _unpacked(packed)
    scales = t["scales"].float()[:, 0]
    zeros = zeros[:, 0]
    codes = (t["codes"].to(torch.int16) - 128).to(torch.int8)
    in_f = codes.shape[1]
    if transposed:
        codes = codes.t()
    else:
        padded = -(-in_f // INT8_COLUMN_MULTIPLE) * INT8_COLUMN_MULTIPLE
        codes = torch.nn.functional.pad(codes, (0, padded - in_f))
    input_scale = t.get("input_scale")
    return PreparedInt8(
        codes=codes.contiguous().to(device), scales=scales.to(device),
        offset=None if bool(torch.all(zeros == 128)) else ((128.0 - zeros) * scales).to(device),
        act_bits=params.get("act_bits"),
        input_scale=None if input_scale is None else input_scale.float().to(device),
        in_features=in_f, cast={})


class CpuInt8Kernels(KernelProvider):
    """8-bit weights per channel on CPU, weight-only, through torch's int8 weight operator
    (bfloat16 activations: see :class:`CpuInt4Kernels`)."""

    name = "cpu-int8"
    support = KernelSupport(
        ops=frozenset({"linear"}),
        layouts=frozenset({LAYOUT}),
        bits=frozenset({8}),
        group_sizes=frozenset({-1}),
        act_bits=frozenset({None}),
        act_order=False,
        dtypes=frozenset({"bfloat16"}),
        devices=frozenset({"cpu"}),
        priority=50,
    )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _missing_ops(_INT8_OPS[:1])

    def prepare(self, packed: PackedWeight, device: torch.device) -> PreparedInt8:
        return _prepare_int8(packed, device, transposed=False)

    def linear(self, x: torch.Tensor, prepared: PreparedInt8,
               bias: torch.Tensor | None) -> torch.Tensor:
        import torch

        scales = prepared.scales_for(x.dtype)
        missing = prepared.codes.shape[1] - prepared.in_features
        x = torch.nn.functional.pad(x, (0, missing)) if missing else x.contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x, prepared.codes, scales)
        if prepared.offset is not None:  # in float32: a bfloat16 sum of x would round
            y = (y.float() + x.float().sum(-1, keepdim=True) * prepared.offset).to(y.dtype)
        return y if bias is None else y + bias.to(y.dtype)


class CpuW8A8Kernels(KernelProvider):
    """8-bit weights per channel and 8-bit activations (static or per-token scales) on CPU,
    through torch's int8 × int8 → int32 matrix product; any float dtype (the product is
    exact, one scaling in float32 after it)."""

    name = "cpu-w8a8"
    support = KernelSupport(
        ops=frozenset({"linear"}),
        layouts=frozenset({LAYOUT}),
        bits=frozenset({8}),
        group_sizes=frozenset({-1}),
        act_bits=frozenset({8}),
        act_order=False,
        devices=frozenset({"cpu"}),
        priority=50,
    )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _missing_ops(_INT8_OPS[1:])

    def prepare(self, packed: PackedWeight, device: torch.device) -> PreparedInt8:
        return _prepare_int8(packed, device, transposed=True)

    def linear(self, x: torch.Tensor, prepared: PreparedInt8,
               bias: torch.Tensor | None) -> torch.Tensor:
        """Activations quantized as the reference quantizes them
        (:func:`qcore.ops.quantize_activations`), then an exact int32 product, scaled
        once."""
        import torch

        from qcore.ops import quantize_activations

        codes, scale = quantize_activations(x, prepared.act_bits,  # type: ignore[arg-type]
                                            prepared.input_scale)
        xq = codes.to(torch.int8)
        acc = torch._int_mm(xq, prepared.codes).float() * prepared.scales
        if prepared.offset is not None:
            acc = acc + xq.sum(-1, keepdim=True).float() * prepared.offset
        y = (acc * scale).to(x.dtype)
        return y if bias is None else y + bias.to(y.dtype)
