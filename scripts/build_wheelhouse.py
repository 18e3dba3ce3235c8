"""Build every distribution of the workspace into one wheelhouse: a wheel and an sdist of
qcore, qcore-kernels and each qcore-plugin-*, with the standard front end (``build``).

    python scripts/build_wheelhouse.py [--out wheelhouse]

Projects are found, not listed: ``core/``, ``kernels/`` and every ``plugins/*/`` with a
``pyproject.toml``, so a new plugin is built as soon as its folder exists. Each is built
without isolation: the backend (setuptools) comes from the running environment, so no
network is needed. Each is built from a clean copy (no earlier ``build/`` or
``*.egg-info``; nothing is written into the tree), and ``build`` makes the sdist first and
the wheel from the unpacked sdist, so a file the sdist forgot breaks the build here
instead of a user's install. Earlier wheels and sdists of the same distributions are
removed from the wheelhouse first: it holds what the tree holds.

Install from it with ``pip install --no-index --find-links wheelhouse qcore-plugin-NAME``
in an environment that already has the third-party dependencies (torch, transformers,
...), or without ``--no-index`` to take those from the usual index.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_projects(root: Path = ROOT) -> list[Path]:
    """The workspace's distributions: core, kernels, then the plugins by folder name."""
    candidates = [root / "core", root / "kernels", *sorted((root / "plugins").iterdir())]
    return [path for path in candidates if (path / "pyproject.toml").is_file()]


def distribution_name(project: Path) -> str:
    return tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]


def file_prefix(distribution: str) -> str:
    """How wheel and sdist file names spell a distribution (``qcore_plugin_gptq``), up to
    the ``-`` before the version: ``qcore-`` never matches ``qcore_kernels-...``."""
    return re.sub(r"[-_.]+", "_", distribution).lower() + "-"


def remove_old_artifacts(out: Path, distribution: str) -> None:
    for path in out.glob(file_prefix(distribution) + "*"):
        if path.name.endswith((".whl", ".tar.gz")):
            path.unlink()


#: What a source tree may hold that is not source: never copied into a build.
NOT_SOURCE = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "*.pyc")


def build(project: Path, out: Path) -> list[Path]:
    """Build ``project``'s sdist and wheel into ``out``; the files made.

    The build runs on a copy of the project without earlier build output, so a stale
    ``build/`` or ``*.egg-info`` cannot leak into the result and nothing is written into
    the source tree."""
    before = set(out.iterdir())
    with tempfile.TemporaryDirectory(prefix="qcore-build-") as scratch:
        copy = Path(scratch) / project.name
        shutil.copytree(project, copy, ignore=NOT_SOURCE)
        result = subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(copy)],
            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"building {project} failed (python -m build exited with "
                         f"{result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return sorted(set(out.iterdir()) - before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "wheelhouse",
                        help="the wheelhouse folder (default: wheelhouse/ in the workspace)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("build") is None:
        print(f"the build front end is not installed in {sys.prefix}: pip install build "
              "(requirements-dev.txt lists it; bash scripts/setup.sh installs it)",
              file=sys.stderr)
        return 2
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    for project in find_projects():
        distribution = distribution_name(project)
        remove_old_artifacts(out, distribution)
        made = build(project, out)
        if sorted(p.suffix for p in made) != [".gz", ".whl"]:
            raise SystemExit(f"building {project} made {[p.name for p in made]}, not one "
                             "sdist and one wheel")
        print(f"{distribution:24} {'  '.join(p.name for p in made)}")
    print(f"wheelhouse: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
