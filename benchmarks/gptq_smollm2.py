"""GPTQ on the embedded SmolLM2-135M under the protocol of BENCHMARKS.md, with
llm-compressor (benchmarks/peers/llm_compressor.py, its own virtual environment) run in
the same invocation on the same model and token windows.

Each setting runs in its own process: quantize (timed: model load to saved checkpoint),
perplexity (97 x 512, fp32), peak RSS. ``--compare`` runs exactly the settings of the
comparison table, qcore's and the peer's, one after the other, and records the load
average around them.

    .venv/bin/python benchmarks/peers/llm_compressor.py install     # once
    .venv/bin/python benchmarks/gptq_smollm2.py --compare
    .venv/bin/python benchmarks/gptq_smollm2.py [--settings NAME ...] [--no-write]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402,I001
    compare_main, comparison_table, load_line, quantize_and_evaluate, write_section)

#: Rows named "range search" run GPTQ's default since this session (20 shrink factors per
#: group); the others pin ``shrink_steps`` to 1 (plain min-max ranges), the earlier default.
MINMAX = {"act_order": True, "shrink_steps": 1}
NO_ACT_ORDER = {"act_order": False, "shrink_steps": 1}
SEARCH = {"act_order": True, "shrink_steps": 20, "max_shrink": 0.2}
SEARCH_NO_ACT_ORDER = {**SEARCH, "act_order": False}
STATIC = {"act_order": True, "static_groups": True, "shrink_steps": 1}
STATIC_SEARCH = {**SEARCH, "static_groups": True}
#: Peer settings (run by benchmarks/peers/llm_compressor.py): "peer: <its setting>, <scheme>".
PEER_SETTINGS = {
    f"peer: {name}, {label}": (scheme, name)
    for name in ("GPTQModifier defaults (static act-order, min-max)",
                 "GPTQModifier, memoryless_mse observer (static act-order)")
    for label, scheme in (("W4 g64 asym", dict(bits=4, group_size=64)),
                          ("W3 g64 asym", dict(bits=3, group_size=64)))
}
#: The comparison table: (scheme, what is compared, qcore setting, peer setting). qcore's
#: default calibrates in bf16 autocast; the like-for-like rows calibrate in float32, as the
#: peer does.
COMPARISONS = [
    (label, kind, qcore, f"peer: {peer}, {label}")
    for label in ("W4 g64 asym", "W3 g64 asym")
    for kind, qcore, peer in (
        ("defaults: qcore (act-order with g_idx, range search, bf16 calibration) vs peer",
         f"{label}, act-order, bf16 calibration, range search",
         "GPTQModifier defaults (static act-order, min-max)"),
        ("like for like: static act-order, min-max ranges, fp32 calibration",
         f"{label}, static act-order", "GPTQModifier defaults (static act-order, min-max)"),
        ("range search vs the peer's MSE observer (static act-order, fp32 calibration)",
         f"{label}, static act-order, range search",
         "GPTQModifier, memoryless_mse observer (static act-order)"),
    )
]
SETTINGS = {
    "W4 g64 asym, act-order": (dict(bits=4, group_size=64), MINMAX),
    "W4 g64 asym, act-order, bf16 calibration": (dict(bits=4, group_size=64), MINMAX),
    "W4 g64 asym, act-order, bf16 calibration, fp32 Hessian products": (
        dict(bits=4, group_size=64), MINMAX),
    "W4 g64 sym, act-order": (dict(bits=4, group_size=64, symmetric=True), MINMAX),
    "W4 g64 sym, act-order, bf16 calibration": (dict(bits=4, group_size=64, symmetric=True),
                                                MINMAX),
    "W3 g64 asym, act-order, bf16 calibration": (dict(bits=3, group_size=64), MINMAX),
    "W3 g64 asym, act-order": (dict(bits=3, group_size=64), MINMAX),
    "W3 g64 asym, act-order, bf16 calibration, range search": (
        dict(bits=3, group_size=64), SEARCH),
    "W4 g64 asym, act-order, bf16 calibration, range search": (
        dict(bits=4, group_size=64), SEARCH),
    "W4 g64 sym, act-order, bf16 calibration, range search": (
        dict(bits=4, group_size=64, symmetric=True),
        SEARCH),
    # Like for like with the peer's GPTQModifier defaults: static act-order groups and
    # min-max ranges (fp32 calibration, as the peer's), and with its MSE observer.
    "W4 g64 asym, static act-order": (dict(bits=4, group_size=64), STATIC),
    "W3 g64 asym, static act-order": (dict(bits=3, group_size=64), STATIC),
    "W4 g64 asym, static act-order, range search": (dict(bits=4, group_size=64), STATIC_SEARCH),
    "W3 g64 asym, static act-order, range search": (dict(bits=3, group_size=64), STATIC_SEARCH),
    "W4 g64 asym, static act-order, bf16 calibration": (dict(bits=4, group_size=64), STATIC),
    "W3 g64 asym, static act-order, bf16 calibration": (dict(bits=3, group_size=64), STATIC),
    "W4 g64 asym, static act-order, bf16 calibration, range search": (
        dict(bits=4, group_size=64), {**SEARCH, "static_groups": True}),
    "W3 g64 asym, static act-order, bf16 calibration, range search": (
        dict(bits=3, group_size=64), {**SEARCH, "static_groups": True}),
    "W4 g64 asym, no act-order": (dict(bits=4, group_size=64), NO_ACT_ORDER),
    "W4 g64 sym, no act-order": (dict(bits=4, group_size=64, symmetric=True), NO_ACT_ORDER),
    "W3 g64 asym, no act-order": (dict(bits=3, group_size=64), NO_ACT_ORDER),
    "W4 g64 asym, no act-order, bf16 calibration, range search": (
        dict(bits=4, group_size=64), SEARCH_NO_ACT_ORDER),
    "W4 g64 sym, no act-order, bf16 calibration, range search": (
        dict(bits=4, group_size=64, symmetric=True), SEARCH_NO_ACT_ORDER),
    "W3 g64 asym, no act-order, bf16 calibration, range search": (
        dict(bits=3, group_size=64), SEARCH_NO_ACT_ORDER),
}
#: Notes under the table of every setting.
NOTES = (
    "Notes on the rows of earlier runs (each measured in its own invocation, so compare "
    "their times only with rows of the same day): rows named 'range search' use GPTQ's "
    "default since 2026-11-27 (20 shrink factors from 1 to 0.8 per group); the other rows "
    "pin `shrink_steps` 1 (min-max). 'bf16 calibration' rows calibrate under bf16 "
    "autocast; the `hessian` observer then builds Hessians from centred bf16 products "
    "summed in float32 ('fp32 Hessian products' turns that off). Act-order ranks columns "
    "by the Hessian's diagonal, so rounding-level changes reorder near-ties: ppl moves by "
    "about 0.1 at W4 from them alone. Before 2026-12-07 `static_groups` silently turned "
    "the range search off; the 'static act-order' rows of 2026-12-07 were measured under "
    "load from other work on this machine (their times are not comparable).")
def child(setting: str) -> dict:
    import torch

    from qcore.pipeline import Pipeline, Step
    from qcore.scheme import Scheme

    if setting in PEER_SETTINGS:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
        import llm_compressor

        scheme, name = PEER_SETTINGS[setting]
        return {"setting": setting, **llm_compressor.run(
            name, symmetric=False, threads=torch.get_num_threads(), **scheme)}
    scheme, options = SETTINGS[setting]
    pipeline = Pipeline.from_names("gptq", scheme=Scheme(**scheme), options={"gptq": options})
    if "fp32 Hessian products" in setting:
        pipeline = dataclasses.replace(
            pipeline, observers=(Step("hessian", {"bf16_products": False}),))
    calib_dtype = torch.bfloat16 if "bf16 calibration" in setting else None
    return quantize_and_evaluate(setting, pipeline, calib_dtype)


def main() -> None:
    rows, write, compare = compare_main(__file__, "gptq_smollm2",
                                        {**SETTINGS, **PEER_SETTINGS}, child, COMPARISONS)
    lines = ["## GPTQ on SmolLM2-135M (`benchmarks/gptq_smollm2.py`)", ""]
    if compare is not None:
        lines += [
            "qcore against llm-compressor 0.14.0.1 (`benchmarks/peers/llm_compressor.py`), "
            "both run by one `--compare` invocation, one setting after the other, on the "
            "same float model and the same token windows: calibration 128 x 512, eval 97 x "
            "512 (fp32), group 64, integer zero points. Time: model load to saved "
            f"checkpoint; ratio = qcore / peer. {load_line(compare)}. "
            f"{compare.get('conditions', '')}".rstrip(), "",
            *comparison_table(compare, COMPARISONS), "",
            "Notes: the peer's GPTQModifier defaults are static act-order (columns in "
            "decreasing Hessian diagonal, groups in natural order, no `g_idx`), min-max "
            "ranges (`memoryless_minmax`), block 128, dampening 0.01, float32 calibration. "
            "qcore's defaults are act-order with `g_idx` (each group's grid when the group "
            "is reached), a range search of 20 shrink factors per group and bf16 autocast "
            "calibration. The like-for-like rows set qcore to the peer's choices "
            "(`static_groups=true, shrink_steps=1`, float32 calibration). The last kind "
            "pairs qcore's range search with the peer's MSE observer (its grid search of "
            "shrink factors), both with static groups.", ""]
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
        write_section("gptq", body)


if __name__ == "__main__":
    main()
