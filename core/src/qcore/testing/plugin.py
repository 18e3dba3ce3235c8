"""qcore's pytest plugin: turn it on with ``-p qcore.testing.plugin`` (e.g. ``addopts``
in ``[tool.pytest.ini_options]``) or ``pytest_plugins = ["qcore.testing.plugin"]`` in a
root ``conftest.py``. It is not a ``pytest11`` entry point, so it stays out of the test
sessions of projects that only have qcore installed (docs/plugins.md says more).

It gives the test sessions that load it these fixtures:

- ``qcore_plugin_manager``: a fresh :class:`~qcore.plugins.PluginManager` that loads no
  installed plugin, only qcore's built-ins (registered as plugin ``builtin`` of
  distribution ``qcore``). While the test runs it is also the process-wide manager, so
  ``Pipeline.validate()`` without a registry and ``get_registry()`` see exactly it.
- ``qcore_registry``: that manager's registry.
- ``qcore_register_plugin``: ``register(module, name=..., distribution=..., version=...)``
  adds a test's own hooks module (or :func:`make_plugin` object) to that manager and
  raises its load errors, if any.

Loading it is cheap: no torch import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

# The base test classes are imported by test modules after this plugin; rewriting their
# asserts gives plugin authors pytest's detailed failure messages.
pytest.register_assert_rewrite("qcore.testing.base")

if TYPE_CHECKING:
    from qcore.interfaces import Component
    from qcore.plugins import PluginManager
    from qcore.registry import Registry

#: Signature of the ``qcore_register_plugin`` fixture's value.
RegisterPlugin = Callable[..., "PluginManager"]

_HOOK_OF_KIND = {
    "observers": "qcore_register_observers",
    "transforms": "qcore_register_transforms",
    "quantizers": "qcore_register_quantizers",
    "packers": "qcore_register_packers",
    "kernels": "qcore_register_kernels",
    "checkpoint_formats": "qcore_register_checkpoint_formats",
}


def make_plugin(
    name: str = "test_plugin",
    *,
    observers: Iterable[type[Component]] = (),
    transforms: Iterable[type[Component]] = (),
    quantizers: Iterable[type[Component]] = (),
    packers: Iterable[type[Component]] = (),
    kernels: Iterable[type[Component]] = (),
    checkpoint_formats: Iterable[type[Component]] = (),
) -> ModuleType:
    """A hooks module, built in memory, that registers the given classes: what a
    plugin's ``hooks.py`` would be. Only the hooks of non-empty kinds are implemented."""
    from qcore import hookimpl

    module = ModuleType(name, f"qcore plugin {name!r} built by qcore.testing.make_plugin")
    given = {"observers": observers, "transforms": transforms, "quantizers": quantizers,
             "packers": packers, "kernels": kernels, "checkpoint_formats": checkpoint_formats}
    for kind, classes in given.items():
        classes = tuple(classes)
        if not classes:
            continue
        hook_name = _HOOK_OF_KIND[kind]

        def hook(register: Callable[[type[Component]], None],
                 _classes: tuple[type[Component], ...] = classes) -> None:
            for cls in _classes:
                register(cls)

        hook.__name__ = hook.__qualname__ = hook_name
        # pluggy reads the argument names, defaults excluded: only ``register`` remains.
        setattr(module, hook_name, hookimpl(hook))
    return module


def isolated_plugin_manager(*plugins: ModuleType | object, builtins: bool = True,
                            distribution: str = "(test)", version: str = "0") -> PluginManager:
    """A :class:`~qcore.plugins.PluginManager` that loads no installed plugin: qcore's
    built-ins (unless ``builtins=False``), then each of ``plugins`` (hooks modules or
    :func:`make_plugin` objects, registered under their ``__name__``)."""
    import qcore
    import qcore.builtin.hooks
    from qcore.plugins import BUILTIN_PLUGIN, PluginManager

    manager = PluginManager()
    if builtins:
        manager.register_module(qcore.builtin.hooks, BUILTIN_PLUGIN, "qcore", qcore.__version__)
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        manager.register_module(plugin, name, distribution, version)
    return manager


@pytest.fixture
def qcore_plugin_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginManager]:
    """An isolated plugin manager with only the built-ins; the process-wide one meanwhile."""
    import qcore.plugins

    manager = isolated_plugin_manager()
    # No public setter exists: the process-wide manager is this module attribute, and
    # monkeypatch puts the previous one back after the test.
    monkeypatch.setattr(qcore.plugins, "_manager", manager)
    yield manager


@pytest.fixture
def qcore_registry(qcore_plugin_manager: PluginManager) -> Registry:
    """The registry of ``qcore_plugin_manager`` (raises if a plugin failed to load)."""
    return qcore_plugin_manager.checked_registry()


@pytest.fixture
def qcore_register_plugin(qcore_plugin_manager: PluginManager) -> RegisterPlugin:
    """``register(module, name=None, distribution="(test)", version="0", check=True)``:
    adds a hooks module to ``qcore_plugin_manager``; with ``check`` it raises the
    manager's load errors (a misspelled hook, a duplicate name, a hook that raised)."""

    def register(module: ModuleType | object, name: str | None = None,
                 distribution: str = "(test)", version: str = "0",
                 check: bool = True) -> PluginManager:
        plugin_name = name or getattr(module, "__name__", None) or type(module).__name__
        qcore_plugin_manager.register_module(module, plugin_name, distribution, version)
        if check:
            qcore_plugin_manager.raise_errors()
        return qcore_plugin_manager

    return register


def pytest_report_header(config: pytest.Config) -> str:
    import qcore

    return f"qcore {qcore.__version__} (plugin contract {qcore.CONTRACT_VERSION})"
