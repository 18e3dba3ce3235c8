"""Random packed weights for the kernels' tests and benchmarks."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from qcore.interfaces import PackedWeight
from qcore.ops import IntPacker
from qcore.testing.base import random_int_weight, reference_linear
from qcore_kernels.layouts import LOWRANK_DOWN, LOWRANK_UP, to_w4a4, to_w8a8, to_wq
from qcore_kernels.ops import Launch, MmaConfig, w4a4_linear, w8a8_linear, wq_linear


def random_int_packed(
    out_features: int,
    in_features: int,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = False,
    act_order: bool = False,
    act_bits: int | None = None,
    static_scale: bool = False,
    seed: int = 0,
) -> PackedWeight:
    """An ``int-packed`` weight from :func:`qcore.testing.base.random_int_weight`."""
    qweight = random_int_weight(
        out_features,
        in_features,
        bits,
        group_size,
        symmetric,
        act_order=act_order,
        act_bits=act_bits,
        static_input_scale=static_scale,
        seed=seed,
    )
    return IntPacker().pack(qweight)


# ------------------------------------------------------------------ numerics of the kernels

#: max |y - y_ref| / max |y_ref| allowed, by activation dtype (the core's conformance bounds).
TOLERANCE = {"float16": 4e-3, "bfloat16": 3e-2}


@dataclass(frozen=True)
class Case:
    """One kernel run: shapes, weight format, activation dtype and the forced path."""

    m: int
    n: int
    k: int
    bits: int = 4
    group: int = 64
    symmetric: bool = False
    act_order: bool = False
    dtype: str = "float16"
    path: str | None = None
    bias: bool = True
    static: bool = False  # W8A8: static per-tensor activation scale
    #: the ``mma`` path's tiling (m16 tiles, n8 tiles, warps, K splits); None: ops' choice
    mma: tuple[int, int, int, int] | None = None

    @property
    def id(self) -> str:
        tiling = "" if self.mma is None else "-t" + "x".join(map(str, self.mma))
        return (
            f"{self.path or 'auto'}{tiling}-m{self.m}n{self.n}k{self.k}-w{self.bits}g{self.group}"
            f"{'s' if self.symmetric else 'a'}{'-act' if self.act_order else ''}"
            f"{'-static' if self.static else ''}-{self.dtype}"
        )


def _inputs(case: Case, device: Any, act_bits: int | None) -> tuple[Any, Any, Any]:
    gen = torch.Generator().manual_seed(case.m * 7919 + case.n * 31 + case.k)
    packed = random_int_packed(
        case.n,
        case.k,
        case.bits,
        case.group,
        symmetric=case.symmetric,
        act_order=case.act_order,
        act_bits=act_bits,
        static_scale=case.static,
        seed=case.k + case.bits,
    )
    dtype = getattr(torch, case.dtype)
    x = torch.randn(case.m, case.k, generator=gen).to(dtype).to(device)
    bias = (torch.randn(case.n, generator=gen) * 0.1).to(dtype).to(device) if case.bias else None
    return packed, x, bias


def run_wq_case(case: Case, launch: Launch, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``qk-wq`` kernels' output and the float32 reference for ``case``."""
    from qcore.ops import dequantize_int

    packed, x, bias = _inputs(case, device, None)
    w = to_wq(packed, x.dtype, device)
    config = None if case.mma is None else MmaConfig(*case.mma)
    y = wq_linear(x, w, bias, launch, path=case.path, config=config)
    ref = reference_linear(
        x.float(),
        dequantize_int(IntPacker().unpack(packed)).to(device),
        None if bias is None else bias.float(),
    )
    return y, ref


def run_w8a8_case(case: Case, launch: Launch, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``qk-w8a8`` kernels' output and the reference (activations fake-quantized)."""
    from qcore.ops import dequantize_int

    packed, x, bias = _inputs(case, device, 8)
    w = to_w8a8(packed, device)
    y = w8a8_linear(x, w, bias, launch, path=case.path)
    unpacked = IntPacker().unpack(packed)
    scale = unpacked.tensors.get("input_scale")
    ref = reference_linear(
        x,
        dequantize_int(unpacked).to(device),
        None if bias is None else bias.float(),
        act_bits=8,
        input_scale=None if scale is None else scale.to(device),
    )
    return y, ref


def assert_close(y: torch.Tensor, ref: torch.Tensor, case: Case) -> float:
    """Checks shape, dtype and the relative error bound; returns the error."""
    assert y.shape == ref.shape, f"{case.id}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
    assert str(y.dtype).removeprefix("torch.") == case.dtype, f"{case.id}: dtype {y.dtype}"
    assert torch.isfinite(y).all(), f"{case.id}: non-finite outputs"
    err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    assert err <= TOLERANCE[case.dtype], (
        f"{case.id}: relative error {err:.2e} > {TOLERANCE[case.dtype]:.0e}"
    )
    return err


# ------------------------------------------------------------------ W4A4 kernels


@dataclass(frozen=True)
class W4A4Case:
    """One W4A4 run (``qk_w4a4.cu``): shapes, weight and activation grids, branch, dtype."""

    m: int
    n: int
    k: int
    symmetric: bool = True  # weights
    act_symmetric: bool = True
    rank: int = 0  # low-rank branch (0: none)
    dtype: str = "float16"
    bias: bool = True
    #: the GEMM's (m16 tiles, n8 tiles, warps along N, warps along K); None: ops' choice
    tiling: tuple[int, int, int, int] | None = None
    splits: int | None = None  # qk_w4a4_quantize's K ranges; None: ops' choice

    @property
    def id(self) -> str:
        tiling = "" if self.tiling is None else "-t" + "x".join(map(str, self.tiling))
        return (f"m{self.m}n{self.n}k{self.k}-w{'s' if self.symmetric else 'a'}"
                f"a{'s' if self.act_symmetric else 'a'}{f'-r{self.rank}' if self.rank else ''}"
                f"{'' if self.bias else '-nobias'}{tiling}"
                f"{'' if self.splits is None else f'-s{self.splits}'}-{self.dtype}")


def random_w4a4_packed(
    out_features: int,
    in_features: int,
    *,
    symmetric: bool = True,
    act_symmetric: bool = True,
    rank: int = 0,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> PackedWeight:
    """An ``int-packed`` W4A4 weight (groups of 64 for weights and activations, dynamic
    activations) from :func:`qcore.testing.base.random_int_weight`, with a random low-rank
    branch of ``rank`` in ``dtype`` in its tensors when ``rank`` (as ``QuantLinear`` hands
    it to a fusing provider). The branch adds about a fifth of the main product's size."""
    qweight = random_int_weight(out_features, in_features, 4, 64, symmetric, act_bits=4,
                                seed=seed)
    qweight.params.update(act_group_size=64, act_symmetric=act_symmetric)
    packed = IntPacker().pack(qweight)
    if rank:
        gen = torch.Generator().manual_seed(seed + 1)
        packed.tensors[LOWRANK_DOWN] = (torch.randn(rank, in_features, generator=gen)
                                        * 0.05).to(dtype)
        packed.tensors[LOWRANK_UP] = (torch.randn(out_features, rank, generator=gen)
                                      * 0.1).to(dtype)
    return packed


def w4a4_reference(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """float32 reference of a W4A4 layer: the torch provider's arithmetic (activations
    fake-quantized by :func:`qcore.grid.fake_quantize_activations` in groups of 64, the
    dequantized weight) in float32, plus the low-rank branch on the unquantized x."""
    from qcore.interfaces import act_fields
    from qcore.ops import dequantize_int, fake_quantize_activations

    qweight = IntPacker().unpack(packed)
    acts = act_fields(qweight.params)
    xq = fake_quantize_activations(x, 4, None, acts["act_group_size"], acts["act_symmetric"])
    y = torch.nn.functional.linear(xq.float(), dequantize_int(qweight).to(x.device),
                                   None if bias is None else bias.float())
    down = packed.tensors.get(LOWRANK_DOWN)
    if down is not None:
        up = packed.tensors[LOWRANK_UP]
        y = y + (x.float() @ down.float().to(x.device).T) @ up.float().to(x.device).T
    return y


def assert_w4a4_codes_are_the_cores(act: Any, x: torch.Tensor, symmetric: bool) -> None:
    """``qk_w4a4_quantize``'s outputs (:class:`qcore_kernels.ops.W4A4Activations`) equal
    :func:`qcore.grid.quantize_activation_groups`' codes, scales and zero points bit for bit,
    and its sums (when written) are the stored codes' sums."""
    from qcore.ops import quantize_activation_groups
    from qcore_kernels.layouts import unpack_signed_nibbles

    m, k = x.shape
    codes, scales, zeros = quantize_activation_groups(x.cpu(), 4, 64, symmetric)
    stored = unpack_signed_nibbles(act.codes.cpu(), k).view(m, k // 64, 64)
    assert torch.equal(act.scales.cpu(), scales), "scales differ from the core's"
    got = stored.float() + (0 if symmetric else 8)
    bad = (got != codes).nonzero()
    assert not len(bad), f"{len(bad)} codes differ from the core's, first at {bad[0].tolist()}"
    if symmetric:
        assert act.zeros is None
    else:
        assert torch.equal(act.zeros.cpu().float() + 8, zeros), "zero points differ"
    if act.sums is not None:
        assert torch.equal(act.sums.cpu(), stored.int().sum(-1))


def w4a4_exact_products(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """float64 ``[M, N]``: the sum over groups of ``sa * sw * sum_k (qa - za)(qw - zw)``,
    from :func:`qcore.grid.quantize_activation_groups`' codes of ``x`` and the weight's
    codes: what the W4A4 GEMM computes before its float32 accumulation and the rounding of
    y (no bias, no branch)."""
    from qcore.interfaces import act_fields
    from qcore.ops import quantize_activation_groups

    qweight = IntPacker().unpack(packed)
    t = qweight.tensors
    n, k = qweight.shape
    groups = k // 64
    wq = t["codes"].double().view(n, groups, 64)
    wz = t["zeros"].double() if "zeros" in t else torch.full((n, groups), 8.0, dtype=torch.float64)
    codes, sa, za = quantize_activation_groups(x.cpu(), 4, 64,
                                               act_fields(qweight.params)["act_symmetric"])
    za = torch.zeros_like(sa) if za is None else za
    dots = torch.einsum("mgk,ngk->mng", codes.double() - za.double()[..., None],
                        wq - wz[..., None])
    return (dots * sa.double()[:, None, :] * t["scales"].double()[None]).sum(-1)


def assert_w4a4_exact(y: torch.Tensor, exact: torch.Tensor) -> None:
    """y equals the exact products up to its own rounding (float16: 2^-11, bfloat16: 2^-8
    relative) and float32 accumulation (1e-6 of the largest output)."""
    ulp = 2.0**-10 if y.dtype == torch.float16 else 2.0**-7
    error = (y.double().cpu() - exact).abs()
    bound = ulp * exact.abs() + 1e-6 * exact.abs().max()
    worst = int((error - bound).argmax())
    assert bool((error <= bound).all()), (
        f"output {divmod(worst, exact.shape[1])}: {float(y.flatten()[worst])} vs exact "
        f"{float(exact.flatten()[worst])}")


def w4a4_inputs(case: W4A4Case, device: Any) -> tuple[PackedWeight, torch.Tensor, Any]:
    """The weight, x and bias of ``case`` (seeded by its shape)."""
    dtype = getattr(torch, case.dtype)
    packed = random_w4a4_packed(case.n, case.k, symmetric=case.symmetric,
                                act_symmetric=case.act_symmetric, rank=case.rank, dtype=dtype,
                                seed=case.k + case.n)
    gen = torch.Generator().manual_seed(case.m * 7919 + case.n * 31 + case.k)
    x = torch.randn(case.m, case.k, generator=gen).to(dtype).to(device)
    bias = (torch.randn(case.n, generator=gen) * 0.1).to(dtype).to(device) if case.bias else None
    return packed, x, bias


def run_w4a4_case(case: W4A4Case, launch: Launch, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``qk-w4a4`` kernels' output and the float32 reference (:func:`w4a4_reference`)."""
    packed, x, bias = w4a4_inputs(case, device)
    w = to_w4a4(packed, device)
    y = w4a4_linear(x, w, bias, launch, tiling=case.tiling, splits=case.splits)
    return y, w4a4_reference(x, packed, bias)


# ------------------------------------------------------------------ codebook (vq) kernels


@dataclass(frozen=True)
class LUTCase:
    """One codebook-kernel run (``qk_lut.cu``): shapes, vq structure, dtype, forced path."""

    m: int
    n: int
    k: int
    v: int = 6
    bits: int = 12  # main index bits
    rows: int | None = 256  # main codebook rows (None: 2**bits)
    res_bits: int = 0
    outliers: int = 0  # outlier columns (with 8-bit indices)
    scale: bool = False
    offset: bool = False
    dtype: str = "float16"
    path: str | None = None
    bias: bool = True

    @property
    def id(self) -> str:
        extra = "".join([
            f"-res{self.res_bits}" if self.res_bits else "",
            f"-out{self.outliers}" if self.outliers else "",
            "-scale" if self.scale else "", "-offset" if self.offset else "",
            "" if self.bias else "-nobias",
        ])
        rows = "" if self.rows is None else f"r{self.rows}"
        return (f"{self.path or 'auto'}-m{self.m}n{self.n}k{self.k}-v{self.v}i{self.bits}{rows}"
                f"{extra}-{self.dtype}")


def random_vq(case: LUTCase, seed: int = 0) -> Any:
    """The logical ``"vq"`` weight of ``case`` (:func:`qcore.testing.base.random_vq_weight`)."""
    from qcore.testing.base import random_vq_weight

    return random_vq_weight(
        case.n,
        case.k,
        case.v,
        case.bits,
        res_index_bits=case.res_bits,
        n_outliers=case.outliers,
        outlier_index_bits=8 if case.outliers else 0,
        scale=case.scale,
        offset=case.offset,
        max_codebook_rows=case.rows,
        seed=seed + case.k + case.v,
    )


def run_lut_case(case: LUTCase, launch: Any, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``qk-lut`` kernels' output (through the ``vq`` packer) and the float32 reference
    (``qcore.codebook.dequantize_vq`` + ``F.linear``)."""
    from qcore.ops import VQPacker, dequantize_vq
    from qcore_kernels.lut_layout import to_lut
    from qcore_kernels.lut_ops import lut_linear

    qweight = random_vq(case)
    w = to_lut(VQPacker().pack(qweight), device)
    gen = torch.Generator().manual_seed(case.m * 7919 + case.n * 31 + case.k)
    dtype = getattr(torch, case.dtype)
    x = torch.randn(case.m, case.k, generator=gen).to(dtype).to(device)
    bias = (torch.randn(case.n, generator=gen) * 0.1).to(dtype).to(device) if case.bias else None
    y = lut_linear(x, w, bias, launch, path=case.path)
    ref = reference_linear(
        x.float(), dequantize_vq(qweight).to(device), None if bias is None else bias.float()
    )
    return y, ref


_SLOW_COPY = r"""
extern "C" __global__ void slow_copy(const unsigned short* src, unsigned short* dst, int n,
                                     long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {}
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[i] = src[i];
}
"""


@functools.cache
def _slow_copy_kernel() -> Any:
    import cupy

    return cupy.RawKernel(_SLOW_COPY, "slow_copy")


def slow_copy(src: torch.Tensor, dst: torch.Tensor, cycles: int = 2_000_000) -> None:
    """dst <- src (16-bit elements, CUDA) by a kernel on torch's stream that first spins for
    ``cycles`` clocks (about a millisecond): the kernel right before a GEMV writes its x late.
    One RawKernel for the process: it is loaded by the first (eager) call, never while a
    CUDA graph is being captured."""
    import numpy as np

    from qcore_kernels.runtime import external_stream

    with external_stream(torch.cuda.current_stream().cuda_stream):
        _slow_copy_kernel()((8,), (256,), (np.uint64(src.data_ptr()), np.uint64(dst.data_ptr()),
                                           np.int32(src.numel()), np.int64(cycles)))


def check_programmatic_launch(path: str, extras: bool, launch: Any) -> None:
    """With ``lut_ops.LUT_PDL`` (CUDA, compute capability 9.0+), each call of ``path`` has
    its x written late by the kernel launched just before it (plain weights: that kernel is
    the GEMV's predecessor), or (``extras``: outliers, scale, offset) the main columns'
    launch adds the sums of the outlier launch before it. Asserts that every launch asked
    for the programmatic attribute and that the outputs equal plain launches bit for bit,
    eagerly and replayed from a CUDA graph: a GEMV that read x or its addend before its
    griddepcontrol wait would see the previous call's x (or garbage). Two tokens."""
    import qcore_kernels.lut_ops as lut_ops
    from qcore_kernels.lut_layout import to_lut

    m = 2
    case = LUTCase(m, 1000, 4096, 4, 8, rows=None) if not extras else LUTCase(
        m, 1000, 4100, 4, 8, rows=200, outliers=64, scale=True, offset=True)
    w = to_lut(random_vq(case), "cuda")
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(m, case.k, generator=gen).half().cuda() for _ in range(3)]
    bias = torch.randn(1000, generator=gen).half().cuda()
    plain = [lut_ops.lut_linear(x, w, bias, launch, path=path) for x in xs]
    flags = []

    def spy(file, instance, grid, block, args, shared_mem=0, **kw):  # noqa: ANN001
        flags.append(kw.get("programmatic", False))
        launch(file, instance, grid, block, args, shared_mem=shared_mem, **kw)

    buf = torch.zeros_like(xs[0])

    def calls() -> list[torch.Tensor]:
        out = []
        for x in xs:
            slow_copy(x, buf)
            out.append(lut_ops.lut_linear(buf, w, bias, spy, path=path))
        return out

    saved = lut_ops.LUT_PDL
    try:
        lut_ops.LUT_PDL = True
        eager = calls()
        torch.cuda.synchronize()
        assert flags and all(flags), flags
        for y, y_plain in zip(eager, plain, strict=True):
            assert torch.equal(y, y_plain)

        buf.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = calls()
    finally:
        lut_ops.LUT_PDL = saved
    for _ in range(2):
        buf.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for y, y_plain in zip(replayed, plain, strict=True):
            assert torch.equal(y, y_plain)
