"""docs/plugins.md is the plugin author's contract: every hook and every interface method
appears with its exact signature, and every Python block on the page runs."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import qcore.testing
from qcore import hookspecs, interfaces

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
TEXT = DOCS.read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FILE_MARKER = re.compile(r"^# file: (\S+)\n")

INTERFACES = (interfaces.Component, interfaces.Observer, interfaces.Transform,
              interfaces.Quantizer, interfaces.Packer, interfaces.KernelProvider,
              interfaces.CheckpointFormat)
DATACLASSES = (interfaces.QuantizedWeight, interfaces.PackedWeight, interfaces.KernelSupport,
               interfaces.KernelRequest)


def squash(text: str) -> str:
    """Whitespace runs as one space: a long signature may wrap in the page."""
    return re.sub(r"\s+", " ", text)


DOCS_SQUASHED = squash(TEXT)


def signature_line(function: Callable[..., Any], name: str) -> str:
    """``def name(arg: Annotation = default, ...) -> Return`` with the annotations as
    written in the source (the modules use ``from __future__ import annotations``)."""
    sig = inspect.signature(function)
    parts: list[str] = []
    keyword_only = False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        parts.append(text)
    returns = "" if sig.return_annotation is sig.empty else f" -> {sig.return_annotation}"
    return f"def {name}({', '.join(parts)}){returns}"


def public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    """Methods the class itself defines (``__init__`` included), unwrapped."""
    out = {}
    for name, value in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        function = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if inspect.isfunction(function):
            out[name] = function
    return out


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(TEXT) if lang == language]


# ------------------------------------------------------------------------- signatures


def test_signature_line_formats_like_the_source() -> None:
    assert signature_line(hookspecs.qcore_register_quantizers, "qcore_register_quantizers") == (
        "def qcore_register_quantizers(register: Callable[[type[Quantizer]], None]) -> None")
    assert signature_line(interfaces.KernelRequest.for_packed.__func__, "for_packed") == (
        "def for_packed(cls, packed: PackedWeight, op: str, *, dtype: str = 'float32', "
        "device: str = 'cpu', compute_capability: tuple[int, int] | None = None) -> KernelRequest")


@pytest.mark.parametrize("hook", sorted(hookspecs.REGISTRATION_HOOKS))
def test_every_hook_is_documented_with_its_exact_signature(hook: str) -> None:
    line = signature_line(getattr(hookspecs, hook), hook)
    assert line in DOCS_SQUASHED, f"docs/plugins.md lacks the hook signature:\n    {line}"
    assert f"- `{hook}`:" in TEXT, f"docs/plugins.md does not explain {hook} in the hook list"


def test_every_hookspec_function_is_a_registration_hook() -> None:
    specs = {name for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("qcore_")}
    assert specs == set(hookspecs.REGISTRATION_HOOKS)


@pytest.mark.parametrize("cls", INTERFACES, ids=lambda c: c.__name__)
def test_every_interface_method_is_documented_with_its_exact_signature(cls: type) -> None:
    methods = public_methods(cls)
    assert methods, f"{cls.__name__} defines no methods?"
    missing = [line for name, f in methods.items()
               if (line := signature_line(f, name)) not in DOCS_SQUASHED]
    assert not missing, f"docs/plugins.md lacks {cls.__name__} methods:\n" + "\n".join(missing)
    assert f"### `{cls.__name__}`" in TEXT, f"no section for {cls.__name__}"


@pytest.mark.parametrize("cls", INTERFACES, ids=lambda c: c.__name__)
def test_every_interface_attribute_is_documented_with_its_type(cls: type) -> None:
    annotations = vars(cls).get("__annotations__", {})
    missing = [f"{name}: {annotation}" for name, annotation in annotations.items()
               if f"`{name}: {annotation}`" not in DOCS_SQUASHED]
    assert not missing, f"docs/plugins.md lacks {cls.__name__} attributes: {missing}"


@pytest.mark.parametrize("cls", DATACLASSES, ids=lambda c: c.__name__)
def test_every_dataclass_field_is_documented_with_its_type(cls: type) -> None:
    missing = [f"{f.name}: {f.type}" for f in dataclasses.fields(cls)
               if f"`{f.name}: {f.type}`" not in DOCS_SQUASHED]
    assert not missing, f"docs/plugins.md lacks {cls.__name__} fields: {missing}"


def test_every_qcore_ops_name_is_documented_with_its_signature() -> None:
    import qcore.ops

    section = squash(TEXT.split("\n## Helpers for plugins: `qcore.ops`\n", 1)[1]
                     .split("\n## ", 1)[0])
    missing = []
    for name in qcore.ops.__all__:
        value = getattr(qcore.ops, name)
        line = signature_line(value, name) if inspect.isfunction(value) else name
        if f"- `{line}`:" not in section:
            missing.append(line)
    assert not missing, "docs/plugins.md's qcore.ops section lacks:\n" + "\n".join(missing)
    assert "def replace_tensors(self, values: Mapping[str, torch.Tensor]) -> None" in section
    from qcore.qlinear import QuantLinear

    assert signature_line(QuantLinear.replace_tensors, "replace_tensors") in section


def test_the_testing_kit_is_documented() -> None:
    for name in qcore.testing.__all__:
        assert f"{name}" in TEXT, f"qcore.testing.{name} is not documented"
    for fixture in ("qcore_plugin_manager", "qcore_registry", "qcore_register_plugin"):
        assert f"`{fixture}" in TEXT, f"fixture {fixture} is not documented"
    for base, required in (("BaseQuantizerTests", "quantizer"), ("BasePackerTests", "packer"),
                           ("BaseKernelProviderTests", "provider"),
                           ("BaseObserverTests", "observer"), ("BaseTransformTests", "transform")):
        assert re.search(rf"\| `{base}` +\| `{required}` +\|", TEXT), f"{base} row missing"


def test_every_mapped_method_from_the_hookspecs_docstring_is_in_the_guide() -> None:
    doc = hookspecs.__doc__ or ""
    methods = re.findall(r"^- ([A-Z][\w-]*(?: \w+)?)(?: \(|:)", doc, re.M)
    assert {"GPTQ", "AWQ", "VPTQ", "Quamba", "SVDQuant"} <= set(methods)
    section = TEXT.split("## How the methods behind qcore map onto the contract")[1]
    for method in methods:
        assert f"**{method}**" in section, f"{method} is not in the mapping section"


# ----------------------------------------------------------------------- code blocks


def test_toml_blocks_parse_and_the_entry_point_names_the_hooks_module() -> None:
    tomls = blocks("toml")
    assert tomls
    for body in tomls:
        tomllib.loads(body)
    pyproject = tomllib.loads(tomls[0])
    target = pyproject["project"]["entry-points"]["qcore"]["clip"]
    assert f"# file: src/{target.replace('.', '/')}.py\n" in TEXT


#: Sections whose shell commands qcore_workspace_tests/test_publishing.py runs, as written,
#: in a new virtual environment (one bash block each).
SECTIONS_WITH_COMMANDS = ("Start from the template", "Publishing")


def test_shell_blocks_are_only_where_a_test_runs_them() -> None:
    sections = {part.split("\n", 1)[0]: part for part in re.split(r"^## ", TEXT, flags=re.M)[1:]}
    for title, body in sections.items():
        shell = [b for lang, b in FENCE.findall(body) if lang in {"bash", "sh", "shell"}]
        expected = 1 if title in SECTIONS_WITH_COMMANDS else 0
        assert len(shell) == expected, (
            f"section {title!r} has {len(shell)} shell blocks; only {SECTIONS_WITH_COMMANDS} "
            "have one, which qcore_workspace_tests/test_publishing.py runs")


def test_every_python_block_runs_and_the_example_tests_pass(tmp_path: Path) -> None:
    scripts: list[str] = []
    test_files: list[str] = []
    for language, body in FENCE.findall(TEXT):
        marker = FILE_MARKER.match(body)
        if marker:
            path = tmp_path / marker.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            if re.fullmatch(r"tests/test_\w+\.py", marker.group(1)):
                test_files.append(marker.group(1))
        elif language == "python":
            scripts.append(body)
        else:
            assert language in {"toml", "bash", ""}, f"unexpected block language {language!r}"
    assert len(scripts) >= 4 and test_files == ["tests/test_conformance.py"]

    # Each block is compiled on its own (its own __future__ imports) and run in one
    # namespace, in page order, like a reader pasting them into one session.
    runner = (
        "import json, sys\n"
        "namespace = {'__name__': '__main__'}\n"
        "for i, block in enumerate(json.loads(sys.stdin.read())):\n"
        "    exec(compile(block, f'docs/plugins.md python block {i}', 'exec'), namespace)\n"
        "print('blocks ran:', i + 1)\n")
    env = {k: v for k, v in os.environ.items() if k not in {"QCORE_DISABLE_PLUGINS"}}
    env.update(PYTHONPATH=str(tmp_path / "src"), QCORE_PLUGINS="", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", runner], input=json.dumps(scripts),
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"blocks ran: {len(scripts)}" in result.stdout

    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             *test_files], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.match(r"\d+ passed", summary), summary
