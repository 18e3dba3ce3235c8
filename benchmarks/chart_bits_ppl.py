"""Bits per weight against perplexity on SmolLM2-135M: every method and setting that the
benchmark scripts recorded (benchmarks/results/*.json), the peer's points among them
(rows named "peer: ..."), and the Pareto front. Redrawn from the recorded results
without running anything:

    .venv/bin/python benchmarks/chart_bits_ppl.py [--no-write]
    # writes docs/bits_vs_ppl.png and its section of BENCHMARKS.md

Bits per weight are the ones each run recorded (every stored bit of the quantized linears,
as ``qcore inspect`` counts them). Rows recorded before runs stored that figure get it
from their scheme: the same count over SmolLM2's linears, packed by qcore's int packer
(act-order with ``g_idx`` wherever the setting used GPTQ's dynamic groups).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "bits_vs_ppl.png"
#: The chart's window; points outside it are named in its note (W2 without codebooks,
#: W8). It reaches 6 bits for SVDQuant's W4A4 rows, whose low-rank branches add up to
#: 1.5 bits per weight.
PPL_MAX = 120.0
BITS_MAX = 6.0
PPL_TICKS = (15, 17, 20, 25, 30, 40, 50, 70, 100)
SCHEME = re.compile(r"W(\d) (?:g(\d+)|per-channel) (asym|sym)")
#: Rows with 4-bit activations (the SVDQuant section): on the chart, not on the
#: weight-only Pareto front.
W4A4 = "W4A4 (4-bit activations too)"
STYLE = {  # method -> (marker, colour)
    "RTN": ("s", "#7f7f7f"),
    "GPTQ": ("o", "#1f77b4"),
    "AWQ": ("^", "#2ca02c"),
    "VPTQ": ("D", "#9467bd"),
    "+ finetune": ("*", "#d62728"),
    "llm-compressor (peer)": ("X", "#ff7f0e"),
    W4A4: ("P", "#8c564b"),
}


#: How the SVDQuant section's W4A4 settings are named on the chart.
LABELS_W4A4 = {
    "rtn W4A4": "RTN W4A4 g64 asym, act-g64",
    "smooth W4A4": "smoothing only W4A4",
    "svdquant r8 W4A4": "SVDQuant r8 W4A4",
    "svdquant r16 W4A4": "SVDQuant r16 W4A4",
    "svdquant r32 W4A4": "SVDQuant r32 W4A4",
    "svdquant r32 + gptq W4A4": "SVDQuant r32 + GPTQ W4A4",
}


@dataclass
class Point:
    method: str
    setting: str
    bits: float
    ppl: float


@cache
def linear_shapes() -> list[tuple[int, int]]:
    """(out, in) of every quantized linear of the embedded SmolLM2 (its config)."""
    from qcore.assets import embedded_model_dir

    config = json.loads((embedded_model_dir() / "config.json").read_text())
    h, inter = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    per_block = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    return per_block * config["num_hidden_layers"]


def scheme_bits(bits: int, group_size: int, symmetric: bool, g_idx: bool) -> float:
    """Stored bits per weight of the int format over SmolLM2's linears, as packed by
    qcore's int packer (codes, float16 scales, uint8 zero points, int32 g_idx)."""
    import torch

    from qcore.interfaces import QuantizedWeight
    from qcore.ops import IntPacker, n_groups

    total = weights = 0
    for out_f, in_f in set(linear_shapes()):
        count = linear_shapes().count((out_f, in_f))
        groups = n_groups(in_f, group_size)
        tensors = {"codes": torch.zeros(out_f, in_f, dtype=torch.uint8),
                   "scales": torch.ones(out_f, groups, dtype=torch.float16)}
        if not symmetric:
            tensors["zeros"] = torch.zeros(out_f, groups, dtype=torch.uint8)
        if g_idx:
            tensors["g_idx"] = (torch.arange(in_f) // max(group_size, 1) % groups).int()
        packed = IntPacker().pack(QuantizedWeight(
            format="int", shape=(out_f, in_f), tensors=tensors,
            params={"bits": bits, "group_size": group_size, "symmetric": symmetric}))
        total += count * sum(8 * t.numel() * t.element_size() for t in packed.tensors.values())
        weights += count * out_f * in_f
    return total / weights


def method_of(source: str, setting: str) -> str:
    if "W4A4" in setting:
        return W4A4
    if "finetune" in setting:
        return "+ finetune"
    if setting.startswith("peer:"):
        return "llm-compressor (peer)"
    if source == "awq" or setting.startswith("awq"):
        return "AWQ"
    if setting.startswith("vptq"):
        return "VPTQ"
    if source == "rtn" or setting.startswith("rtn"):
        return "RTN"
    return "GPTQ"


def bits_of(source: str, row: dict) -> float | None:
    if "bits_per_weight" in row:
        return float(row["bits_per_weight"])
    setting = row["setting"]
    match = SCHEME.search(setting)
    if match is None or "A8" in setting or "fp32 scales" in setting:
        return None
    bits, group, sym = int(match[1]), int(match[2] or -1), match[3] == "sym"
    gptq = source == "gptq" or "gptq" in setting
    dynamic = gptq and "no act-order" not in setting and "static" not in setting
    return scheme_bits(bits, group, sym, dynamic)


def points() -> tuple[list[Point], float | None]:
    found, fp32 = [], None
    for source in ("rtn", "gptq", "awq", "vptq", "svdquant"):
        path = RESULTS / f"{source}_smollm2.json"
        if not path.exists():
            continue
        for row in json.loads(path.read_text()):
            if row["setting"] == "fp32":
                fp32 = fp32 if source == "svdquant" else row["ppl"]
                continue
            if source == "svdquant" and "W4A4" not in row["setting"]:
                continue  # its weight-only reference rows are the RTN and GPTQ sections'
            if source == "svdquant":
                row = {**row, "setting": LABELS_W4A4.get(row["setting"], row["setting"])}
            bits = bits_of(source, row)
            if bits is not None:
                found.append(Point(method_of(source, row["setting"]), row["setting"], bits,
                                   row["ppl"]))
    return found, fp32


def pareto(pts: list[Point]) -> list[Point]:
    """Weight-only points that no other beats on both bits and perplexity."""
    front, best = [], float("inf")
    for p in sorted((p for p in pts if p.method != W4A4), key=lambda p: (p.bits, p.ppl)):
        if p.ppl < best:
            front.append(p)
            best = p.ppl
    return front


def draw(pts: list[Point], fp32: float | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    inside = [p for p in pts if p.ppl <= PPL_MAX and p.bits <= BITS_MAX]
    outside = [p for p in pts if p not in inside]
    front = pareto(pts)
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    for method, (marker, colour) in STYLE.items():
        mine = [p for p in inside if p.method == method]
        if mine:
            ax.scatter([p.bits for p in mine], [p.ppl for p in mine], marker=marker,
                       s=130 if marker == "*" else 60, color=colour, label=method, zorder=3,
                       edgecolors="black", linewidths=0.4)
    shown = [p for p in front if p in inside]
    ax.step([p.bits for p in shown], [p.ppl for p in shown], where="post", color="black",
            linewidth=1, linestyle="--", label="Pareto front", zorder=2)
    # Numbers at the front's points, their names in a box: no label can overlap another.
    for number, p in enumerate(shown, 1):
        ax.annotate(str(number), (p.bits, p.ppl), xytext=(-4, 7), textcoords="offset points",
                    fontsize=9, fontweight="bold", ha="right", zorder=4)
    names = [f"{n}: {p.setting.removeprefix('peer: ')} ({p.bits:.2f} b/w, ppl {p.ppl:.2f})"
             for n, p in enumerate(shown, 1)]
    ax.text(0.30, 0.97, "Pareto front\n" + "\n".join(names), transform=ax.transAxes,
            fontsize=7.5, va="top", ha="left",
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#999999"})
    if fp32 is not None:
        ax.axhline(fp32, color="#444444", linewidth=0.8, linestyle=":")
        ax.text(2.02, fp32 * 1.01, f"float32 model: {fp32:.2f}", fontsize=8, va="bottom")
    ax.set_yscale("log")
    ax.set_ylim(fp32 * 0.95 if fp32 else 14, PPL_MAX)
    ax.set_xlim(2.0, BITS_MAX)
    ax.yaxis.set_major_locator(FixedLocator(PPL_TICKS))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(t) for t in PPL_TICKS]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bits per weight (every stored bit of the quantized linears)")
    ax.set_ylabel("perplexity, 97 x 512 tokens (lower is better; log scale)")
    ax.set_title("SmolLM2-135M: bits per weight against perplexity, every recorded setting")
    ax.grid(True, which="major", linewidth=0.3, alpha=0.6)
    ax.legend(loc="upper right", fontsize=8)
    if outside:
        note = "; ".join(f"{p.setting} ({p.bits:.2f} b/w, ppl {p.ppl:.4g})"
                         for p in sorted(outside, key=lambda p: p.bits))
        fig.text(0.01, 0.01, "Outside the window: " + note, fontsize=6.5, wrap=True)
    fig.tight_layout(rect=(0, 0.05 if outside else 0, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def section(pts: list[Point], fp32: float | None) -> str:
    """The chart's section of BENCHMARKS.md: what it shows, the image, the Pareto front."""
    front = pareto(pts)
    lines = [
        "## Bits per weight against perplexity (`benchmarks/chart_bits_ppl.py`)", "",
        f"Every setting recorded by the RTN, GPTQ, AWQ and VPTQ benchmarks on SmolLM2-135M "
        f"({len(pts)} points; float32: {fp32:.3f}), llm-compressor's points from the "
        "GPTQ section's same-invocation comparison, and the SVDQuant section's W4A4 rows "
        "(4-bit activations as well: plotted, not on the weight-only Pareto front). Bits per "
        "weight count every stored bit of the quantized linears (low-rank branches "
        "included), as `qcore inspect --json` does. The chart is redrawn "
        "from `benchmarks/results/*.json` without running anything.", "",
        "![bits per weight against perplexity](docs/bits_vs_ppl.png)", "",
        "| Pareto front | bits / weight | ppl |", "|---|---|---|"]
    lines += [f"| {p.setting} | {p.bits:.3f} | {p.ppl:.3f} |" for p in front]
    lines += ["", "Notes: rows recorded before the runs stored bits per weight get them from "
              "their scheme (the int packer's count over SmolLM2's linears, with `g_idx` where "
              "GPTQ used dynamic act-order groups); a test checks that this count equals "
              "what the runs recorded. The peer's bits count its compressed-tensors "
              "checkpoint the same way (packed codes, scales, zero points, shapes)."]
    return "\n".join(lines)


def main() -> None:
    pts, fp32 = points()
    draw(pts, fp32, OUT)
    front = pareto(pts)
    print(f"{len(pts)} points, Pareto front: " + "; ".join(
        f"{p.setting} ({p.bits:.3f} b/w, {p.ppl:.3f})" for p in front))
    print(f"wrote {OUT.relative_to(ROOT)}")
    if "--no-write" not in sys.argv:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _common import write_section

        write_section("chart", section(pts, fp32))


if __name__ == "__main__":
    main()
