"""Round-to-nearest on the embedded SmolLM2-135M under the protocol of BENCHMARKS.md.

Each setting runs in its own process: load, quantize (timed: load to saved checkpoint),
perplexity on the eval split (97 x 512, fp32), peak RSS. Also the memory growth check:
quantization's peak RSS with the first 8 blocks vs all 30 blocks of the same model.

The peer, llm-compressor's QuantizationModifier (benchmarks/peers/llm_compressor.py), runs
in the same invocation on the same model and token windows ("peer: ..." settings).

    .venv/bin/python benchmarks/rtn_smollm2.py            # all settings, writes BENCHMARKS.md
    .venv/bin/python benchmarks/rtn_smollm2.py --quick    # 16 calibration windows, 8 eval windows
    .venv/bin/python benchmarks/rtn_smollm2.py --render   # BENCHMARKS.md from results/ only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402,I001
    RESULTS, machine, merge_results, peak_rss_gb, run_child, write_section)

SETTINGS = {
    "fp32": None,
    "W4 g64 asym": dict(bits=4, group_size=64, symmetric=False),
    "W4 g64 sym": dict(bits=4, group_size=64, symmetric=True),
    "W4 g64 sym, fp32 scales": dict(bits=4, group_size=64, symmetric=True),
    "W3 g64 asym": dict(bits=3, group_size=64, symmetric=False),
    "W4 g128 asym": dict(bits=4, group_size=128, symmetric=False),
    "W8 per-channel sym": dict(bits=8, group_size=-1, symmetric=True),
    "W8A8 per-channel sym, per-token act": dict(bits=8, group_size=-1, symmetric=True, act_bits=8),
}
PEER = "QuantizationModifier (RTN, min-max)"
#: The peer's rows, run by benchmarks/peers/llm_compressor.py: "peer: <setting>, <scheme>".
PEER_SETTINGS = {f"peer: {PEER}, {name}": SETTINGS[name]
                 for name in ("W4 g64 asym", "W4 g64 sym", "W3 g64 asym")}
SETTINGS.update(PEER_SETTINGS)
#: How each row is named in BENCHMARKS.md: every setting in full (RTN's scales are float16
#: unless named; asymmetric grids have uint8 zero points).
LABELS = {
    "fp32": "fp32 (not quantized)",
    "W4 g64 asym": "W4 g64 asym, fp16 scales",
    "W4 g64 sym": "W4 g64 sym, fp16 scales",
    "W4 g64 sym, fp32 scales": "W4 g64 sym, fp32 scales",
    "W3 g64 asym": "W3 g64 asym, fp16 scales",
    "W4 g128 asym": "W4 g128 asym, fp16 scales",
    "W8 per-channel sym": "W8 per-channel sym, fp16 scales",
    "W8A8 per-channel sym, per-token act": (
        "W8A8 per-channel sym, fp16 scales, int8 activations with dynamic per-token scales"),
}
#: Rows stored without a date (settings and memory) were measured on this day, each in its
#: own invocation (transformers 5.24.0).
UNDATED = "2026-11-27"
#: The machine of rows stored without one (the script records it per row since): the line
#: BENCHMARKS.md recorded for the 2026-12-07 invocation.
RECORDED_MACHINE = ("AMD EPYC, 2 cores, torch 2.13.0+cpu (2 threads), transformers 5.25.0, "
                    "Python 3.11.7, 2026-12-07")


def child(setting: str, samples: int, windows: int, blocks: int | None, evaluate: bool) -> dict:
    import torch

    from qcore.assets import calibration_windows, embedded_corpus, eval_windows, load_model
    from qcore.checkpoint import save
    from qcore.eval import perplexity
    from qcore.pipeline import Pipeline
    from qcore.quantize import quantize
    from qcore.scheme import Scheme

    torch.manual_seed(0)
    if setting in PEER_SETTINGS:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
        import llm_compressor

        return {"setting": setting, "measured": time.strftime("%Y-%m-%d"), "machine": machine(),
                **llm_compressor.run(PEER, threads=torch.get_num_threads(),
                                     **PEER_SETTINGS[setting])}
    start = time.perf_counter()
    model, tokenizer = load_model()
    for p in model.parameters():  # page in lazily loaded weights before measuring memory
        p.data.sum()
    if blocks is not None:
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = blocks
    rss_loaded = peak_rss_gb()
    result: dict = {"setting": setting, "measured": time.strftime("%Y-%m-%d"),
                    "machine": machine()}
    scheme = SETTINGS[setting]
    if scheme is not None:
        calib = calibration_windows(tokenizer, embedded_corpus("calibration"), samples, 512)
        options = {"rtn": {"scale_dtype": "float32"}} if "fp32 scales" in setting else None
        quantize(model, Pipeline.from_names("rtn", scheme=Scheme(**scheme), options=options), calib,
                 progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            save(model, Path(tmp) / "ck", tokenizer)
        result["quantize_s"] = time.perf_counter() - start
        result["peak_rss_gb"] = peak_rss_gb()
        result["rss_after_load_gb"] = rss_loaded
    if evaluate:
        ids = eval_windows(tokenizer, embedded_corpus("eval"), windows, 512)
        result["ppl"] = perplexity(model, ids, batch_size=8, progress=False)
    return result


def render(rows: list[dict], memory: list[dict], samples: int, windows: int) -> str:
    """The ``rtn`` section of BENCHMARKS.md from stored (or just measured) rows."""
    by_name = {r["setting"]: r for r in rows}
    own = [r for r in rows if r["setting"] not in PEER_SETTINGS]
    machines = [r["machine"] for r in rows if "machine" in r]
    latest = max(machines, key=lambda m: m[-10:]) if machines else RECORDED_MACHINE
    lines = [
        "## Round-to-nearest on SmolLM2-135M (`benchmarks/rtn_smollm2.py`)",
        "",
        "Perplexity, quantization time and peak memory of round-to-nearest weight "
        "quantization, next to llm-compressor 0.14.0.1's QuantizationModifier (min-max "
        "observer) run in the same invocation on the same model and token windows. "
        f"Machine of the latest invocation: {latest}. Protocol: calibration {samples} x 512, "
        f"eval {windows} x 512 (fp32), one process per setting; time = model load to saved "
        "checkpoint, time ratio = qcore / peer.",
        "",
        "| setting | measured | ppl | peer ppl | quantize wall time | peer time | time ratio "
        "| peak RSS | peer RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in own:
        t = f"{r['quantize_s']:.1f} s" if "quantize_s" in r else ""
        m = f"{r['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in r else ""
        peer = by_name.get(f"peer: {PEER}, {r['setting']}")
        cells = ["", "", "", ""]  # peer ppl, peer time, time ratio, peer RSS
        if peer is not None and peer.get("measured") == r.get("measured") and "quantize_s" in r:
            cells = [f"{peer['ppl']:.3f}", f"{peer['quantize_s']:.1f} s",
                     f"{r['quantize_s'] / peer['quantize_s']:.2f}x",
                     f"{peer['peak_rss_gb']:.2f} GB"]
        lines.append(f"| {LABELS.get(r['setting'], r['setting'])} | "
                     f"{r.get('measured', UNDATED)} | {r['ppl']:.3f} | {cells[0]} | {t} | "
                     f"{cells[1]} | {cells[2]} | {m} | {cells[3]} |")
    if memory:
        lines += ["", "**Memory by model depth** (W4 g64 asym, fp16 scales, the model cut to "
                  "its first N blocks, no eval):", "",
                  "| blocks | measured | RSS after load | peak RSS during quantize + save "
                  "| difference |", "|---|---|---|---|---|"]
    for r in memory:
        lines.append(f"| {r['blocks']} | {r.get('measured', UNDATED)} | "
                     f"{r['rss_after_load_gb']:.2f} GB | "
                     f"{r['peak_rss_gb']:.2f} GB | "
                     f"{r['peak_rss_gb'] - r['rss_after_load_gb']:.2f} GB |")
    lines += [
        "",
        "Notes:",
        "",
        f"- Rows dated {UNDATED} were measured each in its own invocation (transformers "
        "5.24.0); compare their times only with rows of the same day. The peer's cells are "
        "filled only where it ran in the same invocation as the qcore row beside it.",
        "- Symmetric grids use compressed-tensors' convention: scale = max|w| / 7.5 at 4 bits "
        "(levels -8..7). Scales are stored in fp16 except in the 'fp32 scales' row, which "
        "keeps them as an fp32 model does in compressed-tensors: SmolLM2's weights sit on a "
        "Q4_1 lattice, so whether a group's extreme lands on exactly -7.5 steps, and rounds "
        "to -8, depends on the scale's rounding.",
        "- Weight-only RTN reads no calibration data, so with the model cut to fewer blocks "
        "the peak grows only by what saving copies (the checkpoint's tensors are serialized "
        "in memory once). The calibration path is measured in the memory section below.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="16 calibration windows, 8 eval windows")
    parser.add_argument("--no-write", action="store_true",
                        help="print, do not update BENCHMARKS.md")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS),
                        help="measure only these (the others' stored results are kept)")
    parser.add_argument("--no-memory", action="store_true", help="skip the 8 vs 30 blocks runs")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write the section from results/ alone")
    args = parser.parse_args()
    samples, windows = (16, 8) if args.quick else (128, 97)
    if args.child:
        print(json.dumps(child(args.child, samples, windows, args.blocks, not args.no_eval)))
        return
    if args.render:
        stored = {r["setting"]: r for r in json.loads((RESULTS / "rtn_smollm2.json").read_text())}
        memory = json.loads((RESULTS / "rtn_smollm2_memory.json").read_text())
        body = render([stored[s] for s in SETTINGS if s in stored], memory, samples, windows)
        print(body)
        if not args.no_write:
            write_section("rtn", body)
        return
    me = Path(__file__)
    flags = ["--quick"] if args.quick else []
    rows = []
    for setting in args.settings:
        r = run_child(me, ["--child", setting, *flags])
        rows.append(r)
        print(json.dumps(r), flush=True)
    if not args.quick:
        stored = {r["setting"]: r for r in merge_results("rtn_smollm2", rows, "setting")}
        rows = [stored[s] for s in SETTINGS if s in stored]
    memory = []
    for blocks in (() if args.no_memory else (8, 30)):
        r = run_child(me, ["--child", "W4 g64 asym", "--blocks", str(blocks), "--no-eval", *flags])
        r["blocks"] = blocks
        memory.append(r)
        print(json.dumps(r), flush=True)
    if not args.quick:
        memory = merge_results("rtn_smollm2_memory", memory, "blocks")
    body = render(rows, memory, samples, windows)
    print(body)
    if not args.no_write:
        write_section("rtn", body)


if __name__ == "__main__":
    main()
