"""VPTQ on the embedded SmolLM2-135M under the protocol of BENCHMARKS.md, at about 2 and 3
bits per weight, next to GPTQ and RTN at 2 and 3 bits (group 64, integer zero points)
measured by this script in the same way.

Each setting runs in its own process: quantize (timed: model load to saved checkpoint),
perplexity (97 x 512, fp32), peak RSS, and the exact bits per weight of the quantized
linears (every stored bit: indices or codes with their padding, codebooks, scales,
zeros).

    .venv/bin/python benchmarks/vptq_smollm2.py [--settings NAME ...] [--no-write]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, quantize_and_evaluate, settings_main, write_section  # noqa: E402,I001

#: GPTQ with each group's range from its min and max (``shrink_steps=1``, GPTQ's default
#: until its range search became the default), next to GPTQ's defaults (act-order, range
#: search over 20 shrink factors).
MINMAX_GPTQ = {"act_order": True, "shrink_steps": 1}
#: name -> (pipeline, scheme, quantizer options or {step: options} for a pipeline of
#: several steps). GPTQ and VPTQ calibrate in bf16 (the GPTQ rows of BENCHMARKS.md show
#: it costs no accuracy); RTN reads no calibration data.
SETTINGS = {
    "vptq W2 (v4, 256 entries)": ("vptq", dict(bits=2), {}),
    "vptq W2 + finetune (4 epochs, 64 rows)": ("vptq,finetune", dict(bits=2), {}),
    "gptq W2 g64 asym, act-order, min-max grid": ("gptq", dict(bits=2, group_size=64),
                                                  MINMAX_GPTQ),
    "gptq W2 g64 asym, act-order, range search (its default)": (
        "gptq", dict(bits=2, group_size=64), {}),
    "gptq W2 g64 asym, range search + finetune": ("gptq,finetune", dict(bits=2, group_size=64),
                                                  {}),
    "rtn W2 g64 asym": ("rtn", dict(bits=2, group_size=64), {}),
    "vptq W3 (v3, 512 entries)": ("vptq", dict(bits=3), {}),
    "vptq W3 + finetune (4 epochs, 64 rows)": ("vptq,finetune", dict(bits=3), {}),
    "gptq W3 g64 asym, act-order, min-max grid": ("gptq", dict(bits=3, group_size=64),
                                                  MINMAX_GPTQ),
    "gptq W3 g64 asym, act-order, range search (its default)": (
        "gptq", dict(bits=3, group_size=64), {}),
    "gptq W3 g64 asym, range search + finetune": ("gptq,finetune", dict(bits=3, group_size=64),
                                                  {}),
    "rtn W3 g64 asym": ("rtn", dict(bits=3, group_size=64), {}),
}
FP32_PPL = 14.934
#: What the machine was doing during the recorded run (shared machine: see BENCHMARKS.md).
RUN_NOTE = ("Recorded 2026-11-27 21:04-21:31 UTC, one setting after another with nothing else "
            "running on this 2-core machine (1-minute load average at most 2.26, logged every "
            "10 s). An earlier run of this table (14:57-16:03 UTC, under load from other "
            "sessions) took 294 s and 350 s for VPTQ W2 and W3 and measured 47.348 and 20.457 "
            "(GPTQ min-max: 5813.6 and 30.912). The calibrated rows moved in between, as the "
            "`hessian` observer changed: it now rounds the float32 inputs of q/k/v and gate/up "
            "to bf16 as those linears do and centres each chunk before its bf16 product (GPTQ "
            "section). GPTQ W3 with its range search reproduces the GPTQ section's row "
            "(22.481) exactly. The two `+ finetune` rows (the built-in after-quantization "
            "transform `finetune` with its defaults: 4 epochs over the first 64 calibration "
            "rows, Adam at 1e-3 relative; plugins/vptq/README.md) were recorded 2026-11-28 "
            "00:22-00:43 UTC in the same way (1-minute load average at most 2.00); the W2 "
            "row's perplexity equals an earlier run's to the last digit. The GPTQ `+ "
            "finetune` rows (GPTQ's defaults, then `finetune`'s, which tunes the float16 "
            "group scales with codes and zero points kept) were recorded 00:58-01:16 UTC "
            "(load average at most 2.12).")


def child(setting: str) -> dict:
    import torch

    from qcore.pipeline import Pipeline
    from qcore.scheme import Scheme

    names, scheme, options = SETTINGS[setting]
    if options and "," not in names:
        options = {names: options}
    pipeline = Pipeline.from_names(names, scheme=Scheme(**scheme), options=options or None)
    return quantize_and_evaluate(setting, pipeline, None if names == "rtn" else torch.bfloat16)


def main() -> None:
    rows, write = settings_main(__file__, "vptq_smollm2", SETTINGS, child)
    lines = [
        "## VPTQ on SmolLM2-135M (`benchmarks/vptq_smollm2.py`)",
        "",
        f"Machine: {machine()}. Calibration 128 x 512 (bf16 autocast for VPTQ and GPTQ), "
        f"eval 97 x 512 (fp32); fp32 model: {FP32_PPL}. Bits per weight: every stored bit "
        "of the 210 quantized linears (VPTQ: packed indices with their padding to 32-index "
        "chunks, float16 codebooks and row scales; GPTQ/RTN: packed codes, a float16 scale "
        "and a uint8 zero point per group of 64, and GPTQ's act-order `g_idx`, int32 per "
        "input column), divided by their 106.2M weights, as `qcore inspect` counts it. "
        "VPTQ defaults: `--bits 2` = vectors of 4 columns, 256-entry "
        "codebook per layer; `--bits 3` = vectors of 3, 512 entries; k-means weighted by "
        "the Hessian diagonal, second-order (OBS) assignment with inverse-Hessian error "
        "feedback and act-order over vector positions, per-row scale; no residual or "
        "outlier stage (see plugins/vptq/README.md). Time: model load to saved "
        "checkpoint, also per million quantized weights. " + RUN_NOTE,
        "",
        "| setting | ppl | bits/weight | time | time per M weights | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_m = r["quantize_s"] / (r["quantized_weights"] / 1e6)
        lines.append(f"| {r['setting']} | {r['ppl']:.3f} | {r['bits_per_weight']:.3f} | "
                     f"{r['quantize_s']:.0f} s ({r['quantize_s'] / 60:.1f} min) | "
                     f"{per_m:.2f} s | {r['peak_rss_gb']:.2f} GB |")
    body = "\n".join(lines)
    print(body)
    if write:
        write_section("vptq", body)


if __name__ == "__main__":
    main()
