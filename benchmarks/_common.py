"""Helpers shared by the benchmark scripts: machine facts, subprocess runs, peak memory,
and writing a marked section of BENCHMARKS.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")


def run_child(script: Path, args: list[str]) -> dict:
    """Run one measurement in a fresh process (so peak memory is its own); it prints one
    JSON line last."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# qcore benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


RESULTS = Path(__file__).resolve().parent / "results"


def merge_results(name: str, rows: list[dict], key: str) -> list[dict]:
    """Merge freshly measured ``rows`` into ``results/<name>.json`` (by ``key``) and return
    every stored row, so that re-measuring one setting keeps the others' numbers."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    stored = json.loads(path.read_text()) if path.exists() else []
    fresh = {r[key] for r in rows}
    merged = [r for r in stored if r[key] not in fresh] + rows
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def quantize_and_evaluate(setting: str, pipeline: object, calib_dtype: object = None) -> dict:
    """One benchmark setting, under the protocol of BENCHMARKS.md: load the embedded model,
    quantize with ``pipeline`` on 128 x 512 calibration tokens, save a checkpoint (the time
    runs from loading to saved), then peak RSS and perplexity on 97 x 512 eval tokens."""
    from qcore.assets import calibration_windows, embedded_corpus, eval_windows, load_model
    from qcore.checkpoint import save
    from qcore.eval import perplexity
    from qcore.quantize import quantize

    start = time.perf_counter()
    model, tokenizer = load_model()
    calib = calibration_windows(tokenizer, embedded_corpus("calibration"), 128, 512)
    result = quantize(model, pipeline, calib, progress=False, calib_dtype=calib_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        save(model, Path(tmp) / "ck", tokenizer)
    seconds = time.perf_counter() - start
    peak = peak_rss_gb()
    ids = eval_windows(tokenizer, embedded_corpus("eval"), 97, 512)
    return {"setting": setting, "quantize_s": seconds, "peak_rss_gb": peak,
            **stored_size(result.blocks, model),
            "ppl": perplexity(model, ids, batch_size=8, progress=False)}


def stored_size(blocks: list, model: object = None) -> dict:
    """Bits per weight of the quantized linears, every stored bit of their packed tensors
    counted (codes or indices with padding, scales, zeros, codebooks) and of their
    low-rank branches (from ``model``'s quantized layers), as ``qcore inspect`` counts
    them; the number of weights they hold; and the branches' share of the bits."""
    bits = weights = branch = 0
    for block in blocks:
        for packed in block.layers.values():
            bits += sum(8 * t.numel() * t.element_size() for t in packed.tensors.values())
            weights += packed.shape[0] * packed.shape[1]
    if model is not None:
        from qcore.qlinear import QuantLinear

        for module in model.modules():  # type: ignore[attr-defined]
            if isinstance(module, QuantLinear) and module.lowrank_down is not None:
                branch += sum(8 * t.numel() * t.element_size()
                              for t in (module.lowrank_down, module.lowrank_up))
    return {"bits_per_weight": (bits + branch) / max(weights, 1), "quantized_weights": weights,
            "lowrank_bits_per_weight": branch / max(weights, 1)}


def settings_main(script: str, name: str, settings: dict, child) -> tuple[list[dict], bool]:
    """The command line of a settings benchmark: ``--child SETTING`` measures one setting
    (in its own process, printing one JSON line); otherwise each of ``--settings`` runs as
    a child, the results merge into ``results/<name>.json``, and every stored row is
    returned in ``settings`` order, with whether to write BENCHMARKS.md."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--settings", nargs="*", default=list(settings), choices=list(settings))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        raise SystemExit(0)
    rows = []
    for setting in args.settings:
        row = run_child(Path(script), ["--child", setting])
        print(json.dumps(row), flush=True)
        rows.append(row)
    stored = {r["setting"]: r for r in merge_results(name, rows, "setting")}
    return [stored[s] for s in settings if s in stored], not args.no_write


def compare_main(
    script: str, name: str, settings: dict, child, comparisons: list[tuple[str, str, str, str]]
) -> tuple[list[dict], bool, dict | None]:
    """``settings_main`` plus ``--compare``: run exactly the settings of ``comparisons``
    ((scheme, what is compared, qcore setting, peer setting)), qcore's and the peer's one
    after the other in this invocation, and record them with the machine and the load
    average around the run in ``results/<name>_compare.json``. Returns every stored row,
    whether to write BENCHMARKS.md, and the recorded comparison (None before the first)."""
    names = []
    for _, _, qcore, peer in comparisons:
        names += [n for n in (qcore, peer) if n not in names]
    compare_file = RESULTS / f"{name}_compare.json"
    if "--compare" not in sys.argv:
        rows, write = settings_main(script, name, settings, child)
    else:
        sys.argv.remove("--compare")
        sys.argv += ["--settings", *names]
        load_before = os.getloadavg()
        rows, write = settings_main(script, name, settings, child)
        compare_file.write_text(json.dumps({
            "machine": machine(), "load_before": load_before, "load_after": os.getloadavg(),
            "rows": [r for r in rows if r["setting"] in set(names)]}, indent=1) + "\n")
    compare = json.loads(compare_file.read_text()) if compare_file.exists() else None
    return rows, write, compare


def comparison_table(compare: dict, comparisons: list[tuple[str, str, str, str]]) -> list[str]:
    """The same-invocation table: each pair's perplexities, times, time ratio (qcore /
    peer) and peak RSS, then the load average of the run."""
    rows = {r["setting"]: r for r in compare["rows"]}
    lines = ["| scheme | comparison | qcore ppl | peer ppl | qcore time | peer time | "
             "time ratio | qcore RSS | peer RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for label, kind, qcore, peer in comparisons:
        if qcore not in rows or peer not in rows:
            continue
        q, r = rows[qcore], rows[peer]
        lines.append(f"| {label} | {kind} | {q['ppl']:.3f} | {r['ppl']:.3f} | "
                     f"{q['quantize_s']:.0f} s | {r['quantize_s']:.0f} s | "
                     f"{q['quantize_s'] / r['quantize_s']:.2f}x | {q['peak_rss_gb']:.2f} GB | "
                     f"{r['peak_rss_gb']:.2f} GB |")
    return lines


def load_line(compare: dict) -> str:
    return (f"{compare['machine']}; 1-minute load average {compare['load_before'][0]:.2f} "
            f"before and {compare['load_after'][0]:.2f} after the run")
