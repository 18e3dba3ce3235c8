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
        #: Under bfloat16 calibration (``calib_dtype`` bfloat16, or inputs that arrive in
        #: bfloat16) the products are taken in bfloat16, several times faster on CPUs
        #: with AVX512-BF16/AMX or on GPUs. The linear multiplies its inputs rounded to
        #: bfloat16 anyway (a norm's float32 output included), so the Hessian is that of
        #: the rounded inputs (see :meth:`_add_bf16_product` for how its products are
        #: rounded without making it indefinite). False: float32 products of the inputs
        #: as they arrive.
        #: Float32 calibration always takes the float32 product.
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
        bf16 = self.config.bf16_products and torch.bfloat16 in (x.dtype, self.calib_dtype)
        # Scale the old mean and the new batch by their shares of the tokens seen, so the
        # sum never grows with the number of tokens (stable in float32).
        # Chunks bound the converted copies to CHUNK tokens (not the whole batch).
        for chunk in x.split(self.CHUNK):
            if bf16:
                self._add_bf16_product(chunk, 2.0 / total)
            else:
                chunk = chunk.float() * (2.0 / total) ** 0.5
                self.hessian.addmm_(chunk.T, chunk)
        self.tokens = total

    def _add_bf16_product(self, chunk: torch.Tensor, alpha: float) -> None:
        """``hessian += alpha · XᵀX`` for ``X`` = ``chunk`` rounded to bfloat16.

        A bfloat16 GEMM accumulates in float32 but rounds each output to bfloat16
        (relative 2⁻⁹). Inputs with a large common component (o_proj's, for one) give
        entries far above the Hessian's small eigenvalues, and that rounding alone made
        block 0's o_proj Hessian of SmolLM2 indefinite (least eigenvalue -8% of the mean
        diagonal, where GPTQ dampens by 1%). So the chunk is centred:
        ``XᵀX = X_cᵀX_c + n·μμᵀ`` with ``μ`` its column mean; the centred product (small
        entries, so small rounding errors) is taken in bfloat16 and the mean part in
        float32 (least eigenvalue then -0.05% of the mean diagonal, the exact one +0.02%).
        Centring rounds ``X − μ`` to bfloat16 once more: input rounding, which averages
        out over the tokens.
        """
        import torch

        rows = chunk.to(torch.bfloat16).float()
        mean = rows.mean(0)
        centred = rows.sub_(mean).to(torch.bfloat16)
        self.hessian.add_(centred.T @ centred, alpha=alpha)
        self.hessian.addr_(mean, mean, alpha=alpha * chunk.shape[0])

    def compute(self) -> torch.Tensor:
        if self.hessian is None:
            raise RuntimeError("hessian observer saw no calibration tokens")
        return self.hessian
