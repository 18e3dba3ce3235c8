"""The ``torch`` kernel provider: dequantize, then ``torch.nn.functional.linear``.

The always-available fallback, on CPU and GPU: supports every bit-width, group size,
act-order and static/dynamic activation quantization of the ``int-packed`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcore.builtin.int_packer import LAYOUT, IntPacker
from qcore.interfaces import KernelProvider, KernelSupport, PackedWeight

if TYPE_CHECKING:
    import torch


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
        priority=-100,
    )

    def prepare(self, packed: PackedWeight, device: torch.device) -> Any:
        import torch

        from qcore.grid import zero_points

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
            input_scale=None if input_scale is None else input_scale.float().to(device))

    def linear(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        from qcore.grid import fake_quantize_activations

        w = prepared.dequantize(x.dtype)
        if prepared.act_bits is not None:
            x = fake_quantize_activations(x, prepared.act_bits, prepared.input_scale)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
