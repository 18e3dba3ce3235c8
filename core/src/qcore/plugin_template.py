"""``qcore new-plugin``: a new plugin project from the template shipped inside qcore.

The template lives in ``qcore/templates/plugin/`` as package data (``*.tmpl`` files with
``{{placeholders}}``), so making a project needs neither the network nor a templating
tool. The project it writes: a ``pyproject.toml`` with the ``qcore`` entry point and a
``qcore`` requirement for the running release line, a hooks module that registers one
working example component of the chosen kind, a README, and tests built on
``qcore.testing`` that pass as generated.
"""

from __future__ import annotations

import keyword
import os
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import qcore
from qcore.errors import TemplateError

#: Component kinds the template can start a plugin with.
KINDS: tuple[str, ...] = ("quantizer", "transform")

DISTRIBUTION_PREFIX = "qcore-plugin-"

#: Lower case, starting with a letter, words joined by single hyphens or underscores: a
#: valid entry-point name, distribution suffix and (with ``_``) Python package suffix.
_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")

_SUMMARY = {
    "quantizer": "Round-to-nearest with each group's range clipped to its least-squares ratio",
    "transform": "SmoothQuant-style scaling of outlier input channels into the weights",
}
_OPTION_EXAMPLE = {"quantizer": "{name}.min_ratio=0.7", "transform": "{name}.alpha=0.6"}
_CALIBRATION_FLAG = {"quantizer": "", "transform": " --calib calibration.txt"}
_PIPELINE_NOTE = {
    "quantizer": "`{name}` is a quantizer: it comes last in a pipeline, after any transforms "
                 "(`--pipeline awq,{name}`). It needs no calibration data.",
    "transform": "`{name}` is a transform: it runs before the quantizer, which is the "
                 "built-in `rtn` unless the pipeline names another (`--pipeline {name},gptq`). "
                 "It needs calibration data (the built-in `minmax` statistic).",
}
_HOOK = {"quantizer": "qcore_register_quantizers", "transform": "qcore_register_transforms"}

#: Template file -> path in the new project (``{package}`` and ``{kind}`` filled in).
_COMMON_FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "gitignore.tmpl": ".gitignore",
    "package_init.py.tmpl": "src/{package}/__init__.py",
    "hooks.py.tmpl": "src/{package}/hooks.py",
}
_KIND_FILES = {
    "{kind}.py.tmpl": "src/{package}/{kind}.py",
    "test_{kind}.py.tmpl": "tests/test_{kind}.py",
}


@dataclass(frozen=True)
class PluginNames:
    """The names a plugin goes by, all derived from its short name."""

    #: Entry-point name (``QCORE_PLUGINS``), and the example component's name.
    name: str
    #: ``qcore-plugin-<name>``, what ``pip install`` takes.
    distribution: str
    #: ``qcore_plugin_<name>``, the import package.
    package: str
    #: The example component's class, e.g. ``MyquantQuantizer``.
    class_name: str

    @classmethod
    def of(cls, name: str, kind: str) -> PluginNames:
        check_name(name)
        words = re.split(r"[-_]", name)
        return cls(name=name, distribution=f"{DISTRIBUTION_PREFIX}{name.replace('_', '-')}",
                   package=f"qcore_plugin_{name.replace('-', '_')}",
                   class_name="".join(w.capitalize() for w in words) + kind.capitalize())


def check_name(name: str) -> None:
    """Raise :class:`TemplateError` unless ``name`` can name a plugin: an entry point, a
    component and the suffix of both the distribution and the import package."""
    if name.startswith((DISTRIBUTION_PREFIX, "qcore_plugin_")):
        short = name.split("plugin", 1)[1][1:]
        raise TemplateError(f"plugin name {name!r}: give the short name ({short!r}); the "
                            f"distribution becomes {DISTRIBUTION_PREFIX}{short}")
    if not _NAME.fullmatch(name):
        raise TemplateError(
            f"plugin name {name!r} is not valid: use lower-case letters and digits, starting "
            "with a letter, with single '-' or '_' between words (e.g. 'myquant', "
            "'clip-search')")
    if keyword.iskeyword(name):
        raise TemplateError(f"plugin name {name!r} is a Python keyword; choose another")


def _builtin_names() -> dict[str, set[str]]:
    """Names qcore itself registers, by kind (a plugin reusing one fails to load)."""
    import qcore.builtin.hooks
    from qcore.plugins import BUILTIN_PLUGIN, PluginManager

    manager = PluginManager()
    manager.register_module(qcore.builtin.hooks, BUILTIN_PLUGIN, "qcore", qcore.__version__)
    return {kind: set(manager.registry.names(kind)) for kind in KINDS}


def qcore_requirement(version: str = qcore.__version__) -> str:
    """The range of qcore releases a new plugin is made for: the running release line
    (``qcore>=0.1,<0.2`` for 0.1.x; ``qcore>=1.2,<2`` from 1.0 on)."""
    from packaging.version import Version

    parsed = Version(version)
    upper = f"0.{parsed.minor + 1}" if parsed.major == 0 else str(parsed.major + 1)
    return f"qcore>={parsed.major}.{parsed.minor},<{upper}"


def render(text: str, values: dict[str, str]) -> str:
    """``text`` with every ``{{key}}`` replaced; a placeholder left over is a bug in the
    template, reported with its name."""
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{(\w+)\}\}", text)
    if left:
        raise TemplateError(f"the plugin template has placeholders with no value: {left}")
    return text


def create_plugin(name: str, directory: str | os.PathLike[str] | None = None,
                  kind: str = "quantizer") -> Path:
    """Write a new plugin project for ``name`` into ``directory`` (default:
    ``./qcore-plugin-<name>``) and return the directory. An existing non-empty directory
    is refused and nothing is written."""
    if kind not in KINDS:
        raise TemplateError(f"unknown component kind {kind!r} for a new plugin; choose one "
                            f"of: {', '.join(KINDS)}")
    names = PluginNames.of(name, kind)
    taken = _builtin_names()[kind]
    if name in taken:
        raise TemplateError(f"{name!r} is already the name of a built-in {kind} of qcore; "
                            "choose another plugin name")
    target = Path(directory) if directory is not None else Path(names.distribution)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TemplateError(f"{target} already exists and is not an empty directory; nothing "
                            "was written. Choose another --dir or remove it first")
    values = {
        "name": name, "distribution": names.distribution, "package": names.package,
        "class_name": names.class_name, "kind": kind, "hook": _HOOK[kind],
        "summary": _SUMMARY[kind], "qcore_version": qcore.__version__,
        "qcore_requirement": qcore_requirement(), "contract_version": qcore.CONTRACT_VERSION,
        "option_example": _OPTION_EXAMPLE[kind].format(name=name),
        "calibration_flag": _CALIBRATION_FLAG[kind],
        "pipeline_note": _PIPELINE_NOTE[kind].format(name=name),
    }
    template = files("qcore") / "templates" / "plugin"
    layout = {**_COMMON_FILES, **{source.format(kind=kind): path
                                  for source, path in _KIND_FILES.items()}}
    # Render everything before writing anything: a template error leaves no half project.
    rendered = {path.format(package=names.package, kind=kind):
                render((template / source).read_text(encoding="utf-8"), values)
                for source, path in layout.items()}
    for path, text in rendered.items():
        out = target / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return target
