"""Input-sharing groups of a block's linears and their scale sources, found by running it.

Nothing here reads module names or architecture tables: a block is run once with hooks on
every submodule; linears that receive the same input tensor form a group; a group's scale
source is a preceding norm or linear whose output channels, scaled by ``s``, scale the
group's input channels by exactly ``s`` and feed nothing else (both checked by rerunning
the block), so ``s`` can be folded between the two without changing the block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from qcore.model.capture import hidden_of
from qcore.model.errors import StructureError
from qcore.model.linears import block_linears, is_linear, linear_shape, weight_matrix

__all__ = [
    "BlockStructure",
    "LinearGroup",
    "SourceKind",
    "describe_block",
    "execution_order_stages",
    "fold_scales_into_source",
]

SourceKind = Literal["norm", "linear"]


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, and the module whose output channels scale it."""

    names: tuple[str, ...]
    in_features: int
    source: str | None = None
    source_kind: SourceKind | None = None


@dataclass
class BlockStructure:
    """A block's linears in execution order and their input-sharing groups.

    ``not_called`` names linears the block holds but did not call on the given inputs;
    they are in no group and not in ``linears``.
    """

    linears: dict[str, nn.Module]
    groups: list[LinearGroup]
    not_called: tuple[str, ...] = field(default=())

    def group_of(self, name: str) -> LinearGroup:
        """The group holding linear ``name``."""
        for group in self.groups:
            if name in group.names:
                return group
        raise KeyError(name)


@dataclass
class _Input:
    """The first input a linear saw: the tensor itself (identity) and a copy of its values."""

    call: int
    ref: torch.Tensor
    value: torch.Tensor


@dataclass
class _Trace:
    """What one hooked run of a block saw, on one event counter."""

    counter: int = 0
    inputs: dict[str, _Input] = field(default_factory=dict)
    completions: dict[str, list[int]] = field(default_factory=dict)
    outputs: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    output: torch.Tensor | None = None  # the block's hidden states

    def tick(self) -> int:
        self.counter += 1
        return self.counter


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _output_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [o for o in output if isinstance(o, torch.Tensor)]
    return []


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same storage, offset, shape, strides and dtype: the same tensor seen twice."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


def _trace_block(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Trace:
    """Run ``block`` once with hooks on every submodule."""
    trace = _Trace()
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre_hook(name: str, linear: bool) -> Callable[..., None]:
        def hook(_m: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            call = trace.tick()
            if linear and name not in trace.inputs:
                x = _first_tensor(a, kw)
                if x is not None:
                    trace.inputs[name] = _Input(call, x, x.detach().clone())

        return hook

    def post_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: tuple[Any, ...], output: Any) -> None:
            done = trace.tick()
            trace.completions.setdefault(name, []).append(done)
            trace.outputs.extend((done, t) for t in _output_tensors(output))

        return hook

    try:
        for name, module in block.named_modules():
            if not name:
                continue
            handles.append(
                module.register_forward_pre_hook(
                    pre_hook(name, is_linear(module)), with_kwargs=True
                )
            )
            handles.append(module.register_forward_hook(post_hook(name)))
        trace.output = hidden_of(block(*args, **kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return trace


def _capture_input(
    block: nn.Module, linear: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """The first input ``linear`` receives when ``block`` runs."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
        x = _first_tensor(a, kw)
        if not seen and x is not None:
            seen.append(x.detach().clone())

    handle = linear.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        block(*args, **kwargs)
    finally:
        handle.remove()
    return seen[0] if seen else None


def _is_norm_like(module: nn.Module, size: int) -> bool:
    """Whether the module holds its own 1-D ``weight`` of ``size`` channels (a norm, say)."""
    weight = module._parameters.get("weight")
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == size


def _source_tensors(module: nn.Module, kind: SourceKind) -> list[torch.Tensor]:
    """Tensors whose rows are the module's output channels: weight (rows) and 1-D bias."""
    weight = weight_matrix(module) if kind == "linear" else module._parameters.get("weight")
    if not isinstance(weight, torch.Tensor):
        raise StructureError(f"{type(module).__name__}: no weight to scale")
    out = [weight]
    bias = module._parameters.get("bias")
    if isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.numel() == weight.shape[0]:
        out.append(bias)
    return out


def _scale_rows(t: torch.Tensor, s: torch.Tensor, divide: bool = False) -> None:
    """In place: multiply (or divide) ``t`` along axis 0 by ``s``, computed in float32."""
    shape = (-1,) + (1,) * (t.dim() - 1)
    factor = s.to(device=t.device, dtype=torch.float32).reshape(shape)
    scaled = t.float() / factor if divide else t.float() * factor
    t.copy_(scaled.to(t.dtype))


def _default_rtol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float32 (inf on shape mismatch or non-finite values)."""
    if got.shape != want.shape:
        return float("inf")
    err = float((got.float() - want.float()).norm())
    size = float(want.float().norm())
    if err != err or err == float("inf"):
        return float("inf")
    return err / size if size > 0 else (0.0 if err == 0 else float("inf"))


@dataclass
class _Check:
    """One block call and what it gave, to test candidate sources against."""

    block: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor
    rtol: float  # relative error allowed on a group's scaled input
    atol: float  # error allowed on the block output after a fold (norm over all elements)


def _is_source(
    check: _Check,
    candidate: nn.Module,
    kind: SourceKind,
    group: list[nn.Module],
    original: torch.Tensor,
    s: torch.Tensor,
) -> bool:
    """Whether ``candidate`` is the group's scale source, checked by rerunning the block.

    1. Its output channels times ``s`` make the group's input exactly ``original * s``.
    2. Folding (candidate / ``s``, group input columns * ``s``) leaves the block output
       unchanged: nothing else reads the candidate's output.
    Parameters are restored exactly either way.
    """
    tensors = _source_tensors(candidate, kind)
    columns = [weight_matrix(linear).t() for linear in group]
    saved = [t.detach().clone() for t in (*tensors, *columns)]
    try:
        for t in tensors:
            _scale_rows(t, s)
        scaled = _capture_input(check.block, group[0], check.args, check.kwargs)
        expected = original.float() * s.to(device=original.device)
        if scaled is None or _relative_error(scaled, expected) > check.rtol:
            return False
        for t, keep in zip(tensors, saved, strict=False):
            t.copy_(keep)
            _scale_rows(t, s, divide=True)
        for t in columns:
            _scale_rows(t, s)
        folded = hidden_of(check.block(*check.args, **check.kwargs))
        if folded.shape != check.output.shape:
            return False
        return float((folded.float() - check.output.float()).norm()) <= check.atol
    finally:
        for t, keep in zip((*tensors, *columns), saved, strict=True):
            t.copy_(keep)


def describe_block(
    block: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    rtol: float | None = None,
    seed: int = 0,
) -> BlockStructure:
    """Groups of linears sharing an input, with their scale sources, from one real call.

    ``args``/``kwargs`` are a call of the block as the model makes it (see
    ``capture_block_inputs``). Groups come in the order their inputs are produced, members
    in call order. A source candidate (a norm-like module or a linear that ran before the
    group, with as many output channels as the group has inputs; nearest first) is accepted
    when scaling its output channels by a random ``s`` scales the group's input by exactly
    ``s`` and folding ``s`` into it and the group leaves the block output unchanged.
    ``rtol`` bounds both relative errors (1e-4 in float32 by default). Parameters are
    restored exactly; the block runs in eval mode without grad.
    """
    linears = block_linears(block)
    if not linears:
        raise StructureError(
            f"{type(block).__name__}: block has no linear layers (nn.Linear or Conv1D)"
        )
    modules = dict(block.named_modules())
    training = {m: m.training for m in block.modules()}
    try:
        block.eval()
        with torch.no_grad():
            return _describe(block, linears, modules, args, kwargs, rtol, seed)
    finally:
        for m, was_training in training.items():
            m.training = was_training


def _describe(
    block: nn.Module,
    linears: dict[str, nn.Module],
    modules: dict[str, nn.Module],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rtol: float | None,
    seed: int,
) -> BlockStructure:
    trace = _trace_block(block, args, kwargs)
    called = sorted(trace.inputs, key=lambda n: trace.inputs[n].call)
    if not called:
        raise StructureError(
            f"{type(block).__name__}: none of its linears ran ({', '.join(linears)})"
        )

    # Group linears by the input tensor they read: the same object, or the same view of the
    # same storage holding the same values.
    shared: list[list[str]] = []
    for name in called:
        mine = trace.inputs[name]
        for members in shared:
            first = trace.inputs[members[0]]
            if mine.ref is first.ref or (
                _same_view(mine.ref, first.ref) and torch.equal(mine.value, first.value)
            ):
                members.append(name)
                break
        else:
            shared.append([name])

    def produced(members: list[str]) -> tuple[int, int]:
        """When the group's input was made: its producing submodule's return, else first use."""
        first = trace.inputs[members[0]]
        made = [
            done
            for done, t in trace.outputs
            if done < first.call and (t is first.ref or _same_view(t, first.ref))
        ]
        return (min(made) if made else first.call, first.call)

    shared.sort(key=produced)

    assert trace.output is not None
    output = trace.output.detach().clone()
    tol = rtol if rtol is not None else _default_rtol(output.dtype)
    hidden = _first_tensor(args, kwargs)
    change = output - hidden if hidden is not None and hidden.shape == output.shape else output
    check = _Check(
        block,
        args,
        kwargs,
        output,
        rtol=tol,
        atol=tol * float(change.float().norm())
        + 4 * torch.finfo(output.dtype).eps * float(output.float().norm()),
    )

    generator = torch.Generator().manual_seed(seed)
    groups: list[LinearGroup] = []
    for members in shared:
        first = trace.inputs[members[0]]
        in_features = linear_shape(linears[members[0]])[1]
        s = torch.empty(in_features).uniform_(0.5, 2.0, generator=generator)
        s = s.to(first.value.dtype).to(torch.float32)  # representable in the input dtype
        source: str | None = None
        source_kind: SourceKind | None = None
        group = [linears[name] for name in members]
        for name, kind in _candidates(modules, trace, members, in_features, first.call):
            if _is_source(check, modules[name], kind, group, first.value, s):
                source, source_kind = name, kind
                break
        groups.append(LinearGroup(tuple(members), in_features, source, source_kind))

    ordered = {name: linears[name] for group in groups for name in group.names}
    not_called = tuple(name for name in linears if name not in ordered)
    return BlockStructure(linears=ordered, groups=groups, not_called=not_called)


def _candidates(
    modules: dict[str, nn.Module],
    trace: _Trace,
    members: list[str],
    in_features: int,
    before: int,
) -> list[tuple[str, SourceKind]]:
    """Modules that could scale the group's input, by shape, nearest preceding first."""
    found: list[tuple[str, SourceKind, int]] = []
    for name, module in modules.items():
        if not name or name in members:
            continue
        done = [t for t in trace.completions.get(name, []) if t < before]
        if not done:
            continue
        if is_linear(module):
            if linear_shape(module)[0] == in_features:
                found.append((name, "linear", max(done)))
        elif _is_norm_like(module, in_features):
            found.append((name, "norm", max(done)))
    found.sort(key=lambda c: c[2], reverse=True)
    return [(name, kind) for name, kind, _ in found]


def fold_scales_into_source(block: nn.Module, group: LinearGroup, s: torch.Tensor) -> None:
    """Divide the source's output channels by ``s`` and multiply the group's input columns by it.

    Norm source: weight and bias divided by ``s``; linear source: weight rows and bias
    divided by ``s``. The block computes the same function afterwards (up to rounding).
    """
    if group.source is None or group.source_kind is None:
        raise ValueError(f"group {group.names} has no scale source to fold into")
    if s.dim() != 1 or s.numel() != group.in_features:
        raise ValueError(
            f"scales of shape {tuple(s.shape)} given for {group.in_features} input channels"
        )
    if not bool((s > 0).all()):
        raise ValueError("scales must be positive")
    source = block.get_submodule(group.source)
    with torch.no_grad():
        for t in _source_tensors(source, group.source_kind):
            _scale_rows(t, s, divide=True)
        for name in group.names:
            w = weight_matrix(block.get_submodule(name))
            _scale_rows(w.t(), s)


def execution_order_stages(structure: BlockStructure) -> list[list[str]]:
    """Linear names stage by stage, in the order the stages' inputs are produced.

    For a Llama block: [q, k, v], [o], [gate, up], [down] (GPTQ's true-sequential order).
    """
    return [list(group.names) for group in structure.groups]
