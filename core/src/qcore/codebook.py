"""The codebook (vector-quantized) logical format ``"vq"`` in one module: checks, dense
weight, size, and its packer (layout ``"vq-packed"``).

A weight ``[out, in]`` is cut into vectors of ``vector_size`` consecutive input columns,
and each vector is stored as an index into a learned codebook (VPTQ, AQLM, QuIP#...).
The full specification is ``docs/codebook-format.md``; in short:

``tensors``:

=====================  ===============================  =====================================
key                    dtype, shape                     meaning
=====================  ===============================  =====================================
``indices``            int32 ``[out, n_vec]``           main part: codebook row of each vector
``codebook``           float16 ``[rows, v]``            main codebook, ``rows <= 2**index_bits``
``res_indices``        int32 ``[out, n_vec]``           optional residual stage
``res_codebook``       float16 ``[rows, v]``            added to the main codebook's vectors
``outlier_cols``       int32 ``[n_outliers]``           optional: columns of the outlier part,
                                                        strictly increasing
``outlier_indices``    int32 ``[out, n_vec_o]``         the outlier part's indices
``outlier_codebook``   float16 ``[rows, v]``            the outlier part's codebook
``scale``              float16 ``[out]``                optional per-output-channel scale
``offset``             float16 ``[out]``                optional per-output-channel offset
                                                        (needs ``scale``)
=====================  ===============================  =====================================

with ``K_main = in - n_outliers`` main columns (all columns not in ``outlier_cols``, in
order), ``n_vec = ceil(K_main / v)`` and ``n_vec_o = ceil(n_outliers / v)``; the last
vector of each part may be partial (its extra decoded entries are dropped).

``params``: ``vector_size``, ``index_bits`` (1..16), ``res_index_bits`` (0 = no residual),
``outlier_index_bits`` (0 = no outliers), ``n_outliers``, ``bits`` (the nominal bits per
weight asked for; the exact figure is :func:`bits_per_weight`).

Dense weight: ``W[:, main] = (codebook[indices] + res_codebook[res_indices])`` flattened
per row, ``W[:, outlier_cols] = outlier_codebook[outlier_indices]`` likewise, then
``W = W * scale[:, None] + offset[:, None]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qcore.interfaces import PackedWeight, Packer, QuantizedWeight

# torch loads with the first function that needs it: the built-in hooks register the
# packer, and importing them must not import torch.
if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT", "LAYOUT", "OP", "VQPacker", "validate_vq", "dequantize_vq",
           "bits_per_weight"]

FORMAT = "vq"
LAYOUT = "vq-packed"
OP = "lut_linear"

MAX_INDEX_BITS = 16

#: The index tensors, with the codebook each one reads and the param giving its width.
INDEX_TENSORS: dict[str, tuple[str, str]] = {
    "indices": ("codebook", "index_bits"),
    "res_indices": ("res_codebook", "res_index_bits"),
    "outlier_indices": ("outlier_codebook", "outlier_index_bits"),
}
CHANNEL_TENSORS = ("scale", "offset")
TENSOR_KEYS = frozenset({*INDEX_TENSORS, *(c for c, _ in INDEX_TENSORS.values()),
                         "outlier_cols", *CHANNEL_TENSORS})


# ---------------------------------------------------------------------------- geometry


def n_vectors(width: int, vector_size: int) -> int:
    """Vectors of ``vector_size`` columns that cover ``width`` columns (last one partial)."""
    return -(-width // vector_size)


def main_columns(in_features: int, outlier_cols: torch.Tensor | None) -> torch.Tensor | None:
    """The main part's columns (int64, increasing), or None when there are no outliers
    (then the main part is every column in order)."""
    import torch

    if outlier_cols is None or not outlier_cols.numel():
        return None
    keep = torch.ones(in_features, dtype=torch.bool, device=outlier_cols.device)
    keep[outlier_cols.long()] = False
    return keep.nonzero().flatten()


def _int_param(params: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if value is None:
        raise ValueError(f"vq weight: param {key!r} is missing; the format needs "
                         "vector_size and index_bits (see docs/codebook-format.md)")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"vq weight: param {key}={value!r} must be an integer")
    return value


def vq_params(params: Mapping[str, Any]) -> dict[str, int]:
    """The format's integer params, with the optional ones defaulted to 0."""
    return {"vector_size": _int_param(params, "vector_size"),
            "index_bits": _int_param(params, "index_bits"),
            "res_index_bits": _int_param(params, "res_index_bits", 0),
            "outlier_index_bits": _int_param(params, "outlier_index_bits", 0),
            "n_outliers": _int_param(params, "n_outliers", 0)}


# -------------------------------------------------------------------------- validation


def validate_vq(qweight: QuantizedWeight) -> None:
    """Check that ``qweight`` is a well-formed ``"vq"`` weight; raise ``ValueError``
    saying what is wrong (with the values) and what the format expects."""
    import torch

    if qweight.format != FORMAT:
        raise ValueError(f"expected a {FORMAT!r}-format weight, got format {qweight.format!r}")
    out_f, in_f = _check_shape(qweight.shape)
    p = vq_params(qweight.params)
    t = qweight.tensors
    v, n_out = p["vector_size"], p["n_outliers"]
    if v < 1:
        raise ValueError(f"vq weight: vector_size={v} must be at least 1")
    if not 0 <= n_out <= in_f:
        raise ValueError(f"vq weight: n_outliers={n_out} must be in 0..in_features={in_f}")
    unknown = sorted(set(t) - TENSOR_KEYS)
    if unknown:
        hint = "; the per-channel offset is called 'offset'" if "bias" in unknown else ""
        raise ValueError(f"vq weight: unknown tensor(s) {unknown}{hint}; the format's tensors "
                         f"are {sorted(TENSOR_KEYS)}")
    widths = {"indices": in_f - n_out, "res_indices": in_f - n_out, "outlier_indices": n_out}
    for index_key, (codebook_key, bits_key) in INDEX_TENSORS.items():
        bits = p[bits_key]
        optional = index_key != "indices"
        if not (0 if optional else 1) <= bits <= MAX_INDEX_BITS:
            raise ValueError(f"vq weight: {bits_key}={bits} must be in "
                             f"{0 if optional else 1}..{MAX_INDEX_BITS}"
                             + (" (0 = this stage is absent)" if optional else ""))
        present = [k for k in (index_key, codebook_key) if k in t]
        if bits == 0:
            if present:
                raise ValueError(f"vq weight: {bits_key}=0 says there is no {index_key}, but "
                                 f"tensor(s) {present} are given; set {bits_key} to their width")
            continue
        if len(present) < 2:
            missing = sorted({index_key, codebook_key} - set(present))
            raise ValueError(f"vq weight: {bits_key}={bits} but tensor(s) {missing} are missing")
        _check_indices(index_key, t[index_key], t[codebook_key], bits,
                       (out_f, n_vectors(widths[index_key], v)), v)
    _check_outlier_cols(t, p, in_f)
    for key in CHANNEL_TENSORS:
        if key in t:
            _check_tensor(key, t[key], torch.float16, (out_f,))
    if "offset" in t and "scale" not in t:
        raise ValueError("vq weight: 'offset' needs 'scale' (W * scale + offset); "
                         "add a scale of ones")


def _check_shape(shape: Any) -> tuple[int, int]:
    if len(shape) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                              for d in shape):
        raise ValueError(f"vq weight: shape {shape!r} must be (out_features, in_features), "
                         "two positive integers")
    return int(shape[0]), int(shape[1])


def _check_tensor(key: str, tensor: torch.Tensor, dtype: torch.dtype,
                  shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype:
        raise ValueError(f"vq weight: {key!r} is {tensor.dtype}, the format stores it as "
                         f"{dtype}: convert it with .to({dtype})")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"vq weight: {key!r} has shape {tuple(tensor.shape)}, expected "
                         f"{shape}")


def _check_indices(index_key: str, indices: torch.Tensor, codebook: torch.Tensor, bits: int,
                   shape: tuple[int, int], vector_size: int) -> None:
    import torch

    _check_tensor(index_key, indices, torch.int32, shape)
    codebook_key = INDEX_TENSORS[index_key][0]
    if codebook.dtype != torch.float16:
        raise ValueError(f"vq weight: {codebook_key!r} is {codebook.dtype}, the format stores "
                         "codebooks as torch.float16: convert it with .to(torch.float16)")
    rows = codebook.shape[0] if codebook.dim() == 2 else -1
    if codebook.dim() != 2 or codebook.shape[1] != vector_size or not 1 <= rows <= 1 << bits:
        raise ValueError(f"vq weight: {codebook_key!r} has shape {tuple(codebook.shape)}, "
                         f"expected [rows, vector_size={vector_size}] with 1 <= rows <= "
                         f"2**{bits} = {1 << bits}")
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= rows:
            raise ValueError(f"vq weight: {index_key!r} holds values {low}..{high}, but "
                             f"{codebook_key!r} has {rows} rows (valid indices 0..{rows - 1})")


def _check_outlier_cols(t: Mapping[str, torch.Tensor], p: Mapping[str, int], in_f: int) -> None:
    import torch

    n_out = p["n_outliers"]
    if p["outlier_index_bits"] == 0:
        if n_out or "outlier_cols" in t:
            given = "given" if "outlier_cols" in t else "absent"
            raise ValueError(f"vq weight: outlier_index_bits=0 (no outlier part) but n_outliers"
                             f"={n_out} and outlier_cols {given}; give both "
                             "outlier_index_bits and the outlier tensors, or neither")
        return
    if n_out == 0 or "outlier_cols" not in t:
        raise ValueError(f"vq weight: outlier_index_bits={p['outlier_index_bits']} needs "
                         f"n_outliers >= 1 (got {n_out}) and the tensor 'outlier_cols'")
    cols = t["outlier_cols"]
    _check_tensor("outlier_cols", cols, torch.int32, (n_out,))
    if int(cols.min()) < 0 or int(cols.max()) >= in_f:
        raise ValueError(f"vq weight: outlier_cols holds {int(cols.min())}..{int(cols.max())}, "
                         f"outside the input columns 0..{in_f - 1}")
    if n_out > 1 and not bool((cols[1:] > cols[:-1]).all()):
        raise ValueError("vq weight: outlier_cols must be strictly increasing (sorted, no "
                         "repeats); sort them and reorder the outlier part's columns to match")


# ---------------------------------------------------------------------- dense weight


def decode_part(indices: torch.Tensor, codebook: torch.Tensor, width: int,
                res_indices: torch.Tensor | None = None,
                res_codebook: torch.Tensor | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """One part's columns, ``[out, width]`` in ``dtype``: each index replaced by its
    codebook row (plus the residual codebook's row), the partial last vector cut;
    ``dtype`` float32 unless given."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    out_f, n_vec = indices.shape
    vectors = codebook.to(dtype).index_select(0, _flat_index(indices))
    if res_indices is not None and res_codebook is not None:
        vectors = vectors + res_codebook.to(dtype).index_select(0, _flat_index(res_indices))
    return vectors.view(out_f, n_vec * codebook.shape[1])[:, :width]


def _flat_index(indices: torch.Tensor) -> torch.Tensor:
    """Indices as ``index_select`` takes them (int32 or int64; int16 is widened)."""
    import torch

    flat = indices.reshape(-1)
    return flat if flat.dtype in (torch.int32, torch.int64) else flat.to(torch.int32)


def assemble_weight(main: torch.Tensor, in_features: int,
                    main_cols: torch.Tensor | None = None,
                    outliers: torch.Tensor | None = None,
                    outlier_cols: torch.Tensor | None = None,
                    scale: torch.Tensor | None = None,
                    offset: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight from its decoded parts: main and outlier columns put in place,
    then the per-channel scale and offset applied (in ``main``'s dtype)."""
    if outliers is None or outlier_cols is None or main_cols is None:
        weight = main
    else:
        weight = main.new_empty(main.shape[0], in_features)
        weight.index_copy_(1, main_cols, main)
        weight.index_copy_(1, outlier_cols.long(), outliers)
    if scale is not None:
        weight = weight * scale.to(weight.dtype)[:, None]
    if offset is not None:
        weight = weight + offset.to(weight.dtype)[:, None]
    return weight


def dequantize_vq(qweight: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight ``[out, in]`` (float32 by default) of a ``"vq"`` weight, checked
    first with :func:`validate_vq`."""
    validate_vq(qweight)
    t = qweight.tensors
    out_f, in_f = qweight.shape
    n_out = vq_params(qweight.params)["n_outliers"]
    main = decode_part(t["indices"], t["codebook"], in_f - n_out, t.get("res_indices"),
                       t.get("res_codebook"), dtype)
    outliers = outlier_cols = main_cols = None
    if "outlier_cols" in t:
        outlier_cols = t["outlier_cols"]
        outliers = decode_part(t["outlier_indices"], t["outlier_codebook"], n_out, dtype=dtype)
        main_cols = main_columns(in_f, outlier_cols)
    return assemble_weight(main, in_f, main_cols, outliers, outlier_cols, t.get("scale"),
                           t.get("offset"))


# --------------------------------------------------------------------------------- size


def stored_bits(tensors: Mapping[str, torch.Tensor]) -> int:
    """Every bit the tensors occupy in storage (elements times element width)."""
    return sum(8 * tensor.numel() * tensor.element_size() for tensor in tensors.values())


def bits_per_weight(packed: PackedWeight) -> float:
    """Stored bits of a packed layer per dense weight: every tensor of ``packed``
    (indices or codes with their padding, codebooks, scales, zero points...) counted,
    divided by ``out_features * in_features``. Works for any layout (``vq-packed``,
    ``int-packed``); the layer's own bias and low-rank branch are not part of it."""
    out_f, in_f = packed.shape
    return stored_bits(packed.tensors) / (out_f * in_f)


def describe_vq(params: Mapping[str, Any]) -> str:
    """Short label of a vq weight's structure, e.g. ``v6 i12 +res8 +outliers(64, i10)``."""
    p = vq_params(params)
    label = f"v{p['vector_size']} i{p['index_bits']}"
    if p["res_index_bits"]:
        label += f" +res i{p['res_index_bits']}"
    if p["outlier_index_bits"]:
        label += f" +outliers({p['n_outliers']} cols, i{p['outlier_index_bits']})"
    return label


# ---------------------------------------------------------------------------- packer


class VQPacker(Packer):
    """Codebook indices bit-packed into int32 words (1-16 bits), codebooks in float16."""

    name = "vq"
    format = FORMAT
    layout = LAYOUT
    op = OP
    supported_bits = frozenset(range(1, 17))

    def dequantize(self, qweight: QuantizedWeight) -> torch.Tensor:
        return dequantize_vq(qweight)

    def pack(self, qweight: QuantizedWeight) -> PackedWeight:
        if qweight.format != FORMAT:
            raise ValueError(f"the vq packer reads format {FORMAT!r}, got {qweight.format!r}")
        validate_vq(qweight)
        from qcore.bitpack import pack_codes

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

        if packed.layout != LAYOUT:
            raise ValueError(f"the vq packer reads layout {LAYOUT!r}, got {packed.layout!r}")
        from qcore.bitpack import unpack_codes

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
