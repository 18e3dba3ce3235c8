"""Checkpoints in formats other engines read: export (``qcore export``) and import
(:func:`qcore.load` of a checkpoint another tool wrote).

The formats themselves are plugins (:class:`qcore.interfaces.CheckpointFormat`, contract
1.3; compressed-tensors, GPTQ and AWQ come with qcore-plugin-interop). This module does the
rest, the same for every format: it reads and unpacks a qcore checkpoint, asks the format
whether it can express every layer before writing anything, copies the float parameters
and the tokenizer, and writes the Hugging Face model directory atomically.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcore.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from qcore.interfaces import CheckpointFormat, QuantizedWeight
    from qcore.registry import Registry

INTEROP = "qcore-plugin-interop"
#: The formats qcore-plugin-interop provides, named when none is installed.
INTEROP_FORMATS = ("compressed-tensors", "gptq", "awq")
#: Largest safetensors file an export writes; larger models are sharded with an index.
SHARD_BYTES = 2 * 1024**3
INDEX_NAME = "model.safetensors.index.json"


def _registry() -> Registry:
    from qcore.plugins import get_registry

    return get_registry()


def checkpoint_format(name: str) -> CheckpointFormat:
    """The installed checkpoint format ``name``, or an error listing the installed ones."""
    registry = _registry()
    reg = registry.find("checkpoint_format", name)
    if reg is not None:
        return reg.cls()  # type: ignore[return-value]
    installed = registry.names("checkpoint_format")
    message = (f"unknown export format {name!r}; installed formats: "
               f"{', '.join(installed) or 'none'}")
    if name in INTEROP_FORMATS and not installed:
        message += f". {name!r} is provided by {INTEROP}: pip install {INTEROP}"
    raise CheckpointError(message)


def importer_for(quant_method: str) -> CheckpointFormat | None:
    """The installed format that reads ``quantization_config.quant_method``, if any."""
    for reg in _registry().of_kind("checkpoint_format"):
        if quant_method in reg.cls.quant_methods:  # type: ignore[attr-defined]
            return reg.cls()  # type: ignore[return-value]
    return None


def require_importer(path: Path, quant_method: Any) -> CheckpointFormat:
    fmt = importer_for(str(quant_method))
    if fmt is not None:
        return fmt
    readable = sorted({m for reg in _registry().of_kind("checkpoint_format")
                       for m in reg.cls.quant_methods})  # type: ignore[attr-defined]
    hint = ("qcore reads quant_method 'qcore'"
            + (f" and, through installed formats, {', '.join(map(repr, readable))}" if readable
               else f"; {INTEROP} reads 'compressed-tensors', 'gptq' and 'awq' checkpoints: "
                    f"pip install {INTEROP}"))
    raise CheckpointError(f"{path} holds a checkpoint with quant_method {quant_method!r}, which "
                          f"no installed checkpoint format reads: {hint}")


def layer_records(qconfig: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A qcore checkpoint's layer records, each with ``format`` (its layout's logical
    format) added, as :class:`~qcore.interfaces.CheckpointFormat` receives them."""
    formats = {reg.cls.layout: reg.cls.format  # type: ignore[attr-defined]
               for reg in _registry().of_kind("packer")}
    return {name: {**record, "format": formats.get(record["layout"], record["layout"])}
            for name, record in qconfig.get("layers", {}).items()}


def _packer_for_layout(layout: str) -> Any:
    for reg in _registry().of_kind("packer"):
        if reg.cls.layout == layout:  # type: ignore[attr-defined]
            return reg.cls()
    raise CheckpointError(f"no installed packer reads layout {layout!r}")


def packer_for_format(fmt: str, bits: int) -> Any:
    """The packer ``packer = "auto"`` picks for a logical format (highest priority)."""
    candidates = [reg.cls for reg in _registry().of_kind("packer")
                  if reg.cls.format == fmt and bits in reg.cls.supported_bits]  # type: ignore[attr-defined]
    if not candidates:
        raise CheckpointError(f"no installed packer stores format {fmt!r} at {bits} bits")
    return max(candidates, key=lambda c: c.priority)()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- export


def export(checkpoint: str | Path, out: str | Path, format: str,
           overwrite: bool = False) -> Path:
    """Write the qcore checkpoint ``checkpoint`` as a Hugging Face model directory in
    ``format`` (e.g. ``"compressed-tensors"``), atomically. Everything is checked before
    anything is written: an existing ``out`` (unless ``overwrite``), an unknown format, a
    checkpoint that is not qcore's, a layer the format cannot express (the error lists
    the installed formats that can)."""
    from qcore.checkpoint import (
        CONFIG_NAME,
        _swap_into_place,
        load_tensors,
        read_quantization_config,
    )

    src = Path(checkpoint)
    dst = Path(out).absolute()
    if dst.exists() and not overwrite:
        raise CheckpointError(f"output directory {dst} already exists; choose another OUT or "
                              "pass --overwrite (overwrite=True) to replace it")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a directory")
    if dst == src.absolute():
        raise CheckpointError("OUT is the checkpoint itself; export to another directory")
    fmt = checkpoint_format(format)
    qconfig = read_quantization_config(src)
    records = layer_records(qconfig)
    if not records:
        raise CheckpointError(f"{src} holds no quantized layer: nothing to export")
    branched = sorted(name for name, record in records.items() if record.get("lowrank"))
    reason = (f"layer {branched[0]} has a low-rank branch (SVDQuant), which no exchange "
              f"format stores ({len(branched)} such layers)" if branched
              else fmt.cannot_express(records))
    if reason is not None and branched:
        raise CheckpointError(f"{src} cannot be written as {format}: {reason}; it stays a "
                              "qcore checkpoint (qcore.load and from_pretrained read it)")
    if reason is not None:
        able = [reg.name for reg in _registry().of_kind("checkpoint_format")
                if reg.name != format and reg.cls().cannot_express(records) is None]
        raise CheckpointError(
            f"{src} cannot be written as {format}: {reason}. "
            + (f"Formats that can express it: {', '.join(able)}" if able
               else "No installed format can express it; it stays a qcore checkpoint"))
    config = json.loads((src / CONFIG_NAME).read_text())
    ignore = _unquantized_linears(src, records)
    tensors = load_tensors(src)
    out_tensors: dict[str, torch.Tensor] = {}
    for name, record in records.items():
        packed = _packed(src, name, record, tensors)
        qweight = _packer_for_layout(record["layout"]).unpack(packed)
        for key, value in fmt.export_layer(qweight).items():
            out_tensors[f"{name}.{key}"] = value.contiguous()
    out_tensors.update(tensors)  # float parameters, biases
    config["quantization_config"] = fmt.export_config(records, ignore)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        write_safetensors(out_tensors, tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        for file in src.iterdir():  # tokenizer, generation config, chat template
            if (file.is_file() and file.name != CONFIG_NAME and file.suffix != ".safetensors"
                    and file.name != INDEX_NAME):
                shutil.copy2(file, tmp / file.name)
        _swap_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _packed(src: Path, name: str, record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    from qcore.interfaces import PackedWeight

    layer_tensors = {}
    for key in record["tensors"]:
        if f"{name}.{key}" not in tensors:
            raise CheckpointError(f"{src}: tensor {name}.{key} is missing; the checkpoint is "
                                  "incomplete")
        layer_tensors[key] = tensors.pop(f"{name}.{key}")
    return PackedWeight(layout=record["layout"], shape=tuple(record["shape"]),  # type: ignore[arg-type]
                        tensors=layer_tensors, params=dict(record["params"]))


def _unquantized_linears(src: Path, records: dict[str, Any]) -> list[str]:
    """The model's ``nn.Linear`` modules that the checkpoint left in float (the model is
    built on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(str(src))
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in records]


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path,
                      shard_bytes: int = SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` with the
    index transformers reads when the tensors exceed ``shard_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for shard, file in zip(shards, names, strict=True):
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    return names


# ---------------------------------------------------------------------------- import


def import_layers(path: Path, qconfig: dict[str, Any], tensors: dict[str, torch.Tensor]
                  ) -> tuple[CheckpointFormat, dict[str, QuantizedWeight]]:
    """The quantized linears of a checkpoint another tool wrote, through the installed
    format that reads its ``quant_method``; their tensors are popped from ``tensors``."""
    fmt = require_importer(path, qconfig.get("quant_method"))
    layers = fmt.import_layers(qconfig, tensors)
    if not layers:
        raise CheckpointError(f"{path}: the {fmt.name} reader found no quantized layer in it")
    return fmt, layers
