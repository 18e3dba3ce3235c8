#!/usr/bin/env bash
# The whole test suite, set-up included. Extra arguments go to pytest.
#
#   bash scripts/test.sh [PYTEST_ARGS...]            # in .venv, from requirements-lock.txt
#   bash scripts/test.sh --latest [PYTEST_ARGS...]   # in a throw-away environment with the
#                                                    # newest versions allowed (removed at
#                                                    # the end unless $QCORE_VENV names it)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
setup_args=()
if [ "${1:-}" = "--latest" ]; then
  shift
  setup_args=(--latest)
  if [ -z "${QCORE_VENV:-}" ]; then
    throwaway="$(mktemp -d "${TMPDIR:-/tmp}/qcore-latest.XXXXXX")"
    trap 'rm -rf "$throwaway"' EXIT
    export QCORE_VENV="$throwaway/venv"
  fi
fi
bash "$root/scripts/setup.sh" "${setup_args[@]}"
cd "$root"
venv="${QCORE_VENV:-$root/.venv}"
"$venv/bin/python" -c 'import sys, transformers, torch; print(f"qcore tests: python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, venv {sys.prefix}")'
# -P: the working directory does not go on sys.path, so the repository's folders (kernels/,
# benchmarks/, ...) can never be imported as top-level packages.
"$venv/bin/python" -P -m pytest "$@"
