#!/usr/bin/env bash
# The main job, set-up included: quantize the embedded SmolLM2-135M with the default
# pipeline (GPTQ, 4 bits, group 64), print perplexity before and after, the checkpoint's
# path and size. Extra arguments go to `qcore quantize` (e.g. --pipeline rtn --bits 3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
venv="${QCORE_VENV:-$root/.venv}"
"$venv/bin/qcore" quantize --pipeline gptq --bits 4 --group-size 64 --eval --overwrite "$@"
