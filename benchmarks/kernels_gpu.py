"""Kernel benchmark of BENCHMARKS.md, on a GPU: the CuPy kernels against fp16 F.linear.

    python benchmarks/kernels_gpu.py run --out DIR     # on the GPU machine (gpu_check.sh)
    python benchmarks/kernels_gpu.py record DIR/kernels_gpu.json   # here: BENCHMARKS.md
    python benchmarks/kernels_gpu.py render    # BENCHMARKS.md from results/ only

Protocol: tokens M in {1, 16, 128, 2048}; (in, out) in {(4096, 4096), (4096, 14336),
(14336, 4096), (8192, 8192)}; fp16 activations; baseline torch.nn.functional.linear in
fp16 (cuBLAS) in the same process; CUDA events, warm-up first, median of 50 runs; every
timed kernel checked against the torch reference on the same inputs first. W4A16 is
group 64 asymmetric (the project's default scheme); both of its paths are timed at every M
(the tensor-core kernel with in-register dequantization, and dequantize + cuBLAS) and
"auto" is what the provider picks; likewise W8A8's (dp4a GEMV for M <= 16, int8 wmma
tiles, cuBLASLt int8 through torch._int_mm + our epilogue for M > 16).
Achieved bandwidth counts weight, activation and output bytes once, against a
device-to-device copy measured in the same run (bytes read + written).
W4A4 (``cupy-w4a4``, a separate table): 4-bit symmetric weights and activations, both in
groups of 64, the activations quantized in every call (two launches: quantization, then the
int4 tensor-core GEMM), without and with a fused rank-32 low-rank branch (SVDQuant), against
fp16 F.linear and against W4A16 (``cupy-wq``, auto path) on the same shapes.
Codebook (vq) weights (``_lut_bench.py``, a separate table): M in {1, 16} on the same
shapes, v = 6 and v = 4 with 12-bit indices (2 and 3 bits per weight), LUT GEMV and
dequantize + cuBLAS, against fp16 F.linear.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOKENS = (1, 16, 128, 2048)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))  # (in, out)
RUNS, WARMUP = 50, 10


GRAPH_REPS = 20
TIMING = {"mode": "graph"}  # "eager" once a capture fails; reported with the results


def _eager_ms(fn, runs: int, warmup: int) -> float:
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


def time_ms(fn, runs: int = RUNS, warmup: int = WARMUP) -> float:
    """Median GPU time of one call. Calls are captured in a CUDA graph (GRAPH_REPS per
    replay), so that Python's launch overhead, the same for every decode step of a served
    model, does not hide the kernels' own time; eager timing if capture fails."""
    import torch

    if TIMING["mode"] == "graph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_REPS):
                fn()
        return _eager_ms(graph.replay, runs, warmup) / GRAPH_REPS
    return _eager_ms(fn, runs, warmup)


def choose_timing(fns) -> None:
    """Graph timing if every kind of call can be captured, else eager for the whole run."""
    import torch

    try:
        for fn in fns:
            time_ms(fn, runs=2, warmup=1)
    except Exception as exc:  # noqa: BLE001 - reported with the results
        TIMING.update(mode="eager", why=f"{type(exc).__name__}: {exc}"[:300])
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _eager_ms(lambda: dst.copy_(src), runs=20, warmup=3)
    return 2 * src.numel() / (ms / 1e3)


def run(out: Path, lut_sweep: str | None = None, only_lut: bool = False) -> dict:
    import cupy
    import torch
    import torch.nn.functional as F

    from qcore.builtin.int_packer import IntPacker
    from qcore.grid import dequantize_int, fake_quantize_activations
    from qcore_kernels import ops
    from qcore_kernels.layouts import to_w4a4, to_w8a8, to_wq
    from qcore_kernels.runtime import cupy_launcher
    from qcore_kernels.testing import TOLERANCE, random_int_packed, random_w4a4_packed

    launch = cupy_launcher()
    bw = copy_bandwidth()
    probe = to_wq(random_int_packed(256, 512, 4, 64), torch.float16, "cuda")
    probe8 = to_w8a8(random_int_packed(256, 512, 8, -1, symmetric=True, act_bits=8), "cuda")
    probe44 = to_w4a4(random_w4a4_packed(256, 512, rank=32), "cuda")
    xp = torch.randn(300, 512, device="cuda", dtype=torch.float16)
    choose_timing(
        [lambda: F.linear(xp, xp[:256])]
        + [
            lambda p=p: ops.wq_linear(xp, probe, None, launch, path=p)
            for p in ops.WQ_PATHS
        ]
        + [
            lambda p=p: ops.w8a8_linear(xp[:1] if p == "gemv" else xp, probe8, None, launch, path=p)
            for p in ops.W8A8_PATHS
        ]
        + [lambda m=m: ops.w4a4_linear(xp[:m], probe44, None, launch) for m in (1, 300)]
    )
    rows = []
    gen = torch.Generator().manual_seed(0)
    for in_f, out_f in () if only_lut else SHAPES:
        packed = random_int_packed(out_f, in_f, 4, 64, seed=1)
        w4 = to_wq(packed, torch.float16, "cuda")
        w_dense = dequantize_int(IntPacker().unpack(packed)).half().cuda()
        packed8 = random_int_packed(out_f, in_f, 8, -1, symmetric=True, act_bits=8, seed=2)
        w8 = to_w8a8(packed8, "cuda")
        w8_dense = dequantize_int(IntPacker().unpack(packed8)).half().cuda()
        packed44 = random_w4a4_packed(out_f, in_f, rank=32, seed=3)
        w44_dense = dequantize_int(IntPacker().unpack(packed44)).cuda()  # float32
        branch = [packed44.tensors.pop(k) for k in ("lowrank_down", "lowrank_up")]
        w44 = {"plain": to_w4a4(packed44, "cuda")}  # the same weight, without its branch
        packed44.tensors.update(lowrank_down=branch[0], lowrank_up=branch[1])
        w44["r32"] = to_w4a4(packed44, "cuda")
        branch = [t.float().cuda() for t in branch]
        for m in TOKENS:
            x = torch.randn(m, in_f, generator=gen).half().cuda()
            base_ms = time_ms(lambda x=x, w=w_dense: F.linear(x, w))
            ref = F.linear(x.float(), w_dense.float())
            row = {"in": in_f, "out": out_f, "m": m, "fp16_ms": base_ms, "w4": {}, "w8a8": {}}
            auto = ops.wq_path(m)
            # the mma path re-reads the weight per 32 tokens: past 128 its time says nothing
            for path in [p for p in ops.WQ_PATHS if p != "mma" or m <= 128]:
                y = ops.wq_linear(x, w4, None, launch, path=path)
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                entry = {"error": err, "ok": err <= TOLERANCE["float16"]}
                if entry["ok"]:
                    ms = time_ms(
                        lambda p=path, x=x, w=w4: ops.wq_linear(x, w, None, launch, path=p)
                    )
                    moved = (
                        w4.qweight.numel() * 4
                        + w4.scales.numel() * 4
                        + x.numel() * 2
                        + m * out_f * 2
                    )
                    entry.update(
                        ms=ms, speedup=base_ms / ms, bandwidth_fraction=moved / (ms / 1e3) / bw
                    )
                row["w4"][path] = entry
            row["w4"]["auto"] = dict(row["w4"][auto], path=auto)
            ref8 = F.linear(fake_quantize_activations(x, 8).float(), w8_dense.float())
            w8_paths = ["gemv", "gemm"] if m <= ops.GEMV_MAX_M else ["gemm", "intmm"]
            for path in w8_paths:
                y = ops.w8a8_linear(x, w8, None, launch, path=path)
                err = float((y.float() - ref8).abs().max() / ref8.abs().max())
                entry = {"error": err, "ok": err <= TOLERANCE["float16"]}
                if entry["ok"]:
                    ms = time_ms(
                        lambda p=path, x=x, w=w8: ops.w8a8_linear(x, w, None, launch, path=p)
                    )
                    entry.update(ms=ms, speedup=base_ms / ms)
                row["w8a8"][path] = entry
            auto8 = ops.w8a8_path(m, out_f)
            row["w8a8"]["auto"] = dict(row["w8a8"][auto8], path=auto8)
            row["w4a4"] = {}
            ref44 = F.linear(fake_quantize_activations(x, 4, None, 64, True).float(), w44_dense)
            for kind, w in w44.items():
                want = ref44 + (x.float() @ branch[0].T) @ branch[1].T if kind == "r32" else ref44
                y = ops.w4a4_linear(x, w, None, launch)
                err = float((y.float() - want).abs().max() / want.abs().max())
                entry = {"error": err, "ok": err <= TOLERANCE["float16"]}
                if entry["ok"]:
                    ms = time_ms(lambda x=x, w=w: ops.w4a4_linear(x, w, None, launch))
                    entry.update(ms=ms, speedup=base_ms / ms)
                    if row["w4"]["auto"].get("ms"):
                        entry["vs_w4a16"] = row["w4"]["auto"]["ms"] / ms
                row["w4a4"][kind] = entry
            rows.append(row)
            print(json.dumps(row), flush=True)
    from _lut_bench import run_lut

    lut_rows = run_lut(launch, bw, time_ms)
    sweep, sweep4 = [], []
    sweeps = set(LUT_SWEEPS if lut_sweep == "all" else (lut_sweep or "").split(",")) - {""}
    if "mma" in sweeps:
        from _lut_bench import sweep_mma

        sweep = sweep_mma(launch, time_ms)
    if "mma4" in sweeps:
        from _lut_bench import sweep_mma4

        sweep4 = sweep_mma4(launch, time_ms)
    result = {
        "device": torch.cuda.get_device_name(),
        "versions": f"torch {torch.__version__}, cupy {cupy.__version__}, CUDA runtime "
        f"{cupy.cuda.runtime.runtimeGetVersion()}, Python {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "copy_bandwidth_GBps": bw / 1e9,
        "timing": dict(TIMING),
        "rows": rows,
        "lut": lut_rows,
    }
    if sweep:
        result["lut_mma_sweep"] = sweep
    if sweep4:
        result["lut_mma4_sweep"] = sweep4
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "kernels_gpu.md").write_text(render(result))
    return result


def cell(entry: dict | None, bandwidth: bool = False, digits: int = 0) -> str:
    """A timed entry as table text: time (speed-up over fp16)[, bandwidth fraction]."""
    if not entry:
        return ""
    if not entry.get("ok"):
        return "failed" if "failed" in entry else f"WRONG (err {entry['error']:.1e})"
    text = f"{entry['ms'] * 1e3:.{digits}f} µs ({entry['speedup']:.2f}×)"
    if bandwidth:
        text += f", {entry['bandwidth_fraction']:.0%} bw"
    return text


def _timing(result: dict) -> str:
    timing = result.get("timing", {})
    if timing.get("mode") == "graph":
        return f"as CUDA-graph replays of {GRAPH_REPS} calls (no Python launch overhead)"
    return f"eagerly, Python launch overhead included ({timing.get('why', '')})"


def render(result: dict) -> str:
    """The body of the ``kernels-gpu`` section: header, tables, then their notes."""
    lines = [
        "Time of one call of qcore-kernels' CuPy kernels (W4A16, W8A8 and codebook weights) "
        "against fp16 `F.linear` (cuBLAS) in the same process. "
        f"Device: {result['device']}; {result['versions']}; {result['date']}; copy bandwidth "
        f"(read + write) {result['copy_bandwidth_GBps']:.0f} GB/s. Protocol: median of {RUNS} "
        f"runs, timed {_timing(result)}, every kernel checked against the torch reference "
        "first; speed-up over fp16 `F.linear` in parentheses, bw = fraction of the copy "
        "bandwidth.",
        "",
        "**W4A16** (4-bit weights, group 64, asymmetric) **and W8A8** (8-bit per-channel "
        "symmetric weights, 8-bit per-token activations), fp16 activations; [path] = the path "
        "`auto` picks"
        + (f"; measured in an earlier full run on the same device ({result['rows_from']})"
           if result.get("rows_from") else "") + ":",
        "",
        "| in × out | M | fp16 F.linear | W4A16 auto | W4A16 mma | W4A16 dequant+cuBLAS "
        "| W8A8 auto | W8A8 gemv | W8A8 GEMM | W8A8 _int_mm+epilogue |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        w4, w8 = r["w4"], r["w8a8"]
        lines.append(
            f"| {r['in']} × {r['out']} | {r['m']} | {r['fp16_ms'] * 1e3:.0f} µs | "
            f"{cell(w4.get('auto'), True)} [{w4['auto'].get('path')}] | "
            f"{cell(w4.get('mma'), True)} | {cell(w4.get('dequant'))} | "
            f"{cell(w8.get('auto'))} [{w8.get('auto', {}).get('path')}] | "
            f"{cell(w8.get('gemv'))} | {cell(w8.get('gemm'))} | {cell(w8.get('intmm'))} |"
        )
    from _lut_bench import render_lut, render_sweep, render_sweep4, render_table_sweep

    notes = [
        "W4A16 columns: mma = the tensor-core kernel with in-register dequantization "
        "(`qk_wq_mma`), timed up to M = 128; dequant+cuBLAS = dequantize, then the fp16 GEMM. "
        "W8A8 columns: gemv = dp4a GEMV (M <= 16), GEMM = int8 wmma tiles, _int_mm+epilogue = "
        "cuBLASLt's int8 GEMM through `torch._int_mm` plus our epilogue (M > 16). Bandwidth "
        "counts weight, activation and output bytes once.",
    ]
    text = "\n".join(lines) + "\n"
    for part, part_notes in (render_w4a4(result), render_lut(result), render_sweep4(result),
                             render_table_sweep(result), render_sweep(result)):
        text += part
        notes += part_notes
    return text + "\nNotes:\n\n" + "".join(f"- {note}\n" for note in notes)


def render_w4a4(result: dict) -> tuple[str, list[str]]:
    """The W4A4 table (rows that have W4A4 entries) and its note."""
    rows = [r for r in result["rows"] if r.get("w4a4")]
    if not rows:
        return "", []

    def versus(entry: dict | None) -> str:
        if not entry or not entry.get("vs_w4a16"):
            return ""
        return f"{entry['vs_w4a16']:.2f}×"

    lines = [
        "",
        "**W4A4** (`cupy-w4a4`: 4-bit symmetric weights and activations, groups of 64 on "
        "both sides, the activations quantized in each call), fp16 activations, against fp16 "
        "`F.linear` and W4A16 (`cupy-wq`, auto path):",
        "",
        "| in × out | M | fp16 F.linear | W4A16 auto | W4A4 | vs W4A16 "
        "| W4A4 + rank-32 branch | vs W4A16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w44 = r["w4a4"]
        lines.append(
            f"| {r['in']} × {r['out']} | {r['m']} | {r['fp16_ms'] * 1e3:.0f} µs | "
            f"{cell(r['w4'].get('auto'))} | {cell(w44.get('plain'))} | {versus(w44.get('plain'))} "
            f"| {cell(w44.get('r32'))} | {versus(w44.get('r32'))} |"
        )
    notes = [
        "W4A4 columns: the time of `qk_w4a4_quantize` (codes, scales and, with the branch, "
        "x·L1ᵀ) plus `qk_w4a4_gemm` (int4 `mma.sync` m16n8k64 per group of 64, the branch's "
        "second product and the bias in the epilogue); vs W4A16 = W4A16 auto time / W4A4 "
        "time. The reference adds the branch in float32 on the unquantized x.",
    ]
    return "\n".join(lines) + "\n", notes


def record(path: Path) -> None:
    from _common import merge_results, write_section

    result = json.loads(path.read_text())
    if not result["rows"]:  # a --only-lut run: the W4/W8A8 rows of the last full run
        previous = json.loads((Path(__file__).parent / "results" / "kernels_gpu.json").read_text())
        last = [r for r in previous if r.get("device") == result["device"] and r.get("rows")]
        if last:
            result["rows"] = last[-1]["rows"]
            result["rows_from"] = f"{last[-1]['date']}, {last[-1]['versions']}"
    if "lut_mma_sweep" not in result:  # the last sweep of qk_lut_mma on this device, if any
        previous = json.loads((Path(__file__).parent / "results" / "kernels_gpu.json").read_text())
        swept = [r for r in previous if r.get("device") == result["device"]
                 and r.get("lut_mma_sweep")]
        if swept:
            result["lut_mma_sweep"] = swept[-1]["lut_mma_sweep"]
            result["lut_mma_sweep_from"] = swept[-1].get("lut_mma_sweep_from", swept[-1]["date"])
    merge_results("kernels_gpu", [result], key="device")
    write_section("kernels-gpu", TITLE + render(result))


def render_recorded(write: bool = True) -> None:
    """The section from the last run recorded in ``results/kernels_gpu.json``."""
    from _common import RESULTS, write_section

    result = json.loads((RESULTS / "kernels_gpu.json").read_text())[-1]
    body = TITLE + render(result)
    print(body)
    if write:
        write_section("kernels-gpu", body)


TITLE = "## Kernels on a GPU (`benchmarks/kernels_gpu.py`)\n\n"


#: The LUT GEMVs whose launch parameters ``--lut-sweep`` can sweep (``mma4``: also each of
#: ``qcore_kernels.lut_ops.UNMEASURED_SWITCHES``).
LUT_SWEEPS = ("mma4", "mma")


def _lut_sweeps(text: str) -> str:
    names = text.split(",")
    unknown = [n for n in names if n not in LUT_SWEEPS + ("all",)]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown sweep {', '.join(unknown)}; one or more of {', '.join(LUT_SWEEPS)}, or all")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--out", type=Path, required=True)
    p_run.add_argument("--lut-sweep", nargs="?", const="mma4", type=_lut_sweeps,
                       help="also sweep LUT GEMVs' launch parameters: a comma-separated list "
                       f"of {', '.join(LUT_SWEEPS)}, or all (qk_lut_mma4 when given alone)")
    p_run.add_argument("--only-lut", action="store_true",
                       help="the codebook rows alone (record keeps the other rows on file)")
    p_rec = sub.add_parser("record")
    p_rec.add_argument("json", type=Path)
    p_ren = sub.add_parser("render", help="write the section from results/kernels_gpu.json "
                           "(the last recorded run) without running anything")
    p_ren.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.cmd == "run":
        run(args.out, lut_sweep=args.lut_sweep, only_lut=args.only_lut)
    elif args.cmd == "record":
        record(args.json)
    else:
        render_recorded(write=not args.no_write)


if __name__ == "__main__":
    main()
