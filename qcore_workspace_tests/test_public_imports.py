"""Plugins and qcore-kernels use the core only through its public modules: ``qcore``, the
contract modules, the testing kit and ``qcore.ops`` (docs/plugins.md, "Helpers for
plugins"). Anything else is internal to the core and may change within a release line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"qcore", "qcore.interfaces", "qcore.context", "qcore.scheme", "qcore.errors",
          "qcore.ops"}
#: The distributions whose own code (not their tests) must keep to the public modules.
SOURCES = sorted([*ROOT.glob("plugins/*/src"), ROOT / "kernels" / "src"])


def core_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a ``qcore`` module in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            if node.module == "qcore":  # ``from qcore import ops`` names a module
                modules = [f"qcore.{a.name}" if a.name in {"ops", "testing"} else "qcore"
                           for a in node.names]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, m) for m in modules if m == "qcore" or m.startswith("qcore.")]
    return found


def is_public(module: str) -> bool:
    return module in PUBLIC or module == "qcore.testing" or module.startswith("qcore.testing.")


def test_the_guard_sees_the_distributions() -> None:
    names = {p.parent.name for p in SOURCES}
    assert {"gptq", "awq", "vptq", "finetune", "kernels"} <= names, names


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.parent.name)
def test_plugin_code_imports_only_public_core_modules(source: Path) -> None:
    internal = [f"{path.relative_to(ROOT)}:{line}: {module}"
                for path in sorted(source.rglob("*.py"))
                for line, module in core_imports(path) if not is_public(module)]
    assert not internal, ("these import core internals; use qcore.ops (or extend it, "
                          "documented, in docs/plugins.md):\n" + "\n".join(internal))


def test_the_guard_catches_an_internal_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from qcore.grid import max_code\nfrom qcore import ops, hookimpl\n"
                      "def f():\n    import qcore.calibration\n")
    found = core_imports(module)
    assert found == [(1, "qcore.grid"), (2, "qcore.ops"), (2, "qcore"),
                     (4, "qcore.calibration")]
    assert [m for _, m in found if not is_public(m)] == ["qcore.grid", "qcore.calibration"]
