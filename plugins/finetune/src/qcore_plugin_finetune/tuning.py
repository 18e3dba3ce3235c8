"""Block fine-tuning of quantized weights' floating-point tensors, after quantization.

Once a block's linears hold their quantized weights, ``finetune`` keeps every index and
integer code as it is and tunes the stored floating-point tensors (the ``"vq"`` format's
codebooks, residual and outlier codebooks, per-channel scale and offset; the ``"int"``
format's group scales, for weight-only layers) with Adam, so that the
block's outputs on the quantized model's calibration inputs come closer, in mean squared
error, to what the unquantized block computed on the unquantized model's inputs. The
quantized model's error carried in from earlier blocks is thereby corrected too. Results
are rounded back to float16; the block keeps them only if its error, measured through the
layers' own kernels on the rows it was tuned on, went down (otherwise nothing changes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qcore.context import BlockCall, BlockContext
from qcore.errors import ConfigError

#: The stored floating-point tensors fine-tuning changes: the ``"vq"`` format's, then the
#: ``"int"`` format's group scales.
TUNED_TENSORS = ("codebook", "res_codebook", "outlier_codebook", "scale", "offset", "scales")
#: The packed layouts it tunes.
LAYOUTS = ("vq-packed", "int-packed")
_FP16_MAX = 65504.0


@dataclass
class _Tuned:
    """One quantized layer being tuned: the Adam parameters, the tensors they make, and
    the dense weight from those."""

    module: nn.Module
    params: dict[str, nn.Parameter]
    tensors: Callable[[], dict[str, torch.Tensor]]
    weight: Callable[[], torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        lead = x.shape[:-1]
        x2 = x.reshape(-1, m.in_features)
        bias = None if m.bias is None else m.bias.to(x.dtype)
        y = nn.functional.linear(x2, self.weight().to(x.dtype), bias)
        if m.lowrank_down is not None:
            y = y + (x2 @ m.lowrank_down.to(x.dtype).T) @ m.lowrank_up.to(x.dtype).T
        return y.reshape(*lead, m.out_features)


def finetune_block(ctx: BlockContext, *, epochs: int, lr: float, samples: int, seed: int) -> None:
    """Tune the ``"vq"`` layers of ``ctx.block`` (module doc); ``ctx.targets`` must be set."""
    from qcore.ops import QuantLinear, forward

    if ctx.targets is None:
        raise RuntimeError("finetune runs after quantization: the block context has no targets")
    layers = {name: m for name, m in ctx.block.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        return
    wrong = sorted(f"{name} ({m.layout})" for name, m in layers.items() if m.layout not in LAYOUTS)
    if wrong:
        raise ConfigError(f"finetune tunes layers of layout {' or '.join(LAYOUTS)}; block "
                          f"{ctx.index} has {', '.join(wrong)}: use a quantizer producing "
                          "the 'vq' or 'int' format, or drop finetune from the pipeline")
    act = sorted(name for name, m in layers.items() if m.params.get("act_bits") is not None)
    if act:
        raise ConfigError(f"finetune tunes weight-only layers; block {ctx.index}'s "
                          f"{', '.join(act)} also quantize their inputs (act_bits "
                          f"{layers[act[0]].params['act_bits']}): drop finetune from the "
                          "pipeline or quantize weights only")
    used = _first_rows(ctx.inputs, samples)
    calls = [_trainable(call) for call in ctx.inputs[:used]]
    targets = [t.to(ctx.device) for t in ctx.targets[:used]]

    def error() -> float:
        with torch.no_grad():
            total = sum(float(nn.functional.mse_loss(forward(ctx.block, *call, ctx.device), t))
                        for call, t in zip(calls, targets, strict=True))
        return total / len(calls)

    before = error()
    saved = {name: {k: getattr(m, k).clone() for k in TUNED_TENSORS if k in m.tensor_names}
             for name, m in layers.items()}
    tuned = {name: _tuning(m, ctx.device) for name, m in layers.items()}
    grads = {p: p.requires_grad for p in ctx.block.parameters()}
    try:
        for p in grads:
            p.requires_grad_(False)
        for name, m in layers.items():
            m.forward = tuned[name].forward  # type: ignore[method-assign]
        params = [p for t in tuned.values() for p in t.params.values()]
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for j in torch.randperm(len(calls), generator=gen).tolist():
                loss = nn.functional.mse_loss(forward(ctx.block, *calls[j], ctx.device),
                                              targets[j])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for m in layers.values():
            m.__dict__.pop("forward", None)  # the class's forward again
        for p, flag in grads.items():
            p.requires_grad_(flag)
    for name, m in layers.items():
        with torch.no_grad():
            _store(m, tuned[name].tensors())
    after = error()
    if not after < before:  # NaN included: keep what the quantizer made
        for name, m in layers.items():
            _store(m, saved[name])
        after = before
    ctx.log.info("finetune block %d: output mse %.5g -> %.5g (%d rows, %d epochs)",
                 ctx.index, before, after, sum(_rows(c) for c in calls), epochs)


def _tuning(module: nn.Module, device: torch.device) -> _Tuned:
    if module.layout == "int-packed":
        return _tuning_int(module, device)
    return _tuning_vq(module, device)


def _tuning_int(module: nn.Module, device: torch.device) -> _Tuned:
    """An ``"int"`` layer: its group scales times a parameter (one per scale, starting at
    one); codes, zero points and groups as stored."""
    from qcore.ops import IntPacker, dequantize_codes, effective_g_idx

    qweight = IntPacker().unpack(module.packed())
    t = qweight.tensors
    start = t["scales"].to(device, torch.float32)
    codes = t["codes"].to(device)
    zeros = t["zeros"].to(device) if "zeros" in t else None
    g_idx = effective_g_idx(qweight).to(device)
    bits = int(qweight.params["bits"])
    params = {"scales": nn.Parameter(torch.ones_like(start))}

    def tensors() -> dict[str, torch.Tensor]:
        return {"scales": start * params["scales"]}

    def weight() -> torch.Tensor:
        return dequantize_codes(codes, tensors()["scales"], zeros, bits, g_idx)

    return _Tuned(module, params, tensors, weight)


def _tuning_vq(module: nn.Module, device: torch.device) -> _Tuned:
    """The layer's tuned tensors in float32, each through a parameter of relative size
    (so that one learning rate moves each by a like fraction: a codebook is its RMS times
    a parameter, the scale its value times one, the offset its value plus the scale times
    one), and the dense weight from them (the reference decoding of
    :func:`qcore.ops.decode_part` and :func:`qcore.ops.assemble_weight`,
    differentiable in those parameters)."""
    from qcore.ops import VQPacker, assemble_weight, decode_part, main_columns, vq_params

    qweight = VQPacker().unpack(module.packed())
    t = qweight.tensors
    start = {k: t[k].to(device, torch.float32) for k in TUNED_TENSORS if k in t}
    units = {k: v.pow(2).mean().sqrt().clamp(min=1e-12) for k, v in start.items()
             if k.endswith("codebook")}
    params = {k: nn.Parameter(v / units[k]) for k, v in start.items() if k in units}
    if "scale" in start:
        params["scale"] = nn.Parameter(torch.ones_like(start["scale"]))
    if "offset" in start:
        params["offset"] = nn.Parameter(torch.zeros_like(start["offset"]))

    def tensors() -> dict[str, torch.Tensor]:
        out = {k: units[k] * params[k] for k in units}
        if "scale" in start:
            out["scale"] = start["scale"] * params["scale"]
        if "offset" in start:
            out["offset"] = start["offset"] + start["scale"] * params["offset"]
        return out

    idx = {k: t[k].to(device) for k in ("indices", "res_indices", "outlier_indices") if k in t}
    in_f = qweight.shape[1]
    n_out = vq_params(qweight.params)["n_outliers"]
    outlier_cols = t["outlier_cols"].to(device) if "outlier_cols" in t else None
    main_cols = main_columns(in_f, outlier_cols) if outlier_cols is not None else None

    def weight() -> torch.Tensor:
        v = tensors()
        main = decode_part(idx["indices"], v["codebook"], in_f - n_out, idx.get("res_indices"),
                           v.get("res_codebook"))
        outliers = None
        if outlier_cols is not None:
            outliers = decode_part(idx["outlier_indices"], v["outlier_codebook"], n_out)
        return assemble_weight(main, in_f, main_cols, outliers, outlier_cols, v.get("scale"),
                               v.get("offset"))

    return _Tuned(module, params, tensors, weight)


def _store(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Write tensors back into the layer's stored (float16) buffers, clamped to their
    range; its kernels prepare again from them."""
    module.replace_tensors({k: v.detach().clamp(-_FP16_MAX, _FP16_MAX)
                            for k, v in values.items()})


def _rows(call: BlockCall) -> int:
    args, kwargs = call
    hidden = args[0] if args else kwargs["hidden_states"]
    return int(hidden.shape[0])


def _first_rows(calls: list[BlockCall], samples: int) -> int:
    """How many calls, from the first, hold ``samples`` rows (all of them for 0)."""
    if samples == 0:
        return len(calls)
    rows = 0
    for i, call in enumerate(calls):
        rows += _rows(call)
        if rows >= samples:
            return i + 1
    return len(calls)


def _trainable(call: BlockCall) -> BlockCall:
    """The call with its inference-mode tensors (the calibration forwards make them)
    copied, so autograd may save them."""
    def fix(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone() if value.is_inference() else value
        if isinstance(value, tuple):
            return tuple(fix(v) for v in value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    args, kwargs = call
    return fix(tuple(args)), fix(dict(kwargs))


__all__ = ["TUNED_TENSORS", "finetune_block"]
