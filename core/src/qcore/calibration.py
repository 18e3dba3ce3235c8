"""Block-sequential calibration: observe, transform and quantize one block at a time.

The inputs of block ``i + 1`` are computed by the already-quantized block ``i``, and only
one block's calibration activations (its inputs and outputs) are held at a time, so the
memory needed grows with one block, not with the model. Activations stay on CPU while a
block may run on another device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from qcore.context import BlockCall, BlockContext
from qcore.interfaces import Observer, PackedWeight
from qcore.model import (
    BlockStructure,
    block_linears,
    DecoderBlocks,
    describe_block,
    execution_order_stages,
    move_to,
    replace_hidden,
    run_block,
    weight_matrix,
)
from qcore.pipeline import ResolvedPipeline
from qcore.qlinear import QuantLinear

log = logging.getLogger("qcore")


@dataclass
class BlockReport:
    """What happened to one block."""

    index: int
    layers: dict[str, PackedWeight] = field(default_factory=dict)
    groups: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)


def observe(block: nn.Module, calls: list[BlockCall], linears: dict[str, nn.Module],
            observers: dict[str, type[Observer]], device: torch.device,
            stop_after: nn.Module | None = None) -> dict[str, dict[str, Any]]:
    """Run the block on every calibration call with one instance of each observer on each
    of ``linears``; return ``stats[linear][observer]``. With ``stop_after``, each forward
    stops once that module has run (later layers' work is not needed)."""
    if not observers or not linears:
        return {name: {} for name in linears}
    instances = {name: {obs: cls() for obs, cls in observers.items()} for name in linears}
    wants_outputs = any(cls.needs_outputs for cls in observers.values())

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1])
            y2 = output.detach().reshape(-1, output.shape[-1]) if wants_outputs else None
            for instance in instances[name].values():
                instance.update(x2, y2 if instance.needs_outputs else None)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(_stop))
    try:
        with torch.inference_mode():
            for args, kwargs in calls:
                try:
                    run_block(block, args, kwargs, device)
                except _StopBlock:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: {obs: inst.compute() for obs, inst in per.items()} for name, per in instances.items()}


class _StopBlock(Exception):
    pass


def _stop(*_: Any) -> None:
    raise _StopBlock


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, new)


def block_signature(block: nn.Module) -> tuple[Any, ...]:
    """Module names, classes and parameter shapes: equal signatures, equal structure."""
    return tuple((name, type(m).__name__, tuple((k, tuple(p.shape)) for k, p in m.named_parameters(recurse=False)))
                 for name, m in block.named_modules())


class StructureCache:
    """Describes the first block of each kind once (by running it on one calibration
    row) and maps that description onto later blocks of the same signature."""

    def __init__(self) -> None:
        self._known: dict[tuple[Any, ...], BlockStructure] = {}

    def describe(self, block: nn.Module, call: BlockCall, device: torch.device) -> BlockStructure:
        signature = block_signature(block)
        template = self._known.get(signature)
        if template is None:
            template = describe_block(block, *move_to(first_row(call), device))
            self._known[signature] = template
            return template
        return BlockStructure(linears={n: block.get_submodule(n) for n in template.linears},
                              groups=list(template.groups), not_called=template.not_called)


def first_row(call: BlockCall) -> BlockCall:
    """The call restricted to its first batch row (tensors whose first dimension is the
    batch size are sliced; shared ones such as rotary tables are kept)."""
    args, kwargs = call
    hidden = args[0] if args else kwargs["hidden_states"]
    batch = hidden.shape[0]

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value[:1]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        if isinstance(value, list):
            return [cut(v) for v in value]
        return value

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def needs_calibration(resolved: ResolvedPipeline) -> bool:
    """Whether any step needs calibration data (else weights are quantized directly)."""
    return bool(resolved.transforms or resolved.observers or resolved.quantizer.sequential)


def _quantize_linear(block: nn.Module, name: str, linear: nn.Module, stats: dict[str, Any],
                     resolved: ResolvedPipeline, device: torch.device,
                     lowrank: tuple[torch.Tensor, torch.Tensor] | None = None) -> PackedWeight:
    weight = weight_matrix(linear).detach().float()
    qweight = resolved.quantizer.quantize(weight, stats, resolved.scheme)
    packed = resolved.packer.pack(qweight)
    packed.tensors = {k: v.contiguous() for k, v in packed.tensors.items()}
    bias = linear.bias.detach().clone() if getattr(linear, "bias", None) is not None else None
    qlinear = QuantLinear(packed, op=resolved.packer.op, bias=bias,
                          kernel=resolved.pipeline.kernel, lowrank=lowrank)
    _replace(block, name, qlinear.to(device))
    return packed


def quantize_block_weights(index: int, block: nn.Module, resolved: ResolvedPipeline,
                           device: torch.device) -> BlockReport:
    """Data-free path: every linear quantized from its weight alone."""
    report = BlockReport(index)
    for name, linear in block_linears(block).items():
        report.layers[name] = _quantize_linear(block, name, linear, {}, resolved, device)
    return report


def quantize_block(index: int, block: nn.Module, calls: list[BlockCall],
                   resolved: ResolvedPipeline, device: torch.device,
                   structures: StructureCache | None = None) -> BlockReport:
    """Transform and quantize one block in place (its linears become QuantLinears)."""
    report = BlockReport(index)
    structure = (structures or StructureCache()).describe(block, calls[0], device)
    report.groups = [(g.names, g.source) for g in structure.groups]
    quantizer, scheme = resolved.quantizer, resolved.scheme

    ctx = BlockContext(index=index, block=block, structure=structure, inputs=calls, stats={},
                       scheme=scheme, quantizer=quantizer, device=device)
    for transform in resolved.transforms:
        needs = {n: resolved.observers[n] for n in resolved.needs_of(transform)}
        ctx.stats = observe(block, calls, structure.linears, needs, device)
        transform.apply(ctx)

    needs = {n: resolved.observers[n] for n in resolved.needs_of(quantizer)}
    stages = execution_order_stages(structure) if quantizer.sequential else [list(structure.linears)]
    for stage in stages:
        stage_linears = {name: structure.linears[name] for name in stage}
        last = stage_linears[stage[-1]] if quantizer.sequential else None
        stats = observe(block, calls, stage_linears, needs, device, stop_after=last)
        for name, linear in stage_linears.items():
            report.layers[name] = _quantize_linear(block, name, linear, stats[name], resolved,
                                                   device, ctx.lowrank.get(name))
    return report


def next_block_inputs(block: nn.Module, calls: list[BlockCall], device: torch.device) -> list[BlockCall]:
    """The calls of the next block: this (quantized) block's outputs, kept on CPU."""
    out = []
    with torch.inference_mode():
        for args, kwargs in calls:
            hidden = run_block(block, args, kwargs, device).to("cpu")
            out.append(replace_hidden(args, kwargs, hidden))
    return out


def quantize_blocks(blocks: DecoderBlocks, calls: list[BlockCall] | None,
                    resolved: ResolvedPipeline, device: torch.device,
                    progress: bool = True) -> list[BlockReport]:
    """Block-sequential quantization of every block, starting from block 0's ``calls``
    (None when :func:`needs_calibration` is false: weights are quantized directly)."""
    from tqdm.auto import tqdm

    reports = []
    structures = StructureCache()
    bar = tqdm(blocks.blocks, desc=f"quantize {resolved.pipeline.short_form()}", unit="block",
               disable=not progress)
    for index, block in enumerate(bar):
        home = _device_of(block)
        block.to(device)
        if calls is None:
            reports.append(quantize_block_weights(index, block, resolved, device))
        else:
            reports.append(quantize_block(index, block, calls, resolved, device, structures))
            if index + 1 < len(blocks.blocks):
                calls = next_block_inputs(block, calls, device)
        block.to(home)
    return reports


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
