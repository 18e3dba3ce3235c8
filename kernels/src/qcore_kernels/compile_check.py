"""Compile every catalogue source for every architecture with NVRTC; fail on errors or spills.

    python -m qcore_kernels.compile_check [--arch sm_80 sm_90 ...] [--json FILE] [--jobs N]

Prints one row per instance and architecture (registers, spill stores/loads, stack frame,
static shared memory). Exit status: 0 clean, 1 a compile error or a register spill,
2 NVRTC unavailable. Needs no GPU (see ``qcore_kernels.nvrtc``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .nvrtc import (
    CompileError,
    CompileResult,
    compile_source,
    nvrtc_library,
    nvrtc_unavailable_reason,
    nvrtc_version,
)
from .sources import ARCHS, SOURCES, KernelSource

COLUMNS = ("source", "instance", "arch", "registers", "spill_stores", "spill_loads",
           "stack_frame", "shared")
HEADER = ("source", "instance", "arch", "regs", "spill st", "spill ld", "stack", "smem")


def _compile(job: tuple[KernelSource, str]) -> CompileResult | Exception:
    try:
        return compile_source(*job)
    except (CompileError, OSError, ValueError) as e:  # OSError: a missing file; ValueError: arch
        return e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qcore_kernels.compile_check",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", action="extend",
                    help=f"architectures (default: {' '.join(ARCHS)})")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = ap.parse_args(argv)
    if reason := nvrtc_unavailable_reason():
        print(reason, file=sys.stderr)
        return 2

    archs = args.arch or list(ARCHS)
    jobs = [(src, arch) for src in SOURCES for arch in archs]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(_compile, jobs))

    rows, compiles, errors = [], [], []
    for (src, arch), r in zip(jobs, results, strict=True):
        if isinstance(r, Exception):
            errors.append({"source": src.file, "arch": arch, "error": str(r)})
            continue
        compiles.append({"source": src.file, "arch": arch, "seconds": round(r.seconds, 3),
                         "cubin_bytes": len(r.cubin)})
        named = {**r.kernels,  # spilling non-inlined device functions get their own row
                 **{f"(device function {n})": k for n, k in r.spills.items() if not k.entry}}
        for inst, k in named.items():
            rows.append({"source": src.file, "instance": inst, "arch": arch,
                         "lowered_name": k.name, "registers": k.registers,
                         "spill_stores": k.spill_stores, "spill_loads": k.spill_loads,
                         "stack_frame": k.stack_frame, "shared": k.shared,
                         "constant": k.constant, "barriers": k.barriers})
    # catalogue order: by source, then instance, then architecture
    order = {key: i for i, key in enumerate(
        [s.file for s in SOURCES] + [i for s in SOURCES for i in s.instances] + archs)}
    rows.sort(key=lambda r: (order[r["source"]], order.get(r["instance"], len(order)),
                             order[r["arch"]]))
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]

    table = [HEADER] + [tuple(str(r[c]) for c in COLUMNS) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    for line in table:
        print("  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                        for i, (v, w) in enumerate(zip(line, widths, strict=True))))
    print()
    major, minor = nvrtc_version()
    print(f"NVRTC {major}.{minor} ({nvrtc_library()})")
    for c in compiles:
        print(f"{c['source']} {c['arch']}: {c['seconds']:.2f} s, cubin {c['cubin_bytes']} bytes")
    for r in spills:
        print(f"SPILL {r['source']} {r['instance']} {r['arch']}: {r['spill_stores']} bytes "
              f"stores, {r['spill_loads']} bytes loads ({r['registers']} registers)")
    for e in errors:
        print(f"ERROR {e['source']} {e['arch']}:\n{e['error']}\n", file=sys.stderr)

    if args.json:
        args.json.write_text(json.dumps({
            "nvrtc": {"library": nvrtc_library(), "version": f"{major}.{minor}"},
            "archs": archs, "kernels": rows, "compiles": compiles, "errors": errors,
        }, indent=1) + "\n")
    ok = not errors and not spills
    print(f"{'OK' if ok else 'FAILED'}: {len(compiles)} compiles, {len(errors)} errors, "
          f"{len(spills)} spilling kernels")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
