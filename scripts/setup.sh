#!/usr/bin/env bash
# Creates (or refreshes) the workspace's virtual environment in .venv. Idempotent: it
# reinstalls only when a requirements file or a pyproject.toml changed since the last run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${QCORE_VENV:-$root/.venv}"
stamp="$venv/.qcore-setup-stamp"
want="$(cat requirements-dev.txt requirements-assets.txt $(git ls-files '*pyproject.toml' 2>/dev/null || find . -name pyproject.toml -not -path './.venv/*') | sha1sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
echo "qcore setup: installing the workspace into $venv (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r requirements-dev.txt
"$venv/bin/python" -m pip install --quiet --no-deps -r requirements-assets.txt
echo "$want" > "$stamp"
