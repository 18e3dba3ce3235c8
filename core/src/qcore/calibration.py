"""Block-sequential calibration: observe, transform and quantize one block at a time.

The inputs of block ``i + 1`` are computed by the already-quantized block ``i``, and only
one block's calibration activations are held at a time, so the memory needed grows with
one block, not with the model. Activations stay on CPU while a block may run elsewhere.

Statistics are collected once per input-sharing group (q/k/v read one input, so one
Hessian serves all three) and quantizers receive a whole group (``quantize_group``).

A *sequential* quantizer (GPTQ's true-sequential) must see, for each group, the inputs
produced by the already-quantized groups before it. That is done in a single forward of
the block over all calibration rows at once: a pre-hook on each group's first linear
collects the group's statistics from the input arriving there, quantizes the group and
writes the dequantized weights into the layers before they run, so later groups receive
exactly the quantized block's activations and the forward's output is the next block's
input. One block forward per block, instead of one per group.

*After-quantization* transforms (``Transform.after_quantization``, e.g. ``finetune``) run
once a block's quantized layers are installed. They tune the block towards what the
unquantized model computes, so when a pipeline has one, the unquantized model's hidden
states are carried along too (a second stream of activations): each block first runs
unquantized on them, giving its targets and the next block's unquantized inputs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qcore.context import BlockCall, BlockContext
from qcore.interfaces import Observer, PackedWeight, QuantizedWeight
from qcore.memory import release_file_pages, trim_heap
from qcore.model import (
    BlockStructure,
    DecoderBlocks,
    LinearGroup,
    block_linears,
    describe_block,
    move_to,
    replace_hidden,
    run_block,
    set_weight_matrix,
    weight_matrix,
)
from qcore.pipeline import ResolvedPipeline
from qcore.qlinear import QuantLinear

log = logging.getLogger("qcore")

#: Precision of the calibration forwards of the current run (None: the model's own).
#: Set once per run by :func:`quantize_blocks`; statistics and quantizers always work in
#: float32 on float32 master weights.
_CALIB_DTYPE: ContextVar[torch.dtype | None] = ContextVar("qcore_calib_dtype", default=None)


def forward(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            device: torch.device | str) -> torch.Tensor:
    """One calibration forward of ``block`` (autocast to the run's calibration dtype, if
    any), returning float32 hidden states."""
    dtype = _CALIB_DTYPE.get()
    if dtype is None:
        return run_block(block, args, kwargs, device)
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        return run_block(block, args, kwargs, device).float()


def _exact(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Statistics and quantization inside a hook: no autocast."""
    return torch.autocast(device_type=device_type, enabled=False)


def _new_observers(observers: Mapping[str, Callable[[], Observer]]) -> dict[str, Observer]:
    """One fresh instance of each observer, told the run's calibration dtype: the hooks
    that feed observers run outside autocast (:func:`_exact`), so this is how an observer
    learns the precision its linear multiplies in (:attr:`Observer.calib_dtype`)."""
    dtype = _CALIB_DTYPE.get()
    instances = {}
    for name, make in observers.items():
        instance = make()
        instance.calib_dtype = dtype
        instances[name] = instance
    return instances


@dataclass
class BlockReport:
    """What happened to one block."""

    index: int
    layers: dict[str, PackedWeight] = field(default_factory=dict)
    groups: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)


# ------------------------------------------------------------------- structure


def block_signature(block: nn.Module) -> tuple[Any, ...]:
    """Module names, classes and parameter shapes: equal signatures, equal structure."""
    return tuple((name, type(m).__name__,
                  tuple((k, tuple(p.shape)) for k, p in m.named_parameters(recurse=False)))
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


def _batch_of(call: BlockCall) -> int:
    args, kwargs = call
    return (args[0] if args else kwargs["hidden_states"]).shape[0]


def _map_batch(value: Any, batch: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_batch(v, batch, fn) for v in value)
    if isinstance(value, list):
        return [_map_batch(v, batch, fn) for v in value]
    return value


def first_row(call: BlockCall) -> BlockCall:
    """The call restricted to its first batch row (tensors whose first dimension is the
    batch size are sliced; shared ones such as rotary tables are kept)."""
    batch = _batch_of(call)
    args, kwargs = call
    cut = lambda t: t[:1]  # noqa: E731
    return (tuple(_map_batch(a, batch, cut) for a in args),
            {k: _map_batch(v, batch, cut) for k, v in kwargs.items()})


def merge_calls(calls: list[BlockCall]) -> BlockCall:
    """One call over every row of ``calls``: tensors with a batch dimension are
    concatenated (without a copy when they are consecutive rows of one tensor, as the
    previous block's output is), shared ones (rotary tables, flags) taken from the first
    call."""
    if len(calls) == 1:
        return calls[0]
    first_args, first_kwargs = calls[0]
    batch = _batch_of(calls[0])
    if batch == 1 and any(_batch_of(c) != 1 for c in calls):
        raise ValueError("cannot merge calibration calls of batch 1 with larger ones")
    args = tuple(_merge_value(calls, batch, (0, i), a) for i, a in enumerate(first_args))
    kwargs = {k: _merge_value(calls, batch, (1, k), v) for k, v in first_kwargs.items()}
    return args, kwargs


def _merge_value(calls: list[BlockCall], batch: int, path: tuple[Any, ...], value: Any) -> Any:
    # A module-level function, not a recursive closure: a closure that calls itself is a
    # reference cycle, and it would keep ``calls`` (a block's activations) alive until
    # the garbage collector's next full pass.
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        parts = [_lookup(c, path) for c in calls]
        if batch == 1 and all(torch.equal(parts[0], p) for p in parts[1:]) and path != (0, 0):
            return value  # shared across calls (e.g. rotary tables at batch size 1)
        return _concatenate(parts)
    if isinstance(value, (tuple, list)):
        merged = [_merge_value(calls, batch, (*path, i), v) for i, v in enumerate(value)]
        return tuple(merged) if isinstance(value, tuple) else merged
    return value


def _concatenate(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``; a view instead of a copy when the parts are consecutive
    contiguous rows of one storage (the next block's calls are slices of one output)."""
    first = parts[0]
    offset = first.storage_offset()
    for part in parts:
        if not (part.is_contiguous() and part.dtype == first.dtype and part.device == first.device
                and part.shape[1:] == first.shape[1:] and part.storage_offset() == offset
                and part.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()):
            return torch.cat(parts)
        offset += part.numel()
    rows = sum(part.shape[0] for part in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _lookup(call: BlockCall, path: tuple[Any, ...]) -> Any:
    value: Any = call
    for key in path:
        value = value[key]
    return value


# -------------------------------------------------------------------- observing


def _group_input_hook(linear: nn.Module, fn: Callable[[torch.Tensor], None]) -> Any:
    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        with _exact(x.device.type):
            # In the dtype the block made it (bf16 under bf16 calibration): observers
            # convert what they need, and a bf16 input costs no float32 copy here.
            fn(x.reshape(-1, x.shape[-1]))
    return linear.register_forward_pre_hook(pre_hook)


def observe(block: nn.Module, calls: list[BlockCall], structure: BlockStructure,
            groups: list[LinearGroup], observers: dict[str, type[Observer]],
            device: torch.device) -> dict[str, dict[str, Any]]:
    """Run the block on every calibration call with one instance of each observer per
    input-sharing group; return ``stats[linear][observer]`` (one object per group,
    shared by its linears: do not modify in place)."""
    names = [n for g in groups for n in g.names]
    if not observers:
        return {name: {} for name in names}
    if any(cls.needs_outputs for cls in observers.values()):
        return _observe_with_outputs(block, calls, structure, names, observers, device)
    instances = {g.names: _new_observers(observers) for g in groups}

    def feed(group: LinearGroup) -> Callable[[torch.Tensor], None]:
        def update(x2: torch.Tensor) -> None:
            for instance in instances[group.names].values():
                instance.update(x2, None)
        return update

    _run_with_hooks(block, calls, device,
                    [_group_input_hook(structure.linears[g.names[0]], feed(g)) for g in groups])
    stats: dict[str, dict[str, Any]] = {}
    for group in groups:
        computed = {obs: inst.compute() for obs, inst in instances[group.names].items()}
        for name in group.names:
            stats[name] = computed
    return stats


def _run_with_hooks(block: nn.Module, calls: list[BlockCall], device: torch.device,
                    handles: list[Any]) -> None:
    """Run the block on every call, then remove ``handles`` (also on error)."""
    try:
        with torch.inference_mode():
            for args, kwargs in calls:
                forward(block, args, kwargs, device)
    finally:
        for handle in handles:
            handle.remove()


def _observe_with_outputs(block: nn.Module, calls: list[BlockCall], structure: BlockStructure,
                          names: list[str], observers: dict[str, type[Observer]],
                          device: torch.device) -> dict[str, dict[str, Any]]:
    """Per-linear observation for observers that need each linear's outputs."""
    instances = {name: _new_observers(observers) for name in names}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            x2 = args[0].detach().reshape(-1, args[0].shape[-1])
            y2 = output.detach().reshape(-1, output.shape[-1])
            with _exact(x2.device.type):
                for instance in instances[name].values():
                    instance.update(x2, y2 if instance.needs_outputs else None)
        return record

    _run_with_hooks(block, calls, device,
                    [structure.linears[n].register_forward_hook(hook(n)) for n in names])
    return {name: {obs: inst.compute() for obs, inst in per.items()} for name, per in instances.items()}


# ------------------------------------------------------------------- quantizing


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    setattr(parent, child, new)


def _install(block: nn.Module, name: str, linear: nn.Module, qweight: QuantizedWeight,
             resolved: ResolvedPipeline, device: torch.device,
             lowrank: tuple[torch.Tensor, torch.Tensor] | None) -> PackedWeight:
    """Pack ``qweight`` and put a QuantLinear in place of ``linear``."""
    packed = resolved.packer.pack(qweight)
    packed.tensors = {k: v.contiguous() for k, v in packed.tensors.items()}
    bias = linear.bias.detach().clone() if getattr(linear, "bias", None) is not None else None
    qlinear = QuantLinear(packed, op=resolved.packer.op, bias=bias,
                          kernel=resolved.pipeline.kernel, lowrank=lowrank)
    _replace(block, name, qlinear.to(device))
    return packed


def _quantize_group(group_names: tuple[str, ...], linears: dict[str, nn.Module],
                    stats: dict[str, Any], resolved: ResolvedPipeline) -> list[QuantizedWeight]:
    weights = [weight_matrix(linears[n]).detach().float() for n in group_names]
    qweights = resolved.quantizer.quantize_group(weights, stats, resolved.scheme)
    if len(qweights) != len(weights):
        raise RuntimeError(f"quantizer {resolved.quantizer.name!r} returned {len(qweights)} "
                           f"weights for a group of {len(weights)}")
    return qweights


def needs_calibration(resolved: ResolvedPipeline) -> bool:
    """Whether any step needs calibration data (else weights are quantized directly)."""
    return bool(resolved.transforms or resolved.observers or resolved.quantizer.sequential)


def quantize_block_weights(index: int, block: nn.Module, resolved: ResolvedPipeline,
                           device: torch.device) -> BlockReport:
    """Data-free path: every linear quantized from its weight alone."""
    report = BlockReport(index)
    linears = block_linears(block)
    for name, linear in linears.items():
        (qweight,) = _quantize_group((name,), linears, {}, resolved)
        report.layers[name] = _install(block, name, linear, qweight, resolved, device, None)
    _release_replaced(block, list(linears.values()))
    return report


def quantize_block(index: int, block: nn.Module, calls: list[BlockCall],
                   resolved: ResolvedPipeline, device: torch.device,
                   structures: StructureCache | None = None,
                   targets: list[torch.Tensor] | None = None,
                   ) -> tuple[BlockReport, list[BlockCall]]:
    """Transform and quantize one block in place (its linears become QuantLinears), then
    run the after-quantization transforms (``targets``: the unquantized block's outputs,
    one per call, which they need); return the report and the next block's calibration
    calls."""
    report = BlockReport(index)
    structure = (structures or StructureCache()).describe(block, calls[0], device)
    report.groups = [(g.names, g.source) for g in structure.groups]
    quantizer, scheme = resolved.quantizer, resolved.scheme

    ctx = BlockContext(index=index, block=block, structure=structure, inputs=calls, stats={},
                       scheme=scheme, quantizer=quantizer, device=device)
    current: set[str] | None = None  # statistics in ctx.stats that describe the block now
    branches = _BranchHooks(structure.linears, ctx.lowrank)
    try:
        for transform in resolved.transforms:
            if transform.after_quantization:
                continue
            needs = {n: resolved.observers[n] for n in resolved.needs_of(transform)}
            if current is None or not set(needs) <= current:
                ctx.stats = observe(block, calls, structure, structure.groups, needs, device)
                current = set(needs)
            transform.apply(ctx)
            branches.update()
            if not transform.updates_stats:
                current = None
        report, next_calls = _quantize_transformed(index, block, calls, resolved, device,
                                                   structure, ctx, report)
    finally:
        branches.remove()
    after = [t for t in resolved.transforms if t.after_quantization]
    if after:
        if targets is None or len(targets) != len(calls):
            raise RuntimeError("after-quantization transforms need the unquantized block's "
                               "outputs, one per calibration call")
        ctx.stats, ctx.targets = {}, targets
        for transform in after:
            transform.apply(ctx)
        next_calls = []  # the block changed after the quantizing forward
    if not next_calls:
        next_calls = next_block_inputs(block, calls, device)
    return report, next_calls


class _BranchHooks:
    """While a block is transformed and quantized, its float linears whose weights a
    transform split (``ctx.add_lowrank_branch``) add their branch to their outputs, so
    that every later observation and the sequential quantizing forward see the block's
    true function; the QuantLinears that replace them carry the branch themselves."""

    def __init__(self, linears: Mapping[str, nn.Module],
                 lowrank: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.linears, self.lowrank = linears, lowrank
        self.handles: dict[str, Any] = {}

    def update(self) -> None:
        for name in self.lowrank:
            if name not in self.handles:
                self.handles[name] = self.linears[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Callable[..., torch.Tensor]:
        def add_branch(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            down, up = self.lowrank[name]  # read at call time: a later step may refit it
            x = args[0]
            return out + (x @ down.to(x.dtype).T) @ up.to(x.dtype).T
        return add_branch

    def remove(self) -> None:
        for handle in self.handles.values():
            handle.remove()
        self.handles.clear()


def _quantize_transformed(index: int, block: nn.Module, calls: list[BlockCall],
                          resolved: ResolvedPipeline, device: torch.device,
                          structure: BlockStructure, ctx: BlockContext, report: BlockReport,
                          ) -> tuple[BlockReport, list[BlockCall]]:
    """Quantize the (transformed) block's linears and install the QuantLinears; the next
    block's calibration calls when the quantizing forward produced them, else []."""
    quantizer = resolved.quantizer

    needs = {n: resolved.observers[n] for n in resolved.needs_of(quantizer)}
    per_linear = any(cls.needs_outputs for cls in needs.values())  # stats differ per linear
    if quantizer.sequential and not per_linear:
        qweights, next_calls = _quantize_in_forward(block, calls, structure, resolved, needs, device)
    else:
        qweights = {}
        units = ([(n,) for g in structure.groups for n in g.names] if per_linear
                 else [g.names for g in structure.groups])
        if quantizer.sequential:  # observers need outputs: one observation pass per linear
            for names in units:
                group = LinearGroup(names, structure.group_of(names[0]).in_features)
                stats = observe(block, calls, structure, [group], needs, device)
                for name, qw in zip(names, _quantize_group(names, structure.linears,
                                                           stats[names[0]], resolved), strict=True):
                    linear = structure.linears[name]
                    set_weight_matrix(linear, quantizer.dequantize(qw).to(weight_matrix(linear).dtype))
                    qweights[name] = qw
        else:
            stats = observe(block, calls, structure, structure.groups, needs, device)
            for names in units:
                qweights.update(zip(names, _quantize_group(names, structure.linears,
                                                           stats[names[0]], resolved), strict=True))
        next_calls = []
    for name, qweight in qweights.items():
        report.layers[name] = _install(block, name, structure.linears[name], qweight, resolved,
                                       device, ctx.lowrank.get(name))
    _release_replaced(block, [structure.linears[name] for name in qweights])
    return report, next_calls


def unquantized_outputs(block: nn.Module, calls: list[BlockCall],
                        device: torch.device) -> list[torch.Tensor]:
    """The block's outputs on ``calls`` (float32, on CPU), before anything edits it: the
    targets of after-quantization transforms, and the inputs of the next block's."""
    with torch.no_grad():
        return [forward(block, args, kwargs, device).to("cpu") for args, kwargs in calls]


def _quantize_in_forward(block: nn.Module, calls: list[BlockCall], structure: BlockStructure,
                         resolved: ResolvedPipeline, observers: dict[str, type[Observer]],
                         device: torch.device) -> tuple[dict[str, QuantizedWeight], list[BlockCall]]:
    """Sequential quantization in one forward over all calibration rows (module doc)."""
    quantizer = resolved.quantizer
    qweights: dict[str, QuantizedWeight] = {}

    def quantize_group_here(group: LinearGroup) -> Callable[[torch.Tensor], None]:
        def on_input(x2: torch.Tensor) -> None:
            if group.names[0] in qweights:  # a layer called twice in one forward
                return
            stats = {}
            for obs, instance in _new_observers(observers).items():
                instance.update(x2, None)
                stats[obs] = instance.compute()
            for name, qw in zip(group.names, _quantize_group(group.names, structure.linears,
                                                              stats, resolved), strict=True):
                qweights[name] = qw
                linear = structure.linears[name]
                set_weight_matrix(linear, quantizer.dequantize(qw).to(weight_matrix(linear).dtype))
        return on_input

    handles = [_group_input_hook(structure.linears[g.names[0]], quantize_group_here(g))
               for g in structure.groups]
    merged = merge_calls(calls)
    try:
        with torch.inference_mode():
            hidden = forward(block, *merged, device).to("cpu")
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in structure.linears if n not in qweights]
    if missing:
        raise RuntimeError(f"block {type(block).__name__}: linears {missing} were not reached "
                           "by the calibration forward")
    return qweights, _with_hidden_rows(calls, hidden)


def _with_hidden_rows(calls: list[BlockCall], hidden: torch.Tensor) -> list[BlockCall]:
    """``calls`` with their hidden states replaced by consecutive row slices of ``hidden``
    (views: :func:`merge_calls` puts them back together without a copy)."""
    out = []
    start = 0
    for args, kwargs in calls:
        rows = _batch_of((args, kwargs))
        out.append(replace_hidden(args, kwargs, hidden[start:start + rows]))
        start += rows
    return out


def _hidden_in_one_tensor(calls: list[BlockCall]) -> list[BlockCall]:
    """The calls with their hidden states moved into one tensor (as the later blocks'
    calls have them), so block 0's merged forward needs no second copy of its inputs."""
    hiddens = [args[0] if args else kwargs.get("hidden_states") for args, kwargs in calls]
    if len(calls) < 2 or not all(isinstance(h, torch.Tensor) and h.shape[1:] == hiddens[0].shape[1:]
                                 for h in hiddens):
        return calls
    return _with_hidden_rows(calls, torch.cat(hiddens))


def next_block_inputs(block: nn.Module, calls: list[BlockCall], device: torch.device) -> list[BlockCall]:
    """The calls of the next block: this (quantized) block's outputs, kept on CPU."""
    out = []
    with torch.inference_mode():
        for args, kwargs in calls:
            hidden = forward(block, args, kwargs, device).to("cpu")
            out.append(replace_hidden(args, kwargs, hidden))
    return out


def quantize_blocks(blocks: DecoderBlocks, calls: list[BlockCall] | None,
                    resolved: ResolvedPipeline, device: torch.device,
                    progress: bool = True, calib_dtype: torch.dtype | None = None) -> list[BlockReport]:
    """Block-sequential quantization of every block, starting from block 0's ``calls``
    (None when :func:`needs_calibration` is false: weights are quantized directly).
    ``calib_dtype`` (e.g. bfloat16) autocasts the calibration forwards.

    ``calls`` is consumed: the list is emptied before block 0 runs, so that the caller's
    reference does not keep block 0's activations for the whole run (one block's
    activations are held at a time)."""
    token = _CALIB_DTYPE.set(calib_dtype)
    try:
        return _quantize_blocks(blocks, calls, resolved, device, progress)
    finally:
        _CALIB_DTYPE.reset(token)


def _quantize_blocks(blocks: DecoderBlocks, calls: list[BlockCall] | None,
                     resolved: ResolvedPipeline, device: torch.device,
                     progress: bool) -> list[BlockReport]:
    from tqdm.auto import tqdm

    if calls is not None:
        given, calls = calls, _hidden_in_one_tensor(list(calls))
        given.clear()
    reports = []
    structures = StructureCache()
    # After-quantization transforms tune each block towards the unquantized model's
    # outputs, so that model's own hidden states are carried along (one more stream).
    reference = calls if any(t.after_quantization for t in resolved.transforms) else None
    bar = tqdm(blocks.blocks, desc=f"quantize {resolved.pipeline.short_form()}", unit="block",
               disable=not progress)
    for index, block in enumerate(bar):
        home = _device_of(block)
        block.to(device)
        if calls is None:
            reports.append(quantize_block_weights(index, block, resolved, device))
        else:
            targets = None if reference is None else unquantized_outputs(block, reference, device)
            report, calls = quantize_block(index, block, calls, resolved, device, structures,
                                           targets)
            reports.append(report)
            if reference is not None and targets is not None:
                reference = [replace_hidden(args, kwargs, hidden)
                             for (args, kwargs), hidden in zip(reference, targets, strict=True)]
        block.to(home)
        _release_block_memory(block)
    return reports


def _release_block_memory(block: nn.Module) -> None:
    """After a block is done: drop the kernels' prepared weights (unpacked codes, made by
    the calibration forwards; inference prepares them again on first use) and hand freed
    heap pages back to the OS, so the resident memory of a long run tracks one block
    instead of creeping up with heap fragmentation."""
    for module in block.modules():
        if isinstance(module, QuantLinear):
            module._providers.clear()
    trim_heap()


def _release_replaced(block: nn.Module, replaced: list[nn.Module]) -> None:
    """The float weights of linears now replaced by QuantLinears: where they are views of
    the checkpoint file's mapping, their pages are dropped (:mod:`qcore.memory`), else the
    whole float model would stay resident by the last block. Tensors still used by a
    module of the block (a weight tied to another layer) are kept."""
    live = {p.data_ptr() for p in block.parameters()}
    release_file_pages(p.detach() for module in replaced for p in module.parameters(recurse=False)
                       if p.data_ptr() not in live)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
