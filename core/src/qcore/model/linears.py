"""Linear layers: ``nn.Linear`` and transformers' GPT-2 ``Conv1D``, seen as one kind.

``Conv1D`` stores its weight transposed, ``[in_features, out_features]``; the helpers here
always speak ``[out_features, in_features]``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

__all__ = [
    "block_linears",
    "is_conv1d",
    "is_linear",
    "linear_shape",
    "set_weight_matrix",
    "weight_matrix",
]


@lru_cache(maxsize=1)
def _conv1d_class() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class, imported on first use (None without transformers)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (a linear with a transposed weight)."""
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (and subclasses) and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _check_linear(module: nn.Module) -> None:
    if not is_linear(module):
        raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as a view ``[out_features, in_features]`` (in-place edits reach the module)."""
    _check_linear(module)
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight.t() if is_conv1d(module) else weight


def set_weight_matrix(module: nn.Module, w_out_in: torch.Tensor) -> None:
    """Copy ``w_out_in`` (``[out_features, in_features]``) into the module's weight."""
    target = weight_matrix(module)
    if tuple(w_out_in.shape) != tuple(target.shape):
        raise ValueError(
            f"{type(module).__name__}: weight of shape {tuple(w_out_in.shape)} given, "
            f"expected [out, in] = {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(w_out_in)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear or Conv1D."""
    out_features, in_features = weight_matrix(module).shape
    return int(out_features), int(in_features)


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linears inside ``block`` by block-relative dotted name, in registration order."""
    return {name: module for name, module in block.named_modules() if name and is_linear(module)}
