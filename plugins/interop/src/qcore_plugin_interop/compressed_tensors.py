"""compressed-tensors, the format of llm-compressor that vLLM and transformers read.

Export (the layout of compressed-tensors 0.20):

- weight-only layers: ``pack-quantized``. ``weight_packed`` int32 ``[out, ceil(in*bits/32)]``
  holds each row's codes as one dense little-endian bit stream (the stored value is the
  signed level plus ``2**(bits-1)``, which is qcore's code); ``weight_scale`` float32
  ``[out, n_groups]``; ``weight_shape`` int64 ``[out, in]``; for an
  asymmetric grid ``weight_zero_point`` int32 ``[ceil(out*bits/32), n_groups]``, the zero
  points packed the same way along the output dimension (qcore's zero ``z`` is the signed
  zero point ``z - 2**(bits-1)`` plus the same offset).
- layers with 8-bit activations: ``int-quantized``. ``weight`` int8 ``[out, in]`` (signed
  levels ``code - 2**(bits-1)``), ``weight_scale``, int8 ``weight_zero_point`` (asymmetric),
  float32 ``input_scale`` ``[1]`` for static activations; the scheme's
  ``input_activations`` are symmetric int8, per token and dynamic or per tensor and static.

Scales are written in float32, an exact widening of qcore's float16 (or bfloat16) scales:
compressed-tensors dequantizes in the dtype of the stored scale, so its dense weight is
then qcore's float32 ``(codes - zero) * scale`` bit for bit (vLLM casts scales to the
model's dtype whatever dtype they are stored in). Layers of one scheme share a config group
targeting ``Linear``; with several schemes, each group lists its modules by exact name.
Act-order weights are refused: compressed-tensors 0.20 removed act-order groups
(``actorder: "group"`` and ``weight_g_idx``).

Import reads both formats (and ``naive-quantized`` and ``mixed-precision``), keeping the
stored scale dtype, and what older releases wrote: ``weight_g_idx`` with ``actorder:
"group"``, unpacked int8 zero points, and the packing before 0.18, which fits ``32 // bits``
codes in each word without straddling (the ``version`` field or the packed width tells).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    int_weight,
    modules_with,
    name_matches,
    pack_stream,
    record_scheme,
    stream_words,
    take,
    unpack_stream,
    unsupported,
    version_tuple,
)

if TYPE_CHECKING:
    import torch

    from qcore.interfaces import QuantizedWeight

NAME = "compressed-tensors"
#: The compressed-tensors release whose layout the export writes (its ``version`` field).
FORMAT_VERSION = "0.20.0"
PACKED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
NAIVE = "naive-quantized"
MIXED = "mixed-precision"
READ_FORMATS = (PACKED, INT_QUANTIZED, NAIVE)
#: From this release on, ``pack_to_int32`` packs widths that do not divide 32 densely.
DENSE_PACKING_SINCE = (0, 18)


def _limit(scheme: LayerScheme) -> str | None:
    """Why compressed-tensors cannot hold a layer of ``scheme`` (None: it can)."""
    if not 1 <= scheme.bits <= 8:
        return "compressed-tensors packs 1 to 8 bits"
    if scheme.act_order:
        return ("act-order (g_idx) is not expressible: compressed-tensors 0.20 removed "
                "act-order groups (actorder 'group' and weight_g_idx); GPTQ's static "
                "act-order (--set gptq.static_groups=true) stores none and exports")
    if scheme.group_size != PER_CHANNEL and scheme.in_features % scheme.group_size:
        return (f"group size {scheme.group_size} does not divide in_features "
                f"{scheme.in_features}: compressed-tensors' groups are all equal")
    if scheme.act_bits is not None and scheme.act_bits != 8:
        return (f"{scheme.act_bits}-bit activations: the compressed-tensors export writes int8 "
                "activations")
    if scheme.act_bits and not scheme.act_dynamic and not scheme.static_input_scale:
        return "static activations without an input_scale"
    if scheme.act_bits and (scheme.act_group_size != PER_CHANNEL or not scheme.act_symmetric):
        return ("activations quantized in groups or on an asymmetric grid: the "
                "compressed-tensors export writes symmetric per-token or per-tensor int8 "
                "activations")
    return None


def _key(scheme: LayerScheme) -> tuple[Any, ...]:
    """What makes two layers' config groups differ."""
    return (scheme.bits, scheme.group_size, scheme.symmetric, scheme.act_bits,
            scheme.act_dynamic if scheme.act_bits else None)


def _weight_args(scheme: LayerScheme) -> dict[str, Any]:
    """``QuantizationArgs`` of the weights, as compressed-tensors 0.20 serialises them."""
    channel = scheme.group_size == PER_CHANNEL
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
            "group_size": None if channel else scheme.group_size,
            "strategy": "channel" if channel else "group", "dynamic": False}


def _input_args(scheme: LayerScheme) -> dict[str, Any] | None:
    if not scheme.act_bits:
        return None
    return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
            "strategy": "token" if scheme.act_dynamic else "tensor",
            "dynamic": scheme.act_dynamic}


@dataclass(frozen=True)
class _Group:
    """One config group as the importer reads it."""

    name: str
    targets: tuple[str, ...]
    bits: int
    group_size: int
    symmetric: bool
    g_idx: bool
    act_bits: int | None
    act_dynamic: bool
    format: str | None


class CompressedTensorsFormat(CheckpointFormat):
    """compressed-tensors (vLLM, transformers, llm-compressor): pack-quantized W1-W8, grouped
    or per channel, symmetric or not; int-quantized with int8 activations."""

    name = NAME
    quant_methods = frozenset({"compressed-tensors"})

    # ------------------------------------------------------------------------- export

    def cannot_express(self, layers: Mapping[str, Mapping[str, Any]]) -> str | None:
        return first_refusal(layers, NAME, _limit)

    def export_layer(self, qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
        import torch

        scheme = check_weight(qweight, NAME, _limit)
        t = qweight.tensors
        offset = 1 << (scheme.bits - 1)
        out: dict[str, torch.Tensor] = {}
        if scheme.act_bits:
            out["weight"] = (t["codes"].to(torch.int16) - offset).to(torch.int8)
            out["weight_scale"] = t["scales"].to(torch.float32)
            if not scheme.symmetric:
                out["weight_zero_point"] = (t["zeros"].to(torch.int16) - offset).to(torch.int8)
            if not scheme.act_dynamic:
                out["input_scale"] = t["input_scale"].to(torch.float32).reshape(1)
            return out
        out["weight_packed"] = pack_stream(t["codes"], scheme.bits)
        out["weight_scale"] = t["scales"].to(torch.float32)
        out["weight_shape"] = torch.tensor(list(qweight.shape), dtype=torch.int64)
        if not scheme.symmetric:
            # Packed along the output dimension: one stream per group column.
            out["weight_zero_point"] = pack_stream(t["zeros"].t(), scheme.bits).t().contiguous()
        return out

    def export_config(self, layers: Mapping[str, Mapping[str, Any]],
                      ignore: Sequence[str]) -> dict[str, Any]:
        by_key: dict[tuple[Any, ...], tuple[LayerScheme, list[str]]] = {}
        for name, record in layers.items():
            scheme = record_scheme(record)
            by_key.setdefault(_key(scheme), (scheme, []))[1].append(name)
        groups: dict[str, Any] = {}
        formats = set()
        for i, (scheme, names) in enumerate(by_key.values()):
            fmt = INT_QUANTIZED if scheme.act_bits else PACKED
            formats.add(fmt)
            groups[f"group_{i}"] = {
                "targets": ["Linear"] if len(by_key) == 1 else list(names),
                "weights": _weight_args(scheme),
                "input_activations": _input_args(scheme),
                "output_activations": None,
                "format": fmt,
            }
        return {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else MIXED,
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": list(ignore),
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "version": FORMAT_VERSION,
        }

    # ------------------------------------------------------------------------- import

    def import_layers(self, qconfig: Mapping[str, Any],
                      tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
        fmt = qconfig.get("format")
        if fmt not in (*READ_FORMATS, MIXED):
            raise unsupported(NAME, "format", fmt,
                              "'pack-quantized', 'int-quantized', 'naive-quantized' and "
                              "'mixed-precision'")
        status = qconfig.get("quantization_status", "compressed")
        if status != "compressed":
            raise unsupported(NAME, "quantization_status", status, "'compressed'")
        for field in ("kv_cache_scheme", "sparsity_config", "transform_config"):
            if qconfig.get(field):
                raise unsupported(NAME, field, qconfig[field], "none")
        raw_groups = qconfig.get("config_groups")
        if not isinstance(raw_groups, Mapping) or not raw_groups:
            raise unsupported(NAME, "config_groups", raw_groups, "a mapping of schemes")
        groups = [_read_group(str(name), scheme) for name, scheme in raw_groups.items()]
        ignore = [str(x) for x in qconfig.get("ignore") or []]
        version = version_tuple(qconfig.get("version"))

        names = dict.fromkeys(modules_with(tensors, "weight_scale")
                              + modules_with(tensors, "weight_packed"))
        layers: dict[str, QuantizedWeight] = {}
        for module in names:
            group = _group_of(module, groups, ignore)
            module_fmt = group.format or fmt
            if module_fmt == MIXED:
                module_fmt = PACKED if f"{module}.weight_packed" in tensors else INT_QUANTIZED
            layers[module] = _read_layer(module, group, module_fmt, tensors, version)
        return layers


# ------------------------------------------------------------------------------ import


def _read_group(name: str, scheme: Any) -> _Group:
    where = f"{NAME} config_groups.{name}"
    if not isinstance(scheme, Mapping):
        raise CheckpointError(f"{where} = {scheme!r} is not supported: qcore reads a scheme "
                              "with targets and weights, not a preset name")
    targets = scheme.get("targets") or []
    if isinstance(targets, str):
        targets = [targets]
    weights = scheme.get("weights")
    if not isinstance(weights, Mapping):
        raise unsupported(where, "weights", weights, "integer weight quantization")
    w = f"{where}.weights"
    kind = str(weights.get("type", "int")).lower()
    if kind != "int":
        raise unsupported(w, "type", weights.get("type"), "'int'")
    bits = weights.get("num_bits", 8)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise unsupported(w, "num_bits", bits, "1 to 8")
    group_size = weights.get("group_size")
    strategy = weights.get("strategy")
    if strategy is None and (group_size is None or isinstance(group_size, int)):
        # compressed-tensors infers it from the group size
        strategy = ("tensor" if group_size is None else "group" if group_size > 0
                    else "channel" if group_size == -1 else None)
    strategy = str(strategy).lower()
    if strategy not in ("group", "channel"):
        raise unsupported(w, "strategy", weights.get("strategy"), "'group' and 'channel'")
    if strategy == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise unsupported(w, "group_size", group_size, "a positive group size")
    else:
        group_size = PER_CHANNEL
    if weights.get("dynamic"):
        raise unsupported(w, "dynamic", weights.get("dynamic"), "false (stored scales)")
    actorder = weights.get("actorder")
    if actorder not in (None, False, True, "weight", "static", "group", "dynamic"):
        raise unsupported(w, "actorder", actorder, "'weight', 'group' or null")
    act_bits, act_dynamic = _read_inputs(f"{where}.input_activations",
                                         scheme.get("input_activations"))
    if scheme.get("output_activations") is not None:
        raise unsupported(where, "output_activations", scheme.get("output_activations"),
                          "null")
    group_fmt = scheme.get("format")
    if group_fmt is not None and group_fmt not in READ_FORMATS:
        raise unsupported(where, "format", group_fmt,
                          "'pack-quantized', 'int-quantized' and 'naive-quantized'")
    return _Group(name=name, targets=tuple(str(t) for t in targets), bits=bits,
                  group_size=group_size, symmetric=bool(weights.get("symmetric", True)),
                  g_idx=actorder in (True, "group", "dynamic"), act_bits=act_bits,
                  act_dynamic=act_dynamic, format=group_fmt)


def _read_inputs(where: str, args: Any) -> tuple[int | None, bool]:
    """``(act_bits, act_dynamic)`` of a scheme's ``input_activations``."""
    if args is None:
        return None, True
    if not isinstance(args, Mapping):
        raise unsupported(where.rsplit(".", 1)[0], "input_activations", args, "a mapping")
    if str(args.get("type", "int")).lower() != "int":
        raise unsupported(where, "type", args.get("type"), "'int'")
    if args.get("num_bits", 8) != 8:
        raise unsupported(where, "num_bits", args.get("num_bits"), "8")
    if not args.get("symmetric", True):
        raise unsupported(where, "symmetric", args.get("symmetric"), "true (symmetric int8)")
    strategy, dynamic = args.get("strategy"), args.get("dynamic", False)
    if strategy == "token" and dynamic is True:
        return 8, True
    if strategy == "tensor" and dynamic is False:
        return 8, False
    if strategy not in ("token", "tensor"):
        raise unsupported(where, "strategy", strategy, "'token' (dynamic) and 'tensor' (static)")
    raise CheckpointError(f"{where}.dynamic = {dynamic!r} with strategy {strategy!r} is not "
                          "supported: qcore reads dynamic 'token' and static 'tensor' "
                          "activation scales")


def _group_of(module: str, groups: list[_Group], ignore: list[str]) -> _Group:
    """The config group of ``module``, matched as compressed-tensors matches: an exact
    name first, then a ``re:`` pattern, then a class name (capitalised, e.g. ``Linear``:
    every quantized module found in the tensors is taken to be of that class)."""
    if any(_names(t, module) for t in ignore):
        raise CheckpointError(f"{NAME} checkpoint: {module} has quantized tensors but the "
                              "config's ignore list names it")
    for test in (lambda t: t == module,
                 lambda t: t.startswith("re:") and name_matches(t[3:], module),
                 lambda t: t[:1].isupper()):
        for group in groups:
            if any(test(t) for t in group.targets):
                return group
    raise CheckpointError(f"{NAME} checkpoint: {module} has quantized tensors but no config "
                          "group targets it")


def _names(target: str, module: str) -> bool:
    """Whether ``target`` names ``module``: exactly or by a ``re:`` pattern."""
    return target == module or (target.startswith("re:") and name_matches(target[3:], module))


def _packing(bits: int, width: int, n: int, version: tuple[int, ...] | None) -> str:
    """``"dense"`` (0.18 and later) or ``"legacy"`` (``32 // bits`` codes per word, before
    0.18) for ``width`` words holding ``n`` codes; the two agree when bits divide 32."""
    dense, legacy = stream_words(n, bits), -(-n // (32 // bits))
    if 32 % bits == 0 or (width == dense and width != legacy):
        return "dense"
    if width == legacy and width != dense:
        return "legacy"
    if width == dense:  # both widths agree: the writer's release decides
        return "legacy" if version is not None and version < DENSE_PACKING_SINCE else "dense"
    raise CheckpointError(f"{NAME} checkpoint: {width} packed words cannot hold {n} "
                          f"{bits}-bit values (expected {dense})")


def _unpack(packed: torch.Tensor, bits: int, n: int,
            version: tuple[int, ...] | None) -> torch.Tensor:
    """Unsigned codes ``[rows, n]`` of int32 words ``[rows, width]`` packed along dim 1."""
    import torch

    if _packing(bits, packed.shape[1], n, version) == "dense":
        return unpack_stream(packed, bits, n)
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8)


def _read_layer(module: str, group: _Group, fmt: str, tensors: dict[str, torch.Tensor],
                version: tuple[int, ...] | None) -> QuantizedWeight:
    import torch

    key = f"{module}."
    bits, offset = group.bits, 1 << (group.bits - 1)
    if fmt == PACKED:
        packed = take(tensors, key + "weight_packed", NAME)
        expect_dtype(packed, (torch.int32,), key + "weight_packed", NAME)
        shape = take(tensors, key + "weight_shape", NAME).reshape(-1).tolist()
        if len(shape) != 2:
            raise CheckpointError(f"{NAME} checkpoint: tensor {key}weight_shape is {shape}, "
                                  "expected [out, in]")
        out_f, in_f = (int(x) for x in shape)
        expect_shape(packed, (out_f, packed.shape[1]), key + "weight_packed", NAME)
        codes = _unpack(packed, bits, in_f, version)
    else:
        weight = take(tensors, key + "weight", NAME)
        expect_dtype(weight, (torch.int8,), key + "weight", NAME)
        out_f, in_f = weight.shape
        codes = weight.to(torch.int16) + offset
    scales = take(tensors, key + "weight_scale", NAME)
    if scales.dim() == 1:
        scales = scales.reshape(-1, 1)
    zero_key = key + "weight_zero_point"
    zeros = None
    if group.symmetric:
        tensors.pop(zero_key, None)
    else:
        zp = take(tensors, zero_key, NAME)
        if zp.dim() == 1:
            zp = zp.reshape(-1, 1)
        if fmt == PACKED and zp.dtype == torch.int32 and zp.shape[0] != out_f:
            zeros = _unpack(zp.t().contiguous(), bits, out_f, version).t()
        else:
            zeros = zp.to(torch.int16) + offset
    g_idx = tensors.pop(key + "weight_g_idx", None)
    input_scale = None
    if group.act_bits and not group.act_dynamic:
        input_scale = take(tensors, key + "input_scale", NAME)
    else:
        tensors.pop(key + "input_scale", None)
    return int_weight(f"{NAME} {module}", (out_f, in_f), bits, group.group_size, codes,
                      scales, zeros, g_idx if group.g_idx else None, group.act_bits,
                      group.act_dynamic, input_scale)
