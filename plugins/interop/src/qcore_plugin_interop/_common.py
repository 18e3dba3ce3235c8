"""What the three formats share: dense bit streams, a layer's scheme read from its record or
its weight, the checks every format makes, and the pieces of an importer (tensors taken
from the checkpoint, fields it cannot read, the ``"int"`` weight it builds).

Cheap to import (no torch): numerical helpers import it when called.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcore.errors import CheckpointError
from qcore.interfaces import act_fields

if TYPE_CHECKING:
    import torch

    from qcore.interfaces import QuantizedWeight

#: ``group_size`` of one group per output channel.
PER_CHANNEL = -1


# ------------------------------------------------------------------------- bit streams


def stream_words(n_codes: int, bits: int) -> int:
    """Words of a dense stream of ``n_codes`` codes: ``ceil(n_codes * bits / 32)``."""
    return -(-n_codes * bits // 32)


def pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integer codes ``[rows, n]`` -> int32 ``[rows, ceil(n * bits / 32)]``.

    Each row is one little-endian bit stream: code ``k`` holds stream bits
    ``k*bits .. k*bits + bits - 1``, word ``w`` stream bits ``32*w .. 32*w + 31``, so a
    width that does not divide 32 (3, 5, 6, 7) straddles words. GPTQ's qweight and qzeros
    and compressed-tensors' ``pack_to_int32`` (0.18 and later) use this layout; AWQ at 4
    bits too, once its columns are interleaved."""
    from qcore.ops import pack_codes

    return pack_codes(codes, bits)[:, :stream_words(codes.shape[1], bits)].contiguous()


def unpack_stream(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_stream`: uint8 codes ``[rows, n_codes]``."""
    import torch

    from qcore.ops import unpack_codes

    full = -(-n_codes // 32) * bits  # qcore.bitpack's words: whole chunks of 32 codes
    words = packed.to(torch.int32)
    if words.shape[1] < full:
        words = torch.nn.functional.pad(words, (0, full - words.shape[1]))
    return unpack_codes(words, bits, n_codes)


# ------------------------------------------------------------------------ layer schemes


@dataclass(frozen=True)
class LayerScheme:
    """What a format needs to know of one quantized linear."""

    bits: int
    group_size: int
    symmetric: bool
    act_bits: int | None
    act_dynamic: bool
    act_order: bool
    #: dtype of the stored scales ("float16"); None when unknown, and for a weight handed
    #: to ``export_layer``, whose scale values a format checks instead.
    scale_dtype: str | None
    static_input_scale: bool
    out_features: int
    in_features: int
    #: activation groups (-1: per token) and grid (contract 1.4)
    act_group_size: int = PER_CHANNEL
    act_symmetric: bool = True

    def label(self) -> str:
        """E.g. ``W4 g128 asym``, ``W8A8 per-channel sym``, ``W4 g32 sym act-order``."""
        w = f"W{self.bits}" + (f"A{self.act_bits}" if self.act_bits else "")
        g = "per-channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        return f"{w} {g} {'sym' if self.symmetric else 'asym'}" + (
            " act-order" if self.act_order else "")


def _act_bits(params: Mapping[str, Any]) -> int | None:
    value = params.get("act_bits")
    return None if value is None else int(value)


def record_scheme(record: Mapping[str, Any]) -> LayerScheme:
    """The scheme of a qcore checkpoint's layer record (``quantization_config.layers``)."""
    params = record.get("params", {})
    tensors = record.get("tensors", {})
    scales = tensors.get("scales")
    out_f, in_f = (int(x) for x in record["shape"])
    return LayerScheme(
        bits=int(params["bits"]), group_size=int(params.get("group_size", PER_CHANNEL)),
        symmetric=bool(params.get("symmetric", False)), act_bits=_act_bits(params),
        act_dynamic=bool(params.get("act_dynamic", True)), act_order="g_idx" in tensors,
        scale_dtype=None if scales is None else str(scales["dtype"]).removeprefix("torch."),
        static_input_scale="input_scale" in tensors, out_features=out_f, in_features=in_f,
        **act_fields(params))


def weight_scheme(qweight: QuantizedWeight) -> LayerScheme:
    """The scheme of an ``"int"`` weight (its scale dtype left unknown: see
    :func:`float16_scales`)."""
    params, tensors = qweight.params, qweight.tensors
    return LayerScheme(
        bits=int(params["bits"]),  # type: ignore[arg-type]
        group_size=int(params.get("group_size", PER_CHANNEL)),  # type: ignore[arg-type]
        symmetric=bool(params.get("symmetric", False)), act_bits=_act_bits(params),
        act_dynamic=bool(params.get("act_dynamic", True)), act_order="g_idx" in tensors,
        scale_dtype=None, static_input_scale="input_scale" in tensors,
        out_features=int(qweight.shape[0]), in_features=int(qweight.shape[1]),
        **act_fields(params))


def not_an_int_grid(record: Mapping[str, Any], fmt: str) -> str | None:
    """Why a layer record is no integer grid a format can hold (a codebook weight, a
    low-rank branch), or None."""
    logical = record.get("format", "int")
    if logical != "int":
        return (f"a {logical!r} weight (layout {record.get('layout')!r}): the {fmt} format "
                "stores integer grids (qcore's 'int' format)")
    if record.get("lowrank"):
        return f"{record_scheme(record).label()} with a low-rank branch: the {fmt} format has none"
    return None


#: A format's limits: why it cannot hold a layer of a scheme, or None.
Limit = Callable[[LayerScheme], "str | None"]


def first_refusal(layers: Mapping[str, Mapping[str, Any]], fmt: str,
                  limit: Limit) -> str | None:
    """``"<layer>: <what it has>: <why>"`` for the first layer that is not an integer grid
    or that ``limit(scheme)`` refuses (it returns the reason or None)."""
    for name, record in layers.items():
        reason = not_an_int_grid(record, fmt)
        if reason is not None:
            return f"{name}: {reason}"
        scheme = record_scheme(record)
        reason = limit(scheme)
        if reason is not None:
            return f"{name}: {scheme.label()}: {reason}"
    return None


def check_weight(qweight: QuantizedWeight, fmt: str, limit: Limit) -> LayerScheme:
    """The scheme of a weight handed to ``export_layer``, or a CheckpointError saying why
    the format cannot hold it."""
    if qweight.format != "int":
        raise CheckpointError(f"a {qweight.format!r} weight: the {fmt} format stores integer "
                              "grids (qcore's 'int' format)")
    scheme = weight_scheme(qweight)
    reason = limit(scheme)
    if reason is not None:
        raise CheckpointError(f"{scheme.label()}: {reason}")
    return scheme


def uniform(layers: Mapping[str, Mapping[str, Any]], fmt: str, what: str,
            key: Callable[[LayerScheme], Any]) -> str | None:
    """For a format whose config holds one value of ``what`` for the whole model: why two
    layers differ in ``key(scheme)``, or None."""
    first: tuple[str, Any] | None = None
    for name, record in layers.items():
        if not_an_int_grid(record, fmt) is not None:
            continue
        value = key(record_scheme(record))
        if first is None:
            first = (name, value)
        elif value != first[1]:
            return (f"{name}: {what} {value} where {first[0]} has {first[1]}: the {fmt} "
                    f"config holds one {what} for the whole model")
    return None


def float16_scales(scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """``scales`` in float16, refused unless the conversion is exact (an export is
    bit-exact or fails)."""
    import torch

    if scales.dtype == torch.float16:
        return scales
    half = scales.to(torch.float16)
    if not torch.equal(half.to(scales.dtype), scales):
        raise CheckpointError(f"scales are {str(scales.dtype).removeprefix('torch.')} and do not "
                              f"convert to float16 exactly: the {fmt} format stores float16 "
                              "scales")
    return half


# --------------------------------------------------------------------------- importers


def unsupported(where: str, field: str, value: Any, reads: str) -> CheckpointError:
    """``<format> <field> = <value> is not supported: qcore reads <reads>``; ``where`` is
    the format's name, or a path in its config (``compressed-tensors config_groups.g``),
    which the field extends with a dot."""
    path = f"{where}.{field}" if " " in where else f"{where} {field}"
    return CheckpointError(f"{path} = {value!r} is not supported: qcore reads {reads}")


def take(tensors: dict[str, torch.Tensor], key: str, fmt: str) -> torch.Tensor:
    """Pop the checkpoint tensor ``key``, or say that the checkpoint lacks it."""
    if key not in tensors:
        raise CheckpointError(f"{fmt} checkpoint: tensor {key!r} is missing")
    return tensors.pop(key)


def expect_shape(tensor: torch.Tensor, shape: Sequence[int], key: str, fmt: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"{fmt} checkpoint: tensor {key!r} has shape "
                              f"{list(tensor.shape)}, expected {list(shape)}")


def expect_dtype(tensor: torch.Tensor, dtypes: Sequence[torch.dtype], key: str,
                 fmt: str) -> None:
    if tensor.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CheckpointError(f"{fmt} checkpoint: tensor {key!r} is "
                              f"{str(tensor.dtype).removeprefix('torch.')}, expected {names}")


def modules_with(tensors: Mapping[str, Any], suffix: str) -> list[str]:
    """Module names ``X`` of the keys ``X.<suffix>``, in checkpoint order."""
    tail = "." + suffix
    return [key[:-len(tail)] for key in tensors if key.endswith(tail)]


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == PER_CHANNEL else -(-in_features // group_size)


def natural_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    import torch

    cols = torch.arange(in_features, dtype=torch.int32)
    return torch.zeros_like(cols) if group_size == PER_CHANNEL else cols // group_size


def int_weight(where: str, shape: tuple[int, int], bits: int, group_size: int,
               codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               g_idx: torch.Tensor | None = None, act_bits: int | None = None,
               act_dynamic: bool = True,
               input_scale: torch.Tensor | None = None) -> QuantizedWeight:
    """An ``"int"`` weight from what an importer read, checked. ``codes`` and ``zeros``
    are unsigned (``0 .. 2**bits - 1``, zeros ``[out, n_groups]``). Zero points that are
    all ``2**(bits-1)`` make a symmetric grid (the same dense weight, no zeros stored); a
    ``g_idx`` equal to the natural ``column // group_size`` is dropped."""
    import torch

    from qcore.interfaces import QuantizedWeight

    out_f, in_f = shape
    groups = n_groups(in_f, group_size)
    top = (1 << bits) - 1
    if tuple(codes.shape) != (out_f, in_f):
        raise CheckpointError(f"{where}: codes of shape {list(codes.shape)} for a "
                              f"{out_f} x {in_f} weight")
    if tuple(scales.shape) != (out_f, groups):
        raise CheckpointError(f"{where}: {scales.shape[-1] if scales.dim() else 0} scale groups "
                              f"per row, but in_features {in_f} with group size {group_size} "
                              f"makes {groups}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > top):
        raise CheckpointError(f"{where}: a weight code is outside the {bits}-bit range "
                              f"({int(codes.min()) - (1 << (bits - 1))} .. "
                              f"{int(codes.max()) - (1 << (bits - 1))} as signed levels)")
    tensors: dict[str, torch.Tensor] = {"codes": codes.to(torch.uint8).contiguous(),
                                        "scales": scales.contiguous()}
    if zeros is not None:
        zeros = zeros.to(torch.int32)
        if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > top):
            raise CheckpointError(f"{where}: a zero point is outside 0 .. {top} "
                                  f"({int(zeros.min())} .. {int(zeros.max())})")
        if not bool((zeros == 1 << (bits - 1)).all()):
            tensors["zeros"] = zeros.to(torch.uint8).contiguous()
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32).reshape(-1)
        if g_idx.numel() != in_f:
            raise CheckpointError(f"{where}: g_idx has {g_idx.numel()} entries for "
                                  f"{in_f} input columns")
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise CheckpointError(f"{where}: g_idx names groups "
                                  f"{int(g_idx.min())} .. {int(g_idx.max())}, outside 0 .. "
                                  f"{groups - 1}")
        if not torch.equal(g_idx, natural_g_idx(in_f, group_size)):
            tensors["g_idx"] = g_idx.contiguous()
    if input_scale is not None:
        tensors["input_scale"] = input_scale.to(torch.float32).reshape(())
    params: dict[str, Any] = {"bits": bits, "group_size": group_size,
                              "symmetric": "zeros" not in tensors, "act_bits": act_bits,
                              "act_dynamic": act_dynamic}
    if act_bits is not None:  # per-token (or per-tensor) symmetric: what the formats hold
        params.update(act_group_size=PER_CHANNEL, act_symmetric=True)
    return QuantizedWeight(format="int", shape=(out_f, in_f), tensors=tensors, params=params)


def name_matches(pattern: str, name: str) -> bool:
    """``re.match`` of ``pattern`` at the start of ``name`` (how compressed-tensors and
    GPTQ's ``dynamic`` match module names); a bad pattern matches nothing."""
    try:
        return re.match(pattern, name) is not None
    except re.error:
        return False


def version_tuple(text: Any) -> tuple[int, ...] | None:
    """``"0.17.1"`` -> ``(0, 17, 1)``; None when it does not start with a number."""
    parts = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text or ""))
    if parts is None:
        return None
    return tuple(int(p) for p in parts.groups() if p is not None)


def qcore_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qcore")
    except PackageNotFoundError:  # pragma: no cover - qcore is installed with the plugin
        return "unknown"
