"""What a checkpoint holds, without building the model: read from its header and config."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from qcore.checkpoint import read_config, read_quantization_config
from qcore.errors import CheckpointError
from qcore.qlinear import LOWRANK_DOWN, LOWRANK_UP

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4}


def safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes)."""
    with file.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise CheckpointError(f"{file} is not a safetensors file (header of {n} bytes)")
        try:
            return json.loads(fh.read(n))
        except json.JSONDecodeError:
            raise CheckpointError(f"{file} has a corrupt safetensors header") from None


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if read_config(path).get("quant_method") != "qcore":
        return _inspect_foreign(path)
    qconfig = read_quantization_config(path)
    tensors: dict[str, dict[str, Any]] = {}
    for file in sorted(path.glob("*.safetensors")):
        header = safetensors_header(file)
        header.pop("__metadata__", None)
        tensors.update(header)
    if not tensors:
        raise CheckpointError(f"{path} holds no *.safetensors weights")

    def nbytes(key: str) -> int:
        meta = tensors[key]
        count = 1
        for dim in meta["shape"]:
            count *= dim
        return count * _DTYPE_BYTES.get(meta["dtype"], 4)

    layers = {}
    quant_bytes = quant_weights = 0
    by_format: dict[str, list[int]] = {}  # format label -> [stored bytes, weights]
    for name, layer in qconfig["layers"].items():
        out_f, in_f = layer["shape"]
        stored = sum(nbytes(f"{name}.{k}") for k in layer["tensors"] if f"{name}.{k}" in tensors)
        if layer.get("lowrank"):  # the branch is part of the layer's storage
            branch = [f"{name}.{LOWRANK_DOWN}", f"{name}.{LOWRANK_UP}"]
            stored += sum(nbytes(k) for k in branch if k in tensors)
            if branch[0] in tensors:
                layer = {**layer, "lowrank_rank": tensors[branch[0]]["shape"][0]}
        fmt = _format_label(layer)
        layers[name] = {"shape": [out_f, in_f], "format": fmt, "bytes": stored,
                        "bits_per_weight": 8 * stored / (out_f * in_f),
                        "kernel": layer.get("kernel", "auto"),
                        "kernel_cpu": _kernel_on(layer, "cpu", "float32"),
                        "kernel_cuda": _kernel_on(layer, "cuda", "float16")}
        quant_bytes += stored
        quant_weights += out_f * in_f
        group = by_format.setdefault(fmt, [0, 0])
        group[0] += stored
        group[1] += out_f * in_f
    total_params = sum(_numel(meta["shape"]) for meta in tensors.values()
                       if meta["dtype"] in {"F32", "F16", "BF16", "F64"})
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    pipeline = qconfig.get("pipeline", {})
    names = [t["name"] for t in pipeline.get("transforms", [])] + [pipeline.get("quantizer", {}).get("name", "?")]
    scheme = pipeline.get("scheme", {})
    fp16_bytes = 2 * (total_params - _quantized_float_params(qconfig, tensors) + quant_weights)
    return {
        "path": str(path),
        "pipeline": pipeline,
        "pipeline_short": ",".join(names),
        "scheme": _scheme_label(scheme),
        "distributions": qconfig.get("distributions", {}),
        "n_quantized": len(layers),
        "formats": dict(Counter(layer["format"] for layer in layers.values())),
        "formats_bits_per_weight": {fmt: 8 * stored / n for fmt, (stored, n) in by_format.items()},
        "bits_per_weight": 8 * quant_bytes / max(quant_weights, 1),
        "size_bytes": size,
        "fp16_bytes": fp16_bytes,
        "layers": layers,
    }


def _scheme_label(scheme: dict[str, Any]) -> str:
    """The pipeline scheme's label (``W4A4 g64 sym act-g64``), as :class:`Scheme` writes it."""
    from qcore.errors import QcoreError
    from qcore.scheme import Scheme

    try:
        return Scheme.from_dict(scheme).label()
    except (QcoreError, TypeError):  # a scheme written by another version: the basics
        return (f"W{scheme.get('bits')} g{scheme.get('group_size')} "
                f"{'sym' if scheme.get('symmetric') else 'asym'}")


def _format_label(layer: dict[str, Any]) -> str:
    """``int-packed W4 g128 asym``, or for codebook layers ``vq-packed W2 v6 i12 +res i8``."""
    p = layer["params"]
    if "vector_size" in p:
        from qcore.codebook import describe_vq

        return f"{layer['layout']} W{p.get('bits')} {describe_vq(p)}"
    act = p.get("act_bits")
    return (f"{layer['layout']} W{p.get('bits')}"
            + (f"A{act}" if act else "")
            + (" per-channel" if p.get("group_size") == -1 else f" g{p.get('group_size')}")
            + (" sym" if p.get("symmetric") else " asym")
            + (f" act-g{p['act_group_size']}" if act and p.get("act_group_size", -1) != -1 else "")
            + (" act-asym" if act and not p.get("act_symmetric", True) else "")
            + (" act-order" if "g_idx" in layer["tensors"] else "")
            + (f" +low-rank r{layer['lowrank_rank']}" if layer.get("lowrank_rank") else ""))


def _kernel_on(layer: dict[str, Any], device: str, dtype: str) -> str:
    """The provider that would serve the layer on ``device``/``dtype`` here, or why none."""
    from qcore.errors import QcoreError
    from qcore.interfaces import KernelRequest, act_fields
    from qcore.kernel_select import select_kernel
    from qcore.plugins import get_registry

    p = layer["params"]
    cc = None
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            cc = torch.cuda.get_device_capability()
    request = KernelRequest(op=layer["op"], layout=layer["layout"], bits=int(p.get("bits") or 0),
                            group_size=int(p.get("group_size") or -1),
                            symmetric=bool(p.get("symmetric")), in_features=layer["shape"][1],
                            out_features=layer["shape"][0], act_bits=p.get("act_bits"),
                            act_dynamic=bool(p.get("act_dynamic", True)),
                            act_order="g_idx" in layer["tensors"], dtype=dtype, device=device,
                            compute_capability=cc, **act_fields(p))
    try:
        return select_kernel(get_registry(), request, layer.get("kernel", "auto")).name
    except QcoreError as exc:
        return f"none ({exc})"


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _quantized_float_params(qconfig: dict[str, Any], tensors: dict[str, Any]) -> int:
    """Float elements stored for quantized layers (scales etc.), not counted as model
    parameters in the fp16 comparison (their dense weights are counted instead)."""
    n = 0
    for name, layer in qconfig["layers"].items():
        keys = list(layer["tensors"]) + ([LOWRANK_DOWN, LOWRANK_UP] if layer.get("lowrank") else [])
        for key in keys:
            meta = tensors.get(f"{name}.{key}")
            if meta is not None and meta["dtype"] in {"F32", "F16", "BF16", "F64"}:
                n += _numel(meta["shape"])
    return n


def _inspect_foreign(path: Path) -> dict[str, Any]:
    """A checkpoint another tool wrote, described as qcore holds it once imported (the
    layers packed in qcore's layouts; bits per weight of that storage)."""
    from qcore.checkpoint import load_tensors
    from qcore.exchange import import_layers, packer_for_format

    qconfig = read_config(path)
    tensors = load_tensors(path)
    fmt, imported = import_layers(path, qconfig, tensors)
    records, stored_bytes = {}, {}
    for name, qweight in imported.items():
        packer = packer_for_format(qweight.format, int(qweight.params.get("bits") or 0))
        packed = packer.pack(qweight)
        records[name] = {"layout": packed.layout, "op": packer.op, "shape": list(packed.shape),
                         "params": dict(packed.params),
                         "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."),
                                         "shape": list(v.shape)}
                                     for k, v in packed.tensors.items()}}
        stored_bytes[name] = sum(v.numel() * v.element_size() for v in packed.tensors.values())
    layers = {}
    by_format: dict[str, list[int]] = {}
    for name, record in records.items():
        out_f, in_f = record["shape"]
        label = _format_label(record)
        layers[name] = {"shape": [out_f, in_f], "format": label, "bytes": stored_bytes[name],
                        "bits_per_weight": 8 * stored_bytes[name] / (out_f * in_f),
                        "kernel": "auto", "kernel_cpu": _kernel_on(record, "cpu", "float32"),
                        "kernel_cuda": _kernel_on(record, "cuda", "float16")}
        group = by_format.setdefault(label, [0, 0])
        group[0] += stored_bytes[name]
        group[1] += out_f * in_f
    quant_weights = sum(n for _, n in by_format.values())
    float_params = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    first = next(iter(records.values()))["params"]
    return {
        "path": str(path),
        "imported_from": {"quant_method": qconfig.get("quant_method"), "format": fmt.name},
        "pipeline": {},
        "pipeline_short": f"imported from {qconfig.get('quant_method')} (read by {fmt.name})",
        "scheme": f"W{first.get('bits')} g{first.get('group_size')} "
                  f"{'sym' if first.get('symmetric') else 'asym'}",
        "distributions": {},
        "n_quantized": len(layers),
        "formats": dict(Counter(layer["format"] for layer in layers.values())),
        "formats_bits_per_weight": {f: 8 * b / n for f, (b, n) in by_format.items()},
        "bits_per_weight": 8 * sum(b for b, _ in by_format.values()) / max(quant_weights, 1),
        "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "fp16_bytes": 2 * (float_params + quant_weights),
        "layers": layers,
    }

