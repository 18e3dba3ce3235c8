"""The ``absmean`` observer: per-input-channel mean activation magnitude (AWQ's s_x)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qcore.interfaces import Observer

if TYPE_CHECKING:
    import torch


class AbsMeanObserver(Observer):
    """Per-input-channel mean |x| over the calibration tokens (running mean)."""

    name = "absmean"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.mean: torch.Tensor | None = None
        self.tokens = 0

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor | None) -> None:
        n = inputs.shape[0]
        if n == 0:
            return
        batch = inputs.detach().float().abs().mean(0)
        total = self.tokens + n
        # A running mean weighted by tokens: no sum grows with the number of tokens.
        self.mean = batch if self.mean is None else self.mean + (batch - self.mean) * (n / total)
        self.tokens = total

    def compute(self) -> torch.Tensor:
        if self.mean is None:
            raise RuntimeError("absmean observer saw no calibration tokens")
        return self.mean
