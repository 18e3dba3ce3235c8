"""The ``int`` packer: bit-packed codes + scales + zero points (layout ``int-packed``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qcore.interfaces import PackedWeight, Packer, QuantizedWeight

if TYPE_CHECKING:
    import torch

LAYOUT = "int-packed"


class IntPacker(Packer):
    """Codes bit-packed into int32 words along the input dimension (1-8 bits)."""

    name = "int"
    format = "int"
    layout = LAYOUT
    op = "linear"
    supported_bits = frozenset(range(1, 9))

    def dequantize(self, qweight: QuantizedWeight) -> torch.Tensor:
        from qcore.grid import dequantize_int

        return dequantize_int(qweight)

    def pack(self, qweight: QuantizedWeight) -> PackedWeight:
        from qcore.bitpack import pack_codes

        if qweight.format != "int":
            raise ValueError(f"the int packer reads format 'int', got {qweight.format!r}")
        bits = int(qweight.params["bits"])  # type: ignore[arg-type]
        if bits not in self.supported_bits:
            raise ValueError(f"bits={bits}: the int packer stores 1 to 8 bits per code")
        t = qweight.tensors
        tensors = {"qweight": pack_codes(t["codes"], bits), "scales": t["scales"]}
        for key in ("zeros", "g_idx", "input_scale"):
            if key in t:
                tensors[key] = t[key]
        return PackedWeight(layout=LAYOUT, shape=qweight.shape, tensors=tensors,
                            params=dict(qweight.params))

    def unpack(self, packed: PackedWeight) -> QuantizedWeight:
        from qcore.bitpack import unpack_codes

        bits = int(packed.params["bits"])  # type: ignore[arg-type]
        t = packed.tensors
        tensors = {"codes": unpack_codes(t["qweight"], bits, packed.shape[1]), "scales": t["scales"]}
        for key in ("zeros", "g_idx", "input_scale"):
            if key in t:
                tensors[key] = t[key]
        return QuantizedWeight(format="int", shape=packed.shape, tensors=tensors,
                               params=dict(packed.params))
