"""Checkpoints llm-compressor wrote, read by qcore: the embedded SmolLM2-135M quantized to
W4A16 g64 by llm-compressor 0.14.0.1 (benchmarks/peers/llm_compressor.py, its own
virtual environment) and saved compressed (compressed-tensors ``pack-quantized``), then
loaded with ``qcore.load`` and evaluated under the protocol of BENCHMARKS.md.

The perplexity of the peer's checkpoint as transformers reloads it (compressed-tensors'
own decompression, in the peer's environment) sits beside qcore's, on the same 97 x 512
windows, with qcore's torch provider (the reference) and with the kernel qcore picks on
this machine.

    .venv/bin/python benchmarks/peers/llm_compressor.py install     # once
    .venv/bin/python benchmarks/interop_smollm2.py [--settings NAME ...] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from _common import RESULTS, machine, write_section  # noqa: E402,I001

RECORD = RESULTS / "interop_smollm2.json"
#: name -> (peer setting, symmetric)
SETTINGS = {
    "W4A16 g64 sym, QuantizationModifier (RTN, min-max)": (
        "QuantizationModifier (RTN, min-max)", True),
    "W4A16 g64 asym, GPTQModifier defaults (static act-order)": (
        "GPTQModifier defaults (static act-order, min-max)", False),
}


def measure(name: str, folder: Path) -> dict:
    import llm_compressor
    import torch

    import qcore
    from qcore.assets import embedded_corpus, eval_windows, load_model
    from qcore.checkpoint_info import inspect_checkpoint
    from qcore.eval import perplexity
    from qcore.qlinear import QuantLinear

    setting, symmetric = SETTINGS[name]
    if folder.exists():
        shutil.rmtree(folder)
    peer = llm_compressor.run(setting, bits=4, group_size=64, symmetric=symmetric,
                              threads=torch.get_num_threads(), save=folder)
    _, tokenizer = load_model()
    windows = eval_windows(tokenizer, embedded_corpus("eval"), 97, 512)
    row = {"setting": name, "peer_ppl": peer["ppl"], "peer_reloaded_ppl": peer["reloaded_ppl"],
           "peer_version": peer["peer_version"],
           "bits_per_weight_qcore": inspect_checkpoint(folder)["bits_per_weight"],
           "bits_per_weight_peer": peer["bits_per_weight"]}
    for kernel in ("torch", "auto"):
        model = qcore.load(folder)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        for layer in layers:
            layer.kernel = kernel
        row[f"qcore_ppl_{kernel}"] = perplexity(model, windows, batch_size=8, progress=False)
        row[f"providers_{kernel}"] = dict(Counter(m.provider_name for m in layers))
    return row


def render(record: dict) -> str:
    rows = record["rows"]
    lines = [
        "## Checkpoints llm-compressor wrote, evaluated by qcore (`benchmarks/interop_smollm2.py`)",
        "",
        "SmolLM2-135M quantized and saved compressed by llm-compressor "
        f"{rows[0]['peer_version']}, then loaded by `qcore.load` without conversion; "
        f"eval 97 x 512 (fp32). {record['machine']}.",
        "",
        "| checkpoint | peer ppl (reloaded by transformers) | qcore ppl, torch provider | "
        "qcore ppl, kernel auto (providers) | bits / weight (qcore's storage) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        providers = ", ".join(f"{k} x{v}" for k, v in r["providers_auto"].items())
        lines.append(f"| {r['setting']} | {r['peer_reloaded_ppl']:.3f} | "
                     f"{r['qcore_ppl_torch']:.3f} | {r['qcore_ppl_auto']:.3f} ({providers}) | "
                     f"{r['bits_per_weight_qcore']:.3f} |")
    lines += [
        "",
        "Notes: the peer's perplexity is computed in its own environment on its checkpoint "
        "as transformers reloads it (compressed-tensors' decompression to float32), on the "
        "same token windows. qcore imports the checkpoint's packed codes, scales and zero "
        "points into its `int` format (scales kept in the checkpoint's dtype) and runs them "
        "on its own kernels; 'kernel auto' is the provider qcore picks on this CPU. Bits "
        "per weight count every stored bit of the quantized linears as qcore holds them."]
    return "\n".join(lines)


def main() -> None:
    from qcore.assets import cache_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", action="store_true", help="rewrite the section from the "
                        "recorded rows, measuring nothing")
    args = parser.parse_args()
    rows = []
    for name in [] if args.render else args.settings:
        folder = cache_dir() / "interop" / f"llmcompressor-smollm2-{list(SETTINGS).index(name)}"
        row = measure(name, folder)
        print(json.dumps(row), flush=True)
        rows.append(row)
    stored = (json.loads(RECORD.read_text())["rows"] if RECORD.exists() else [])
    rows = [r for r in stored if r["setting"] not in {x["setting"] for x in rows}] + rows
    record = {"machine": machine(), "rows": rows}
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    body = render(record)
    print(body)
    if not args.no_write:
        write_section("interop", body)


if __name__ == "__main__":
    main()
