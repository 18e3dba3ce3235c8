"""The ``input-sample`` observer: evenly spaced calibration rows of a linear's inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcore.interfaces import Observer

if TYPE_CHECKING:
    import torch


class InputSampleObserver(Observer):
    """Keeps every ``stride``-th input row (token) of all calibration batches, with the
    stride doubling whenever more than ``max_rows`` are held: the sample stays evenly
    spread over the whole calibration set, between ``max_rows / 2`` and ``max_rows``
    rows (or all of them when there are fewer), deterministic, without a random draw.
    SVDQuant's search scores candidates on it, since the error of quantized activations
    cannot be computed from second-order statistics."""

    name = "input-sample"

    @dataclass(frozen=True)
    class Config:
        max_rows: int = 2048

        def __post_init__(self) -> None:
            if self.max_rows < 1:
                raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.rows: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []
        self.seen = 0
        self.stride = 1

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor | None) -> None:
        import torch

        n = inputs.shape[0]
        if n == 0:
            return
        positions = torch.arange(self.seen, self.seen + n)
        keep = positions % self.stride == 0
        self.rows.append(inputs.detach()[keep.to(inputs.device)].float().cpu())
        self.index.append(positions[keep])
        self.seen += n
        held = sum(len(i) for i in self.index)
        while held > self.config.max_rows:
            self.stride *= 2
            rows, index = torch.cat(self.rows), torch.cat(self.index)
            keep = index % self.stride == 0
            self.rows, self.index = [rows[keep]], [index[keep]]
            held = int(keep.sum())

    def compute(self) -> torch.Tensor:
        import torch

        if not self.rows:
            raise RuntimeError("input-sample observer saw no calibration tokens")
        return torch.cat(self.rows)
