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


def run_lut(launch: Callable, bandwidth: float, time_ms: Callable) -> list[dict]:
    """The LUT rows; ``time_ms`` is the benchmark's timer (CUDA-graph replays), with an
    eager fallback (noted in the row) should a LUT call fail to be captured."""
    import torch
    import torch.nn.functional as F

    from qcore.codebook import VQPacker, bits_per_weight, dequantize_vq
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
                row["lut"] = _time_paths(x, w, ref, launch, time_ms, m, weight_bytes, bandwidth,
                                         base_ms)
                row["auto"] = _time_auto(x, w, ref, launch, time_ms, lut_path(m, w, x.device))
                if (v, bits) == (4, 8) and pdl:
                    row["pdl"] = _time_pdl(x, w, ref, launch, time_ms, m)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del q, packed, w, dense, dense16
            torch.cuda.empty_cache()
    return rows


def _time_paths(x, w, ref, launch: Callable, time_ms: Callable, m: int, weight_bytes: int,
                bandwidth: float, base_ms: float) -> dict:
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


def _time_pdl(x, w, ref, launch: Callable, time_ms: Callable, m: int) -> dict:
    """The tensor-core GEMVs with programmatic dependent launch
    (``lut_ops.LUT_PDL``): each timed call may start while the call before it still runs
    (checked against the float32 reference first; a failure is recorded, not raised)."""
    import torch

    import qcore_kernels.lut_ops as lut_ops
    from qcore_kernels.testing import TOLERANCE

    out = {}
    saved = lut_ops.LUT_PDL
    try:
        lut_ops.LUT_PDL = True
        for path in ("mma4", "mma"):
            if path not in lut_ops.lut_paths(m, w):
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


def render_lut(result: dict) -> tuple[str, list[str]]:
    """The codebook table (its caption and rows) and its notes."""
    from kernels_gpu import cell

    if not result.get("lut"):
        return "", []
    rows = result["lut"]
    floors = any(r.get("floor") for r in rows)
    pdl = any(r.get("pdl") for r in rows)
    auto = any(r.get("auto") for r in rows)
    #: the dot-product-table GEMV ``qk_lut_table``: in runs recorded before issue 28 deleted it
    table = any(r["lut"].get("table") for r in rows)
    pdl_paths = [p for p in ("mma4", "mma", "table") if any(p in (r.get("pdl") or {})
                                                            for r in rows)]
    lines = [
        "",
        "**Codebook (vq) weights**, op `lut_linear` (provider `cupy-lut`), full fp16 codebooks, "
        "no residual or outliers, fp16 activations; vq = vector size v and index bits i (v4 "
        "i8: 256 codebook rows, VPTQ's 2-bit default; i12: 4096 rows)"
        + ("; LUT auto in bold, with the path it took" if auto else "") + ":",
        "",
        "| in × out | M | vq | bits/weight | fp16 F.linear | " + ("floor | " if floors else "")
        + ("LUT auto | " if auto else "")
        + "LUT mma4 | LUT mma | " + ("LUT table | " if table else "")
        + ("LUT PDL | " if pdl else "") + "LUT gemv | LUT dequant+cuBLAS |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if floors else "")
        + ("---|" if auto else "") + ("---|" if table else "") + ("---|" if pdl else ""),
    ]
    for r in rows:
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
    notes = [
        "Codebook columns: mma4 = tensor-core LUT GEMV in blocks of 4 tokens (`qk_lut_mma4`: a "
        "codebook row read is half an mma A operand as is; x in the table's free halves; index "
        "words streamed into shared memory by cp.async); mma = tensor-core LUT GEMV for up to "
        "16 tokens (`qk_lut_mma`: v = 4, 8-bit indices; codebook 16 times over in shared "
        "memory); gemv = SIMT LUT GEMV (codebook in shared memory); dequant = decode to fp16 "
        "+ cuBLAS. bits/weight counts every stored bit (indices, padding, codebook); bw counts "
        "indices, codebook, x and y."
        + (" The path columns launch plainly (`lut_ops.LUT_PDL` off); LUT auto is `lut_linear` "
           "as a caller gets it: its own path choice (in brackets) with the module's defaults, "
           "which on sm_90+ include programmatic dependent launch." if auto else ""),
    ]
    if floors:
        notes.append(
            "Floor (v4 i8, M = 1): a kernel that only reads the index bytes once, timed the "
            "same way; its speed-up is the most any LUT GEMV that reads its indices once could "
            "reach here" + _empty_note(rows) + ".")
    if table:
        notes.append(
            "LUT table (v4 i8, M = 1): the dot-product-table GEMV (`qk_lut_table`, deleted in "
            "issue 28): per slice of 32 Q vectors, every codebook row's dot product with x in "
            "float32 tables that each lane reads in its own bank, 4 bytes per index; the "
            "slices' partial sums added by the warp that completes a row group.")
    if pdl:
        notes.append(
            f"LUT PDL (v4 i8): the fastest of {_and(pdl_paths)} launched with "
            "programmatic "
            "dependent launch (`lut_ops.LUT_PDL`): a call's launch, weight loads and table "
            "build may overlap the end of the call before it (its x is read after "
            "griddepcontrol.wait); fp16 F.linear as cuBLAS launches it.")
    return "\n".join(lines) + "\n", notes


def _and(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


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

    from qcore.codebook import VQPacker, dequantize_vq
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
#: blocks can all be resident: lut_ops.mma4_warps_per_sm); each with lut_ops' defaults (at
#: one token the L2 requests off and, on sm_90+, programmatic dependent launch: both measured
#: faster on the H200) and with each of lut_ops.UNMEASURED_SWITCHES turned on alone.
SWEEP4_GROUPS = (1, 2)
SWEEP4_WARPS = (4, 8, 16)
SWEEP4_BLOCKS_PER_SM = (1, 2, 3)


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
    weights), with lut_ops' defaults and with each unmeasured switch on alone; each setting
    checked against the float32 reference first."""
    import itertools

    import torch

    import qcore_kernels.lut_ops as lut_ops

    switches = lut_ops.UNMEASURED_SWITCHES
    saved = (lut_ops.lut_mma4_config, lut_ops.LUT_MMA4_WARPS,
             {name: getattr(lut_ops, name) for name in switches})
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pdl = lut_ops.LUT_PDL and torch.cuda.get_device_capability()[0] >= 9

    def settings(in_f: int, out_f: int):
        for g, warps, per_sm, switch in itertools.product(
                SWEEP4_GROUPS, SWEEP4_WARPS, SWEEP4_BLOCKS_PER_SM, (None, *switches)):
            registers = switch == "LUT_MMA4_REGISTER_INDICES"  # other launch bounds
            if warps * per_sm > lut_ops.mma4_warps_per_sm(g, registers):
                continue
            blocks = min(-(-out_f // (8 * g)), sms * per_sm)

            def apply(g=g, blocks=blocks, warps=warps, switch=switch):
                lut_ops.lut_mma4_config = lambda *_: (g, blocks)
                lut_ops.LUT_MMA4_WARPS = warps
                for name in switches:
                    setattr(lut_ops, name, name == switch)

            yield ({"groups": g, "warps": warps, "blocks_per_sm": per_sm,
                    "switch": switch or "default", "pdl": pdl}, apply)

    try:
        return _sweep_one_token(launch, time_ms, "mma4", (5, 2), settings)
    finally:
        lut_ops.lut_mma4_config, lut_ops.LUT_MMA4_WARPS, values = saved
        for name, value in values.items():
            setattr(lut_ops, name, value)


def _sweep4_variant(row: dict) -> tuple:
    """A ``qk_lut_mma4`` sweep row's setting beyond the grid: (row groups, switch), or in
    runs recorded before issue 28 (row groups, index stages, L2 requests, PDL)."""
    if "stages" in row:
        return row["groups"], row["stages"], row["l2"], row["pdl"]
    return row["groups"], row.get("switch", "default")


def _variant_cells(variant: tuple) -> str:
    if len(variant) == 4:
        g, stages, l2, pdl = variant
        return f"{g} | {stages} | {'on' if l2 else 'off'} | {'on' if pdl else 'off'}"
    g, switch = variant
    return f"{g} | {'defaults' if switch == 'default' else f'`{switch}`'}"


def render_sweep4(result: dict) -> tuple[str, list[str]]:
    """qk_lut_mma4's launch-parameter sweep (caption and rows), one line per shape, row-group
    count and setting (the defaults, or one of lut_ops.UNMEASURED_SWITCHES on; in runs
    before issue 28, each combination of index stages, L2 requests and PDL), and its note."""
    sweep = result.get("lut_mma4_sweep")
    if not sweep:
        return "", []
    settings = [(w, b) for w in SWEEP4_WARPS for b in SWEEP4_BLOCKS_PER_SM]
    legacy = any("stages" in r for r in sweep)
    pdl = any(r.get("pdl") for r in sweep)
    lines = [
        "",
        "**`qk_lut_mma4` launch sweep** (`--lut-sweep`, v4 i8, fp16, M = 1; bold: the fastest "
        "per shape" + _sweep_from(result, "lut_mma4_sweep") + "):",
        "",
        "| in × out | groups | " + ("index stages | L2 | PDL | " if legacy else "switch | ")
        + " | ".join(f"{w} warps, {b}/SM" for w, b in settings) + " |",
        "|---|---|" + ("---|---|---|" if legacy else "---|") + "---|" * len(settings),
    ]
    shapes = sorted({(r["in"], r["out"]) for r in sweep}, key=lambda s: (s[0] * s[1], s[0]))
    for shape in shapes:
        rows = [r for r in sweep if (r["in"], r["out"]) == shape]
        best = min((r["ms"] for r in rows if r.get("ok")), default=None)
        variants = sorted({_sweep4_variant(r) for r in rows},
                          key=lambda v: (v[0], v[1] != "after", not v[2], v[3]) if len(v) == 4
                          else (v[0], v[1] != "default", v[1]))
        for variant in variants:
            cells = []
            for warps, per_sm in settings:
                cells.append(_sweep_cell([r for r in rows if _sweep4_variant(r) == variant
                                          and r["warps"] == warps
                                          and r["blocks_per_sm"] == per_sm], best))
            lines.append(f"| {shape[0]} × {shape[1]} | {_variant_cells(variant)} | "
                         + " | ".join(cells) + " |")
    note = ("`qk_lut_mma4` sweep: row groups (of 8 rows) per block tile; warps per block; "
            "blocks per multiprocessor the persistent grid is sized for; "
            + ("index stages after the table (4 per warp) or in its free halves next to x (2 "
               "per warp; only where they fit; deleted in issue 28); L2 requests of the next "
               "tile on or off; programmatic dependent launch (PDL) on or off."
               if legacy else
               "`lut_ops`' defaults (L2 requests off at one token"
               + (", programmatic dependent launch" if pdl else "") + "), or one of its "
               "switches not yet measured (`lut_ops.UNMEASURED_SWITCHES`) on."))
    return "\n".join(lines) + "\n", [note]


def _sweep_cell(hit: list[dict], best: float | None) -> str:
    """One sweep cell: the time (bold if the fastest of its shape), or why there is none."""
    if not hit or not hit[0].get("ok"):
        return "" if not hit else "failed" if "failed" in hit[0] else "WRONG"
    text = f"{hit[0]['ms'] * 1e3:.1f} µs"
    return f"**{text}**" if hit[0]["ms"] == best else text


def render_table_sweep(result: dict) -> tuple[str, list[str]]:
    """The launch sweep of the dot-product-table GEMV ``qk_lut_table`` (deleted in issue 28;
    in runs recorded before it), caption and rows, and its note."""
    sweep = result.get("lut_table_sweep")
    if not sweep:
        return "", []
    settings = sorted({(r["warps"], r["blocks_per_sm"]) for r in sweep})
    lines = [
        "",
        "**`qk_lut_table` launch sweep** (`--lut-sweep table`, deleted in issue 28; v4 i8, "
        "fp16, M = 1; bold: the fastest per shape" + _sweep_from(result, "lut_table_sweep")
        + "):",
        "",
        "| in × out | Q | PDL | " + " | ".join(f"{w} warps, {b}/SM" for w, b in settings)
        + " |",
        "|---|---|---|" + "---|" * len(settings),
    ]
    shapes = sorted({(r["in"], r["out"]) for r in sweep}, key=lambda s: (s[0] * s[1], s[0]))
    for shape in shapes:
        rows = [r for r in sweep if (r["in"], r["out"]) == shape]
        best = min((r["ms"] for r in rows if r.get("ok")), default=None)
        for q, pdl in sorted({(r["q"], r["pdl"]) for r in rows}):
            cells = []
            for warps, per_sm in settings:
                cells.append(_sweep_cell([r for r in rows if (r["q"], r["pdl"]) == (q, pdl)
                                          and (r["warps"], r["blocks_per_sm"])
                                          == (warps, per_sm)], best))
            lines.append(f"| {shape[0]} × {shape[1]} | {q} | {'on' if pdl else 'off'} | "
                         + " | ".join(cells) + " |")
    note = ("`qk_lut_table` sweep (slower than `qk_lut_mma4` everywhere): vectors per lane Q "
            "(tables of 64 or 128 KB); warps per block; blocks per multiprocessor the grid of "
            "slices x row ranges is sized for; programmatic dependent launch on or off.")
    return "\n".join(lines) + "\n", [note]


def _sweep_from(result: dict, key: str) -> str:
    """Where a sweep recorded with another run's rows came from (``<key>_from``)."""
    origin = result.get(f"{key}_from")
    return f"; measured in another run: {origin}" if origin else ""


def render_sweep(result: dict) -> tuple[str, list[str]]:
    """The tensor-core LUT GEMV's launch-parameter sweep (caption and rows), one line per
    shape and setting, and its note."""
    sweep = result.get("lut_mma_sweep")
    if not sweep:
        return "", []
    lines = [
        "",
        "**`qk_lut_mma` launch sweep** (`--lut-sweep`, v4 i8, fp16; bold: the fastest per shape"
        + _sweep_from(result, "lut_mma_sweep") + "):",
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
    note = ("`qk_lut_mma` sweep: token tile 8 = weights as the mma's A operand (16-row "
            "groups), 16 = tokens as A (8-row groups); groups per block tile; warps per block; "
            "resident warps per multiprocessor the persistent grid is sized for.")
    return "\n".join(lines) + "\n", [note]
