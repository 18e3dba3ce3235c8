"""GPTQ checkpoints, version 1 (``checkpoint_format: "gptq"``), as AutoGPTQ and GPTQModel
write them and vLLM, transformers and GPTQModel read them.

Per linear (``in`` input, ``out`` output features, ``G`` groups):

- ``qweight`` int32 ``[in*bits/32, out]``: each output column's codes, in input order, as
  one dense little-endian bit stream (at 3 bits, 32 codes fill 3 words and codes 10 and 21
  straddle words);
- ``qzeros`` int32 ``[G, out*bits/32]``: each group's zero points, in output order, packed
  the same way, each stored minus 1 (version 1); a symmetric grid stores its implicit
  zero point ``2**(bits-1)`` too;
- ``scales`` float16 ``[G, out]``; ``g_idx`` int32 ``[in]``, the group of each input
  column (``column // group_size`` without act-order).

Bits 2, 3, 4 and 8; ``group_size`` -1 means one group per output channel. Version 1 cannot
store a zero point of 0 (it would be stored as -1); the export stores such a group with
its codes and zero point raised by one, the same dense weight, when its codes leave room,
and refuses otherwise. The importer also reads ``checkpoint_format: "gptq_v2"`` (zero points
stored as they are) and GPTQModel's per-module ``dynamic`` overrides.
"""

from __future__ import annotations

import re
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
    n_groups,
    name_matches,
    natural_g_idx,
    pack_stream,
    qcore_version,
    record_scheme,
    stream_words,
    take,
    uniform,
    unpack_stream,
    unsupported,
)

if TYPE_CHECKING:
    import torch

    from qcore.interfaces import QuantizedWeight

NAME = "gptq"
BITS = (2, 3, 4, 8)


def _limit(scheme: LayerScheme) -> str | None:
    """Why GPTQ cannot hold a layer of ``scheme`` (None: it can)."""
    if scheme.bits not in BITS:
        return "the gptq format stores 2, 3, 4 or 8 bits"
    if scheme.act_bits is not None:
        return f"{scheme.act_bits}-bit activations: the gptq format is weight-only"
    if scheme.scale_dtype not in (None, "float16"):
        return (f"{scheme.scale_dtype} scales: the gptq format stores float16 scales, and "
                f"{scheme.scale_dtype} ones do not in general convert to float16 exactly")
    for what, n in (("in_features", scheme.in_features), ("out_features", scheme.out_features)):
        if n * scheme.bits % 32:
            return (f"{what} {n} at {scheme.bits} bits does not fill whole 32-bit words "
                    "(qweight packs the input dimension, qzeros the output dimension)")
    return None


def _raise_zero_points(codes: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                       bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and zero points with every zero point of 0 raised to 1 and its group's codes
    raised by 1 (the same dense weight), which version 1 can store; an error when a code
    of such a group is already the largest."""
    import torch

    low = zeros == 0
    if not bool(low.any()):
        return codes, zeros
    top = (1 << bits) - 1
    index = g_idx.long().expand(codes.shape[0], -1)
    highest = torch.zeros(zeros.shape, dtype=torch.int32).scatter_reduce(
        1, index, codes.to(torch.int32), "amax")
    stuck = low & (highest >= top)
    if bool(stuck.any()):
        row, group = (int(i) for i in stuck.nonzero()[0])
        raise CheckpointError(
            f"row {row}, group {group} has zero point 0 and a code of {top}: the gptq format "
            "(version 1) stores zero points minus 1 and cannot hold that group exactly")
    raise_by = low.to(torch.uint8)
    return codes + torch.gather(raise_by, 1, index), zeros + raise_by


class GPTQFormat(CheckpointFormat):
    """GPTQ (AutoGPTQ, GPTQModel; read by vLLM and transformers): version-1 checkpoints,
    2, 3, 4 or 8 bits, act-order through ``g_idx``."""

    name = NAME
    quant_methods = frozenset({"gptq"})

    # ------------------------------------------------------------------------- export

    def cannot_express(self, layers: Mapping[str, Mapping[str, Any]]) -> str | None:
        return (first_refusal(layers, NAME, _limit)
                or uniform(layers, NAME, "bit width", lambda s: s.bits)
                or uniform(layers, NAME, "group size", lambda s: s.group_size))

    def export_layer(self, qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
        import torch

        scheme = check_weight(qweight, NAME, _limit)
        bits, t = scheme.bits, qweight.tensors
        scales = float16_scales(t["scales"], NAME)
        zeros = t.get("zeros")
        if zeros is None:
            zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8)
        g_idx = t.get("g_idx")
        if g_idx is None:
            g_idx = natural_g_idx(scheme.in_features, scheme.group_size)
        codes, zeros = _raise_zero_points(t["codes"], zeros, g_idx, bits)
        return {
            "qweight": pack_stream(codes, bits).t().contiguous(),
            "qzeros": pack_stream((zeros.to(torch.int32) - 1).t().contiguous(), bits),
            "scales": scales.t().contiguous(),
            "g_idx": g_idx.to(torch.int32).contiguous(),
        }

    def export_config(self, layers: Mapping[str, Mapping[str, Any]],
                      ignore: Sequence[str]) -> dict[str, Any]:
        schemes = [record_scheme(r) for r in layers.values()]
        config: dict[str, Any] = {
            "quant_method": "gptq",
            "bits": schemes[0].bits,
            "group_size": schemes[0].group_size,
            "desc_act": any(s.act_order for s in schemes),
            "sym": all(s.symmetric for s in schemes),
            "lm_head": any(name.rsplit(".", 1)[-1] == "lm_head" for name in layers),
            "checkpoint_format": "gptq",
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"qcore:{qcore_version()}"]},
        }
        # Linears left in float inside the decoder blocks: GPTQModel's and vLLM's negative
        # ``dynamic`` matches keep them unquantized (lm_head has its own flag).
        skipped = {f"-:{re.escape(name)}$": {} for name in ignore
                   if name.rsplit(".", 1)[-1] != "lm_head"}
        if skipped:
            config["dynamic"] = skipped
        return config

    # ------------------------------------------------------------------------- import

    def import_layers(self, qconfig: Mapping[str, Any],
                      tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
        fmt = str(qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise unsupported(NAME, "checkpoint_format", fmt, "'gptq' and 'gptq_v2'")
        pack_dtype = str(qconfig.get("pack_dtype", "int32")).removeprefix("torch.")
        if pack_dtype != "int32":
            raise unsupported(NAME, "pack_dtype", qconfig.get("pack_dtype"), "'int32'")
        base = _settings(NAME, qconfig)
        dynamic = qconfig.get("dynamic") or {}
        if not isinstance(dynamic, Mapping):
            raise unsupported(NAME, "dynamic", dynamic, "a mapping of module patterns")
        desc_act = bool(qconfig.get("desc_act", False))
        layers: dict[str, QuantizedWeight] = {}
        for module in modules_with(tensors, "qweight"):
            bits, group_size = _module_settings(module, base, dynamic)
            if desc_act and f"{module}.g_idx" not in tensors:
                raise CheckpointError(f"{NAME} checkpoint: desc_act is true but {module}.g_idx "
                                      "is missing: the columns' groups are unknown")
            layers[module] = _read_layer(module, bits, group_size, fmt == "gptq", tensors)
        return layers


def _settings(where: str, config: Mapping[str, Any]) -> tuple[int, int]:
    """``(bits, group_size)`` of a config or of a ``dynamic`` override, checked."""
    bits = config.get("bits")
    if isinstance(bits, bool) or bits not in BITS:
        raise unsupported(where, "bits", bits, "2, 3, 4 and 8")
    group_size = config.get("group_size")
    if (isinstance(group_size, bool) or not isinstance(group_size, int)
            or (group_size != PER_CHANNEL and group_size < 1)):
        raise unsupported(where, "group_size", group_size, "-1 or a positive group size")
    return bits, group_size


def _module_settings(module: str, base: tuple[int, int],
                     dynamic: Mapping[str, Any]) -> tuple[int, int]:
    """A module's bits and group size: the first ``dynamic`` pattern matching its name
    overrides the config's (``-:`` patterns mark modules left unquantized)."""
    for pattern, override in dynamic.items():
        pattern = str(pattern)
        if pattern.startswith("-:"):
            if name_matches(pattern[2:], module):
                raise CheckpointError(f"{NAME} checkpoint: {module} has a qweight but the "
                                      f"config's dynamic pattern {pattern!r} excludes it")
            continue
        if name_matches(pattern.removeprefix("+:"), module):
            if not isinstance(override, Mapping):
                raise unsupported(NAME, f"dynamic[{pattern!r}]", override, "a mapping")
            merged = {"bits": base[0], "group_size": base[1], **override}
            return _settings(f"{NAME} dynamic[{pattern!r}]", merged)
    return base


def _read_layer(module: str, bits: int, group_size: int, v1: bool,
                tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    import torch

    key = f"{module}."
    qweight = take(tensors, key + "qweight", NAME)
    qzeros = take(tensors, key + "qzeros", NAME)
    scales = take(tensors, key + "scales", NAME)
    g_idx = tensors.pop(key + "g_idx", None)
    for name, tensor in (("qweight", qweight), ("qzeros", qzeros)):
        expect_dtype(tensor, (torch.int32,), key + name, NAME)
    rows, out_f = qweight.shape
    if g_idx is not None:
        in_f = g_idx.numel()
    elif rows * 32 % bits == 0:
        in_f = rows * 32 // bits
    else:
        raise CheckpointError(f"{NAME} checkpoint: {key}qweight has {rows} rows, which hold no "
                              f"whole number of {bits}-bit codes, and no g_idx gives in_features")
    expect_shape(qweight, (stream_words(in_f, bits), out_f), key + "qweight", NAME)
    groups = n_groups(in_f, group_size)
    expect_shape(scales, (groups, out_f), key + "scales", NAME)
    expect_shape(qzeros, (groups, stream_words(out_f, bits)), key + "qzeros", NAME)
    codes = unpack_stream(qweight.t().contiguous(), bits, in_f)
    zeros = unpack_stream(qzeros, bits, out_f).to(torch.int32)
    if v1:  # stored minus 1, field by field
        zeros = (zeros + 1) & ((1 << bits) - 1)
    return int_weight(f"{NAME} {module}", (out_f, in_f), bits, group_size, codes,
                      scales.t(), zeros.t(), g_idx)
