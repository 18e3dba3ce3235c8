"""The ``minmax`` observer: per-input-channel minimum and maximum of a linear's inputs."""

from __future__ import annotations

from dataclasses import dataclass
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


class HessianObserver(Observer):
    """Running mean of 2·XᵀX over calibration tokens (second-order statistic: GPTQ, VPTQ)."""

    name = "hessian"
    #: Tokens per bfloat16 product (see ``Config.bf16_products``).
    CHUNK = 4096

    @dataclass(frozen=True)
    class Config:
        #: Inputs that arrive in bfloat16 (calibration autocast to bf16) are multiplied
        #: in bfloat16, several times faster on CPUs with AMX or on GPUs: each product of
        #: CHUNK tokens is accumulated in float32 inside the GEMM, rounded to bfloat16
        #: (relative error about 2e-3 per chunk) and summed in float32. The inputs are
        #: already bfloat16 values, so only that rounding differs. float32 inputs always
        #: take the float32 product.
        bf16_products: bool = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.hessian: torch.Tensor | None = None
        self.tokens = 0

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor | None) -> None:
        import torch

        x = inputs.detach()
        n = x.shape[0]
        if n == 0:
            return
        total = self.tokens + n
        if self.hessian is None:
            self.hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        else:
            self.hessian.mul_(self.tokens / total)
        # Scale the old mean and the new batch by their shares of the tokens seen, so the
        # sum never grows with the number of tokens (stable in float32).
        # Chunks bound the float32 copies to CHUNK tokens (not the whole batch).
        for chunk in x.split(self.CHUNK):
            if chunk.dtype == torch.bfloat16 and self.config.bf16_products:
                self.hessian.add_((chunk.T @ chunk).float(), alpha=2.0 / total)
            else:
                chunk = chunk.float() * (2.0 / total) ** 0.5
                self.hessian.addmm_(chunk.T, chunk)
        self.tokens = total

    def compute(self) -> torch.Tensor:
        if self.hessian is None:
            raise RuntimeError("hessian observer saw no calibration tokens")
        return self.hessian
