"""llm-compressor as a peer in qcore's benchmarks: installed into its own virtual
environment and called as a program, on exactly the protocol of BENCHMARKS.md.

``python benchmarks/peers/llm_compressor.py install`` makes the environment (once; about 2
minutes and 1.3 GB), in ``$QCORE_CACHE/peers/llmcompressor-<version>``, with the torch
this machine's qcore uses (pinned, so pip never resolves a CUDA build). The benchmark
scripts then call :func:`run` for a peer setting in the same invocation as qcore's rows.

``run`` hands the peer the float model that qcore's benchmarks load (the embedded
SmolLM2, exported once by qcore) and the very token windows qcore calibrates and
evaluates on (128 x 512 and 97 x 512, saved with torch.save), and reads back one JSON line
(see ``_llmcompressor_child.py``, which runs inside the peer's environment).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "0.14.0.1"
TORCH = "2.13.0"
CHILD = Path(__file__).resolve().parent / "_llmcompressor_child.py"

#: The peer's settings, by their true names. ``observer`` None is the peer's default
#: weight observer (memoryless min-max); GPTQModifier's act-order default is "static"
#: (weight ordering, groups in natural order, no g_idx).
SETTINGS = {
    "GPTQModifier defaults (static act-order, min-max)": {"method": "gptq"},
    "GPTQModifier, memoryless_mse observer (static act-order)": {
        "method": "gptq", "observer": "memoryless_mse"},
    "QuantizationModifier (RTN, min-max)": {"method": "rtn"},
    "AWQModifier defaults (duo scaling) + QuantizationModifier (RTN)": {"method": "awq"},
    "AWQModifier, duo_scaling=False + QuantizationModifier (RTN)": {
        "method": "awq", "duo_scaling": False},
}


def venv() -> Path:
    from qcore.ops import cache_dir

    return cache_dir() / "peers" / f"llmcompressor-{VERSION}"


def python() -> Path:
    return venv() / "bin" / "python"


def installed_reason() -> str | None:
    """None when the peer's environment is ready, else why not and how to make it."""
    if not python().is_file():
        return (f"llm-compressor {VERSION} is not installed in {venv()}: run "
                "'python benchmarks/peers/llm_compressor.py install'")
    # Versions from the package metadata: importing llmcompressor logs to stdout.
    probe = subprocess.run([str(python()), "-c", "from importlib.metadata import version; "
                            "print(version('llmcompressor'), version('torch'))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{venv()} is broken ({probe.stderr.strip()[-300:]}); delete it and install again"
    found = probe.stdout.split()
    if found[:1] != [VERSION]:
        return f"{venv()} holds llm-compressor {found[:1]}, not {VERSION}"
    return None


def install() -> None:
    if installed_reason() is None:
        print(f"llm-compressor {VERSION} is ready in {venv()}")
        return
    venv().parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv())], check=True)
    subprocess.run([str(python()), "-m", "pip", "install", "--quiet", f"torch=={TORCH}",
                    f"llmcompressor=={VERSION}"], check=True)
    reason = installed_reason()
    if reason is not None:
        raise SystemExit(reason)
    print(f"llm-compressor {VERSION} installed in {venv()}")


def run(setting: str, *, bits: int, group_size: int, symmetric: bool, threads: int,
        save: Path | None = None) -> dict:
    """One peer setting under the protocol: the same model and token windows as qcore's
    rows. Returns ``quantize_s``, ``peak_rss_gb``, ``ppl``, ``bits_per_weight`` (every
    stored bit of the quantized linears in the peer's saved checkpoint, per weight, as
    ``qcore inspect`` counts qcore's) and ``peer_version``. With ``save``, the peer's
    compressed checkpoint is kept there, and ``reloaded_ppl`` is the perplexity of that
    directory as transformers reloads it (compressed-tensors' own decompression)."""
    import torch

    from qcore.assets import (
        calibration_windows,
        embedded_corpus,
        embedded_model_dir,
        eval_windows,
        load_model,
    )

    reason = installed_reason()
    if reason is not None:
        raise SystemExit(reason)
    spec = {**SETTINGS[setting], "bits": bits, "group_size": group_size,
            "symmetric": symmetric, "threads": threads}
    _, tokenizer = load_model()
    with tempfile.TemporaryDirectory() as tmp:
        calib, windows = Path(tmp) / "calib.pt", Path(tmp) / "eval.pt"
        torch.save(calibration_windows(tokenizer, embedded_corpus("calibration"), 128, 512),
                   calib)
        torch.save(eval_windows(tokenizer, embedded_corpus("eval"), 97, 512), windows)
        proc = subprocess.run([str(python()), "-P", str(CHILD), "--model",
                               str(embedded_model_dir()), "--calib", str(calib), "--eval",
                               str(windows), "--spec", json.dumps(spec),
                               *(["--save", str(save)] if save is not None else [])],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llm-compressor ({setting}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        install()
    else:
        raise SystemExit("usage: python benchmarks/peers/llm_compressor.py install")
