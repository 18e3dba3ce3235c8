"""Capturing the inputs of the first decoder block, and calling blocks on captured inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qcore.model.blocks import DecoderBlocks
from qcore.model.errors import StructureError

__all__ = [
    "BlockCall",
    "capture_block_inputs",
    "hidden_of",
    "move_to",
    "replace_hidden",
    "run_block",
]

BlockCall = tuple[tuple[Any, ...], dict[str, Any]]
"""One call of a block: positional arguments and keyword arguments."""


class _StopForward(Exception):
    """Raised by the block-0 hook to stop the model once its inputs are recorded."""


def _is_cache(value: object) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(value, Cache)


def move_to(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor (also inside tuples, lists, dicts) moved to ``device``.

    Cache objects become ``None``; other non-tensor values are kept as they are.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if _is_cache(value):
        return None
    if isinstance(value, tuple):
        moved = [move_to(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, Mapping):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


def _input_device(model: nn.Module) -> torch.device:
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def capture_block_inputs(
    model: nn.Module,
    blocks: DecoderBlocks,
    input_ids: torch.Tensor,
    batch_size: int,
) -> list[BlockCall]:
    """Run the model's front-end up to block 0 and record that block's call, per batch.

    Returns one ``(args, kwargs)`` per batch of ``batch_size`` rows of ``input_ids``
    (``[n, seq]``), tensors on CPU, cache objects dropped. The model runs under
    ``no_grad`` in eval mode with ``use_cache=False``; hooks and training flags are
    restored afterwards, also on error.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [n, seq], got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(blocks.blocks) == 0:
        raise StructureError(f"{type(model).__name__}: '{blocks.path}' holds no blocks")

    calls: list[BlockCall] = []

    def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append((move_to(tuple(args), "cpu"), move_to(dict(kwargs), "cpu")))
        raise _StopForward

    device = _input_device(model)
    training = {module: module.training for module in model.modules()}
    handle = blocks.blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start : start + batch_size].to(device)
                before = len(calls)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
                if len(calls) != before + 1:
                    raise StructureError(
                        f"{type(model).__name__}: the forward pass never reached block 0 "
                        f"of '{blocks.path}'"
                    )
    finally:
        handle.remove()
        for module, was_training in training.items():
            module.training = was_training
    return calls


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a block's output: the tensor itself, or the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("hidden_states"), torch.Tensor):
        return output["hidden_states"]
    raise TypeError(f"cannot find hidden states in a block output of type {type(output).__name__}")


def run_block(
    block: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Call ``block(*args, **kwargs)`` and return its hidden states tensor.

    With ``device``, the arguments are moved there first.
    """
    if device is not None:
        args, kwargs = move_to(tuple(args), device), move_to(dict(kwargs), device)
    return hidden_of(block(*args, **kwargs))


def replace_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
) -> BlockCall:
    """The same call with ``hidden`` as hidden states (first positional or ``hidden_states``)."""
    if args:
        return (hidden, *args[1:]), dict(kwargs)
    if "hidden_states" in kwargs:
        return (), {**kwargs, "hidden_states": hidden}
    raise ValueError("the block call has neither a positional argument nor 'hidden_states'")
