"""Codebook (vq) rows of the kernel benchmark (``kernels_gpu.py``): cupy-lut against fp16
F.linear.

Weights: ``qcore.testing.base.random_vq_weight`` with full 4096-row codebooks (12-bit
indices) and no residual/outliers/scale: v = 6 (2 bits per weight, plus the codebook) and
v = 4 (3 bits); built on the GPU (packing and the float32 reference included) to keep the
run short. Every timed path is checked against dequantize_vq + F.linear (float32) first.
Bandwidth counts the index streams, the codebooks, x and y once.
"""

from __future__ import annotations

import json
from collections.abc import Callable

LUT_SHAPES = ((4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096))  # (in, out)
LUT_TOKENS = (1, 16)
LUT_CONFIGS = (  # (label, vector size, index bits)
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


def run_lut(launch: Callable, bandwidth: float, time_ms: Callable) -> list[dict]:
    """The LUT rows; ``time_ms`` is the benchmark's timer (CUDA-graph replays), with an
    eager fallback (noted in the row) should a LUT call fail to be captured."""
    import torch
    import torch.nn.functional as F

    from qcore.builtin.vq_packer import VQPacker
    from qcore.codebook import bits_per_weight, dequantize_vq
    from qcore.interfaces import QuantizedWeight
    from qcore.testing.base import random_vq_weight
    from qcore_kernels.lut_layout import to_lut
    from qcore_kernels.lut_ops import lut_linear, lut_paths
    from qcore_kernels.testing import TOLERANCE

    rows = []
    gen = torch.Generator().manual_seed(0)
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
            for m in LUT_TOKENS:
                x = torch.randn(m, in_f, generator=gen).half().cuda()
                base_ms = time_ms(lambda x=x, d=dense16: F.linear(x, d))
                ref = F.linear(x.float(), dense)
                row = {"in": in_f, "out": out_f, "m": m, "config": label, "vector_size": v,
                       "index_bits": bits, "bits_per_weight": bits_per_weight(packed),
                       "fp16_ms": base_ms, "lut": {}}
                for path in lut_paths(m):
                    y = lut_linear(x, w, None, launch, path=path)
                    err = float((y.float() - ref).abs().max() / ref.abs().max())
                    entry = {"error": err, "ok": err <= TOLERANCE["float16"]}
                    if entry["ok"]:
                        call = lambda p=path, x=x, w=w: lut_linear(x, w, None, launch, path=p)  # noqa: E731
                        try:
                            ms = time_ms(call)
                        except Exception as exc:  # noqa: BLE001 - graph capture failed
                            torch.cuda.synchronize()
                            entry["timing"] = f"eager ({type(exc).__name__}: {exc})"[:200]
                            ms = _eager_ms(call)
                        moved = weight_bytes + x.numel() * 2 + m * out_f * 2
                        entry.update(ms=ms, speedup=base_ms / ms,
                                     bandwidth_fraction=moved / (ms / 1e3) / bandwidth)
                    row["lut"][path] = entry
                rows.append(row)
                print(json.dumps(row), flush=True)
            del q, packed, w, dense, dense16
            torch.cuda.empty_cache()
    return rows


def render_lut(result: dict) -> str:
    from kernels_gpu import cell

    if not result.get("lut"):
        return ""
    lines = [
        "",
        "Codebook (vq) weights, op `lut_linear` (provider `cupy-lut`): full 4096-row fp16 "
        "codebooks (12-bit indices), no residual or outliers; bits/weight counts every stored "
        "bit (indices, padding, codebook). gemv = LUT GEMV (codebook in shared memory), "
        "dequant = decode to fp16 + cuBLAS; bw counts indices, codebook, x and y.",
        "",
        "| in × out | M | vq | bits/weight | fp16 F.linear | LUT gemv | LUT dequant+cuBLAS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["lut"]:
        lines.append(
            f"| {r['in']} × {r['out']} | {r['m']} | {r['config']} | "
            f"{r['bits_per_weight']:.2f} | {r['fp16_ms'] * 1e3:.1f} µs | "
            f"{cell(r['lut'].get('gemv'), True, 1)} | {cell(r['lut'].get('dequant'), digits=1)} |"
        )
    return "\n".join(lines) + "\n"
