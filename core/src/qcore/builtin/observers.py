"""The ``minmax`` observer: per-input-channel minimum and maximum of a linear's inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qcore.interfaces import Observer

if TYPE_CHECKING:
    import torch


class MinMaxObserver(Observer):
    """Per-input-channel min and max of the inputs (static activation scales)."""

    name = "minmax"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor | None) -> None:
        import torch

        lo = inputs.detach().float().amin(0)
        hi = inputs.detach().float().amax(0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def compute(self) -> dict[str, torch.Tensor]:
        if self.min is None or self.max is None:
            raise RuntimeError("minmax observer saw no calibration batch")
        return {"min": self.min, "max": self.max}
