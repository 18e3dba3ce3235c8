"""The ``torch`` kernel provider: dequantize, then ``torch.nn.functional.linear``.

The always-available fallback, on CPU and GPU: supports every bit-width, group size,
act-order and activation quantization (static or dynamic, per token or in groups,
symmetric or asymmetric) of the ``int-packed`` layout: the exact reference of each.

Dequantized weights are kept in a bounded, process-wide cache: a layer whose float weight
fits in what is left of the budget keeps it after its first call (one per dtype), and
later calls skip the dequantization; a layer that does not fit dequantizes on every call,
as before. Nothing is evicted, so a model larger than the budget keeps its first layers'
weights and is never slower than without the cache. The budget is
``QCORE_DEQUANT_CACHE_MB`` (default 1024 MiB; 0 turns the cache off), read when a weight is
first cached; a cached weight's bytes return to the budget when its layer is prepared
again or freed. The outputs are the same bit for bit with or without the cache.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qcore.builtin.int_packer import LAYOUT, IntPacker
from qcore.interfaces import KernelProvider, KernelSupport, PackedWeight

if TYPE_CHECKING:
    import torch


#: Default budget of the dequantized-weight cache, in MiB (``QCORE_DEQUANT_CACHE_MB``).
DEFAULT_CACHE_MB = 1024


class _DequantBudget:
    """Bytes of dequantized weights held by all prepared weights of this process."""

    def __init__(self) -> None:
        self.used = 0
        self._lock = threading.Lock()

    @staticmethod
    def limit() -> int:
        raw = os.environ.get("QCORE_DEQUANT_CACHE_MB", str(DEFAULT_CACHE_MB))
        try:
            mib = float(raw)
        except ValueError:
            raise ValueError(f"QCORE_DEQUANT_CACHE_MB={raw!r} is not a number of MiB; "
                             "set it to e.g. 256, or 0 to turn the cache off") from None
        return max(0, int(mib * 2**20))

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.used + nbytes > self.limit():
                return False
            self.used += nbytes
            return True

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes


DEQUANT_BUDGET = _DequantBudget()


@dataclass
class PreparedIntWeight:
    """Codes unpacked to uint8 once (padded to whole groups when columns are in natural
    order); scales and zero points stay per group and are expanded at call time, so the
    prepared weight costs about one byte per weight."""

    codes: torch.Tensor  # [out, n_groups * group] natural order, else [out, in]
    scales: torch.Tensor  # [out, n_groups] float32
    zeros: torch.Tensor  # [out, n_groups] float32
    g_idx: torch.Tensor | None  # act-order: group of each column
    in_features: int
    act_bits: int | None
    input_scale: torch.Tensor | None
    act_group_size: int = -1
    act_symmetric: bool = True
    #: Dequantized weights by dtype, within :data:`DEQUANT_BUDGET`.
    cache: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight in ``dtype``: from the cache, or dequantized (and cached when
        the budget has room)."""
        import torch

        found = self.cache.get(dtype)
        if found is not None:
            return found
        if self.scales.requires_grad:  # a graph to differentiate through: never cached
            return self.dequantize(dtype)
        # An ordinary tensor even under inference_mode, so that it serves later calls made
        # outside it too.
        with torch.inference_mode(False), torch.no_grad():
            w = self.dequantize(dtype)
        nbytes = w.numel() * w.element_size()
        if DEQUANT_BUDGET.take(nbytes):
            self.cache[dtype] = w
            weakref.finalize(self, DEQUANT_BUDGET.give_back, nbytes)
        return w

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        out_f, n_groups = self.scales.shape
        if self.g_idx is not None:
            gi = self.g_idx
            return ((self.codes.to(dtype) - self.zeros[:, gi].to(dtype))
                    * self.scales[:, gi].to(dtype))
        codes = self.codes.view(out_f, n_groups, -1).to(dtype)
        w = (codes - self.zeros.to(dtype)[..., None]) * self.scales.to(dtype)[..., None]
        return w.view(out_f, -1)[:, : self.in_features]


class TorchKernels(KernelProvider):
    """Reference kernels in plain torch (dequantize + F.linear), CPU and GPU."""

    name = "torch"
    support = KernelSupport(
        ops=frozenset({"linear"}),
        layouts=frozenset({LAYOUT}),
        act_bits=frozenset({None, 4, 8}),
        act_group_sizes=None,
        act_symmetric=frozenset({True, False}),
        priority=-100,
    )

    def prepare(self, packed: PackedWeight, device: torch.device) -> Any:
        import torch

        from qcore.grid import zero_points
        from qcore.interfaces import act_fields

        qweight = IntPacker().unpack(packed)
        t = qweight.tensors
        bits = int(qweight.params["bits"])  # type: ignore[arg-type]
        scales = t["scales"].float()
        zeros = zero_points(scales, t.get("zeros"), bits)
        codes = t["codes"]
        out_f, in_f = codes.shape
        g_idx = t.get("g_idx")
        natural = g_idx is None
        if natural:
            width = scales.shape[1] * (in_f if scales.shape[1] == 1 else
                                       int(qweight.params["group_size"]))  # type: ignore[arg-type]
            if width != in_f:
                codes = torch.nn.functional.pad(codes, (0, width - in_f))
        input_scale = t.get("input_scale")
        return PreparedIntWeight(
            codes=codes.contiguous().to(device), scales=scales.to(device),
            zeros=zeros.to(device), g_idx=None if natural else g_idx.long().to(device),
            in_features=in_f, act_bits=qweight.params.get("act_bits"),  # type: ignore[arg-type]
            input_scale=None if input_scale is None else input_scale.float().to(device),
            **act_fields(qweight.params))

    def linear(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        from qcore.grid import fake_quantize_activations

        w = prepared.weight(x.dtype)
        if prepared.act_bits is not None:
            x = fake_quantize_activations(x, prepared.act_bits, prepared.input_scale,
                                          prepared.act_group_size, prepared.act_symmetric)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
