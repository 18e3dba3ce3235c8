"""Static cost of the LUT GEMVs: SASS instructions per table read, no GPU needed.

    python benchmarks/kernels_sass.py [--arch sm_90] [--no-write]
    python benchmarks/kernels_sass.py --render   # BENCHMARKS.md from results/ only

``qk_lut_mma`` was issue-bound (Nsight Compute on an H200, BENCHMARKS.md), so the
instructions a main loop issues per codebook index and lane were the number to lower
between GPU sessions (``qk_lut_mma4`` then turned out latency-bound). This compiles
``qk_lut.cu`` with NVRTC (``qcore_kernels.nvrtc``, as the compile check does),
disassembles the cubin with ``cuobjdump -sass`` and, for every
``qk_lut_mma``/``qk_lut_mma4`` instance, finds the innermost loop holding its ``HMMA``
instructions. One ``LDS.64`` there is one table read, i.e. one index of one lane, so
instructions / ``LDS.64`` is the cost per index. Results go to ``results/kernels_sass.json``
and the ``kernels-sass`` section of BENCHMARKS.md.

``cuobjdump`` comes with the CUDA toolkit, or ``pip install nvidia-cuda-cuobjdump`` (found
on PATH, under CUDA_HOME, or in that wheel).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_section  # noqa: E402


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    try:
        import nvidia

        for base in nvidia.__path__:
            candidates += sorted(Path(base).glob("*/bin/cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c.is_file():
            return str(c)
    sys.exit("cuobjdump not found: install the CUDA toolkit or `pip install nvidia-cuda-cuobjdump`")


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Mangled function name -> [(address, instruction)]."""
    out = {}
    for part in re.split(r"\n\s+Function : ", sass)[1:]:
        name, body = part.split("\n", 1)
        out[name.strip()] = [(int(a, 16), i) for a, i in _INSTR.findall(body)]
    return out


def opcode(instr: str) -> str:
    toks = instr.split()
    return toks[1] if toks[0].startswith("@") else toks[0]


def main_loop(code: list[tuple[int, str]]) -> list[str] | None:
    """The smallest loop (backward branch) that holds HMMA instructions."""
    index = {a: k for k, (a, _) in enumerate(code)}
    best = None
    for k, (addr, instr) in enumerate(code):
        m = re.search(r"BRA (?:`\(\S+\) )?0x([0-9a-f]+)", instr)
        if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in index:
            continue
        body = [i for _, i in code[index[int(m.group(1), 16)] : k + 1]]
        mma = any(opcode(i).startswith("HMMA") for i in body)
        if mma and (best is None or len(body) < len(best)):
            best = body
    return best


def measure(arch: str) -> list[dict]:
    from qcore_kernels.nvrtc import compile_source, nvrtc_unavailable_reason
    from qcore_kernels.sources import source

    if reason := nvrtc_unavailable_reason():
        sys.exit(reason)
    src = source("qk_lut.cu")
    result = compile_source(src, arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "qk_lut.cubin"
        cubin.write_bytes(result.cubin)
        sass = subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
    code = functions(sass)
    rows = []
    for inst, k in result.kernels.items():
        if not inst.startswith("qk_lut_mma"):
            continue
        loop = main_loop(code[k.name])
        ops = collections.Counter(opcode(i).split(".")[0] for i in loop)
        reads = sum(1 for i in loop if opcode(i) == "LDS.64")
        rows.append({
            "instance": inst, "arch": arch, "registers": k.registers,
            "loop_instructions": len(loop), "table_reads": reads,
            "per_index": round(len(loop) / reads, 2), "hmma": ops["HMMA"],
            "lds": ops["LDS"], "prmt": ops["PRMT"],
            "other": len(loop) - ops["HMMA"] - ops["LDS"] - ops["PRMT"],
        })
    return rows


_DTYPES = {"__half": "fp16", "__nv_bfloat16": "bf16"}


def settings_of(instance: str, legacy: bool) -> str:
    """An instance's template arguments in words. ``legacy``: recorded before issue 28, when
    ``qk_lut_mma4``'s fourth argument put the index stages in the table and a fifth loaded the
    index words into registers (now the fourth)."""
    name, args = instance.split("<", 1)
    args = [a.strip() for a in args.rstrip(">").split(",")]
    parts = [_DTYPES.get(args[0], args[0])]
    if name == "qk_lut_mma":
        tile, groups = int(args[1]), int(args[2])
        parts += [f"token tile {tile} ({'weights' if tile == 8 else 'tokens'} as the A operand)",
                  f"{groups} row group{'s' if groups > 1 else ''}"]
    elif name == "qk_lut_mma4":
        groups, flags = int(args[1]), [a == "true" for a in args[2:]]
        in_table = legacy and flags[1]
        registers = flags[2] if legacy and len(flags) > 2 else flags[1] if not legacy else False
        parts += [f"{groups} row group{'s' if groups > 1 else ''}",
                  "x in the table's free halves" if flags[0] else "x after the table",
                  "index words in registers" if registers else
                  "index stages in the table (deleted in issue 28)" if in_table else
                  "index stages after the table"]
    elif name == "qk_lut_table":
        parts.append(f"Q = {args[1]} vectors per lane")
    return ", ".join(parts)


def render(result: dict) -> str:
    """The body of the ``kernels-sass`` section: header, tables, then their notes."""
    rows = [r for r in result["rows"] if "per_index" in r]
    table_rows = [r for r in result["rows"] if "per_lookup" in r]  # qk_lut_table, before issue 28
    legacy = any(r["instance"].startswith("qk_lut_mma4<") and r["instance"].count(",") == 4
                 for r in rows)
    lines = [
        "Static cost of the tensor-core LUT GEMVs, no GPU needed: SASS instructions per table "
        "read (one index of one lane) in each instance's main loop, and the loop's make-up. "
        f"NVRTC {result['nvrtc']}, {result['arch']}, cuobjdump {result['cuobjdump']}; "
        f"{result['date']}. Protocol: `qk_lut.cu` compiled with NVRTC, disassembled with "
        "`cuobjdump -sass`, the innermost loop holding the instance's HMMA instructions "
        "counted (one LDS.64 there is one table read).",
        "",
        "| instance | settings | registers | loop instructions | table reads (LDS.64) | "
        "per index | HMMA | LDS (all) | PRMT | other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['instance']}` | {settings_of(r['instance'], legacy)} | {r['registers']} | "
            f"{r['loop_instructions']} | {r['table_reads']} | **{r['per_index']:.2f}** | "
            f"{r['hmma']} | {r['lds']} | {r['prmt']} | {r['other']} |")
    if table_rows:
        lines += [
            "", "**The dot-product-table GEMV `qk_lut_table`** (one token; deleted in issue 28), "
            "per lookup (one 4-byte table read of one lane) in a group of 32 rows whose next "
            "group is full:", "",
            "| instance | settings | registers | group instructions | lookups (LDS) | per lookup "
            "| lookup block | butterfly (SHFL) |", "|---|---|---|---|---|---|---|---|"]
        for r in table_rows:
            lines.append(
                f"| `{r['instance']}` | {settings_of(r['instance'], legacy)} | {r['registers']} | "
                f"{r['group_instructions']} | {r['lookups']} | **{r['per_lookup']:.2f}** | "
                f"{r['lookup_block']} | {r['butterfly_block']} ({r['shfl']}) |")
    notes = [
        "`qk_lut_mma4`'s loop (one chunk step) also holds the move to the next tile, taken "
        "once per tile: with 2 row groups a chunk step ran about 130 of the loop's 353 "
        "instructions (4.1 per index; 145 with the stages in the table), counted by hand on "
        "2026-11-27's build.",
        "Index words in registers (`lut_ops.LUT_MMA4_REGISTER_INDICES`): no stage reads (LDS), "
        "the moves of the words held 2 steps ahead among 'other'. "
        + ("In this build `qk_lut_mma4`'s template arguments are (type, row groups, x in the "
           "table's free halves, index stages in the table[, index words in registers]); "
           "issue 28 deleted the stages in the table, and the fourth argument is now the "
           "index words in registers." if legacy else
           "`qk_lut_mma4`'s template arguments: (type, row groups, x in the table's free "
           "halves, index words in registers)."),
        "Since 2026-11-28 the x reads of every `qk_lut_mma4` instance are predicated (absent "
        "tokens' lanes may skip them: `lut_ops.LUT_MMA4_SKIP_ABSENT_X`).",
    ]
    if table_rows:
        notes.append(
            "`qk_lut_table` counts: a group's instructions are the loop's first block, the "
            "lookups with the next group's index loads (lookup block) and the butterfly that "
            "sums the lanes (with its SHFL count); the row-group count and, for the last warp, "
            "the slices' partial sums are left out (about 20-35 more per group).")
    return "\n".join(lines) + "\n\nNotes:\n\n" + "".join(f"- {n}\n" for n in notes)


TITLE = "## LUT GEMV instructions per index (`benchmarks/kernels_sass.py`)\n\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--render", action="store_true",
                    help="compile nothing: write the section from results/kernels_sass.json")
    args = ap.parse_args()
    if args.render:
        text = render(json.loads((RESULTS / "kernels_sass.json").read_text()))
        print(text)
        if not args.no_write:
            write_section("kernels-sass", TITLE + text)
        return
    from qcore_kernels.nvrtc import nvrtc_version

    tool = subprocess.run([cuobjdump(), "--version"], capture_output=True, text=True).stdout
    version = re.findall(r"V(\d+\.\d+\.\d+)", tool)
    result = {
        "arch": args.arch, "date": datetime.date.today().isoformat(),
        "nvrtc": ".".join(map(str, nvrtc_version())),
        "cuobjdump": version[-1] if version else "?",
        "rows": [r for r in measure(args.arch) if "__half" in r["instance"]],
    }
    text = render(result)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "kernels_sass.json").write_text(json.dumps(result, indent=1) + "\n")
        write_section("kernels-sass", TITLE + text)


if __name__ == "__main__":
    main()
