"""Static cost of the LUT GEMVs: SASS instructions per table read, no GPU needed.

    python benchmarks/kernels_sass.py [--arch sm_90] [--no-write]

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


def render(result: dict) -> str:
    lines = [
        f"NVRTC {result['nvrtc']}, {result['arch']}, cuobjdump {result['cuobjdump']}; "
        f"{result['date']}. The main loop of each tensor-core LUT GEMV instance: instructions "
        "per table read (one index of one lane), and the loop's make-up. Static counts: "
        "`qk_lut_mma4`'s loop (one chunk step) also holds the move to the next tile, taken "
        "once per tile: with 2 row groups a chunk step ran about 130 of the loop's 353 "
        "instructions (4.1 per index), counted by hand on 2026-11-27's build. Instances with a "
        "fourth template argument `true` load the index words into registers "
        "(`lut_ops.LUT_MMA4_REGISTER_INDICES`): no stage reads (LDS), the moves of the words "
        "held 2 steps ahead among 'other'. Since 2026-11-28 the x reads of every `qk_lut_mma4` "
        "instance are predicated (absent tokens' lanes may skip them: "
        "`lut_ops.LUT_MMA4_SKIP_ABSENT_X`).",
        "",
        "| instance | registers | loop instructions | table reads (LDS.64) | per index | HMMA | "
        "LDS (all) | PRMT | other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [r for r in result["rows"] if "per_index" in r]:
        lines.append(
            f"| `{r['instance']}` | {r['registers']} | {r['loop_instructions']} | "
            f"{r['table_reads']} | **{r['per_index']:.2f}** | {r['hmma']} | {r['lds']} | "
            f"{r['prmt']} | {r['other']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
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
        write_section("kernels-sass",
                      "## LUT GEMV instructions per index (`benchmarks/kernels_sass.py`)\n\n"
                      + text)


if __name__ == "__main__":
    main()
