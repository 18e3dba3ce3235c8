"""AWQ on the embedded SmolLM2-135M under the protocol of BENCHMARKS.md: ``awq`` (AWQ +
round-to-nearest), ``awq,awq-clip``, ``awq,gptq`` and ``finetune`` after them, with
llm-compressor's AWQModifier (benchmarks/peers/llm_compressor.py, its own virtual
environment) run in the same invocation on the same model and token windows.

Each setting runs in its own process: quantize (timed: model load to saved checkpoint),
perplexity (97 x 512, fp32), peak RSS. ``--compare`` runs exactly the settings of the
comparison table, qcore's and the peer's, one after the other, and records the load
average around them.

    .venv/bin/python benchmarks/peers/llm_compressor.py install     # once
    .venv/bin/python benchmarks/awq_smollm2.py --compare
    .venv/bin/python benchmarks/awq_smollm2.py [--settings NAME ...] [--no-write]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402,I001
    compare_main, comparison_table, load_line, quantize_and_evaluate, write_section)

W4A = dict(bits=4, group_size=64)
W4S = dict(bits=4, group_size=64, symmetric=True)
W3A = dict(bits=3, group_size=64)
#: name -> (pipeline, scheme, options). Settings calibrate under bf16 autocast (qcore's
#: default) unless named "fp32 calibration".
SETTINGS = {
    "awq W4 g64 asym": ("awq", W4A, {}),
    "awq W4 g64 asym, fp32 calibration": ("awq", W4A, {}),
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
PEER_DEFAULTS = "AWQModifier defaults (duo scaling) + QuantizationModifier (RTN)"
PEER_NO_DUO = "AWQModifier, duo_scaling=False + QuantizationModifier (RTN)"
#: Peer settings (run by benchmarks/peers/llm_compressor.py): "peer: <its setting>, <scheme>".
PEER_SETTINGS = {
    f"peer: {name}, {label}": (scheme, name)
    for name in (PEER_DEFAULTS, PEER_NO_DUO)
    for label, scheme in (("W4 g64 asym", W4A),)
}
#: The comparison table: (scheme, what is compared, qcore setting, peer setting). W4 only:
#: the peer's AWQ takes about half an hour per setting on this 2-core machine.
COMPARISONS = [
    (label, kind, qcore, f"peer: {peer}, {label}")
    for label in ("W4 g64 asym",)
    for kind, qcore, peer in (
        ("defaults: qcore `awq` (x-only scales, bf16 calibration) vs peer (duo scaling)",
         f"awq {label}", PEER_DEFAULTS),
        ("like for like: x-only scales s = mean|x|^α, 20 α, RTN min-max, fp32 calibration",
         f"awq {label}, fp32 calibration", PEER_NO_DUO),
        ("qcore's best AWQ pipeline `awq,awq-clip` (bf16 calibration) vs peer defaults",
         f"awq,awq-clip {label}", PEER_DEFAULTS),
        ("both in fp32 calibration: qcore `awq` (x-only scales) vs peer defaults (duo "
         "scaling)", f"awq {label}, fp32 calibration", PEER_DEFAULTS),
    )
]
NOTES = (
    "Notes on the rows of every setting: `awq` searches α over 20 points for each group "
    "of linears sharing an input and scores each by the group's output error over all "
    "calibration tokens (through the Hessian); `awq-clip` reuses the statistics `awq` "
    "rescaled, so it adds no observation pass. `awq,gptq`: AWQ's scales folded first, then "
    "GPTQ (its defaults) on the scaled block. `finetune` (qcore-plugin-finetune, its "
    "defaults): 4 epochs of Adam over the first 64 calibration rows per block, tuning the "
    "float16 group scales against the unquantized model's block outputs. Rows carry the "
    "numbers of the run that measured them; compare times only within one run (the "
    "comparison table above). Rows not in the comparison were recorded on 2026-11-27 (the "
    "two `finetune` rows on 2026-11-28, with nothing else running) on the same machine with "
    "transformers 5.24.0, bf16 calibration.")


def child(setting: str) -> dict:
    import torch

    from qcore.pipeline import Pipeline
    from qcore.scheme import Scheme

    if setting in PEER_SETTINGS:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
        import llm_compressor

        scheme, name = PEER_SETTINGS[setting]
        return {"setting": setting, **llm_compressor.run(
            name, symmetric=False, threads=torch.get_num_threads(), **scheme)}
    names, scheme, options = SETTINGS[setting]
    pipeline = Pipeline.from_names(names, scheme=Scheme(**scheme), options=options)
    calib_dtype = None if "fp32 calibration" in setting else torch.bfloat16
    return quantize_and_evaluate(setting, pipeline, calib_dtype)


def main() -> None:
    rows, write, compare = compare_main(__file__, "awq_smollm2",
                                        {**SETTINGS, **PEER_SETTINGS}, child, COMPARISONS)
    lines = ["## AWQ on SmolLM2-135M (`benchmarks/awq_smollm2.py`)", ""]
    if compare is not None:
        lines += [
            "qcore against llm-compressor 0.14.0.1 (`benchmarks/peers/llm_compressor.py`), "
            "both run by one `--compare` invocation, one setting after the other, on the "
            "same float model and the same token windows: calibration 128 x 512, eval 97 x "
            "512 (fp32), group 64, integer zero points, round-to-nearest min-max after the "
            "scales. Time: model load to saved checkpoint; ratio = qcore / peer. "
            f"{load_line(compare)}. {compare.get('conditions', '')}".rstrip(), "",
            *comparison_table(compare, COMPARISONS), "",
            "Notes: the peer's AWQModifier defaults use duo scaling (s = mean|x|^α / "
            "mean|w|^(1-α)), 20 α, and score each α by the output of the module that holds "
            "the balanced linears (the attention block for q/k/v, the MLP for gate/up, the "
            "linear itself for o and down), float32 calibration; a QuantizationModifier "
            "then rounds to nearest with min-max ranges. qcore's `awq` uses s = mean|x|^α "
            "(the paper's form), 20 α, and scores by the output error of the group's "
            "linears through the Hessian, in bf16 autocast by default. The like-for-like "
            "rows set the peer to `duo_scaling=False` and qcore to float32 calibration: "
            "they then differ only in what an α is scored by. Neither side's `awq` searches "
            "clipping ranges; qcore's `awq-clip` does.", ""]
    lines += [
        "Every setting measured (rows from earlier runs keep their numbers; "
        "`--settings NAME` remeasures one):", "",
        "| setting | ppl | time | peak RSS | bits / weight |", "|---|---|---|---|---|"]
    for r in rows:
        bits = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else ""
        lines.append(f"| {r['setting']} | {r['ppl']:.3f} | {r['quantize_s']:.0f} s | "
                     f"{r['peak_rss_gb']:.2f} GB | {bits} |")
    lines += ["", NOTES]
    body = "\n".join(lines)
    print(body)
    if write:
        write_section("awq", body)


if __name__ == "__main__":
    main()
