"""The catalogue of CUDA sources and the template instances each one is compiled for.

Every consumer reads this list: the runtime (CuPy ``RawModule`` with ``name_expressions``),
the NVRTC compile check (every instance, every architecture) and the CPU harness (the
sources whose kernels are SIMT code). A new kernel is added here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CUDA_DIR = Path(__file__).parent / "cuda"

#: Architectures every instance must compile to (cubin) in the compile check.
ARCHS: tuple[str, ...] = ("sm_80", "sm_86", "sm_89", "sm_90")

#: Options shared by every compile (runtime and compile check).
COMMON_OPTIONS: tuple[str, ...] = ("-std=c++17",)  # no fast math: results match the torch reference


@dataclass(frozen=True)
class KernelSource:
    #: File name under ``qcore_kernels/cuda``.
    file: str
    #: Template instances (NVRTC name expressions), e.g. ``"qk_wq_mma<4, __half, 1, 2, 4>"``.
    instances: tuple[str, ...]
    #: Instances (a subset of ``instances``) whose tensor-core code (``mma.h``/inline PTX)
    #: has no CPU substitute, so the CPU harness cannot run them. The qcore kernels keep
    #: their tensor-core code in ``qk_mma.cuh``'s ``WarpTile``, which the harness build
    #: (``QK_CPU_HARNESS``) replaces by SIMT code: their tiled GEMMs run in the harness
    #: except the wmma calls themselves, which only the GPU tests check.
    tensor_core_instances: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return CUDA_DIR / self.file

    def read(self) -> str:
        return self.path.read_text()


#: (m16 tiles, n8 tiles, warps) of the qk_wq_mma instances (qcore_kernels.ops.mma_config
#: picks among them; the sweep of benchmarks/kernels_gpu_tune.py chose them): 8 warps per
#: block for up to 16 tokens, 4 for up to 32 (past 32 tokens, dequantize + cuBLAS wins).
MMA_TILINGS: tuple[tuple[int, int, int], ...] = ((1, 2, 8), (1, 4, 8), (2, 2, 4), (2, 4, 4))


#: (token tile, row groups per block tile) of the qk_lut_mma instances
#: (qcore_kernels.lut_ops.lut_mma_config picks among them).
LUT_MMA_TILINGS: tuple[tuple[int, int], ...] = ((8, 1), (8, 2), (16, 2))

#: Row groups (of 8 output rows) per block tile of the qk_lut_mma4 instances (up to 4
#: tokens; qcore_kernels.lut_ops.lut_mma4_config picks among them).
LUT_MMA4_GROUPS: tuple[int, ...] = (1, 2)


#: (m16 tiles per warp, n8 tiles per warp, warps along N, warps along K) of the qk_w4a4_gemm
#: instances (qcore_kernels.ops.w4a4_tiling picks among them; not yet timed on a GPU): up
#: to 32 tokens 16 x 32 tiles whose four warps split K, above that 32 x 128 tiles of four
#: warps side by side.
W4A4_TILINGS: tuple[tuple[int, int, int, int], ...] = ((1, 4, 1, 4), (2, 4, 4, 1))


def _wq_instances() -> tuple[tuple[str, ...], tuple[str, ...]]:
    simt, tc = [], []
    for bits in (4, 8):
        for t in ("__half", "__nv_bfloat16"):
            for m_tiles, n_tiles, warps in MMA_TILINGS:
                tc.append(f"qk_wq_mma<{bits}, {t}, {m_tiles}, {n_tiles}, {warps}>")
            simt.append(f"qk_wq_dequant<{bits}, {t}>")
    return tuple(simt), tuple(tc)


_WQ_SIMT, _WQ_TC = _wq_instances()

SOURCES: tuple[KernelSource, ...] = (
    # qk_wq_mma's tensor-core product is qk::mma_16816, which the harness computes in SIMT
    # code: every qk_wq instance runs in the harness.
    KernelSource("qk_wq.cu", _WQ_SIMT + _WQ_TC),
    KernelSource(
        "qk_w8a8.cu",
        tuple(f"qk_quantize_rows<{t}>" for t in ("__half", "__nv_bfloat16"))
        + tuple(
            f"qk_w8a8_gemv<{t}, {m}>" for t in ("__half", "__nv_bfloat16") for m in (1, 4, 8, 16)
        )
        + tuple(f"qk_w8a8_gemm<{t}>" for t in ("__half", "__nv_bfloat16"))
        + tuple(f"qk_w8a8_scale<{t}>" for t in ("__half", "__nv_bfloat16")),
    ),
    # Codebook (vq) linears: GEMV per (dtype, vector size, token tile), the tensor-core GEMV
    # (V = 4, 8-bit indices; its mma is qk::mma_16816, SIMT in the harness) per (dtype,
    # tiling), dequantize per dtype.
    KernelSource(
        "qk_lut.cu",
        tuple(
            f"qk_lut_gemv<{t}, {v}, {m}>"
            for t in ("__half", "__nv_bfloat16")
            for v in (4, 6, 8)  # support.LUT_VECTOR_SIZES
            for m in (1, 4, 8, 16)  # lut_ops.LUT_TILES
        )
        + tuple(
            f"qk_lut_mma<{t}, {mt}, {g}>"
            for t in ("__half", "__nv_bfloat16")
            for mt, g in LUT_MMA_TILINGS
        )
        + tuple(
            # x in the table's free halves, or after it; the index words through shared-memory
            # stages, or (lut_ops.LUT_MMA4_REGISTER_INDICES, not yet timed) into registers
            f"qk_lut_mma4<{t}, {g}, {xt}, {ri}>"
            for t in ("__half", "__nv_bfloat16")
            for g in LUT_MMA4_GROUPS
            for xt in ("true", "false")
            for ri in ("false", "true")
        )
        + tuple(f"qk_lut_dequant<{t}>" for t in ("__half", "__nv_bfloat16")),
    ),
    # W4A4 with the fused low-rank branch: activation quantization per (dtype, asymmetric
    # activations), the int4 GEMM per (dtype, zero points on either side, tiling). Its
    # products are qk::mma_s4_16864 and qk::mma_16816, SIMT in the harness.
    KernelSource(
        "qk_w4a4.cu",
        tuple(
            f"qk_w4a4_quantize<{t}, {asym}>"
            for t in ("__half", "__nv_bfloat16")
            for asym in ("false", "true")
        )
        + tuple(
            f"qk_w4a4_gemm<{t}, {zero}, {mt}, {nt}, {wn}, {kw}>"
            for t in ("__half", "__nv_bfloat16")
            for zero in ("false", "true")
            for mt, nt, wn, kw in W4A4_TILINGS
        ),
    ),
)


def source(file: str) -> KernelSource:
    for s in SOURCES:
        if s.file == file:
            return s
    raise KeyError(f"no CUDA source {file!r} in the catalogue; known: {[s.file for s in SOURCES]}")
