"""AWQ on the embedded SmolLM2-135M under the protocol of BENCHMARKS.md: ``awq`` (AWQ +
round-to-nearest), ``awq,awq-clip`` and ``awq,gptq``, next to RTN, GPTQ alone and the
llm-compressor reference measured on this machine (from the AWQ issue; the peer toolkit is
not installed in this workspace, and its AWQ needs a patch to run on a CPU-only torch).

Each setting runs in its own process: quantize (timed: model load to saved checkpoint),
perplexity (97 x 512, fp32), peak RSS.

    .venv/bin/python benchmarks/awq_smollm2.py [--settings NAME ...] [--no-write]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    machine,
    quantize_and_evaluate,
    settings_main,
    write_section,
)

W4A = dict(bits=4, group_size=64)
W4S = dict(bits=4, group_size=64, symmetric=True)
W3A = dict(bits=3, group_size=64)
#: name -> (pipeline, scheme, options); every setting calibrates in bf16 (the GPTQ rows of
#: BENCHMARKS.md show it costs no accuracy and saves a quarter of the time).
SETTINGS = {
    "awq W4 g64 asym": ("awq", W4A, {}),
    "awq,awq-clip W4 g64 asym": ("awq,awq-clip", W4A, {}),
    "awq,gptq W4 g64 asym": ("awq,gptq", W4A, {}),
    "awq W4 g64 sym": ("awq", W4S, {}),
    "awq,awq-clip W4 g64 sym": ("awq,awq-clip", W4S, {}),
    "awq,gptq W4 g64 sym": ("awq,gptq", W4S, {}),
    "awq W3 g64 asym": ("awq", W3A, {}),
    "awq,awq-clip W3 g64 asym": ("awq,awq-clip", W3A, {}),
    "awq,gptq W3 g64 asym": ("awq,gptq", W3A, {}),
    "awq,awq-clip,gptq W4 g64 asym": ("awq,awq-clip,gptq", W4A, {}),
    "awq,awq-clip,gptq W3 g64 asym": ("awq,awq-clip,gptq", W3A, {}),
    "awq,awq-clip,finetune W4 g64 asym": ("awq,awq-clip,finetune", W4A, {}),
    "awq,awq-clip,finetune W3 g64 asym": ("awq,awq-clip,finetune", W3A, {}),
}
#: RTN (BENCHMARKS.md) and llm-compressor 0.14.0.1 on this machine (from the AWQ issue):
#: RTN ppl, peer AWQ+RTN ppl / time / RSS, peer GPTQ ppl / time.
PEER = {
    "W4 g64 asym": ("19.27", "17.75", "1906 s", "5.0 GB", "17.33", "224 s"),
    "W4 g64 sym": ("21.62", "", "", "", "19.19", "209 s"),
    "W3 g64 asym": ("49.2", "", "", "", "28.61", ""),
}


def child(setting: str) -> dict:
    import torch

    from qcore.pipeline import Pipeline
    from qcore.scheme import Scheme

    names, scheme, options = SETTINGS[setting]
    pipeline = Pipeline.from_names(names, scheme=Scheme(**scheme), options=options)
    return quantize_and_evaluate(setting, pipeline, torch.bfloat16)


def main() -> None:
    rows, write = settings_main(__file__, "awq_smollm2", SETTINGS, child)
    lines = [
        "## AWQ on SmolLM2-135M (`benchmarks/awq_smollm2.py`)",
        "",
        f"Machine: {machine()}. Calibration 128 x 512 (bf16 autocast), eval 97 x 512 "
        "(fp32), group 64, integer zero points or symmetric. Time: model load to saved "
        "checkpoint. Peer: llm-compressor 0.14.0.1 measured on this machine earlier (from "
        "the AWQ issue; its AWQModifier needs a patch to run on a CPU-only torch, so it "
        "is not rerun here). The `awq` search scores each α by the group's output error "
        "over all calibration tokens (through the Hessian); `awq-clip` reuses the "
        "statistics `awq` rescaled, so it adds no observation pass. `awq,gptq`: AWQ's "
        "scales folded first, then GPTQ (act-order) on the scaled block. `finetune`: the "
        "built-in after-quantization transform with its defaults (4 epochs of Adam over the "
        "first 64 calibration rows per block; it tunes the float16 group scales, codes and "
        "zero points kept, against the unquantized model's block outputs). The two "
        "`finetune` rows were recorded 2026-11-28 02:19-02:41 UTC, one after the other with "
        "nothing else running (1-minute load average at most 2.17, logged every 10 s); the "
        "other rows 2026-11-27.",
        "",
        "| setting | qcore ppl | time | peak RSS | RTN ppl | peer AWQ ppl | peer AWQ time "
        "| peer AWQ RSS | peer GPTQ ppl | peer GPTQ time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peer = PEER.get(r["setting"].split(" ", 1)[1], ("",) * 6)
        lines.append(
            f"| {r['setting']} | {r['ppl']:.3f} | {r['quantize_s']:.0f} s | "
            f"{r['peak_rss_gb']:.2f} GB | " + " | ".join(peer) + " |"
        )
    body = "\n".join(lines)
    print(body)
    if write:
        write_section("awq", body)


if __name__ == "__main__":
    main()
