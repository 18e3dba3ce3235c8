"""Speed of quantized models on the CPU: prefill and decode tokens/s, and perplexity
evaluation time, for the float model and each int checkpoint kind, with torchao's int4
weight-only CPU path as the peer, all in one invocation.

Models:
- ``smollm2``: the embedded SmolLM2-135M-Instruct (its tied 49152 x 576 head stays fp32, as
  in every qcore checkpoint; it is a fifth of the float model's weights).
- ``llama1b``: a Llama-architecture model of TinyLlama-1.1B's shapes (hidden 2048, 22
  layers, MLP 5632, 32 heads, 4 KV heads, vocabulary 32000), random weights from seed 0;
  decode there is memory-bound.

Each (model, setting) runs in its own process, one after another: build the model, quantize
it with RTN (the kernels' speed depends on the format, not on the method that chose the
codes), then:
- prefill: one forward of a 512-token prompt, tokens/s;
- decode: batch 1, exactly 128 new tokens (greedy) after a 64-token prompt, tokens/s of the
  127 tokens after the first; one warm-up generation first;
- both best of ``--repeats`` (3) on SmolLM2, one run on the 1.1B model;
- eval (SmolLM2 only): perplexity of 8 eval windows x 512 tokens at batch 8, seconds.

The peer, ``torchao int4``: torchao's CPU int4 weight-only path
(``PrototypeInt4WeightOnlyConfig``, group 64: torch's int4 CPU operator, as ``cpu-int4``
uses) applied to the float model's linear layers except the head, like qcore. torchao is
installed at a pinned version, without dependencies, into ``$QCORE_CACHE/peers`` (the
project's environment is not touched).

The second peer on SmolLM2, ``llama.cpp Q4_1``: the embedded model's own GGUF file, whose
every matrix (head and embeddings too) is Q4_1 (4-bit codes in groups of 32 with a scale
and a minimum), run by llama.cpp through ``llama-cpp-python`` (pinned; PyPI has only its
source distribution, so the first run compiles llama.cpp into ``$QCORE_CACHE/peers``).
Its like-for-like qcore row is ``W4 g32 asym, bf16``; llama.cpp also quantizes the head
and the activations (to 8 bits inside its dot products), qcore keeps both 16-bit.

    .venv/bin/python benchmarks/decode_cpu.py                    # everything, BENCHMARKS.md
    .venv/bin/python benchmarks/decode_cpu.py --models smollm2 --no-write
    .venv/bin/python benchmarks/decode_cpu.py --paired llama1b "W4 g64 asym, bf16" \
        "torchao int4 g64, bf16"       # decode A/B in one process, alternating rounds
    .venv/bin/python benchmarks/decode_cpu.py --render   # BENCHMARKS.md from results/ only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402,I001
    RESULTS, machine, merge_results, peak_rss_gb, run_child, write_section)

TORCHAO = "torchao==0.18.0"
LLAMA_CPP = "llama-cpp-python==0.3.36"
#: What the peers import beyond what the project's environment has.
PEER_EXTRAS = {LLAMA_CPP: ["diskcache==5.6.3"]}

W4 = dict(bits=4, group_size=64, symmetric=False)
W8 = dict(bits=8, group_size=-1, symmetric=True)
#: Setting -> (RTN scheme, compute dtype); scheme None: the float model, "torchao": the peer.
SETTINGS: dict[str, tuple[object, str]] = {
    "fp32": (None, "float32"),
    "bf16": (None, "bfloat16"),
    "W4 g64 asym, bf16": (W4, "bfloat16"),
    "W4 g64 sym, bf16": (dict(W4, symmetric=True), "bfloat16"),
    "W4 g128 asym, bf16": (dict(W4, group_size=128), "bfloat16"),
    "W4 g64 asym, fp32": (W4, "float32"),
    "W8 per-channel sym, bf16": (W8, "bfloat16"),
    "W8A8 per-channel sym, per-token act, fp32": (dict(W8, act_bits=8), "float32"),
    "W3 g64 asym, bf16": (dict(W4, bits=3), "bfloat16"),
    "torchao int4 g64, bf16": ("torchao", "bfloat16"),
    "W4 g32 asym, bf16": (dict(W4, group_size=32), "bfloat16"),
    "llama.cpp Q4_1 (g32 asym)": ("llama.cpp", "float32"),
}
MODELS = {
    "smollm2": list(SETTINGS),
    "llama1b": ["fp32", "bf16", "W4 g64 asym, bf16", "W8 per-channel sym, bf16",
                "torchao int4 g64, bf16"],
}
PEER = "torchao int4 g64, bf16"
#: How each row is named in BENCHMARKS.md: every setting in full.
LABELS = {
    "fp32": "float model, fp32",
    "bf16": "float model, bf16",
    **{name: f"RTN {name[:-6]}, bf16 model" for name, (scheme, dtype) in SETTINGS.items()
       if isinstance(scheme, dict) and dtype == "bfloat16"},
    "W4 g64 asym, fp32": "RTN W4 g64 asym, fp32 model",
    "W8A8 per-channel sym, per-token act, fp32": (
        "RTN W8A8 per-channel sym, int8 activations with dynamic per-token scales, fp32 model"),
    "torchao int4 g64, bf16": (
        "torchao int4 g64 asym (`PrototypeInt4WeightOnlyConfig`), bf16 model"),
    "llama.cpp Q4_1 (g32 asym)": (
        "llama.cpp Q4_1 (g32 asym; head and embeddings Q4_1 too, 8-bit activations in its "
        "dot products)"),
}
#: The machine of rows stored without one (the script records it per row since): the line
#: BENCHMARKS.md recorded when the tables were last written.
RECORDED_MACHINE = ("AMD EPYC, 2 cores, torch 2.13.0+cpu (2 threads), transformers 5.25.0, "
                    "Python 3.11.7, 2026-12-07")
#: Notes under the tables: what the recorded runs showed (dated; the tables are above them).
NOTES = [
    "The head and embeddings stay float in every row, torchao's included, in the row's "
    "dtype: fp32 rows compute in float32, bf16 rows run the whole model in bfloat16. "
    "Weights are quantized with RTN: the speed depends on the format, not on the method.",
    "The ppl column is on the 8 eval windows only (a sanity check, not the protocol's 97); "
    "llama.cpp's is from its own logits on the same 8 windows. Load avg: the 1-minute load "
    "average before / after each row.",
    f"Peers: {TORCHAO}, `PrototypeInt4WeightOnlyConfig(group_size=64)` (its own "
    "tinygemm-style asymmetric grid, torch's int4 CPU operator); on SmolLM2 also llama.cpp "
    f"({LLAMA_CPP}, built from source here in 5.2 minutes on 2 cores) on the embedded Q4_1 "
    "GGUF file, whose head is 4-bit too and whose dot products quantize activations to 8 "
    "bits; its like-for-like qcore row is W4 g32 asym.",
    "2026-12-07: torch's packed int4/int8 CPU operators are fast for bfloat16 activations "
    "only: at 4096 x 4096 and one token (1 thread) the int4 operator took 1.0 ms with "
    "bfloat16 inputs and 33-58 ms with float32 or float16 ones, against 4.1 ms for float32 "
    "`F.linear`. So `cpu-int4` and `cpu-int8` declare bfloat16 only; a float32 model runs "
    "its int layers on the `torch` provider, whose dequantized-weight cache makes it as fast "
    "as the float model once warm (one process, 8 x 512 eval, three alternating rounds: fp32 "
    "10.3, 12.0, 12.9 s; W4 g64 on `torch` 13.0 s with the first dequantization, then 11.5, "
    "11.3 s).",
    "2026-12-07: decode is where 4 bits pay (2.2x the fp32 model on SmolLM2, whose fp32 head "
    "is a fifth of its weights; 3.7x on the 1.1B model); prefill (512 tokens) is not: there "
    "the int4 operator is slower than bfloat16 `F.linear`, and W4 prefills at about fp32's "
    "speed. Dequantizing to bfloat16 on each call, then `F.linear`, measured as a "
    "large-prompt path, is slower still (2 threads, 512 tokens: 2048 x 2048 44.0 ms against "
    "the int4 operator's 30.8; 5632 x 2048 130.8 against 85.4); only a kept bfloat16 weight "
    "wins (10.8 and 29.3 ms), which gives up the memory saving.",
    "2026-12-07: against torchao (the same torch operator underneath) 1.09x on SmolLM2 and "
    "0.90x on the 1.1B model in these tables; earlier invocations the same day gave 1.00x / "
    "0.95x on SmolLM2 and 0.97x on the 1.1B model. Rows move by 10-15% from one invocation "
    "to the next on this shared 2-core machine (the bf16 float row's decode: 16.6 then 23.5 "
    "tokens/s). Paired in one process, alternating rounds (`decode_cpu.py --paired llama1b "
    "\"W4 g64 asym, bf16\" \"torchao int4 g64, bf16\"`, 128 tokens each, tokens/s): qcore "
    "16.51, 13.41, 14.98 against torchao 14.20, 14.39, 12.98 (medians 1.05x); run again, "
    "14.93, 16.36, 15.11 against 14.81, 16.44, 15.67 (0.96x): a tie within noise, not a "
    "lead. `QuantLinear`'s own cost per call was cut from 29 to 12 us between the two "
    "invocations (about 2.5 ms per token at SmolLM2's 210 layers).",
    "2026-12-07: llama.cpp is far ahead at batch-1 decode on SmolLM2 (94 tokens/s against "
    "qcore's best 41.8, W4 g32 asym, its like-for-like row): at 135M parameters the "
    "per-token cost of the transformers model in Python (about 210 linear calls plus "
    "attention and norms per token) dominates, which no weight format removes. Its prefill "
    "(220 tokens/s) and eval (26.1 s) are slower than qcore's W4 rows (492, 8.9 s). Its "
    "perplexity is the float model's because the embedded weights are that very Q4_1 file; "
    "qcore's integer zero points cannot represent Q4_1's free minimum, hence W4 g32's 17.13 "
    "from RTN.",
]
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                max_position_embeddings=2048, tie_word_embeddings=False)


def peer_site(requirement: str = TORCHAO) -> Path:
    """A folder holding a peer (pinned, no dependencies), installed on first use.
    llama-cpp-python is a source distribution: its first install compiles llama.cpp."""
    from qcore.assets import cache_dir

    site = cache_dir() / "peers" / requirement.replace("==", "-")
    package = requirement.split("==")[0].replace("-python", "").replace("-", "_")
    if not (site / package).is_dir():
        site.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(site), requirement, *PEER_EXTRAS.get(requirement, [])],
                       check=True)
    return site


def llama_cpp_child(threads: int, repeats: int) -> dict:
    """The embedded SmolLM2's own GGUF file (Q4_1: 4-bit codes in groups of 32 with a scale
    and a minimum, head and embeddings included, activations quantized to 8 bits inside
    its dot products) in llama.cpp, timed like the torch rows."""
    import math

    import numpy as np
    import torch

    sys.path.insert(0, str(peer_site(LLAMA_CPP)))
    import llama_cpp

    from qcore.assets import embedded_corpus, embedded_gguf_path, eval_windows, load_model

    _, tokenizer = load_model()
    llm = llama_cpp.Llama(model_path=str(embedded_gguf_path()), n_ctx=1024, n_batch=512,
                          n_threads=threads, logits_all=True, verbose=False)
    vocab = llm.n_vocab()
    g = torch.Generator().manual_seed(1)
    long_prompt = torch.randint(0, vocab, (512,), generator=g).tolist()
    short_prompt = torch.randint(0, vocab, (64,), generator=g).tolist()
    prefill = []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(long_prompt)
        prefill.append(time.perf_counter() - start)

    def decode() -> float:
        llm.reset()
        llm.eval(short_prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])  # the first new token ends the prefill, as in the torch rows
        start = time.perf_counter()
        for _ in range(126):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        return 126 / (time.perf_counter() - start)

    decode()  # warm-up
    decode_tok_s = max(decode() for _ in range(repeats))
    ids = eval_windows(tokenizer, embedded_corpus("eval"), 8, 512)
    start = time.perf_counter()
    nll = 0.0
    for window in ids.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
    eval_s = time.perf_counter() - start
    return {"kernels": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            "prefill_tok_s": 512 / min(prefill), "decode_tok_s": decode_tok_s,
            "ppl_8_windows": math.exp(nll / (ids.shape[0] * (ids.shape[1] - 1))),
            "eval_s": eval_s}


def build_model(name: str):
    import torch

    if name == "smollm2":
        from qcore.assets import load_model

        model, tokenizer = load_model()
        return model, tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).float().eval()
    return model, None


def quantize_setting(model, setting: str):
    """Quantize in place and cast to the setting's dtype; returns the model and the kernel
    providers that serve its linear layers."""
    import torch

    from qcore.generate import cast_model

    scheme, dtype = SETTINGS[setting]
    dtype = getattr(torch, dtype)
    if scheme is None:
        return model.to(dtype), f"F.linear ({dtype})".replace("torch.", "")
    if scheme == "torchao":
        sys.path.insert(0, str(peer_site()))
        import torchao
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        model = model.to(dtype)
        head = model.get_output_embeddings()
        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=64),
                  filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m is not head)
        return model, f"torchao {torchao.__version__}"
    from qcore.pipeline import Pipeline
    from qcore.qlinear import QuantLinear
    from qcore.quantize import quantize
    from qcore.scheme import Scheme

    calib = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    quantize(model, Pipeline.from_names("rtn", scheme=Scheme(**scheme)), calib, progress=False)
    model = cast_model(model, dtype)
    model(torch.zeros(1, 2, dtype=torch.long))  # selects the kernels
    return model, ", ".join(sorted({m.provider_name for m in model.modules()
                                    if isinstance(m, QuantLinear)}))


def child(model_name: str, setting: str, repeats: int) -> dict:
    import torch

    from qcore.generate import generate_ids

    load_before = os.getloadavg()[0]
    recorded = {"measured": time.strftime("%Y-%m-%d"), "machine": machine()}
    if SETTINGS[setting][0] == "llama.cpp":
        row = {"model": model_name, "setting": setting, "key": f"{model_name}: {setting}",
               **llama_cpp_child(torch.get_num_threads(), repeats),
               "threads": torch.get_num_threads()}
        row["peak_rss_gb"] = peak_rss_gb()
        row["load_avg"] = [load_before, os.getloadavg()[0]]
        return {**row, **recorded}
    model, tokenizer = build_model(model_name)
    model, kernels = quantize_setting(model, setting)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    long_prompt = torch.randint(0, vocab, (1, 512), generator=g)
    short_prompt = torch.randint(0, vocab, (1, 64), generator=g)
    prefill = []
    with torch.inference_mode():
        model(long_prompt[:, :32])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(long_prompt, use_cache=False)
            prefill.append(time.perf_counter() - start)
    generate_ids(model, short_prompt, max_new_tokens=8, exact_length=True)  # warm-up
    decode = max((generate_ids(model, short_prompt, max_new_tokens=128, exact_length=True)
                  for _ in range(repeats)), key=lambda g: g.decode_tokens_per_s)
    row = {"model": model_name, "setting": setting, "key": f"{model_name}: {setting}",
           "kernels": kernels, "prefill_tok_s": 512 / min(prefill),
           "decode_tok_s": decode.decode_tokens_per_s, "threads": torch.get_num_threads()}
    if tokenizer is not None:
        from qcore.assets import embedded_corpus, eval_windows
        from qcore.eval import perplexity

        ids = eval_windows(tokenizer, embedded_corpus("eval"), 8, 512)
        start = time.perf_counter()
        row["ppl_8_windows"] = perplexity(model, ids, batch_size=8, progress=False)
        row["eval_s"] = time.perf_counter() - start
    row["peak_rss_gb"] = peak_rss_gb()
    row["load_avg"] = [load_before, os.getloadavg()[0]]
    return {**row, **recorded}


def paired(model_name: str, settings: list[str], rounds: int) -> dict:
    """Decode tokens/s of several settings of one model in one process, in alternating
    rounds (after one warm-up each): the same machine state for all of them."""
    import copy

    import torch

    from qcore.generate import generate_ids

    base, _ = build_model(model_name)
    models = {}
    for setting in settings:
        model, kernels = quantize_setting(copy.deepcopy(base), setting)
        models[f"{setting} ({kernels})"] = model
    del base
    prompt = torch.randint(0, models[next(iter(models))].config.vocab_size, (1, 64),
                           generator=torch.Generator().manual_seed(1))
    for model in models.values():
        generate_ids(model, prompt, max_new_tokens=8, exact_length=True)
    result: dict = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            g = generate_ids(model, prompt, max_new_tokens=128, exact_length=True)
            result[name].append(round(g.decode_tokens_per_s, 2))
    return {"model": model_name, "decode_tok_s": result,
            "load_avg_after": os.getloadavg()[0]}


def table(rows: list[dict]) -> str:
    lines = []
    for model in MODELS:
        chosen = [r for r in rows if r["model"] == model]
        if not chosen:
            continue
        base = next((r for r in chosen if r["setting"] == "fp32"), None)
        peer = next((r for r in chosen if r["setting"] == PEER), None)
        title = ("SmolLM2-135M (embedded)" if model == "smollm2"
                 else "Llama-architecture 1.1B, random weights (TinyLlama-1.1B shapes)")
        lines += ["", f"**{title}**", "",
                  "| setting | kernels | prefill 512 tok/s | decode tok/s | decode vs fp32 "
                  "| decode vs torchao | eval 8x512 | ppl (8 windows) | peak RSS | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in chosen:
            vs = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else ""
            vs_peer = f"{r['decode_tok_s'] / peer['decode_tok_s']:.2f}x" if peer else ""
            eval_s = f"{r['eval_s']:.1f} s" if "eval_s" in r else ""
            ppl = f"{r['ppl_8_windows']:.3f}" if "ppl_8_windows" in r else ""
            lines.append(
                f"| {LABELS.get(r['setting'], r['setting'])} | {r['kernels']} | "
                f"{r['prefill_tok_s']:.0f} | "
                f"{r['decode_tok_s']:.1f} | {vs} | {vs_peer} | {eval_s} | {ppl} | "
                f"{r['peak_rss_gb']:.2f} GB | {r['load_avg'][0]:.2f} / {r['load_avg'][1]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--paired", nargs="+", metavar=("MODEL", "SETTING"),
                        help="decode A/B of settings of one model in one process; prints JSON")
    parser.add_argument("--rounds", type=int, default=3, help="with --paired")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--settings", nargs="*", default=None, choices=list(SETTINGS),
                        help="only these settings (of each model's list)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="prefill and decode repeats on SmolLM2, best kept (1 on the "
                        "1.1B model)")
    parser.add_argument("--no-write", action="store_true",
                        help="print, do not update BENCHMARKS.md")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write the section from results/ alone")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.repeats)))
        return
    if args.paired:
        model, *settings = args.paired
        if model not in MODELS or len(settings) < 2 or not set(settings) <= set(SETTINGS):
            parser.error(f"--paired MODEL SETTING SETTING...: MODEL in {list(MODELS)}, "
                         f"settings in {list(SETTINGS)}")
        if any(SETTINGS[s][0] == "torchao" for s in settings):
            peer_site()
        print(json.dumps(paired(model, settings, args.rounds)))
        return
    if args.render:
        body = render(json.loads((RESULTS / "decode_cpu.json").read_text()))
        print(body)
        if not args.no_write:
            write_section("decode_cpu", body)
        return
    peer_site()  # installed (llama.cpp built) before anything is timed
    if "smollm2" in args.models:
        peer_site(LLAMA_CPP)
    rows = []
    for model in args.models:
        for setting in MODELS[model]:
            if args.settings and setting not in args.settings:
                continue
            repeats = args.repeats if model == "smollm2" else 1
            row = run_child(Path(__file__), ["--child", model, setting,
                                             "--repeats", str(repeats)])
            print(json.dumps(row), flush=True)
            rows.append(row)
    body = render(merge_results("decode_cpu", rows, "key"))
    print(body)
    if not args.no_write:
        write_section("decode_cpu", body)


def render(rows: list[dict]) -> str:
    """The ``decode_cpu`` section of BENCHMARKS.md from stored (or just measured) rows."""
    machines = sorted({r.get("machine", RECORDED_MACHINE) for r in rows}, key=lambda m: m[-10:])
    return "\n".join([
        "## CPU kernels: prefill, decode and eval speed (`benchmarks/decode_cpu.py`)",
        "",
        "Prefill and decode tokens/s, eval time and peak memory of RTN-quantized models on "
        "the CPU, next to the float model, torchao's int4 CPU path and (on SmolLM2) llama.cpp, "
        f"every row of a table in one invocation. Machine: {'; '.join(machines)}. Protocol: "
        "one process per row, one after another; decode: batch 1, 128 greedy tokens after a "
        "64-token prompt, tokens/s after the first; prefill: one 512-token forward; both best "
        "of 3 on SmolLM2, one run on the 1.1B model; eval: perplexity of 8 x 512 eval tokens "
        "at batch 8.",
        table(rows),
        "",
        "Notes:",
        "",
        *(f"- {note}" for note in NOTES),
    ])


if __name__ == "__main__":
    main()
