"""Round-to-nearest on the embedded SmolLM2-135M under the protocol of BENCHMARKS.md.

Each setting runs in its own process: load, quantize (timed: load to saved checkpoint),
perplexity on the eval split (97 x 512, fp32), peak RSS. Also the memory growth check:
quantization's peak RSS with the first 8 blocks vs all 30 blocks of the same model.

The peer, llm-compressor's QuantizationModifier (benchmarks/peers/llm_compressor.py), runs
in the same invocation on the same model and token windows ("peer: ..." settings).

    .venv/bin/python benchmarks/rtn_smollm2.py            # all settings, writes BENCHMARKS.md
    .venv/bin/python benchmarks/rtn_smollm2.py --quick    # 16 calibration windows, 8 eval windows
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, merge_results, peak_rss_gb, run_child, write_section  # noqa: E402

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

        return {"setting": setting, "measured": time.strftime("%Y-%m-%d"), **llm_compressor.run(
            PEER, threads=torch.get_num_threads(), **PEER_SETTINGS[setting])}
    start = time.perf_counter()
    model, tokenizer = load_model()
    for p in model.parameters():  # page in lazily loaded weights before measuring memory
        p.data.sum()
    if blocks is not None:
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = blocks
    rss_loaded = peak_rss_gb()
    result: dict = {"setting": setting, "measured": time.strftime("%Y-%m-%d")}
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="16 calibration windows, 8 eval windows")
    parser.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS),
                        help="measure only these (the others' stored results are kept)")
    parser.add_argument("--no-memory", action="store_true", help="skip the 8 vs 30 blocks runs")
    args = parser.parse_args()
    samples, windows = (16, 8) if args.quick else (128, 97)
    if args.child:
        print(json.dumps(child(args.child, samples, windows, args.blocks, not args.no_eval)))
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
    by_name = {r["setting"]: r for r in rows}
    rows = [r for r in rows if r["setting"] not in PEER_SETTINGS]
    memory = []
    for blocks in (() if args.no_memory else (8, 30)):
        r = run_child(me, ["--child", "W4 g64 asym", "--blocks", str(blocks), "--no-eval", *flags])
        r["blocks"] = blocks
        memory.append(r)
        print(json.dumps(r), flush=True)
    if not args.quick:
        memory = merge_results("rtn_smollm2_memory", memory, "blocks")
    lines = [
        "## Round-to-nearest on SmolLM2-135M (`benchmarks/rtn_smollm2.py`)",
        "",
        f"Machine of the latest invocation: {machine()}. Rows marked 'earlier' were "
        "measured on 2026-11-27 (transformers 5.24.0), each in its own run. Calibration "
        f"{samples} x 512, eval {windows} x 512 (fp32).",
        "Symmetric grids use compressed-tensors' convention: scale = max|w| / 7.5 at 4 bits "
        "(levels -8..7); scales stored in fp16, except the row 'fp32 scales' (as an fp32 model "
        "keeps them in compressed-tensors: SmolLM2's weights sit on a Q4_1 lattice, so whether "
        "a group's extreme lands on exactly -7.5 steps, and rounds to -8, depends on the scale's "
        "rounding). Time: load to saved checkpoint.",
        "",
        "Peer columns: llm-compressor 0.14.0.1's QuantizationModifier (min-max observer) on "
        "the same model and token windows, run in the same invocation as the qcore row "
        "beside it (both rows carry the date they were measured); time ratio = qcore / peer.",
        "",
        "| setting | measured | ppl | peer ppl | quantize wall time | peer time | time ratio "
        "| peak RSS | peer RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = f"{r['quantize_s']:.1f} s" if "quantize_s" in r else ""
        m = f"{r['peak_rss_gb']:.2f} GB" if "peak_rss_gb" in r else ""
        peer = by_name.get(f"peer: {PEER}, {r['setting']}")
        cells = ["", "", "", ""]  # peer ppl, peer time, time ratio, peer RSS
        if peer is not None and peer.get("measured") == r.get("measured") and "quantize_s" in r:
            cells = [f"{peer['ppl']:.3f}", f"{peer['quantize_s']:.1f} s",
                     f"{r['quantize_s'] / peer['quantize_s']:.2f}x",
                     f"{peer['peak_rss_gb']:.2f} GB"]
        lines.append(f"| {r['setting']} | {r.get('measured', 'earlier')} | {r['ppl']:.3f} | "
                     f"{cells[0]} | {t} | {cells[1]} | {cells[2]} | {m} | {cells[3]} |")
    if memory:
        lines += ["", "Weight-only RTN reads no calibration data (W4 g64 asym, the model cut to its "
                  "first N blocks, no eval): the peak grows only by what saving copies (the "
                  "checkpoint's tensors are serialized in memory once). The calibration path is "
                  "measured in the memory section below.", "",
                  "| blocks | RSS after load | peak RSS during quantize + save | difference |",
                  "|---|---|---|---|"]
    for r in memory:
        lines.append(f"| {r['blocks']} | {r['rss_after_load_gb']:.2f} GB | {r['peak_rss_gb']:.2f} GB | "
                     f"{r['peak_rss_gb'] - r['rss_after_load_gb']:.2f} GB |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("rtn", body)


if __name__ == "__main__":
    main()
