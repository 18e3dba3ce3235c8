"""No folder of this repository may be imported under a top-level name that another
distribution owns.

pytest's ``importlib`` import mode names a test module that is not inside a package after
its path from the root folder (``kernels/tests/conftest.py`` became
``kernels.tests.conftest``) and puts an empty stand-in module into ``sys.modules`` for each
missing parent (``kernels``, ``kernels.tests``). The stand-in ``kernels`` then shadowed
Hugging Face's ``kernels`` package for the rest of the run, and every test that loaded a
transformers model failed on transformers' ``from kernels import CUDAProperties``.

The test folders are now packages named after their distributions, and the suite runs under
``python -P`` (the working directory is not on ``sys.path``). These checks hold after the
whole suite has been collected: once in this process (where the whole suite was collected
before any test ran, when the suite runs as a whole) and once in a subprocess that collects
the whole suite itself, so they hold whichever tests are selected.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]

#: Top-level names that a folder of this repository could be taken for.
GENERIC_NAMES = ("kernels", "tests", "test", "core", "plugins", "benchmarks", "scripts",
                 "docs")

#: The docstring of the stand-in modules that pytest's importlib mode inserts.
PYTEST_STAND_IN_DOC = "Empty module created by pytest's importmode=importlib."


def _repository_locations(module: ModuleType | None) -> list[Path]:
    """Where ``module`` was loaded from, restricted to this repository's own folders (an
    environment inside the repository, such as ``.venv``, is not one of them)."""
    if module is None:
        return []
    places = [getattr(module, "__file__", None), *list(getattr(module, "__path__", []) or [])]
    prefixes = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    found = []
    for place in places:
        if not place:
            continue
        path = Path(place).resolve()
        if path.is_relative_to(ROOT) and not any(path.is_relative_to(p) for p in prefixes):
            found.append(path)
    return found


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return None


def kernels_problems() -> list[str]:
    """Import ``kernels`` as transformers does; it must be the installed distribution, or
    absent."""
    try:
        distribution = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        spec = _find_spec("kernels")
        if spec is None:
            return []
        places = [spec.origin, *(spec.submodule_search_locations or [])]
        return [f"the 'kernels' distribution is not installed, yet `import kernels` finds "
                f"{[p for p in places if p]}"]
    problems = []
    expected = Path(distribution.locate_file("kernels/__init__.py")).resolve()
    try:
        import kernels
    except ImportError as error:
        return [f"`import kernels` fails with 'kernels' {distribution.version} installed: "
                f"{error}"]
    actual = getattr(kernels, "__file__", None)
    if actual is None or Path(actual).resolve() != expected:
        problems.append(f"`import kernels` gives {kernels!r} (file {actual}), not the installed "
                        f"distribution's {expected}")
    try:
        # transformers' hub-kernels integration runs `from kernels import CUDAProperties, ...`
        # when the installed version is one it supports.
        importlib.import_module("transformers.integrations.hub_kernels")
    except ImportError as error:
        problems.append(f"transformers' hub-kernels integration does not import: {error}")
    return problems


def shadowing_problems() -> list[str]:
    """Everything in this interpreter's ``sys.modules`` (and its import path) that lets a
    folder of the repository stand in for a top-level package."""
    problems = []
    for name, module in sorted(sys.modules.items()):
        # The module's own namespace, not getattr: some modules warn on attribute access.
        if vars(module).get("__doc__") == PYTEST_STAND_IN_DOC if module is not None else False:
            problems.append(f"sys.modules[{name!r}] is an empty stand-in module made up by "
                            "pytest's importlib mode")
    for name in GENERIC_NAMES:
        where = _repository_locations(sys.modules.get(name))
        spec = _find_spec(name) if name not in sys.modules else None
        if spec is not None:
            places = [spec.origin, *(spec.submodule_search_locations or [])]
            where += [Path(p).resolve() for p in places
                      if p and Path(p).resolve().is_relative_to(ROOT)
                      and not Path(p).resolve().is_relative_to(Path(sys.prefix).resolve())]
        if where:
            problems.append(f"the top-level name {name!r} resolves to this repository: "
                            f"{sorted(set(map(str, where)))}")
    return problems + kernels_problems()


def test_no_repository_folder_shadows_a_package_in_this_run() -> None:
    problems = shadowing_problems()
    assert not problems, "\n".join(problems)


def test_no_repository_folder_shadows_a_package_after_collecting_the_whole_suite() -> None:
    """Collects the whole suite in a new interpreter, started as scripts/test.sh starts
    pytest, then runs the same checks there."""
    code = (
        "import importlib.util, json, sys\n"
        "import pytest\n"
        "rc = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider'])\n"
        f"spec = importlib.util.spec_from_file_location('qcore_import_names_check', "
        f"{str(Path(__file__).resolve())!r})\n"
        "check = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(check)\n"
        "print('RESULT ' + json.dumps({'rc': int(rc), 'problems': check.shadowing_problems(),"
        " 'collected': [m for m in sys.modules if m.endswith('_tests') or '_tests.' in m]}))\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the collecting interpreter printed no result:\n{result.stdout[-3000:]}" \
                  f"\n{result.stderr[-3000:]}"
    report = json.loads(lines[-1].removeprefix("RESULT "))
    assert report["rc"] == 0, result.stdout[-3000:]
    assert not report["problems"], "\n".join(report["problems"])
    # The collection did reach every test package, so the checks saw them all.
    packages = {name.split(".")[0] for name in report["collected"]}
    assert {"qcore_tests", "qcore_kernels_tests", "qcore_plugin_gptq_tests",
            "qcore_plugin_awq_tests", "qcore_plugin_vptq_tests",
            "qcore_workspace_tests"} <= packages
