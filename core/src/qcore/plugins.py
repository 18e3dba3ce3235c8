"""The plugin manager: discovers plugins through the ``qcore`` entry-point group,
registers their components, and attributes each one to its distribution and version.

Environment:

- ``QCORE_PLUGINS``: unset = load every installed plugin; empty = built-ins only;
  ``"awq,gptq"`` = built-ins plus those (entry-point or distribution names). Naming a
  plugin that is not installed is an error.
- ``QCORE_DISABLE_PLUGINS``: comma-separated plugins never to load (like pytest's
  ``-p no:NAME``).

A plugin that fails is never swallowed: its error (naming the distribution, its version
and the entry point) is kept in :attr:`PluginManager.errors`; ``qcore plugins`` shows it
and anything that uses the registry raises it, with the way to run without the plugin.

A plugin made for another qcore is refused with an error naming both versions: before
import, when its distribution requires a ``qcore`` range the running qcore is outside of;
after import, when its hooks module declares a ``QCORE_CONTRACT_VERSION`` of another major
version than :data:`qcore.CONTRACT_VERSION`.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator

import pluggy

import qcore
from qcore import CONTRACT_VERSION, PROJECT_NAME, hookspecs
from qcore.errors import PluginLoadError, QcoreError
from qcore.interfaces import (
    CheckpointFormat,
    Component,
    KernelProvider,
    Observer,
    Packer,
    Quantizer,
    Transform,
)
from qcore.registry import Origin, Registry

ENTRY_POINT_GROUP = PROJECT_NAME
BUILTIN_PLUGIN = "builtin"
ALLOWLIST_ENV = "QCORE_PLUGINS"
BLOCKLIST_ENV = "QCORE_DISABLE_PLUGINS"

_BASES: dict[str, type[Component]] = {
    "observer": Observer,
    "transform": Transform,
    "quantizer": Quantizer,
    "packer": Packer,
    "kernel": KernelProvider,
    "checkpoint_format": CheckpointFormat,
}


@dataclass
class PluginInfo:
    """One plugin as ``qcore plugins`` reports it."""

    name: str
    distribution: str
    version: str
    entry_point: str
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.entry_point,
            "hooks": self.hooks,
            "components": self.components,
            "error": self.error,
        }


def _split_env(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


class PluginManager:
    """Loads plugins and holds the :class:`Registry` of their components."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: dict[str, PluginInfo] = {}
        self.errors: list[PluginLoadError] = []

    # ------------------------------------------------------------------ loading

    def load_installed(self, allowlist: list[str] | None = None,
                       blocked: Iterable[str] = ()) -> None:
        """Load the plugins of the ``qcore`` entry-point group (built-ins always, unless
        blocked), honouring an allowlist (None = all) and a blocklist."""
        blocked = set(blocked)
        eps = list(entry_points(group=ENTRY_POINT_GROUP))
        if allowlist is not None:
            known = {ep.name for ep in eps} | {_dist_name(ep) for ep in eps}
            missing = [name for name in allowlist if name not in known]
            if missing:
                installed = ", ".join(sorted(ep.name for ep in eps if ep.name != BUILTIN_PLUGIN))
                self.errors.append(PluginLoadError(
                    f"{ALLOWLIST_ENV} names {', '.join(map(repr, missing))}, which "
                    f"{'is' if len(missing) == 1 else 'are'} not installed. Installed plugins: "
                    f"{installed or 'none besides the built-ins'}. Install it "
                    f"(pip install qcore-plugin-<name>) or remove it from {ALLOWLIST_ENV}."))
        for ep in sorted(eps, key=lambda e: (e.name != BUILTIN_PLUGIN, e.name)):
            dist = _dist_name(ep)
            if ep.name in blocked or dist in blocked:
                continue
            if (allowlist is not None and ep.name != BUILTIN_PLUGIN
                    and ep.name not in allowlist and dist not in allowlist):
                continue
            self._load_entry_point(ep)
        self._register_components()

    def _load_entry_point(self, ep: EntryPoint) -> None:
        dist, version = _dist_name(ep), _dist_version(ep)
        info = PluginInfo(ep.name, dist, version, f"{ep.name} = {ep.value}")
        if ep.name in self.plugins:
            other = self.plugins[ep.name]
            self._fail(info, f"plugin name {ep.name!r} is used by two distributions: "
                             f"{other.distribution} and {dist}; uninstall one of them")
            return
        self.plugins[ep.name] = info
        mismatch = _core_requirement_mismatch(ep)
        if mismatch is not None:
            self._fail(info, f"plugin {ep.name!r} from {dist} {version} requires {mismatch}, "
                             f"but qcore {qcore.__version__} is installed: install a release of "
                             f"{dist} made for qcore {qcore.__version__}, or the qcore it "
                             f"was made for (pip install '{mismatch}')")
            return
        try:
            module = ep.load()
        # A broken plugin must be reported whatever it raised, even sys.exit() at import.
        except (Exception, SystemExit) as exc:
            self._fail(info, f"plugin {ep.name!r} from {dist} {version} failed to import "
                             f"(entry point {info.entry_point}): {type(exc).__name__}: {exc}",
                       exc)
            return
        self._add_plugin_module(info, module)

    def register_module(self, module: ModuleType | object, name: str,
                        distribution: str = "(in-process)", version: str = "0") -> None:
        """Register a plugin object directly (tests, notebooks); then its components."""
        info = PluginInfo(name, distribution, version, f"{name} (registered in-process)")
        self.plugins[name] = info
        self._add_plugin_module(info, module)
        self._register_components(only=name)

    def _add_plugin_module(self, info: PluginInfo, module: ModuleType | object) -> None:
        contract = getattr(module, "QCORE_CONTRACT_VERSION", None)
        if contract is not None and str(contract).split(".")[0] != CONTRACT_VERSION.split(".")[0]:
            self._fail(info, f"plugin {info.name!r} from {info.distribution} {info.version} "
                             f"was built for qcore contract {contract}, but qcore "
                             f"{qcore.__version__} implements contract {CONTRACT_VERSION}, "
                             f"which is incompatible: install a release of "
                             f"{info.distribution} made for contract {CONTRACT_VERSION}, or a "
                             f"qcore that implements contract {contract}")
            return
        try:
            self.pm.register(module, name=info.name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            self._fail(info, f"plugin {info.name!r} from {info.distribution} {info.version} "
                             f"is invalid: {exc}. Hook names must be one of: "
                             f"{', '.join(hookspecs.REGISTRATION_HOOKS)}", exc)
            return
        info.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(module) or [])

    def _register_components(self, only: str | None = None) -> None:
        for hook_name, kind in hookspecs.REGISTRATION_HOOKS.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():  # registration order: built-ins first
                info = self.plugins.get(impl.plugin_name)
                if info is None or info.error is not None:
                    continue
                if only is not None and impl.plugin_name != only:
                    continue
                register = self._registrar(kind, info)
                try:
                    impl.function(**({"register": register} if impl.argnames else {}))
                except QcoreError as exc:
                    self._fail(info, str(exc), exc)
                except Exception as exc:
                    self._fail(info, f"plugin {info.name!r} from {info.distribution} "
                                     f"{info.version} raised in {hook_name}: "
                                     f"{type(exc).__name__}: {exc}", exc)

    def _registrar(self, kind: str, info: PluginInfo) -> Callable[[type[Component]], None]:
        base = _BASES[kind]
        origin = Origin(info.name, info.distribution, info.version)

        def register(cls: type[Component]) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginLoadError(
                    f"plugin {info.name!r} ({info.distribution} {info.version}) registered "
                    f"{cls!r} as a {kind}, but it is not a subclass of "
                    f"qcore.interfaces.{base.__name__}")
            if not isinstance(cls.name, str) or not cls.name:
                raise PluginLoadError(
                    f"plugin {info.name!r} ({info.distribution}) registered {kind} class "
                    f"{cls.__qualname__} without a name: set name = '...' on the class")
            import dataclasses

            params = getattr(cls.Config, "__dataclass_params__", None)
            if params is None or not params.frozen or not dataclasses.is_dataclass(cls.Config):
                raise PluginLoadError(
                    f"{kind} {cls.name!r} from {info.distribution}: Config must be a "
                    "@dataclass(frozen=True) nested in the class")
            self.registry.add(kind, cls, origin)
            info.components.setdefault(kind, []).append(cls.name)

        return register

    def _fail(self, info: PluginInfo, message: str, exc: BaseException | None = None) -> None:
        info.error = message
        err = PluginLoadError(message)
        if exc is not None:
            err.__cause__ = exc
            err.details = "".join(traceback.format_exception(exc))  # type: ignore[attr-defined]
        self.errors.append(err)
        # A failed plugin contributes nothing: drop anything it registered before failing.
        if info.components:
            self.registry = self.registry.restricted(
                {name for name, p in self.plugins.items() if p.error is None})
            info.components = {}

    # ----------------------------------------------------------------- queries

    def raise_errors(self) -> None:
        """Raise the load errors (all of them in one message), if any."""
        if not self.errors:
            return
        if len(self.errors) == 1:
            err = self.errors[0]
            raise PluginLoadError(f"{err} (to run without a plugin: "
                                  f"{BLOCKLIST_ENV}=<plugin> or {ALLOWLIST_ENV}=<plugins to keep>)"
                                  ) from err.__cause__
        lines = "\n".join(f"- {e}" for e in self.errors)
        raise PluginLoadError(f"{len(self.errors)} plugins failed to load:\n{lines}\n(to run "
                              f"without a plugin: {BLOCKLIST_ENV}=<plugin>)")

    def checked_registry(self) -> Registry:
        """The registry, after raising any load error."""
        self.raise_errors()
        return self.registry

    def distribution_of(self, kind: str, name: str) -> tuple[str, str]:
        origin = self.registry.get(kind, name).origin
        return origin.distribution, origin.version

    def report(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.plugins.values()] + [
            {"name": None, "error": str(e)} for e in self.errors
            if not any(p.error == str(e) for p in self.plugins.values())
        ]


def _core_requirement_mismatch(ep: EntryPoint) -> str | None:
    """The plugin distribution's requirement on ``qcore`` (e.g. ``qcore<0.3,>=0.2``) when
    the running qcore does not satisfy it; None when it does or when there is none.

    pip enforces the requirement at install time, but ``--no-deps``, ``--target`` folders
    and a later ``pip install qcore==...`` all get past it: the plugin would then import
    against a core it was not made for and fail in ways that name neither version."""
    if ep.dist is None or ep.dist.name == PROJECT_NAME or not ep.dist.requires:
        return None
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    for line in ep.dist.requires:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(requirement.name) != PROJECT_NAME:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # qcore needed only with an optional extra
        if not requirement.specifier.contains(qcore.__version__, prereleases=True):
            return f"{requirement.name}{requirement.specifier}"
    return None


def _dist_name(ep: EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "(unknown distribution)"


def _dist_version(ep: EntryPoint) -> str:
    return ep.dist.version if ep.dist is not None else "?"


def installed_distributions() -> dict[str, str]:
    """Name -> version of qcore and of every installed distribution with a ``qcore`` entry
    point, loaded or not (the allowlist, the blocklist and load errors do not matter):
    what ``qcore plugins --requirements`` pins."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    try:
        found[PROJECT_NAME] = version(PROJECT_NAME)
    except PackageNotFoundError:  # qcore run from a source tree without being installed
        found[PROJECT_NAME] = qcore.__version__
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.dist is not None:
            found[ep.dist.name] = ep.dist.version
    return dict(sorted(found.items()))


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use from the environment."""
    global _manager
    if _manager is None:
        manager = PluginManager()
        manager.load_installed(allowlist=_split_env(os.environ.get(ALLOWLIST_ENV)),
                               blocked=_split_env(os.environ.get(BLOCKLIST_ENV)) or ())
        _manager = manager
    return _manager


@contextlib.contextmanager
def use_plugin_manager(manager: PluginManager) -> Iterator[PluginManager]:
    """Make ``manager`` the process-wide one inside the ``with`` block (tests, embedding
    applications); the previous one is restored afterwards."""
    global _manager
    previous = _manager
    _manager = manager
    try:
        yield manager
    finally:
        _manager = previous


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (the environment is read again on next use)."""
    global _manager
    _manager = None


def get_registry() -> Registry:
    """The process-wide registry; raises the plugins' load errors, if any."""
    return get_plugin_manager().checked_registry()
