"""Quantizing a model with a pipeline: the entry point behind ``qcore quantize``."""

from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qcore.calibration import BlockReport, needs_calibration, quantize_blocks
from qcore.errors import ConfigError
from qcore.model import capture_block_inputs, find_blocks
from qcore.pipeline import Pipeline, ResolvedPipeline

#: Attribute of a quantized model holding what the checkpoint records.
QCORE_ATTR = "qcore_quantization"


@dataclass
class QuantizeResult:
    model: nn.Module
    resolved: ResolvedPipeline
    blocks: list[BlockReport]
    seconds: float

    @property
    def n_layers(self) -> int:
        return sum(len(b.layers) for b in self.blocks)


def quantize(model: nn.Module, pipeline: Pipeline | ResolvedPipeline | str,
             calibration: torch.Tensor | None, *, batch_size: int = 8,
             device: torch.device | str | None = None, progress: bool = True,
             calib_dtype: torch.dtype | None = None) -> QuantizeResult:
    """Quantize every linear of ``model``'s decoder blocks in place, block by block.

    ``calibration``: token ids ``[n_samples, seq_len]`` (may be None when no step of the
    pipeline needs calibration data, e.g. weight-only round-to-nearest). ``device``: where each block runs
    (default: where the model is); activations are kept on CPU between blocks.
    ``calib_dtype``: run the calibration forwards autocast to this dtype (bfloat16 uses
    the CPU's AMX/AVX-512 units or the GPU's tensor cores); statistics, quantizers and
    the stored weights stay float32-exact. Recorded in the checkpoint.
    """
    if calib_dtype is not None and calib_dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(f"calib_dtype must be torch.bfloat16 or torch.float16, got {calib_dtype}")
    start = time.perf_counter()
    resolved = pipeline if isinstance(pipeline, ResolvedPipeline) else (
        Pipeline.from_names(pipeline) if isinstance(pipeline, str) else pipeline).validate()
    if hasattr(model, QCORE_ATTR):
        raise ConfigError("this model is already quantized by qcore; load the original "
                          "floating-point model to quantize it again")
    uses_data = needs_calibration(resolved)
    if calibration is None and uses_data:
        raise ConfigError(f"pipeline {resolved.pipeline.short_form()!r} needs calibration data: "
                          "pass token ids [n_samples, seq_len]")
    if calibration is not None and (calibration.dim() != 2 or calibration.shape[0] < 1):
        raise ConfigError(f"calibration ids must be [n_samples, seq_len], got {tuple(calibration.shape)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    blocks = find_blocks(model)
    run_device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    calls = capture_block_inputs(model, blocks, calibration, batch_size) if uses_data else None
    reports = quantize_blocks(blocks, calls, resolved, run_device, progress=progress,
                              calib_dtype=calib_dtype)
    model.train(was_training)
    record = quantization_record(resolved, blocks.path)
    record["calibration"] = None if not uses_data else {
        "samples": int(calibration.shape[0]), "seq_len": int(calibration.shape[1]),  # type: ignore[union-attr]
        "dtype": str(calib_dtype or _model_dtype(model)).removeprefix("torch.")}
    setattr(model, QCORE_ATTR, record)
    return QuantizeResult(model, resolved, reports, time.perf_counter() - start)


def quantization_record(resolved: ResolvedPipeline, blocks_path: str) -> dict[str, Any]:
    return {"pipeline": resolved.spec(), "distributions": resolved.distributions,
            "blocks": blocks_path}


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _CallableModule(types.ModuleType):
    """``qcore.quantize`` names both this module and :func:`quantize`: Python makes the
    package attribute this module once it is imported (``qcore.checkpoint`` imports it),
    so calling the module calls the function and ``qcore.quantize(model, ...)`` always works."""

    def __call__(self, *args: Any, **kwargs: Any) -> QuantizeResult:
        return quantize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
