"""The ``vq`` packer: codebook indices bit-packed, codebooks as they are (``vq-packed``).

Each index tensor of a ``"vq"`` weight (``indices``, ``res_indices``,
``outlier_indices``) is stored under the same key as a bitstream of its stage's
``*index_bits`` bits per index along each row (:mod:`qcore.bitpack`); codebooks,
``scale``, ``offset`` and ``outlier_cols`` are stored unchanged. See
``docs/codebook-format.md``.
"""

from __future__ import annotations

from qcore.interfaces import PackedWeight, Packer, QuantizedWeight

FORMAT = "vq"
LAYOUT = "vq-packed"
OP = "lut_linear"


class VQPacker(Packer):
    """Codebook indices bit-packed into int32 words (1-16 bits), codebooks in float16."""

    name = "vq"
    format = FORMAT
    layout = LAYOUT
    op = OP
    supported_bits = frozenset(range(1, 17))

    def pack(self, qweight: QuantizedWeight) -> PackedWeight:
        from qcore.bitpack import pack_codes
        from qcore.codebook import INDEX_TENSORS, validate_vq, vq_params

        if qweight.format != FORMAT:
            raise ValueError(f"the vq packer reads format {FORMAT!r}, got {qweight.format!r}")
        validate_vq(qweight)
        p = vq_params(qweight.params)
        tensors = {}
        for key, tensor in qweight.tensors.items():
            if key in INDEX_TENSORS:
                tensor = pack_codes(tensor, p[INDEX_TENSORS[key][1]])
            tensors[key] = tensor
        return PackedWeight(layout=LAYOUT, shape=qweight.shape, tensors=tensors,
                            params=dict(qweight.params))

    def unpack(self, packed: PackedWeight) -> QuantizedWeight:
        import torch

        from qcore.bitpack import unpack_codes
        from qcore.codebook import INDEX_TENSORS, n_vectors, vq_params

        if packed.layout != LAYOUT:
            raise ValueError(f"the vq packer reads layout {LAYOUT!r}, got {packed.layout!r}")
        p = vq_params(packed.params)
        in_f = packed.shape[1]
        widths = {"indices": in_f - p["n_outliers"], "res_indices": in_f - p["n_outliers"],
                  "outlier_indices": p["n_outliers"]}
        tensors = {}
        for key, tensor in packed.tensors.items():
            if key in INDEX_TENSORS:
                n_vec = n_vectors(widths[key], p["vector_size"])
                tensor = unpack_codes(tensor, p[INDEX_TENSORS[key][1]], n_vec, torch.int32)
            tensors[key] = tensor
        return QuantizedWeight(format=FORMAT, shape=packed.shape, tensors=tensors,
                               params=dict(packed.params))
