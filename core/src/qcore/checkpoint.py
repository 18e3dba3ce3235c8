"""Quantized checkpoints: safetensors + ``config.json`` with a ``quantization_config``.

A checkpoint is a directory with ``config.json`` (the model's config plus
``quantization_config``: ``quant_method: "qcore"``, the format version, the whole
pipeline spec, the name and version of every distribution that took part, and each
quantized layer's layout, op and parameters), ``model.safetensors`` (packed tensors and
the unquantized parameters) and the tokenizer files. Writes are atomic (a temporary
directory renamed into place); loading never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.errors import CheckpointError
from qcore.interfaces import PackedWeight
from qcore.qlinear import LOWRANK_DOWN, LOWRANK_UP, QuantLinear
from qcore.quantize import QCORE_ATTR

QUANT_METHOD = "qcore"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# ------------------------------------------------------------------------------ save


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def layer_record(layer: QuantLinear) -> dict[str, Any]:
    return {"layout": layer.layout, "op": layer.op, "shape": [layer.out_features, layer.in_features],
            "params": dict(layer.params),
            "tensors": {k: {"dtype": str(getattr(layer, k).dtype).removeprefix("torch."),
                            "shape": list(getattr(layer, k).shape)} for k in layer.tensor_names},
            "bias": layer.bias is not None, "lowrank": _lowrank_record(layer),
            "kernel": layer.kernel}


def _lowrank_record(layer: QuantLinear) -> dict[str, Any] | bool:
    """The branch's rank and dtype (a loader builds its buffers from them), or False."""
    down = layer.lowrank_down
    if down is None:
        return False
    return {"rank": int(down.shape[0]), "dtype": str(down.dtype).removeprefix("torch.")}


def quantization_config(model: nn.Module) -> dict[str, Any]:
    record = getattr(model, QCORE_ATTR, None)
    if record is None:
        raise CheckpointError("this model was not quantized by qcore (no quantization record); "
                              "quantize it with qcore.quantize() or `qcore quantize` first")
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
            "qcore_version": _version("qcore"), **record,
            "layers": {name: layer_record(m) for name, m in quantized_layers(model).items()}}


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied parameters' aliases (tied embeddings are stored once
    and tied again on load). Buffers that alias another tensor (e.g. one ``g_idx`` shared
    by the linears of an input group) are stored as copies of their own."""
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for key, tensor in model.state_dict().items():
        if tensor is None:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        alias = bool(tensor.numel()) and ident in seen
        if alias and key in parameters:
            continue
        seen.add(ident)
        tensor = tensor.detach().to("cpu")
        out[key] = tensor.clone() if alias else tensor.contiguous()
    return out


def save(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write a quantized model to ``out_dir`` atomically. An existing ``out_dir`` is
    refused unless ``overwrite``; an interrupted save leaves nothing behind."""
    from safetensors.torch import save_file

    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(f"output directory {out} already exists; choose another --out or "
                              "pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    qconfig = quantization_config(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(_unique_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = model.config.to_dict() if hasattr(model, "config") else {}
        config["quantization_config"] = qconfig
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ load


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``quantization_config`` of a quantized checkpoint directory, whoever wrote it."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: {CONFIG_NAME} is missing")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from None
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or "quant_method" not in qconfig:
        raise CheckpointError(f"{path} is not a quantized checkpoint (its {CONFIG_NAME} has no "
                              "quantization_config with a quant_method): it is a float model; "
                              "quantize it with `qcore quantize` first")
    return qconfig


def read_quantization_config(path: str | Path) -> dict[str, Any]:
    """The ``quantization_config`` of a qcore checkpoint, checked for method and version."""
    path = Path(path)
    qconfig = read_config(path)
    if qconfig.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} is not a qcore checkpoint: its quantization_config has "
                              f"quant_method {qconfig.get('quant_method')!r}, not 'qcore' (it "
                              "was written by another tool)")
    fmt = qconfig.get("format_version")
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in qcore checkpoint format {fmt} (by qcore "
            f"{qconfig.get('qcore_version')}), but this qcore {_version('qcore')} reads format "
            f"{FORMAT_VERSION} and older: upgrade qcore (pip install -U qcore)")
    return qconfig


def check_distributions(qconfig: dict[str, Any]) -> None:
    """Every distribution that made the checkpoint must be installed."""
    missing = [f"{dist} (the checkpoint was made with {ver})"
               for dist, ver in qconfig.get("distributions", {}).items() if _version(dist) is None]
    if missing:
        names = " ".join(d.split(" ")[0] for d in missing)
        raise CheckpointError(f"this checkpoint needs {', '.join(missing)}, which "
                              f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {names}")


def _check_layouts(qconfig: dict[str, Any]) -> None:
    from qcore.plugins import get_registry

    registry = get_registry()
    layouts = {layer["layout"] for layer in qconfig.get("layers", {}).values()}
    known = {reg.cls.layout for reg in registry.of_kind("packer")}  # type: ignore[attr-defined]
    unknown = sorted(layouts - known)
    if unknown:
        raise CheckpointError(f"this checkpoint stores layout(s) {', '.join(unknown)}, which no "
                              "installed packer reads; install the plugin that made it "
                              f"({', '.join(qconfig.get('distributions', {}))})")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors weights; was the save interrupted? "
                              "Quantize again to write a complete checkpoint")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is corrupt or truncated ({exc}); quantize again to "
                                  "write a complete checkpoint") from None
    return tensors


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized model from a qcore checkpoint (no pickle), or from a checkpoint
    another tool wrote in a format an installed checkpoint format reads
    (``compressed-tensors``, ``gptq``, ``awq`` with qcore-plugin-interop): its layers are
    imported into qcore's own formats and run on qcore's kernels."""
    path = Path(path)
    qconfig = read_config(path)
    if qconfig.get("quant_method") != QUANT_METHOD:
        return _load_foreign(path, qconfig, device)
    qconfig = read_quantization_config(path)
    check_distributions(qconfig)
    _check_layouts(qconfig)
    tensors = load_tensors(path)
    model = _float_model(path)
    kernel_default = qconfig.get("pipeline", {}).get("kernel", "auto")
    for name, layer in qconfig["layers"].items():
        layer_tensors = {}
        for key in layer["tensors"]:
            full = f"{name}.{key}"
            if full not in tensors:
                raise CheckpointError(f"{path}: tensor {full} is missing; the checkpoint is incomplete")
            layer_tensors[key] = tensors.pop(full)
        bias = tensors.pop(f"{name}.bias", None) if layer.get("bias") else None
        lowrank = None
        if layer.get("lowrank"):
            lowrank = (tensors.pop(f"{name}.{LOWRANK_DOWN}"), tensors.pop(f"{name}.{LOWRANK_UP}"))
        packed = PackedWeight(layout=layer["layout"], shape=tuple(layer["shape"]),  # type: ignore[arg-type]
                              tensors=layer_tensors, params=dict(layer["params"]))
        qlinear = QuantLinear(packed, op=layer["op"], bias=bias,
                              kernel=layer.get("kernel", kernel_default), lowrank=lowrank)
        _replace_module(model, name, qlinear)
    _load_rest(path, model, tensors, qconfig["layers"])
    setattr(model, QCORE_ATTR, {k: qconfig[k] for k in ("pipeline", "distributions", "blocks",
                                                         "calibration") if k in qconfig})
    return model.to(device).eval()


def _float_model(path: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return AutoModelForCausalLM.from_config(config).float()


def _load_rest(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor],
               quantized: Any) -> None:
    """Load the float parameters left in ``tensors`` and tie the embeddings."""
    result = model.load_state_dict(tensors, strict=False)
    tied = _tied_keys(model)
    built = tuple(f"{name}." for name in quantized)
    missing = [k for k in result.missing_keys if k not in tied and not k.startswith(built)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not match the model: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _load_foreign(path: Path, qconfig: dict[str, Any], device: str | torch.device) -> nn.Module:
    from qcore.exchange import import_layers, packer_for_format

    tensors = load_tensors(path)
    fmt, layers = import_layers(path, qconfig, tensors)
    model = _float_model(path)
    for name, qweight in layers.items():
        packer = packer_for_format(qweight.format, int(qweight.params.get("bits") or 0))
        bias = tensors.pop(f"{name}.bias", None)
        qlinear = QuantLinear(packer.pack(qweight), op=packer.op, bias=bias, kernel="auto")
        _replace_module(model, name, qlinear)
    _load_rest(path, model, tensors, layers)
    setattr(model, QCORE_ATTR, {"imported": {"quant_method": qconfig.get("quant_method"),
                                             "format": fmt.name}})
    return model.to(device).eval()


def _tied_keys(model: nn.Module) -> set[str]:
    keys: set[str] = set()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None:
            for name, module in model.named_modules():
                if module is out:
                    keys.add(f"{name}.weight")
    return keys


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise CheckpointError(f"the checkpoint quantizes {name}, which the model built from its "
                              "config does not have; the config and weights do not belong together")
    setattr(parent, child, new)


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None
