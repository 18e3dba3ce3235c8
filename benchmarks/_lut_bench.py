"""Codebook (vq) rows of the kernel benchmark (``kernels_gpu.py``): cupy-lut against fp16
F.linear.

Weights: ``qcore.testing.base.random_vq_weight`` with full codebooks and no
residual/outliers/scale: v = 4 with 256 rows (8-bit indices, 2 bits per weight: VPTQ's
2-bit default, which the tensor-core GEMV takes), v = 6 with 4096 rows (12-bit indices,
2 bits per weight) and v = 4 with 4096 rows (3 bits); built on the GPU (packing and the
float32 reference included) to keep the run short. Every timed path is checked against
dequantize_vq + F.linear (float32) first. Bandwidth counts the index streams, the
codebooks, x and y once.
"""

from __future__ import annotations

import json
from collections.abc import Callable

LUT_SHAPES = ((4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096))  # (in, out)
LUT_TOKENS = (1, 16)
#: Also timed for the tensor-core GEMVs' weights (v4 i8): where qk_lut_mma4's blocks of 4
#: tokens and qk_lut_mma's 8-token tiles meet.
LUT_TOKENS_MMA = (4, 8)
LUT_CONFIGS = (  # (label, vector size, index bits)
    ("v4 i8 (2 bits)", 4, 8),
    ("v6 i12 (2 bits)", 6, 12),
    ("v4 i12 (3 bits)", 4, 12),
)


def _eager_ms(fn: Callable, runs: int = 50, warmup: int = 10) -> float:
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


#: The timing protocol's floors for a GEMV that reads its index stream once: a kernel that
#: does nothing, and one that only reads a buffer (16-byte loads, grid-stride, 8 blocks of
#: 256 threads per multiprocessor).
FLOOR_SOURCE = r"""
extern "C" __global__ void qk_bench_empty(int n) { if (n == 12345) __trap(); }
extern "C" __global__ void qk_bench_stream(const uint4* __restrict__ p, long long n16,
                                           unsigned* out) {
    unsigned acc = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n16;
         i += (long long)gridDim.x * blockDim.x) {
        const uint4 v = __ldg(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) *out = acc;  // keeps the loads
}
"""


def floor_timers(time_ms: Callable) -> tuple[Callable, Callable]:
    """(empty() -> ms, stream(tensor) -> ms): the floors above, timed like the kernels, on
    torch's stream."""
    import cupy
    import numpy as np
    import torch

    from qcore_kernels.runtime import external_stream

    module = cupy.RawModule(code=FLOOR_SOURCE)
    empty_k = module.get_function("qk_bench_empty")
    stream_k = module.get_function("qk_bench_stream")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")

    def on_torch(fn: Callable) -> Callable:
        def call() -> None:
            with external_stream(torch.cuda.current_stream().cuda_stream):
                fn()
        return call

    def empty() -> float:
        return time_ms(on_torch(lambda: empty_k((1,), (32,), (np.int32(0),))))

    def stream(t: torch.Tensor) -> float:
        n16 = t.numel() * t.element_size() // 16
        return time_ms(on_torch(lambda: stream_k(
            (sms * 8,), (256,), (t.data_ptr(), np.int64(n16), sink.data_ptr()))))

    return empty, stream


#: A first call of the table GEMV (never run on a GPU before this benchmark had it), in a
#: process of its own: a fault there (an illegal address poisons the CUDA context) must not
#: cost the rest of the run. Exits 0 when both the plain and the programmatic launch match
#: the float32 reference.
TABLE_CANARY = r"""
import sys, torch
import torch.nn.functional as F
import qcore_kernels.lut_ops as lut_ops
sys.path.insert(0, sys.argv[1])
from _lut_bench import _v4_weight
from qcore_kernels.runtime import cupy_launcher
from qcore_kernels.testing import TOLERANCE
launch = cupy_launcher()
for k, n in ((1024, 1000), (4096, 4096)):
    w, dense = _v4_weight(k, n, seed=8)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(9)).half().cuda()
    ref = F.linear(x.float(), dense)
    for pdl in (False, torch.cuda.get_device_capability()[0] >= 9):
        lut_ops.LUT_PDL = pdl
        for _ in range(2):
            y = lut_ops.lut_linear(x, w, None, launch, path="table")
        torch.cuda.synchronize()
        err = float((y.float() - ref).abs().max() / ref.abs().max())
        print(f"table canary {k} x {n} pdl={pdl}: error {err:.2e}", flush=True)
        if not err <= TOLERANCE["float16"]:
            sys.exit(1)
"""


def table_canary() -> str | None:
    """None when the table GEMV ran correctly in a process of its own, else why not."""
    import subprocess
    import sys
    from pathlib import Path

    try:
        done = subprocess.run([sys.executable, "-c", TABLE_CANARY, str(Path(__file__).parent)],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "the table canary timed out (300 s)"
    print(done.stdout + done.stderr[-2000:], flush=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return f"the table canary failed (exit {done.returncode}): {' / '.join(tail)}"[:400]
    return None


def run_lut(launch: Callable, bandwidth: float, time_ms: Callable,
            table_failed: str | None = None) -> list[dict]:
    """The LUT rows; ``time_ms`` is the benchmark's timer (CUDA-graph replays), with an
    eager fallback (noted in the row) should a LUT call fail to be captured. With
    ``table_failed`` (the canary's message) the table GEMV is left out and the message
    recorded in its place."""
    import torch
    import torch.nn.functional as F

    from qcore.builtin.vq_packer import VQPacker
    from qcore.codebook import bits_per_weight, dequantize_vq
    from qcore.interfaces import QuantizedWeight
    from qcore.testing.base import random_vq_weight
    from qcore_kernels.lut_layout import to_lut
    from qcore_kernels.lut_ops import lut_path

    rows = []
    gen = torch.Generator().manual_seed(0)
    pdl = torch.cuda.get_device_capability()[0] >= 9
    try:
        empty_ms, stream_ms = floor_timers(time_ms)
        empty = empty_ms()
    except Exception as exc:  # noqa: BLE001 - the floors are extra; the rows go on
        torch.cuda.synchronize()
        print(f"floors not measured: {type(exc).__name__}: {exc}", flush=True)
        stream_ms, empty = None, None
    for in_f, out_f in LUT_SHAPES:
        for label, v, bits in LUT_CONFIGS:
            q = random_vq_weight(out_f, in_f, v, bits, max_codebook_rows=None, seed=3)
            q = QuantizedWeight(format=q.format, shape=q.shape, params=q.params,
                                tensors={k: t.cuda() for k, t in q.tensors.items()})
            packed = VQPacker().pack(q)
            w = to_lut(packed, "cuda")
            dense = dequantize_vq(q)  # float32 on the GPU
            dense16 = dense.half()
            weight_bytes = sum(
                t.numel() * t.element_size() for t in packed.tensors.values()
            )
            tokens = sorted(LUT_TOKENS + (LUT_TOKENS_MMA if (v, bits) == (4, 8) else ()))
            for m in tokens:
                x = torch.randn(m, in_f, generator=gen).half().cuda()
                base_ms = time_ms(lambda x=x, d=dense16: F.linear(x, d))
                ref = F.linear(x.float(), dense)
                row = {"in": in_f, "out": out_f, "m": m, "config": label, "vector_size": v,
                       "index_bits": bits, "bits_per_weight": bits_per_weight(packed),
                       "fp16_ms": base_ms, "lut": {}}
                if stream_ms is not None and m == 1 and (v, bits) == (4, 8):
                    # what any kernel reading this index stream once would take at best
                    try:
                        row["floor"] = {"empty_ms": empty,
                                        "index_stream_ms": stream_ms(w.main.stage.codes)}
                    except Exception as exc:  # noqa: BLE001 - extra; the row goes on
                        torch.cuda.synchronize()
                        row["floor_failed"] = f"{type(exc).__name__}: {exc}"[:200]
                row["lut"] = _time_paths(x, w, ref, launch, time_ms, m, table_failed,
                                         weight_bytes, bandwidth, base_ms)
                auto = lut_path(m, w, x.device)
                if auto == "table" and table_failed:
                    row["auto"] = {"ok": False, "failed": table_failed, "path": auto}
                else:
                    row["auto"] = _time_auto(x, w, ref, launch, time_ms, auto)
                if (v, bits) == (4, 8) and pdl:
                    row["pdl"] = _time_pdl(x, w, ref, launch, time_ms, m,
                                           skip=("table",) if table_failed else ())
                rows.append(row)
                print(json.dumps(row), flush=True)
            del q, packed, w, dense, dense16
            torch.cuda.empty_cache()
    return rows


def _time_paths(x, w, ref, launch: Callable, time_ms: Callable, m: int,
                table_failed: str | None, weight_bytes: int, bandwidth: float,
                base_ms: float) -> dict:
    """Every path that can run ``m`` tokens of ``w``, each launched plainly
    (``lut_ops.LUT_PDL`` off) and checked against the float32 reference first."""
    import torch

    import qcore_kernels.lut_ops as lut_ops
    from qcore_kernels.lut_ops import lut_linear, lut_paths
    from qcore_kernels.testing import TOLERANCE

    out = {}
    saved = lut_ops.LUT_PDL
    try:
        lut_ops.LUT_PDL = False
        for path in lut_paths(m, w):
            if path == "table" and table_failed:
                out[path] = {"ok": False, "failed": table_failed}
                continue
            y = lut_linear(x, w, None, launch, path=path)
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            entry = {"error": err, "ok": err <= TOLERANCE["float16"]}
            if entry["ok"]:
                call = lambda p=path: lut_linear(x, w, None, launch, path=p)  # noqa: E731
                try:
                    ms = time_ms(call)
                except Exception as exc:  # noqa: BLE001 - graph capture failed
                    torch.cuda.synchronize()
                    entry["timing"] = f"eager ({type(exc).__name__}: {exc})"[:200]
                    ms = _eager_ms(call)
                moved = weight_bytes + x.numel() * 2 + m * w.out_features * 2
                entry.update(ms=ms, speedup=base_ms / ms,
                             bandwidth_fraction=moved / (ms / 1e3) / bandwidth)
            out[path] = entry
    finally:
        lut_ops.LUT_PDL = saved
    return out


def _time_auto(x, w, ref, launch: Callable, time_ms: Callable, path: str) -> dict:
    """``lut_linear`` as a caller gets it: its own path choice (``path``) and the module's
    defaults (programmatic dependent launch on sm_90+ included), checked first."""
    import torch

    from qcore_kernels.lut_ops import lut_linear
    from qcore_kernels.testing import TOLERANCE

    call = lambda: lut_linear(x, w, None, launch)  # noqa: E731
    try:
        err = float((call().float() - ref).abs().max() / ref.abs().max())
        entry = {"error": err, "ok": err <= TOLERANCE["float16"], "path": path}
        if entry["ok"]:
            entry["ms"] = time_ms(call)
    except Exception as exc:  # noqa: BLE001 - recorded, the rows go on
        torch.cuda.synchronize()
        entry = {"ok": False, "failed": f"{type(exc).__name__}: {exc}"[:200], "path": path}
    return entry


def _time_pdl(x, w, ref, launch: Callable, time_ms: Callable, m: int,
              skip: tuple[str, ...] = ()) -> dict:
    """The tensor-core and table GEMVs with programmatic dependent launch
    (``lut_ops.LUT_PDL``): each timed call may start while the call before it still runs
    (checked against the float32 reference first; a failure is recorded, not raised)."""
    import torch

    import qcore_kernels.lut_ops as lut_ops
    from qcore_kernels.testing import TOLERANCE

    out = {}
    saved = lut_ops.LUT_PDL
    try:
        lut_ops.LUT_PDL = True
        for path in ("mma4", "mma", "table"):
            if path not in lut_ops.lut_paths(m, w) or path in skip:
                continue
            call = lambda p=path: lut_ops.lut_linear(x, w, None, launch, path=p)  # noqa: E731
            try:
                err = float((call().float() - ref).abs().max() / ref.abs().max())
                entry = {"error": err, "ok": err <= TOLERANCE["float16"]}
                if entry["ok"]:
                    entry["ms"] = time_ms(call)
            except Exception as exc:  # noqa: BLE001 - extra; the rows go on
                torch.cuda.synchronize()
                entry = {"ok": False, "failed": f"{type(exc).__name__}: {exc}"[:200]}
            out[path] = entry
    finally:
        lut_ops.LUT_PDL = saved
    return out


def render_lut(result: dict) -> str:
    from kernels_gpu import cell

    if not result.get("lut"):
        return ""
    floors = any(r.get("floor") for r in result["lut"])
    pdl = any(r.get("pdl") for r in result["lut"])
    table = any(r["lut"].get("table") for r in result["lut"])
    auto = any(r.get("auto") for r in result["lut"])
    lines = [
        "",
        "Codebook (vq) weights, op `lut_linear` (provider `cupy-lut`): full fp16 codebooks "
        "(v4 i8: 256 rows, VPTQ's 2-bit default; i12: 4096 rows), no residual or outliers; "
        "bits/weight counts every stored bit (indices, padding, codebook). mma4 = tensor-core "
        "LUT GEMV in blocks of 4 tokens (`qk_lut_mma4`: a codebook row read is half an mma A "
        "operand as is; x in the table's free halves; index words streamed into shared "
        "memory by cp.async), mma = tensor-core LUT GEMV for up to 16 "
        "tokens (`qk_lut_mma`: v = 4, 8-bit indices; codebook 16 times over in shared "
        "memory), gemv = SIMT LUT GEMV (codebook in shared memory), dequant = decode to fp16 "
        "+ cuBLAS; bw counts indices, codebook, x and y."
        + (" These path columns launch plainly (`lut_ops.LUT_PDL` off); LUT auto is "
           "`lut_linear` as a caller gets it: its own path choice (in brackets) with the "
           "module's defaults, which on sm_90+ include programmatic dependent launch."
           if auto else "")
        + (" Floor (v4 i8, M = 1): a kernel that only reads the index bytes once, timed the "
           "same way; the speed-up in parentheses is the most any LUT GEMV that reads its "
           "indices once could reach here" + _empty_note(result["lut"]) + "." if floors else "")
        + (" LUT table (v4 i8, M = 1): the dot-product-table GEMV (`qk_lut_table`: per slice "
           "of 32 Q vectors, every codebook row's dot product with x in float32 tables that "
           "each lane reads in its own bank, 4 bytes per index; the slices' partial sums added "
           "by the warp that completes a row group)." if table else "")
        + (f" The table GEMV was left out: {result['table_canary']}."
           if result.get("table_canary") else "")
        + (" LUT PDL (v4 i8): the fastest of mma4, mma" + (" and table" if table else "")
           + " launched with programmatic dependent "
           "launch (`lut_ops.LUT_PDL`): a call's launch, weight loads and table build may "
           "overlap the end of the call before it (its x is read after griddepcontrol.wait); "
           "fp16 F.linear as cuBLAS launches it." if pdl else ""),
        "",
        "| in × out | M | vq | bits/weight | fp16 F.linear | " + ("floor | " if floors else "")
        + ("LUT auto | " if auto else "")
        + "LUT mma4 | LUT mma | " + ("LUT table | " if table else "")
        + ("LUT PDL | " if pdl else "") + "LUT gemv | LUT dequant+cuBLAS |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if floors else "")
        + ("---|" if auto else "") + ("---|" if table else "") + ("---|" if pdl else ""),
    ]
    for r in result["lut"]:
        floor = r.get("floor")
        floor_cell = "" if not floors else " | " if not floor else (
            f"{floor['index_stream_ms'] * 1e3:.1f} µs "
            f"({r['fp16_ms'] / floor['index_stream_ms']:.2f}×) | ")
        lines.append(
            f"| {r['in']} × {r['out']} | {r['m']} | {r['config']} | "
            f"{r['bits_per_weight']:.2f} | {r['fp16_ms'] * 1e3:.1f} µs | {floor_cell}"
            + (f"{_auto_cell(r)} | " if auto else "")
            + f"{cell(r['lut'].get('mma4'), True, 1)} | {cell(r['lut'].get('mma'), True, 1)} | "
            + (f"{cell(r['lut'].get('table'), True, 1)} | " if table else "")
            + (f"{_pdl_cell(r)} | " if pdl else "")
            + f"{cell(r['lut'].get('gemv'), True, 1)} | {cell(r['lut'].get('dequant'), digits=1)} |"
        )
    return "\n".join(lines) + "\n"


def _auto_cell(row: dict) -> str:
    """``lut_linear``'s own choice with the defaults, and which path it took."""
    entry = row.get("auto")
    if not entry:
        return ""
    if not entry.get("ok"):
        return f"failed [{entry.get('path')}]" if "failed" in entry else \
            f"WRONG (err {entry['error']:.1e}) [{entry.get('path')}]"
    return (f"**{entry['ms'] * 1e3:.1f} µs ({row['fp16_ms'] / entry['ms']:.2f}×)** "
            f"[{entry['path']}]")


def _pdl_cell(row: dict) -> str:
    """The faster tensor-core GEMV with programmatic dependent launch, and which."""
    entries = row.get("pdl") or {}
    timed = {p: e for p, e in entries.items() if e.get("ok") and "ms" in e}
    if not timed:
        failed = [p for p, e in entries.items() if not e.get("ok")]
        return f"failed ({', '.join(failed)})" if failed else ""
    path = min(timed, key=lambda p: timed[p]["ms"])
    ms = timed[path]["ms"]
    return f"{ms * 1e3:.1f} µs ({row['fp16_ms'] / ms:.2f}×) [{path}]"


def _empty_note(rows: list[dict]) -> str:
    empties = [r["floor"]["empty_ms"] for r in rows if r.get("floor")]
    return f" (an empty kernel: {min(empties) * 1e3:.2f} µs)" if empties else ""


#: The tensor-core LUT GEMV's launch parameters swept by ``sweep_mma`` (8-row groups per
#: tile, warps per block, resident warps per multiprocessor the grid is sized for).
SWEEP_TILINGS = ((8, 1), (8, 2), (16, 2))  # (token tile, row groups): sources.LUT_MMA_TILINGS
SWEEP_WARPS = (4, 8)
SWEEP_WARPS_PER_SM = (16, 32)
SWEEP_TOKENS = (1,)


def _v4_weight(in_f: int, out_f: int, seed: int) -> tuple:
    """A v4 i8 (2 bits per weight) codebook weight on the GPU: (qk-lut weight, float32 dense)."""
    import torch  # noqa: F401 - CUDA tensors

    from qcore.builtin.vq_packer import VQPacker
    from qcore.codebook import dequantize_vq
    from qcore.interfaces import QuantizedWeight
    from qcore.testing.base import random_vq_weight
    from qcore_kernels.lut_layout import to_lut

    q = random_vq_weight(out_f, in_f, 4, 8, max_codebook_rows=None, seed=seed)
    q = QuantizedWeight(format=q.format, shape=q.shape, params=q.params,
                        tensors={k: t.cuda() for k, t in q.tensors.items()})
    return to_lut(VQPacker().pack(q), "cuda"), dequantize_vq(q)


def sweep_mma(launch: Callable, time_ms: Callable) -> list[dict]:
    """qk_lut_mma at M = 1 (and 16) on the benchmark shapes over its launch parameters
    (v4 i8 weights); each setting checked against the float32 reference first."""
    import itertools

    import torch
    import torch.nn.functional as F

    import qcore_kernels.lut_ops as lut_ops
    from qcore_kernels.testing import TOLERANCE

    saved = (lut_ops.lut_mma_config, lut_ops.LUT_MMA_WARPS, lut_ops.LUT_MMA_WARPS_PER_SM)
    rows = []
    gen = torch.Generator().manual_seed(1)
    try:
        for in_f, out_f in LUT_SHAPES:
            w, dense = _v4_weight(in_f, out_f, seed=4)
            for m in SWEEP_TOKENS:
                x = torch.randn(m, in_f, generator=gen).half().cuda()
                ref = F.linear(x.float(), dense)
                for (mt, g), warps, per_sm in itertools.product(
                        SWEEP_TILINGS, SWEEP_WARPS, SWEEP_WARPS_PER_SM):
                    lut_ops.lut_mma_config = lambda m_, n_, d_, mt=mt, g=g: (mt, g)
                    lut_ops.LUT_MMA_WARPS, lut_ops.LUT_MMA_WARPS_PER_SM = warps, per_sm
                    y = lut_ops.lut_linear(x, w, None, launch, path="mma")
                    err = float((y.float() - ref).abs().max() / ref.abs().max())
                    entry = {"in": in_f, "out": out_f, "m": m, "token_tile": mt, "groups": g,
                             "warps": warps,
                             "warps_per_sm": per_sm, "error": err,
                             "ok": err <= TOLERANCE["float16"]}
                    if entry["ok"]:
                        entry["ms"] = time_ms(
                            lambda x=x, w=w: lut_ops.lut_linear(x, w, None, launch, path="mma"))
                    rows.append(entry)
                    print(json.dumps(entry), flush=True)
            del w, dense
            torch.cuda.empty_cache()
    finally:
        lut_ops.lut_mma_config, lut_ops.LUT_MMA_WARPS, lut_ops.LUT_MMA_WARPS_PER_SM = saved
    return rows


#: qk_lut_mma4's launch parameters swept by ``sweep_mma4``: row groups per tile, warps per
#: block, blocks per multiprocessor the persistent grid is sized for (only settings whose
#: blocks can all be resident: lut_ops.mma4_warps_per_sm); for each, the variants of
#: ``sweep4_variants``.
SWEEP4_GROUPS = (1, 2)
SWEEP4_WARPS = (4, 8, 16)
SWEEP4_BLOCKS_PER_SM = (1, 2, 3)
#: Where the index words go: stages after the table (``after``), stages in its free halves
#: where x leaves room (``table``, lut_ops.LUT_MMA4_STAGES_IN_TABLE), or registers
#: (``registers``, lut_ops.LUT_MMA4_REGISTER_INDICES).
SWEEP4_STAGES = ("after", "table", "registers")
SWEEP4_L2 = (True, False)
#: Programmatic dependent launch (``lut_ops.LUT_PDL``; sm_90+ only).
SWEEP4_PDL = (False, True)


def sweep4_variants(pdl_capable: bool) -> list[tuple[str, bool, bool, bool]]:
    """(index words, L2 requests, PDL, absent tokens' x reads skipped) of the ``qk_lut_mma4``
    sweep: the stages after the table with the L2 requests and PDL on and off; every other
    variant (the other index-word places, the x reads not skipped:
    ``lut_ops.LUT_MMA4_SKIP_ABSENT_X`` off) only at the one-token default of those two (L2
    requests off, PDL where the device has it), to compare with it."""
    pdls = [p for p in SWEEP4_PDL if pdl_capable or not p]
    out = [("after", l2, pdl, True) for l2 in SWEEP4_L2 for pdl in pdls]
    out += [(stages, False, pdl_capable, True) for stages in SWEEP4_STAGES if stages != "after"]
    out.append(("after", False, pdl_capable, False))
    return out


def _sweep_one_token(launch: Callable, time_ms: Callable, path: str, seeds: tuple[int, int],
                     settings: Callable) -> list[dict]:
    """``path`` at M = 1 on the benchmark shapes (v4 i8 weights and x of ``seeds``) under each
    setting that ``settings(in_f, out_f)`` yields as (the row's fields, a function that sets
    it in lut_ops); each checked against the float32 reference first, a failure recorded,
    not raised. The caller restores lut_ops."""
    import torch
    import torch.nn.functional as F

    import qcore_kernels.lut_ops as lut_ops
    from qcore_kernels.testing import TOLERANCE

    rows = []
    gen = torch.Generator().manual_seed(seeds[1])
    for in_f, out_f in LUT_SHAPES:
        w, dense = _v4_weight(in_f, out_f, seed=seeds[0])
        x = torch.randn(1, in_f, generator=gen).half().cuda()
        ref = F.linear(x.float(), dense)
        call = lambda x=x, w=w: lut_ops.lut_linear(x, w, None, launch, path=path)  # noqa: E731
        for fields, apply in settings(in_f, out_f):
            apply()
            entry = {"in": in_f, "out": out_f, "m": 1, **fields}
            try:
                y = call()
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                entry.update(error=err, ok=err <= TOLERANCE["float16"])
                if entry["ok"]:
                    entry["ms"] = time_ms(call)
            except Exception as exc:  # noqa: BLE001 - e.g. too many resident blocks
                torch.cuda.synchronize()
                entry.update(ok=False, failed=f"{type(exc).__name__}: {exc}"[:200])
            rows.append(entry)
            print(json.dumps(entry), flush=True)
        del w, dense
        torch.cuda.empty_cache()
    return rows


def sweep_mma4(launch: Callable, time_ms: Callable) -> list[dict]:
    """qk_lut_mma4 at M = 1 on the benchmark shapes over its launch parameters (v4 i8
    weights); each setting checked against the float32 reference first."""
    import itertools

    import torch

    import qcore_kernels.lut_ops as lut_ops

    saved = (lut_ops.lut_mma4_config, lut_ops.LUT_MMA4_WARPS, lut_ops.LUT_MMA4_STAGES_IN_TABLE,
             lut_ops.LUT_MMA4_L2, lut_ops.LUT_PDL, lut_ops.LUT_MMA4_SKIP_ABSENT_X,
             lut_ops.LUT_MMA4_REGISTER_INDICES)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    variants = sweep4_variants(torch.cuda.get_device_capability()[0] >= 9)

    def settings(in_f: int, out_f: int):
        for g, warps, per_sm, (stages, l2, pdl, skip_x) in itertools.product(
                SWEEP4_GROUPS, SWEEP4_WARPS, SWEEP4_BLOCKS_PER_SM, variants):
            in_table, in_registers = stages == "table", stages == "registers"
            if in_table and not lut_ops.mma4_stages_fit_in_table(1, in_f, g, warps):
                continue
            if warps * per_sm > lut_ops.mma4_warps_per_sm(g, in_table, in_registers):
                continue
            blocks = min(-(-out_f // (8 * g)), sms * per_sm)

            def apply(g=g, blocks=blocks, warps=warps, in_table=in_table, l2=l2, pdl=pdl,
                      skip_x=skip_x, in_registers=in_registers):
                lut_ops.lut_mma4_config = lambda *_: (g, blocks)
                lut_ops.LUT_MMA4_WARPS = warps
                lut_ops.LUT_MMA4_STAGES_IN_TABLE = in_table
                lut_ops.LUT_MMA4_REGISTER_INDICES = in_registers
                lut_ops.LUT_MMA4_L2 = l2
                lut_ops.LUT_PDL = pdl
                lut_ops.LUT_MMA4_SKIP_ABSENT_X = skip_x

            yield ({"groups": g, "warps": warps, "blocks_per_sm": per_sm, "stages": stages,
                    "l2": l2, "pdl": pdl, "skip_x": skip_x}, apply)

    try:
        return _sweep_one_token(launch, time_ms, "mma4", (5, 2), settings)
    finally:
        (lut_ops.lut_mma4_config, lut_ops.LUT_MMA4_WARPS, lut_ops.LUT_MMA4_STAGES_IN_TABLE,
         lut_ops.LUT_MMA4_L2, lut_ops.LUT_PDL, lut_ops.LUT_MMA4_SKIP_ABSENT_X,
         lut_ops.LUT_MMA4_REGISTER_INDICES) = saved


def render_sweep4(result: dict) -> str:
    """qk_lut_mma4's launch-parameter sweep, one line per shape, row-group count, stage
    layout, L2 setting, PDL and the absent tokens' x reads (runs before these were swept:
    after the table, L2 on, no PDL, x read)."""
    sweep = result.get("lut_mma4_sweep")
    if not sweep:
        return ""
    settings = [(w, b) for w in SWEEP4_WARPS for b in SWEEP4_BLOCKS_PER_SM]
    pdls = any(r.get("pdl") for r in sweep)
    skips = any("skip_x" in r for r in sweep)
    lines = [
        "",
        "`qk_lut_mma4` launch sweep (`--lut-sweep`, v4 i8, fp16, M = 1): row "
        "groups (of 8 rows) per block tile; warps per block; blocks per multiprocessor the "
        "persistent grid is sized for; index stages after the table (4 per warp) or in its "
        "free halves next to x (2 per warp; only where they fit) or none, the index words "
        "loaded into registers (`registers`); L2 requests of the next tile on or off"
        + ("; programmatic dependent launch (PDL) on or off" if pdls else "")
        + ("; the x reads of the lanes of the 3 absent tokens skipped or read" if skips else "")
        + ". Bold: the fastest per shape." + _sweep_from(result, "lut_mma4_sweep"),
        "",
        "| in × out | groups | stages | L2 | " + ("PDL | " if pdls else "")
        + ("absent x | " if skips else "")
        + " | ".join(f"{w} warps, {b}/SM" for w, b in settings) + " |",
        "|---|---|---|---|" + ("---|" if pdls else "") + ("---|" if skips else "")
        + "---|" * len(settings),
    ]

    def key(r: dict) -> tuple:
        return (r["groups"], r.get("stages", "after"), r.get("l2", True), r.get("pdl", False),
                r.get("skip_x", False))

    shapes = sorted({(r["in"], r["out"]) for r in sweep}, key=lambda s: (s[0] * s[1], s[0]))
    for shape in shapes:
        rows = [r for r in sweep if (r["in"], r["out"]) == shape]
        best = min((r["ms"] for r in rows if r.get("ok")), default=None)
        variants = sorted({key(r) for r in rows},
                          key=lambda v: (v[0], v[1], not v[2], v[3], not v[4]))
        for variant in variants:
            g, stages, l2, pdl, skip_x = variant
            cells = []
            for warps, per_sm in settings:
                hit = [r for r in rows if key(r) == variant and r["warps"] == warps
                       and r["blocks_per_sm"] == per_sm]
                if not hit or not hit[0].get("ok"):
                    cells.append("" if not hit else "failed" if "failed" in hit[0] else "WRONG")
                    continue
                text = f"{hit[0]['ms'] * 1e3:.1f} µs"
                cells.append(f"**{text}**" if hit[0]["ms"] == best else text)
            lines.append(f"| {shape[0]} × {shape[1]} | {g} | {stages} | {'on' if l2 else 'off'} | "
                         + ("" if not pdls else f"{'on' if pdl else 'off'} | ")
                         + ("" if not skips else f"{'skipped' if skip_x else 'read'} | ")
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sweep_from(result: dict, key: str) -> str:
    """Where a sweep recorded with another run's rows came from (``<key>_from``)."""
    origin = result.get(f"{key}_from")
    return f" Measured in another run: {origin}." if origin else ""


def render_sweep(result: dict) -> str:
    """The tensor-core LUT GEMV's launch-parameter sweep, one line per shape and setting."""
    sweep = result.get("lut_mma_sweep")
    if not sweep:
        return ""
    lines = [
        "",
        "Tensor-core LUT GEMV launch sweep (`--lut-sweep`, v4 i8, fp16): token tile 8 = "
        "weights as the mma's A operand (16-row groups), 16 = tokens as A (8-row groups); "
        "groups per block tile; warps per block; resident warps per multiprocessor the "
        "persistent grid is sized for. Bold: the fastest per shape."
        + _sweep_from(result, "lut_mma_sweep"),
        "",
        "| in × out | M | token tile, groups | 4 warps, 16/SM | 4 warps, 32/SM | 8 warps, 16/SM "
        "| 8 warps, 32/SM |",
        "|---|---|---|---|---|---|---|",
    ]
    shapes = sorted({(r["in"], r["out"], r["m"]) for r in sweep},
                    key=lambda s: (s[0] * s[1], s[0], s[2]))
    for shape in shapes:
        rows = [r for r in sweep if (r["in"], r["out"], r["m"]) == shape]
        best = min((r["ms"] for r in rows if r.get("ok")), default=None)
        for tiling in sorted({(r.get("token_tile", 8), r["groups"]) for r in rows}):
            cells = []
            for warps, per_sm in ((4, 16), (4, 32), (8, 16), (8, 32)):
                hit = [r for r in rows if (r.get("token_tile", 8), r["groups"]) == tiling
                       and r["warps"] == warps and r["warps_per_sm"] == per_sm]
                if not hit or not hit[0].get("ok"):
                    cells.append("" if not hit else "WRONG")
                    continue
                text = f"{hit[0]['ms'] * 1e3:.1f} µs"
                cells.append(f"**{text}**" if hit[0]["ms"] == best else text)
            lines.append(f"| {shape[0]} × {shape[1]} | {shape[2]} | {tiling[0]}, {tiling[1]} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: qk_lut_table's launch parameters swept by ``sweep_table`` (M = 1): vectors per lane Q,
#: warps per block, and blocks per multiprocessor the grid (slices x row ranges) is sized for
#: (2 only where two blocks fit: 8 warps, and registers for 16 per multiprocessor); with and
#: without programmatic dependent launch (sm_90+).
SWEEP_TABLE_Q = (2, 4)
SWEEP_TABLE_WARPS = (8, 16)
SWEEP_TABLE_BLOCKS_PER_SM = (1, 2)
SWEEP_TABLE_PDL = (False, True)


def table_grid(n_vec: int, n: int, q: int, blocks: int, warps: int) -> tuple[int, int, int, int]:
    """(Q, slices, rows per block, warps) of a qk_lut_table grid of about ``blocks`` blocks."""
    slices = -(-n_vec // (32 * q))
    groups = -(-n // 32)
    ranges = max(1, min(groups, blocks // slices))
    per_range = -(-groups // ranges)
    return q, slices, 32 * per_range, min(warps, per_range)


def sweep_table(launch: Callable, time_ms: Callable) -> list[dict]:
    """qk_lut_table at M = 1 on the benchmark shapes over its launch parameters (v4 i8
    weights); each setting checked against the float32 reference first."""
    import itertools

    import torch

    import qcore_kernels.lut_ops as lut_ops

    saved = (lut_ops.lut_table_config, lut_ops.LUT_PDL)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pdl_capable = torch.cuda.get_device_capability()[0] >= 9

    def settings(in_f: int, out_f: int):
        for q, warps, per_sm, pdl in itertools.product(
                SWEEP_TABLE_Q, SWEEP_TABLE_WARPS, SWEEP_TABLE_BLOCKS_PER_SM, SWEEP_TABLE_PDL):
            if (pdl and not pdl_capable) or warps * per_sm > lut_ops.LUT_TABLE_WARPS:
                continue
            if per_sm > 1 and q == 4:  # two 132 KB blocks do not fit a multiprocessor
                continue

            def apply(q=q, blocks=sms * per_sm, warps=warps, pdl=pdl):
                lut_ops.lut_table_config = (
                    lambda n_vec, n, device: table_grid(n_vec, n, q, blocks, warps))
                lut_ops.LUT_PDL = pdl

            yield {"q": q, "warps": warps, "blocks_per_sm": per_sm, "pdl": pdl}, apply

    try:
        return _sweep_one_token(launch, time_ms, "table", (7, 6), settings)
    finally:
        lut_ops.lut_table_config, lut_ops.LUT_PDL = saved


def render_sweep_table(result: dict) -> str:
    """qk_lut_table's launch-parameter sweep, one line per shape, Q and PDL setting."""
    sweep = result.get("lut_table_sweep")
    if not sweep:
        return ""
    settings = [(w, b) for w in SWEEP_TABLE_WARPS for b in SWEEP_TABLE_BLOCKS_PER_SM
                if w * b <= 16]
    lines = [
        "",
        "`qk_lut_table` launch sweep (`--lut-sweep table`, v4 i8, fp16, M = 1): vectors per "
        "lane Q (tables of 64 or 128 KB); warps per block; blocks per multiprocessor the "
        "grid of slices x row ranges is sized for; programmatic dependent launch on or off. "
        "Bold: the fastest per shape." + _sweep_from(result, "lut_table_sweep"),
        "",
        "| in × out | Q | PDL | " + " | ".join(f"{w} warps, {b}/SM" for w, b in settings) + " |",
        "|---|---|---|" + "---|" * len(settings),
    ]
    shapes = sorted({(r["in"], r["out"]) for r in sweep}, key=lambda s: (s[0] * s[1], s[0]))
    for shape in shapes:
        rows = [r for r in sweep if (r["in"], r["out"]) == shape]
        best = min((r["ms"] for r in rows if r.get("ok")), default=None)
        for q, pdl in sorted({(r["q"], r["pdl"]) for r in rows}):
            cells = []
            for warps, per_sm in settings:
                hit = [r for r in rows if r["q"] == q and r["pdl"] == pdl and r["warps"] == warps
                       and r["blocks_per_sm"] == per_sm]
                if not hit or not hit[0].get("ok"):
                    cells.append("" if not hit else "failed" if "failed" in hit[0] else "WRONG")
                    continue
                text = f"{hit[0]['ms'] * 1e3:.1f} µs"
                cells.append(f"**{text}**" if hit[0]["ms"] == best else text)
            lines.append(f"| {shape[0]} × {shape[1]} | {q} | {'on' if pdl else 'off'} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
