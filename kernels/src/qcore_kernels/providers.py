"""The CuPy kernel providers: what they support, as data, and how they run.

They read the core's ``int-packed`` layout (``vq-packed`` for the codebook provider:
what checkpoints store) and convert it once per layer in ``prepare`` to their own layout
(:mod:`qcore_kernels.layouts`, :mod:`qcore_kernels.lut_layout`). They run on CUDA
tensors of compute capability 8.0 or higher, in float16 or bfloat16, and outrank the
torch provider; ``kernel auto`` falls back to torch wherever they do not apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qcore.interfaces import KernelProvider, KernelRequest, KernelSupport, PackedWeight
from qcore.ops import INT_LAYOUT as INT_PACKED
from qcore_kernels.support import (
    W4A4_GROUP,
    W4A4_IN_MULTIPLE,
    W8A8_IN_MULTIPLE,
    WQ_IN_MULTIPLE,
    lut_unsupported_reason,
    w8a8_unsupported_reason,
    wq_unsupported_reason,
)

if TYPE_CHECKING:
    import torch

_DTYPES = frozenset({"float16", "bfloat16"})


class _CupyProvider(KernelProvider):
    @classmethod
    def unavailable_reason(cls) -> str | None:
        from qcore_kernels.runtime import cupy_unavailable_reason

        return cupy_unavailable_reason()


class _PerDtype:
    """A weight in the kernel layout, with scales cast once per activation dtype."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self._cast: dict[Any, Any] = {}

    def get(self, dtype: torch.dtype) -> Any:
        prepared = self._cast.get(dtype)
        if prepared is None:
            import dataclasses

            prepared = dataclasses.replace(
                self.base, scales=self.base.scales.to(dtype), zeros=self.base.zeros.to(dtype)
            )
            self._cast[dtype] = prepared
        return prepared


class CupyWQLinear(_CupyProvider):
    """W4A16 / W8A16: group-wise (multiple of 32, or per channel) asymmetric or symmetric
    integer weights, act-order included, dequantized inside the kernel."""

    name = "cupy-wq"
    support = KernelSupport(
        ops=frozenset({"linear"}),
        layouts=frozenset({INT_PACKED}),
        bits=frozenset({4, 8}),
        act_bits=frozenset({None}),
        act_order=True,
        dtypes=_DTYPES,
        devices=frozenset({"cuda"}),
        min_compute_capability=(8, 0),
        in_features_multiple=WQ_IN_MULTIPLE,
        priority=100,
    )

    @classmethod
    def unsupported_reason(cls, request: KernelRequest) -> str | None:
        return super().unsupported_reason(request) or wq_unsupported_reason(
            request.bits, request.group_size, request.in_features
        )

    def prepare(self, packed: PackedWeight, device: torch.device) -> Any:
        import torch

        from qcore_kernels.layouts import to_wq

        return _PerDtype(to_wq(packed, torch.float32, device))

    def linear(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        from qcore_kernels.ops import wq_linear
        from qcore_kernels.runtime import cupy_launcher

        return wq_linear(x, prepared.get(x.dtype), bias, cupy_launcher())


class CupyW8A8Linear(_CupyProvider):
    """W8A8: symmetric int8 weights per output channel, int8 activations per token
    (dynamic) or per tensor (static), int32 accumulation on tensor cores or dp4a."""

    name = "cupy-w8a8"
    support = KernelSupport(
        ops=frozenset({"linear"}),
        layouts=frozenset({INT_PACKED}),
        bits=frozenset({8}),
        group_sizes=frozenset({-1}),
        symmetric=frozenset({True}),
        act_bits=frozenset({8}),
        act_order=False,
        dtypes=_DTYPES,
        devices=frozenset({"cuda"}),
        min_compute_capability=(8, 0),
        in_features_multiple=W8A8_IN_MULTIPLE,
        priority=100,
    )

    @classmethod
    def unsupported_reason(cls, request: KernelRequest) -> str | None:
        return super().unsupported_reason(request) or w8a8_unsupported_reason(
            request.bits,
            request.group_size,
            request.symmetric,
            request.act_bits,
            request.in_features,
        )

    def prepare(self, packed: PackedWeight, device: torch.device) -> Any:
        from qcore_kernels.layouts import to_w8a8

        return to_w8a8(packed, device)

    def linear(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        from qcore_kernels.ops import w8a8_linear
        from qcore_kernels.runtime import cupy_launcher

        return w8a8_linear(x, prepared, bias, cupy_launcher())


class CupyW4A4Linear(_CupyProvider):
    """W4A4 (SVDQuant / Nunchaku style): 4-bit weights and 4-bit activations, both in groups
    of 64 along the input, symmetric or asymmetric on either side; activations quantized
    at run time per [token, group]; int4 tensor-core products with int32 sums per group,
    scaled in float32. Fuses the layer's low-rank branch: the activation kernel computes
    ``x @ down.T`` with the codes, the GEMM's epilogue adds its product with ``up`` (in
    the activations' dtype) and the bias."""

    name = "cupy-w4a4"
    support = KernelSupport(
        ops=frozenset({"linear"}),
        layouts=frozenset({INT_PACKED}),
        bits=frozenset({4}),
        group_sizes=frozenset({W4A4_GROUP}),
        symmetric=frozenset({True, False}),
        act_bits=frozenset({4}),
        act_dynamic=frozenset({True}),
        act_group_sizes=frozenset({W4A4_GROUP}),
        act_symmetric=frozenset({True, False}),
        lowrank=True,
        act_order=False,
        dtypes=_DTYPES,
        devices=frozenset({"cuda"}),
        min_compute_capability=(8, 0),
        in_features_multiple=W4A4_IN_MULTIPLE,
        priority=100,
    )

    def prepare(self, packed: PackedWeight, device: torch.device) -> Any:
        from qcore_kernels.layouts import to_w4a4

        return to_w4a4(packed, device)

    def linear(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        from qcore_kernels.ops import w4a4_linear
        from qcore_kernels.runtime import cupy_launcher

        return w4a4_linear(x, prepared, bias, cupy_launcher())


class CupyLUTLinear(_CupyProvider):
    """Codebook (vq) weights, op ``lut_linear``: every vector size, index width (1-16
    bits), residual stage, outlier columns, per-channel scale and offset. Up to 16 tokens,
    vector sizes 4, 6 and 8 whose codebooks fit in shared memory run the LUT GEMV (indices
    decoded inside the kernel); larger M, other vector sizes and codebooks too large for
    shared memory decode the weight to fp16/bf16 and use cuBLAS (``qcore_kernels.lut_ops``).
    A request does not carry the vector size or codebook size, so that choice is made per
    weight at run time, never a wrong result."""

    name = "cupy-lut"
    support = KernelSupport(
        ops=frozenset({"lut_linear"}),
        layouts=frozenset({"vq-packed"}),
        dtypes=_DTYPES,
        devices=frozenset({"cuda"}),
        min_compute_capability=(8, 0),
        priority=100,
    )

    @classmethod
    def unsupported_reason(cls, request: KernelRequest) -> str | None:
        return super().unsupported_reason(request) or lut_unsupported_reason(request.bits)

    def prepare(self, packed: PackedWeight, device: torch.device) -> Any:
        from qcore_kernels.lut_layout import to_lut

        return to_lut(packed, device)

    def lut_linear(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        from qcore_kernels.lut_ops import lut_linear
        from qcore_kernels.runtime import cupy_launcher

        return lut_linear(x, prepared, bias, cupy_launcher())


PROVIDERS = (CupyWQLinear, CupyW8A8Linear, CupyW4A4Linear, CupyLUTLinear)
