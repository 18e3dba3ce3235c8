"""The ``qk-lut`` layout of codebook weights (``qk_lut.cu``), from the core's ``vq`` format.

Pure torch, on any device: ``CupyLUTLinear.prepare`` runs :func:`to_lut` once per layer.
The index streams are the core's ``vq-packed`` bitstreams unchanged (``qcore.bitpack``:
every 32 indices of a row fill ``bits`` int32 words, least significant bits first), so
memory stays at ``index_bits`` per index plus the 32-index padding of each row; the
codebooks stay float16 (the kernels convert them to the activation dtype in shared
memory). The weight is split into its parts: the main columns and, optionally, the
outlier columns, each with its column list (the kernels read the gathered activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcore.interfaces import PackedWeight, QuantizedWeight


@dataclass
class LUTStage:
    """One index stream and the codebook it reads."""

    codes: torch.Tensor  # int32 [N, ceil(n_vec / 32) * bits]: qcore.bitpack's stream
    bits: int
    codebook: torch.Tensor  # float16 [rows, V], rows <= 2**bits

    @property
    def row_words(self) -> int:
        return int(self.codes.shape[1])

    @property
    def rows(self) -> int:
        return int(self.codebook.shape[0])

    def indices(self, n_vec: int) -> torch.Tensor:
        """int64 [N, n_vec]: the stream decoded (reference, pure torch)."""
        return unpack_stream(self.codes, self.bits, n_vec)


@dataclass
class LUTPart:
    """Main or outlier columns: vectors of ``V`` consecutive columns of the part."""

    stage: LUTStage
    residual: LUTStage | None
    width: int  # columns of the part
    cols: torch.Tensor | None  # int64 [width]: the input columns of the part; None = all
    cols32: torch.Tensor | None  # the same as int32 (the dequantize kernel's scatter)

    def n_vec(self, vector_size: int) -> int:
        return -(-self.width // vector_size)

    def decode(self, vector_size: int) -> torch.Tensor:
        """float32 [N, width]: the part's columns (codebook rows, plus the residual)."""
        n_vec = self.n_vec(vector_size)
        out = self.stage.codebook.float()[self.stage.indices(n_vec)]
        if self.residual is not None:
            out = out + self.residual.codebook.float()[self.residual.indices(n_vec)]
        return out.reshape(out.shape[0], -1)[:, : self.width]


@dataclass
class PreparedLUT:
    main: LUTPart
    outliers: LUTPart | None
    scale: torch.Tensor | None  # float16 [N]
    offset: torch.Tensor | None  # float16 [N]
    vector_size: int
    in_features: int
    out_features: int

    @property
    def parts(self) -> tuple[LUTPart, ...]:
        return (self.main,) if self.outliers is None else (self.outliers, self.main)

    def dequantize(self) -> torch.Tensor:
        """Reference: the dense float32 weight [N, K] decoded from this layout (equal to
        ``qcore.codebook.dequantize_vq`` of the weight it was made from)."""
        w = torch.empty(self.out_features, self.in_features, device=self.main.stage.codes.device)
        for part in self.parts:
            dense = part.decode(self.vector_size)
            if part.cols is None:
                w.copy_(dense)
            else:
                w[:, part.cols] = dense
        if self.scale is not None:
            w = w * self.scale.float()[:, None]
        if self.offset is not None:
            w = w + self.offset.float()[:, None]
        return w


def unpack_stream(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int64 [rows, n]: index k of each 32-index chunk from stream bits k*bits .. +bits-1
    (an independent decoder of ``qcore.bitpack``'s format, for the tests)."""
    rows, words = codes.shape
    chunks = words // bits
    w = (codes.to(torch.int64) & 0xFFFFFFFF).view(rows, chunks, bits)
    w = torch.nn.functional.pad(w, (0, 1))  # a word past each chunk (never reached)
    bit = torch.arange(32, device=codes.device) * bits
    lo, hi = w[..., bit // 32], w[..., bit // 32 + 1]
    value = ((lo | (hi << 32)) >> (bit % 32)) & ((1 << bits) - 1)
    return value.reshape(rows, chunks * 32)[:, :n]


def _layout_error(message: str) -> Exception:
    from qcore_kernels.layouts import LayoutError

    return LayoutError(message)


def to_lut(weight: PackedWeight | QuantizedWeight, device: torch.device | str) -> PreparedLUT:
    """The ``qk-lut`` layout of a ``vq-packed`` weight (or of a logical ``"vq"`` weight,
    packed here with ``qcore.bitpack``), on ``device``."""
    from qcore.ops import VQ_INDEX_TENSORS as INDEX_TENSORS
    from qcore.ops import main_columns, n_vectors, validate_vq, vq_params

    if isinstance(weight, QuantizedWeight):
        from qcore.ops import pack_codes

        validate_vq(weight)
        p = vq_params(weight.params)
        tensors = {
            k: pack_codes(t, p[INDEX_TENSORS[k][1]]) if k in INDEX_TENSORS else t
            for k, t in weight.tensors.items()
        }
    elif weight.layout == "vq-packed":
        p = vq_params(weight.params)
        tensors = dict(weight.tensors)
    else:
        raise _layout_error(
            f"the qk-lut kernels read the 'vq-packed' layout or 'vq' weights, got "
            f"layout {weight.layout!r}"
        )
    out_f, in_f = weight.shape
    v = p["vector_size"]
    n_out = p["n_outliers"] if p["outlier_index_bits"] else 0

    def stage(key: str, width: int) -> LUTStage | None:
        if key not in tensors:
            return None
        cb_key, bits_key = INDEX_TENSORS[key]
        bits = p[bits_key]
        codes = tensors[key]
        want = (out_f, -(-n_vectors(width, v) // 32) * bits)
        if tuple(codes.shape) != want or codes.dtype != torch.int32:
            raise _layout_error(
                f"{key}: packed stream {tuple(codes.shape)} {codes.dtype}, expected int32 {want} "
                f"({bits}-bit indices of {n_vectors(width, v)} vectors per row)"
            )
        codebook = tensors[cb_key]
        if not codebook.dtype.is_floating_point or codebook.dim() != 2 or codebook.shape[1] != v:
            raise _layout_error(f"{cb_key}: expected float16 [rows, {v}], got "
                                f"{codebook.dtype} {tuple(codebook.shape)}")
        codes = codes.to(device).contiguous()
        if codes.data_ptr() % 16:  # the kernels read 16-byte words of the stream
            codes = codes.clone()
        return LUTStage(
            codes=codes,
            bits=bits,
            # float16 as the format stores it (a module cast may have changed the buffer's
            # dtype), in its own 16-byte aligned storage
            codebook=codebook.to(device=device, dtype=torch.float16).contiguous().clone(),
        )

    outliers = None
    main_cols = None
    if n_out:
        cols = tensors["outlier_cols"].to(device).long()
        main_cols = main_columns(in_f, cols)
        outlier_stage = stage("outlier_indices", n_out)
        assert outlier_stage is not None
        outliers = LUTPart(outlier_stage, None, n_out, cols, cols.to(torch.int32).contiguous())
    main_stage = stage("indices", in_f - n_out)
    if main_stage is None:
        raise _layout_error("a vq weight needs 'indices' and 'codebook'")
    main = LUTPart(
        main_stage,
        stage("res_indices", in_f - n_out),
        in_f - n_out,
        main_cols,
        None if main_cols is None else main_cols.to(torch.int32).contiguous(),
    )

    def channel(key: str) -> torch.Tensor | None:
        t = tensors.get(key)
        return None if t is None else t.to(device=device, dtype=torch.float16).contiguous()

    prepared = PreparedLUT(
        main=main,
        outliers=outliers,
        scale=channel("scale"),
        offset=channel("offset"),
        vector_size=v,
        in_features=in_f,
        out_features=out_f,
    )
    if torch.device(device).type == "cuda" and not torch.cuda.is_current_stream_capturing():
        # the copies and casts above are done before any GEMV reads these tensors early
        # (a programmatically launched GEMV reads its weights before the kernel ahead of it
        # in the stream has ended: lut_ops.LUT_PDL)
        torch.cuda.synchronize(device)
    return prepared
