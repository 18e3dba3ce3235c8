"""Second-order helpers shared by the Hessian-guided quantizers (GPTQ, VPTQ, ...).

They quantize a weight column by column (or vector by vector) and spread each rounding
error over the columns not quantized yet through the inverse of the layer's Hessian
``H = 2 XᵀX`` (the ``hessian`` observer), in its upper Cholesky form.
"""

from __future__ import annotations

import logging

import torch

#: Dampening is multiplied by this factor after each failed Cholesky factorisation.
DAMPENING_GROWTH = 10.0
MAX_ATTEMPTS = 6


class HessianFactorError(RuntimeError):
    """The Hessian could not be factorised even with strong dampening."""


def inverse_hessian_factor(
    hessian: torch.Tensor, dampening: float, *, method: str = "GPTQ",
    option: str = "gptq.dampening", error: type[Exception] = HessianFactorError,
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λ·mean(diag H)·I)⁻¹`` and the λ used.

    λ starts at ``dampening`` and grows ×10 after each failed factorisation, with a
    warning (logger ``qcore.<method>``) that names ``method``; after ``MAX_ATTEMPTS``
    failures ``error`` is raised, naming the ``--set`` ``option`` that raises the
    dampening. Never falls back silently.
    """
    size = hessian.shape[0]
    mean_diag = float(torch.diagonal(hessian).mean())
    damp = dampening
    eye = torch.eye(size, dtype=hessian.dtype, device=hessian.device)
    for attempt in range(MAX_ATTEMPTS):
        lower, info = torch.linalg.cholesky_ex(hessian + (damp * mean_diag) * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, damp
        next_damp = max(damp * DAMPENING_GROWTH, 1e-6)
        logging.getLogger(f"qcore.{method.lower()}").warning(
            "%s: Cholesky factorisation failed with dampening %.3g (attempt %d of %d); "
            "retrying with %.3g", method, damp, attempt + 1, MAX_ATTEMPTS, next_damp)
        damp = next_damp
    raise error(f"{method}: the Hessian ({size}x{size}) is not positive definite even with "
                f"dampening {damp / DAMPENING_GROWTH:.3g} x mean diagonal; check the "
                f"calibration data (NaN or constant inputs?) or raise --set {option}")
