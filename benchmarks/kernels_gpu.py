"""Kernel benchmark of BENCHMARKS.md, on a GPU: the CuPy kernels against fp16 F.linear.

    python benchmarks/kernels_gpu.py run --out DIR     # on the GPU machine (gpu_check.sh)
    python benchmarks/kernels_gpu.py record DIR/kernels_gpu.json   # here: BENCHMARKS.md

Protocol: tokens M in {1, 16, 128, 2048}; (in, out) in {(4096, 4096), (4096, 14336),
(14336, 4096), (8192, 8192)}; fp16 activations; baseline torch.nn.functional.linear in
fp16 (cuBLAS) in the same process; CUDA events, warm-up first, median of 50 runs; every
timed kernel checked against the torch reference on the same inputs first. W4A16 is
group 64 asymmetric (the project's default scheme); every path of it is timed (gemv for
M <= 16, the fused tiled GEMM, dequantize + cuBLAS) and "auto" is what the provider picks.
Achieved bandwidth counts weight, activation and output bytes once, against a
device-to-device copy measured in the same run (bytes read + written).
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


def time_ms(fn, runs: int = RUNS, warmup: int = WARMUP) -> float:
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


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), runs=20, warmup=3)
    return 2 * src.numel() / (ms / 1e3)


def run(out: Path) -> dict:
    import torch
    import torch.nn.functional as F

    import cupy

    from qcore.grid import dequantize_int, fake_quantize_activations
    from qcore.builtin.int_packer import IntPacker
    from qcore_kernels import ops
    from qcore_kernels.layouts import to_w8a8, to_wq
    from qcore_kernels.runtime import cupy_launcher
    from qcore_kernels.testing import TOLERANCE, random_int_packed

    launch = cupy_launcher()
    bw = copy_bandwidth()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for in_f, out_f in SHAPES:
        packed = random_int_packed(out_f, in_f, 4, 64, seed=1)
        w4 = to_wq(packed, torch.float16, "cuda")
        w_dense = dequantize_int(IntPacker().unpack(packed)).half().cuda()
        packed8 = random_int_packed(out_f, in_f, 8, -1, symmetric=True, act_bits=8, seed=2)
        w8 = to_w8a8(packed8, "cuda")
        w8_dense = dequantize_int(IntPacker().unpack(packed8)).half().cuda()
        for m in TOKENS:
            x = torch.randn(m, in_f, generator=gen).half().cuda()
            base_ms = time_ms(lambda: F.linear(x, w_dense))
            ref = F.linear(x.float(), w_dense.float())
            row = {"in": in_f, "out": out_f, "m": m, "fp16_ms": base_ms, "w4": {}, "w8a8": {}}
            paths = (["gemv"] if m <= ops.GEMV_MAX_M else []) + ["gemm", "dequant"]
            auto = ops.wq_path(m)
            for path in paths:
                y = ops.wq_linear(x, w4, None, launch, path=path)
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                entry = {"error": err, "ok": err <= TOLERANCE["float16"]}
                if entry["ok"]:
                    ms = time_ms(lambda p=path: ops.wq_linear(x, w4, None, launch, path=p))
                    moved = w4.qweight.numel() * 4 + w4.scales.numel() * 4 + x.numel() * 2 + m * out_f * 2
                    entry.update(ms=ms, speedup=base_ms / ms, bandwidth_fraction=moved / (ms / 1e3) / bw)
                row["w4"][path] = entry
            row["w4"]["auto"] = dict(row["w4"][auto], path=auto)
            ref8 = F.linear(fake_quantize_activations(x, 8).float(), w8_dense.float())
            for path in (["gemv"] if m <= ops.GEMV_MAX_M else []) + ["gemm"]:
                y = ops.w8a8_linear(x, w8, None, launch, path=path)
                err = float((y.float() - ref8).abs().max() / ref8.abs().max())
                entry = {"error": err, "ok": err <= TOLERANCE["float16"]}
                if entry["ok"]:
                    ms = time_ms(lambda p=path: ops.w8a8_linear(x, w8, None, launch, path=p))
                    entry.update(ms=ms, speedup=base_ms / ms)
                row["w8a8"][path] = entry
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "versions": f"torch {torch.__version__}, cupy {cupy.__version__}, CUDA runtime "
                    f"{cupy.cuda.runtime.runtimeGetVersion()}, Python {platform.python_version()}",
        "date": datetime.date.today().isoformat(),
        "copy_bandwidth_GBps": bw / 1e9,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "kernels_gpu.md").write_text(render(result))
    return result


def _cell(entry: dict | None, bandwidth: bool = False) -> str:
    if not entry:
        return ""
    if not entry.get("ok"):
        return f"WRONG (err {entry['error']:.1e})"
    text = f"{entry['ms'] * 1e3:.0f} µs ({entry['speedup']:.2f}×)"
    if bandwidth:
        text += f", {entry['bandwidth_fraction']:.0%} bw"
    return text


def render(result: dict) -> str:
    lines = [
        f"Device: {result['device']}; {result['versions']}; {result['date']}. Copy bandwidth "
        f"(read + write) {result['copy_bandwidth_GBps']:.0f} GB/s. Median of {RUNS} runs; "
        "speed-up over fp16 `F.linear` in parentheses; bw = fraction of the copy bandwidth.",
        "",
        "| in × out | M | fp16 F.linear | W4A16 auto | W4 gemv | W4 tiled GEMM | W4 dequant+cuBLAS | W8A8 gemv | W8A8 GEMM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        w4, w8 = r["w4"], r["w8a8"]
        lines.append(
            f"| {r['in']} × {r['out']} | {r['m']} | {r['fp16_ms'] * 1e3:.0f} µs | "
            f"{_cell(w4.get('auto'), True)} [{w4['auto'].get('path')}] | {_cell(w4.get('gemv'), True)} | "
            f"{_cell(w4.get('gemm'))} | {_cell(w4.get('dequant'))} | {_cell(w8.get('gemv'))} | {_cell(w8.get('gemm'))} |")
    return "\n".join(lines) + "\n"


def record(path: Path) -> None:
    from _common import merge_results, write_section

    result = json.loads(path.read_text())
    merge_results("kernels_gpu", [result], key="device")
    write_section("kernels-gpu", "## Kernels on a GPU (`benchmarks/kernels_gpu.py`)\n\n" + render(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--out", type=Path, required=True)
    p_rec = sub.add_parser("record")
    p_rec.add_argument("json", type=Path)
    args = parser.parse_args()
    if args.cmd == "run":
        run(args.out)
    else:
        record(args.json)


if __name__ == "__main__":
    main()
