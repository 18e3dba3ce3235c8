"""VPTQ on the embedded SmolLM2-135M under the protocol of BENCHMARKS.md, at about 2 and 3
bits per weight, next to GPTQ and RTN at 2 and 3 bits (group 64, integer zero points)
measured by this script in the same way.

Each setting runs in its own process: quantize (timed: model load to saved checkpoint),
perplexity (97 x 512, fp32), peak RSS, and the exact bits per weight of the quantized
linears (every stored bit: indices or codes with their padding, codebooks, scales,
zeros).

    .venv/bin/python benchmarks/vptq_smollm2.py [--settings NAME ...] [--no-write]
    .venv/bin/python benchmarks/vptq_smollm2.py --settings   # BENCHMARKS.md from results/ only
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
FINETUNE = "+ finetune (4 epochs over 64 rows)"
#: How each row is named in BENCHMARKS.md: every setting in full.
LABELS = {
    **{f"vptq W{b} ({v}, {e} entries)": f"VPTQ W{b}: vectors of {v[1]}, {e}-entry codebook "
       "per layer, row scales, bf16 calibration" for b, v, e in ((2, "v4", 256), (3, "v3", 512))},
    **{f"vptq W{b} + finetune (4 epochs, 64 rows)": f"VPTQ W{b} (vectors of {v}, {e} entries), "
       f"bf16 calibration, {FINETUNE}" for b, v, e in ((2, 4, 256), (3, 3, 512))},
    **{f"gptq W{b} g64 asym, act-order, min-max grid": f"GPTQ W{b} g64 asym, act-order, "
       "min-max ranges, bf16 calibration" for b in (2, 3)},
    **{f"gptq W{b} g64 asym, act-order, range search (its default)": f"GPTQ W{b} g64 asym, "
       "act-order, range search (GPTQ's defaults), bf16 calibration" for b in (2, 3)},
    **{f"gptq W{b} g64 asym, range search + finetune": f"GPTQ W{b} g64 asym, act-order, range "
       f"search (GPTQ's defaults), bf16 calibration, {FINETUNE}" for b in (2, 3)},
    **{f"rtn W{b} g64 asym": f"RTN W{b} g64 asym, fp16 scales (no calibration)" for b in (2, 3)},
}
#: The machine of rows stored without one (the script records it per row since): the line
#: BENCHMARKS.md recorded when the table was last written.
RECORDED_MACHINE = ("AMD EPYC, 2 cores, torch 2.13.0+cpu (2 threads), transformers 5.24.0, "
                    "Python 3.11.7, 2026-11-28")
#: Notes under the table: how the stored rows were recorded (shared machine).
NOTES = [
    "Bits per weight: every stored bit of the 210 quantized linears (VPTQ: packed indices "
    "with their padding to 32-index chunks, float16 codebooks and row scales; GPTQ/RTN: "
    "packed codes, a float16 scale and a uint8 zero point per group of 64, and GPTQ's "
    "act-order `g_idx`, int32 per input column), divided by their 106.2M weights, as `qcore "
    "inspect` counts it. Time per M weights: the time per million quantized weights.",
    "VPTQ defaults: `--bits 2` = vectors of 4 columns, 256-entry codebook per layer; "
    "`--bits 3` = vectors of 3, 512 entries; k-means weighted by the Hessian diagonal, "
    "second-order (OBS) assignment with inverse-Hessian error feedback and act-order over "
    "vector positions, per-row scale; no residual or outlier stage (plugins/vptq/README.md).",
    "`finetune`: the after-quantization transform (built into qcore when these rows were "
    "recorded, `qcore-plugin-finetune` now) with its defaults: 4 epochs over the first 64 "
    "calibration rows, Adam at 1e-3 relative (plugins/finetune/README.md); after GPTQ it "
    "tunes the float16 group scales, codes and zero points kept.",
    "Recorded one setting after another with nothing else running on this 2-core machine "
    "(1-minute load average logged every 10 s): the rows without `finetune` 2026-11-27 "
    "21:04-21:31 UTC (load average at most 2.26); the VPTQ `+ finetune` rows 2026-11-28 "
    "00:22-00:43 UTC (at most 2.00; the W2 row's perplexity equals an earlier run's to the "
    "last digit); the GPTQ `+ finetune` rows 00:58-01:16 UTC (at most 2.12).",
    "GPTQ W3 with its range search reproduces the GPTQ section's row (22.481) exactly.",
    "History: an earlier run of this table (2026-11-27 14:57-16:03 UTC, under load from other "
    "sessions) took 294 s and 350 s for VPTQ W2 and W3 and measured 47.348 and 20.457 (GPTQ "
    "min-max: 5813.6 and 30.912). The calibrated rows moved since, as the `hessian` observer "
    "changed: it now rounds the float32 inputs of q/k/v and gate/up to bf16 as those linears "
    "do and centres each chunk before its bf16 product (GPTQ section).",
]


def child(setting: str) -> dict:
    import torch

    from qcore.pipeline import Pipeline
    from qcore.scheme import Scheme

    names, scheme, options = SETTINGS[setting]
    if options and "," not in names:
        options = {names: options}
    pipeline = Pipeline.from_names(names, scheme=Scheme(**scheme), options=options or None)
    return {**quantize_and_evaluate(setting, pipeline,
                                    None if names == "rtn" else torch.bfloat16),
            "machine": machine()}


def render(rows: list[dict]) -> str:
    """The ``vptq`` section of BENCHMARKS.md from stored (or just measured) rows."""
    machines = sorted({r.get("machine", RECORDED_MACHINE) for r in rows}, key=lambda m: m[-10:])
    lines = [
        "## VPTQ on SmolLM2-135M (`benchmarks/vptq_smollm2.py`)",
        "",
        "Perplexity, exact bits per weight, time and peak memory of VPTQ at about 2 and 3 bits "
        "per weight, next to GPTQ and RTN at 2 and 3 bits (group 64, integer zero points) "
        f"measured by this script in the same way. Machine: {'; '.join(machines)}. Protocol: "
        "calibration 128 x 512 (bf16 autocast for VPTQ and GPTQ), eval 97 x 512 (fp32; fp32 "
        f"model: {FP32_PPL}), one process per setting; time = model load to saved checkpoint.",
        "",
        "| setting | ppl | bits/weight | time | time per M weights | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_m = r["quantize_s"] / (r["quantized_weights"] / 1e6)
        lines.append(f"| {LABELS.get(r['setting'], r['setting'])} | {r['ppl']:.3f} | "
                     f"{r['bits_per_weight']:.3f} | "
                     f"{r['quantize_s']:.0f} s ({r['quantize_s'] / 60:.1f} min) | "
                     f"{per_m:.2f} s | {r['peak_rss_gb']:.2f} GB |")
    lines += ["", "Notes:", "", *(f"- {note}" for note in NOTES)]
    return "\n".join(lines)


def main() -> None:
    rows, write = settings_main(__file__, "vptq_smollm2", SETTINGS, child)
    body = render(rows)
    print(body)
    if write:
        write_section("vptq", body)


if __name__ == "__main__":
    main()
