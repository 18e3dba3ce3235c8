#!/usr/bin/env bash
# The prepared GPU check: installs the workspace offline, runs every kernel test (the GPU
# ones included) and the kernel benchmark of BENCHMARKS.md, and writes into OUTDIR:
#   gpu_check.log      everything printed
#   gpu_tests.xml      pytest's JUnit report
#   kernels_gpu.json   benchmark results (record here with:
#                      python benchmarks/kernels_gpu.py record OUTDIR/kernels_gpu.json)
#   kernels_gpu.md     the benchmark table
#   gpu_check.json     summary: environment, test counts, exit codes, durations
# Usage: kernels/gpu_check.sh OUTDIR   (about 3-5 minutes on an H100; no network needed)
# PYTHON selects the interpreter (default python3: the GPU machines' torch + CuPy).
set -uo pipefail
out="${1:?usage: kernels/gpu_check.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
site="$(mktemp -d /tmp/qcore-site.XXXXXX)"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1 QCORE_CACHE="${QCORE_CACHE:-/tmp/qcore-cache}"
start=$SECONDS

{
  echo "== $(date -u +%FT%TZ) gpu_check in $root"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
  "$py" -c "import cupy; print('cupy', cupy.__version__)" 2>&1
  echo "== install the workspace offline into $site"
} 2>&1 | tee "$log"

# setuptools builds the wheels here (no hatchling on the GPU machines); --target keeps the
# machine's environment untouched, and the entry points live in the installed dist-info.
"$py" -m pip install --no-index --no-deps --no-build-isolation --quiet --target "$site" \
  ./core ./plugins/gptq ./kernels 2>&1 | tee -a "$log"
install_rc=${PIPESTATUS[0]}
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

echo "== tests" | tee -a "$log"
t0=$SECONDS
# PYTEST_ARGS narrows the tests (e.g. "-m gpu": the GPU tests alone) when device time is short.
"$py" -P -m pytest kernels/qcore_kernels_tests -p no:cacheprovider -q -rs --junitxml="$out/gpu_tests.xml" ${PYTEST_ARGS:-} 2>&1 | tee -a "$log"
tests_rc=${PIPESTATUS[0]}
tests_s=$((SECONDS - t0))

echo "== kernel benchmark" | tee -a "$log"
t0=$SECONDS
# BENCH_ARGS adds options to the benchmark (e.g. "--lut-sweep": qk_lut_mma4's launch sweep, which
# also times each switch of qcore_kernels.lut_ops.UNMEASURED_SWITCHES against the defaults).
"$py" benchmarks/kernels_gpu.py run --out "$out" ${BENCH_ARGS:-} 2>&1 | tee -a "$log"
bench_rc=${PIPESTATUS[0]}
bench_s=$((SECONDS - t0))

"$py" - "$out" "$install_rc" "$tests_rc" "$tests_s" "$bench_rc" "$bench_s" "$((SECONDS - start))" <<'PY' 2>&1 | tee -a "$log"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out = Path(sys.argv[1])
install_rc, tests_rc, tests_s, bench_rc, bench_s, total_s = map(int, sys.argv[2:])
counts = {}
try:
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except Exception as exc:  # noqa: BLE001
    counts = {"unreadable": str(exc)}
summary = {"install_rc": install_rc, "tests_rc": tests_rc, "tests": counts, "tests_s": tests_s,
           "benchmark_rc": bench_rc, "benchmark_s": bench_s, "total_s": total_s,
           "benchmark": "kernels_gpu.json" if (out / "kernels_gpu.json").exists() else None}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
print("== summary", json.dumps(summary))
PY
[ "$install_rc" = 0 ] && [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
