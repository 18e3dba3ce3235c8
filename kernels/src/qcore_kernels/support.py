"""What the kernels accept beyond ``KernelSupport``'s fields. No torch import."""

from __future__ import annotations

#: in_features must be a multiple of this for the ``qk-wq`` kernels (16-byte code loads).
WQ_IN_MULTIPLE = 32
#: in_features must be a multiple of this for the ``qk-w8a8`` kernels (16-byte loads).
W8A8_IN_MULTIPLE = 16


def wq_unsupported_reason(bits: int, group_size: int, in_features: int) -> str | None:
    if bits not in (4, 8):
        return f"bits {bits} not in [4, 8]"
    if in_features % WQ_IN_MULTIPLE:
        return f"in_features {in_features} not a multiple of {WQ_IN_MULTIPLE}"
    if group_size != -1 and group_size % 32:
        return f"group size {group_size} is neither -1 (per channel) nor a multiple of 32"
    return None


def w8a8_unsupported_reason(
    bits: int, group_size: int, symmetric: bool, act_bits: int | None, in_features: int
) -> str | None:
    if bits != 8 or act_bits != 8:
        return f"W{bits}A{act_bits} is not W8A8"
    if group_size != -1:
        return f"group size {group_size}: the W8A8 kernels take per-channel scales (-1)"
    if not symmetric:
        return "the W8A8 kernels take symmetric weights"
    if in_features % W8A8_IN_MULTIPLE:
        return f"in_features {in_features} not a multiple of {W8A8_IN_MULTIPLE}"
    return None


#: Columns per group of the ``qk-w4a4`` kernels, for weights and activations alike: one
#: m16n8k64 int4 tensor-core step.
W4A4_GROUP = 64
#: in_features must be a multiple of this for the ``qk-w4a4`` kernels (whole groups).
W4A4_IN_MULTIPLE = W4A4_GROUP


def w4a4_unsupported_reason(
    bits: int,
    group_size: int,
    act_bits: int | None,
    act_group_size: int,
    act_dynamic: bool,
    in_features: int,
) -> str | None:
    """Why the ``qk-w4a4`` kernels cannot hold a weight (symmetric or asymmetric, either
    side), or None."""
    if bits != 4 or act_bits != 4:
        return f"W{bits}A{act_bits} is not W4A4"
    if group_size != W4A4_GROUP:
        return f"group size {group_size}: the W4A4 kernels take weight groups of {W4A4_GROUP}"
    if act_group_size != W4A4_GROUP:
        return (f"activation group size {act_group_size}: the W4A4 kernels quantize "
                f"activations in groups of {W4A4_GROUP}")
    if not act_dynamic:
        return "static activation scales: the W4A4 kernels quantize activations at run time"
    if in_features % W4A4_IN_MULTIPLE:
        return f"in_features {in_features} not a multiple of {W4A4_IN_MULTIPLE}"
    return None


#: Vector sizes of the ``qk-lut`` GEMV instances (others take the dequantize path).
LUT_VECTOR_SIZES = (4, 6, 8)
#: Index words per warp step of the ``qk-lut`` GEMV (``qk_lut.cu``: STEP_CHUNKS chunks of
#: 32 indices), for its shared-memory size.
LUT_STEP_CHUNKS = 8


def lut_unsupported_reason(bits: int) -> str | None:
    """What a ``lut_linear`` request can say that the ``qk-lut`` kernels refuse: its
    nominal bits per weight (``bits``) above 16, which no vq weight of 16-bit indices
    reaches. Vector and codebook sizes are not in the request: the kernels take any
    (codebooks too large for shared memory use the dequantize path)."""
    if not 0 <= bits <= 16:
        return f"bits {bits}: a vq weight stores at most 16 bits per weight"
    return None


def lut_stage_words(bits: int) -> int:
    """Staging words per warp for one index stream (``qk_lut::stage_words``)."""
    return LUT_STEP_CHUNKS * bits + 4 if bits else 0


def lut_gemv_smem(
    vector_size: int, stages: list[tuple[int, int]], warps: int, rows_per_warp: int = 1
) -> int:
    """Dynamic shared memory (bytes) of one ``qk_lut_gemv`` block, activations aside: each
    stage's codebook (``(rows, index_bits)``, 2 bytes per value, 16-byte aligned) and the
    warps' staging buffers (one per stage and channel a warp computes at once)."""
    tables = sum(-(-rows * vector_size // 8) * 16 for rows, _ in stages)
    staging = rows_per_warp * 4 * sum(lut_stage_words(bits) for _, bits in stages)
    return tables + warps * staging


def lut_gemv_unsupported_reason(
    vector_size: int,
    stages: list[tuple[int, int]],
    warps: int,
    smem_limit: int,
    rows_per_warp: int = 1,
) -> str | None:
    """Why the ``qk-lut`` GEMV cannot take a part of a vq weight (its layers then use
    dequantize + cuBLAS at every M), or None."""
    if vector_size not in LUT_VECTOR_SIZES:
        return f"vector size {vector_size} not in {list(LUT_VECTOR_SIZES)}"
    smem = lut_gemv_smem(vector_size, stages, warps, rows_per_warp)
    if smem > smem_limit:
        rows = " + ".join(f"{r} x {vector_size}" for r, _ in stages)
        return (f"the codebooks ({rows} fp16 values) need {smem} bytes of shared memory per "
                f"block, more than the device's {smem_limit}")
    return None
