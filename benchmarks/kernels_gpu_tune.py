"""Tiling sweep of the weight-only ``mma`` path and a breakdown of the W8A8 ``intmm`` path,
on a GPU: the data behind the defaults of ``qcore_kernels.ops`` (``mma_config``,
``DEQUANT_MIN_M``, ``w8a8_path``).

    python benchmarks/kernels_gpu_tune.py --out DIR    # writes DIR/kernels_tune.json

Timing as in ``kernels_gpu.py`` (CUDA-graph replays, median); every configuration is
checked against the torch reference before it is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels_gpu import SHAPES, copy_bandwidth, time_ms  # noqa: E402

SWEEP_TOKENS = (1, 4, 16)
CROSSOVER_TOKENS = (32, 64, 128, 256)


def sweep(out: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from qcore.builtin.int_packer import IntPacker
    from qcore.grid import dequantize_int
    from qcore_kernels import ops
    from qcore_kernels.layouts import to_w8a8, to_wq
    from qcore_kernels.runtime import cupy_launcher
    from qcore_kernels.testing import TOLERANCE, random_int_packed

    launch = cupy_launcher()
    bw = copy_bandwidth()
    gen = torch.Generator().manual_seed(0)
    result: dict = {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bw / 1e9,
                    "mma": [], "crossover": [], "w8a8": []}
    for in_f, out_f in SHAPES:
        packed = random_int_packed(out_f, in_f, 4, 64, seed=1)
        w4 = to_wq(packed, torch.float16, "cuda")
        dense = dequantize_int(IntPacker().unpack(packed)).half().cuda()
        moved = w4.qweight.numel() * 4 + w4.scales.numel() * 4
        for m in SWEEP_TOKENS + CROSSOVER_TOKENS:
            x = torch.randn(m, in_f, generator=gen).half().cuda()
            ref = F.linear(x.float(), dense.float())
            base = time_ms(lambda x=x, d=dense: F.linear(x, d))
            configs = []
            if m in SWEEP_TOKENS:
                for warps in (4, 8):
                    for n_tiles in (2, 4):
                        for per_sm in (16, 32, 64):
                            configs.append(ops.mma_config(m, out_f, in_f, 4, x.device,
                                                          per_sm, warps, n_tiles))
            else:
                for per_sm in (16, 32, 64):
                    configs.append(ops.mma_config(m, out_f, in_f, 4, x.device, per_sm))
            seen = set()
            for cfg in configs:
                if cfg in seen:
                    continue
                seen.add(cfg)
                y = ops.wq_linear(x, w4, None, launch, path="mma", config=cfg)
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                entry = {"in": in_f, "out": out_f, "m": m, "fp16_ms": base,
                         "config": [cfg.m_tiles, cfg.n_tiles, cfg.warps, cfg.splits], "error": err}
                if err <= TOLERANCE["float16"]:
                    ms = time_ms(lambda x=x, c=cfg, w=w4: ops.wq_linear(
                        x, w, None, launch, path="mma", config=c))
                    entry.update(ms=ms, speedup=base / ms,
                                 bandwidth_fraction=moved / (ms / 1e3) / bw)
                result["mma" if m in SWEEP_TOKENS else "crossover"].append(entry)
                print(json.dumps(entry), flush=True)
            if m not in SWEEP_TOKENS:
                ms = time_ms(lambda x=x, w=w4: ops.wq_linear(x, w, None, launch, path="dequant"))
                entry = {"in": in_f, "out": out_f, "m": m, "fp16_ms": base, "config": "dequant",
                         "ms": ms, "speedup": base / ms}
                result["crossover"].append(entry)
                print(json.dumps(entry), flush=True)
        # W8A8 at M = 2048: where the time goes
        packed8 = random_int_packed(out_f, in_f, 8, -1, symmetric=True, act_bits=8, seed=2)
        w8 = to_w8a8(packed8, "cuda")
        x = torch.randn(2048, in_f, generator=gen).half().cuda()
        xq, xs = ops.quantize_rows(x, None, launch)
        wt_copy = w8.wq.t().contiguous()
        acc = torch._int_mm(xq, w8.wq.t())
        y = torch.empty(2048, out_f, dtype=torch.float16, device="cuda")
        parts = breakdown(launch, x, w4, dense, w8, xq, xs, acc, wt_copy, y, out_f)
        parts.update({"in": in_f, "out": out_f})
        result["w8a8"].append(parts)
        print(json.dumps(parts), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_tune.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def breakdown(launch, x, w4, dense, w8, xq, xs, acc, wt_copy, y, out_f) -> dict:
    """W8A8 at M = 2048, part by part, and the dequantization kernel alone."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from qcore_kernels import ops

    scale_args = [acc, xs, w8.wscale, None, y, np.int32(x.shape[0]), np.int32(out_f)]
    scale_grid = (min(-(-x.shape[0] * out_f // 512), 65535), 1, 1)
    half = x[: x.shape[0] // 2]
    return {
        "fp16_ms": time_ms(lambda: F.linear(x, dense)),
        "quantize_rows_ms": time_ms(lambda: ops.quantize_rows(x, None, launch)),
        "int_mm_view_ms": time_ms(lambda: torch._int_mm(xq, w8.wq.t())),
        "int_mm_kn_contiguous_ms": time_ms(lambda: torch._int_mm(xq, wt_copy)),
        "epilogue_ms": time_ms(lambda: launch("qk_w8a8.cu", "qk_w8a8_scale<__half>", scale_grid,
                                              (256, 1, 1), scale_args)),
        "intmm_path_ms": time_ms(lambda: ops.w8a8_linear(x, w8, None, launch, path="intmm")),
        "dequant_kernel_ms": time_ms(lambda: ops.wq_linear(half, w4, None, launch, path="dequant"))
        - time_ms(lambda: F.linear(half, dense)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    sweep(parser.parse_args().out)


if __name__ == "__main__":
    main()
