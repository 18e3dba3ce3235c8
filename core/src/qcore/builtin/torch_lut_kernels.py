"""The ``torch-lut`` kernel provider: decode codebook weights, then ``F.linear``.

The always-available fallback for the ``vq-packed`` layout (op ``lut_linear``), on CPU
and GPU: every vector size, index width (1-16 bits), residual stage, outlier part,
scale and offset. ``prepare`` unpacks the indices once and keeps them compact (int16 up
to 15 bits, int32 for 16) with the float16 codebooks; each call gathers the codebook
rows in the activation's dtype and multiplies. See ``docs/codebook-format.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcore.codebook import LAYOUT, OP, VQPacker
from qcore.interfaces import KernelProvider, KernelSupport, PackedWeight

if TYPE_CHECKING:
    import torch


@dataclass
class PreparedVQWeight:
    """Indices unpacked once to int16 (int32 for 16-bit indices), codebooks, outlier
    columns and per-channel scale/offset on the device: about ``index_bits / v`` bytes
    per weight rounded up to 2 bytes per vector, plus the codebooks."""

    indices: torch.Tensor  # [out, n_vec]
    codebook: torch.Tensor  # [rows, v]
    res_indices: torch.Tensor | None
    res_codebook: torch.Tensor | None
    outlier_indices: torch.Tensor | None  # [out, n_vec_o]
    outlier_codebook: torch.Tensor | None
    outlier_cols: torch.Tensor | None  # int64 [n_outliers]
    main_cols: torch.Tensor | None  # int64 [K_main], None without outliers
    scale: torch.Tensor | None  # [out]
    offset: torch.Tensor | None  # [out]
    in_features: int

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight ``[out, in]`` in ``dtype``."""
        from qcore.codebook import assemble_weight, decode_part

        n_outliers = 0 if self.outlier_cols is None else self.outlier_cols.numel()
        main = decode_part(self.indices, self.codebook, self.in_features - n_outliers,
                           self.res_indices, self.res_codebook, dtype)
        outliers = None
        if self.outlier_indices is not None and self.outlier_codebook is not None:
            outliers = decode_part(self.outlier_indices, self.outlier_codebook, n_outliers,
                                   dtype=dtype)
        return assemble_weight(main, self.in_features, self.main_cols, outliers,
                               self.outlier_cols, self.scale, self.offset)


class TorchLUTKernels(KernelProvider):
    """Reference codebook kernel in plain torch (gather + F.linear), CPU and GPU."""

    name = "torch-lut"
    support = KernelSupport(
        ops=frozenset({OP}),
        layouts=frozenset({LAYOUT}),
        priority=-100,
    )

    def prepare(self, packed: PackedWeight, device: torch.device) -> Any:
        import torch

        from qcore.codebook import main_columns, vq_params

        qweight = VQPacker().unpack(packed)
        t = qweight.tensors
        p = vq_params(qweight.params)

        def compact(key: str, bits_key: str) -> torch.Tensor | None:
            if key not in t:
                return None
            dtype = torch.int16 if p[bits_key] <= 15 else torch.int32
            return t[key].to(dtype).contiguous().to(device)

        def on_device(key: str) -> torch.Tensor | None:
            return None if key not in t else t[key].contiguous().to(device)

        outlier_cols = t.get("outlier_cols")
        main_cols = main_columns(packed.shape[1], outlier_cols)
        return PreparedVQWeight(
            indices=compact("indices", "index_bits"),  # type: ignore[arg-type]
            codebook=on_device("codebook"),  # type: ignore[arg-type]
            res_indices=compact("res_indices", "res_index_bits"),
            res_codebook=on_device("res_codebook"),
            outlier_indices=compact("outlier_indices", "outlier_index_bits"),
            outlier_codebook=on_device("outlier_codebook"),
            outlier_cols=None if outlier_cols is None else outlier_cols.long().to(device),
            main_cols=None if main_cols is None else main_cols.to(device),
            scale=on_device("scale"), offset=on_device("offset"),
            in_features=packed.shape[1])

    def lut_linear(self, x: torch.Tensor, prepared: Any,
                   bias: torch.Tensor | None) -> torch.Tensor:
        import torch.nn.functional as F

        w = prepared.dequantize(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
