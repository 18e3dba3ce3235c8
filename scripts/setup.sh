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
pip_install() {
  # This machine's pip configuration lists local indexes that may be absent; their
  # "is ignored" warnings are noise.
  "$venv/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_install --upgrade pip
pip_install -r requirements-dev.txt
pip_install --no-deps -r requirements-assets.txt
echo "$want" > "$stamp"
