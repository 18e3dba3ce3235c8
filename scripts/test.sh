#!/usr/bin/env bash
# The whole test suite, set-up included.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "${QCORE_VENV:-$root/.venv}/bin/python" -m pytest "$@"
