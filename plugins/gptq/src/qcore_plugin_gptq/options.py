"""GPTQ's options and their defaults (cheap to import: no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GPTQOptions:
    """The solver's options and their defaults, in one place: the ``gptq`` quantizer's
    ``Config`` extends this class, and :func:`gptq` takes an instance. Each option does
    exactly what its name says, in every combination (tested): ``act_order`` only orders
    the columns, ``static_groups`` only fixes the groups' grids before any update, and
    ``shrink_steps`` chooses each grid's range, static or not. Perplexity figures for
    each setting: BENCHMARKS.md (GPTQ section)."""

    #: columns per lazy batch update
    block_size: int = 128
    #: added to the Hessian's diagonal, relative to its mean diagonal
    dampening: float = 0.01
    #: quantize columns by decreasing Hessian diagonal (the weight stores ``g_idx``
    #: unless ``static_groups``)
    act_order: bool = True
    #: every group's grid from the weight as it is before any update, groups in natural
    #: column order (with act_order: no ``g_idx``); otherwise each group's grid comes
    #: from its columns as they are when the group is reached
    static_groups: bool = False
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    #: range search of each group's grid: shrink factors from 1 down to 1 - max_shrink,
    #: the one with the least weight error kept (1 = plain min-max ranges)
    shrink_steps: int = 20
    max_shrink: float = 0.2

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (0 <= self.dampening < 10, f"dampening must be in [0, 10), got {self.dampening}"),
            (self.shrink_steps >= 1,
             f"shrink_steps must be >= 1 (1: min-max ranges), got {self.shrink_steps}"),
            (0 <= self.max_shrink < 1, f"max_shrink must be in [0, 1), got {self.max_shrink}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
