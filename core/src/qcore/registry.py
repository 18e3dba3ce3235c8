"""Name -> component class, per kind, each attributed to the distribution that gave it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

from qcore.errors import DuplicateComponentError, UnknownComponentError
from qcore.interfaces import KINDS, Component

#: Well-known component names and the distribution that provides them, so that an
#: unknown name can say what to install.
KNOWN_PROVIDERS: dict[str, str] = {
    "gptq": "qcore-plugin-gptq",
    "awq": "qcore-plugin-awq",
    "awq-clip": "qcore-plugin-awq",
    "act_absmean": "qcore-plugin-awq",
    "vptq": "qcore-plugin-vptq",
    "finetune": "qcore-plugin-finetune",
    "quamba": "qcore-plugin-quamba",
    "svdquant": "qcore-plugin-svdquant",
    "cupy": "qcore-kernels[cuda]",
}


@dataclass(frozen=True)
class Origin:
    """Where a component came from."""

    plugin: str
    distribution: str
    version: str

    def label(self) -> str:
        return f"{self.distribution} {self.version} (plugin {self.plugin!r})"


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    cls: type[Component]
    origin: Origin


class Registry:
    """The components of every kind that the loaded plugins registered."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, cls: type[Component], origin: Origin) -> Registration:
        entries = self._by_kind[kind]
        existing = entries.get(cls.name)
        if existing is not None:
            raise DuplicateComponentError(
                f"two {kind}s are named {cls.name!r}: {existing.cls.__qualname__} from "
                f"{existing.origin.label()} and {cls.__qualname__} from {origin.label()}; "
                "uninstall or disable one of them (QCORE_DISABLE_PLUGINS=<plugin>)")
        reg = Registration(kind, cls.name, cls, origin)
        entries[cls.name] = reg
        return reg

    def get(self, kind: str, name: str) -> Registration:
        try:
            return self._by_kind[kind][name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def find(self, kind: str, name: str) -> Registration | None:
        return self._by_kind[kind].get(name)

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def of_kind(self, kind: str) -> list[Registration]:
        return [self._by_kind[kind][n] for n in sorted(self._by_kind[kind])]

    def kinds_of(self, name: str) -> list[str]:
        return [kind for kind in KINDS if name in self._by_kind[kind]]

    def __iter__(self) -> Iterator[Registration]:
        for kind in KINDS:
            yield from self.of_kind(kind)

    def unknown_message(self, kind: str, name: str) -> str:
        installed = ", ".join(self.names(kind)) or "none"
        msg = f"Unknown {kind}: {name!r}. Installed {kind}s: {installed}."
        elsewhere = [k for k in self.kinds_of(name) if k != kind]
        if elsewhere:
            msg += f" ({name!r} is installed as a {' and a '.join(elsewhere)}.)"
        dist = KNOWN_PROVIDERS.get(name)
        if dist:
            msg += f" {name!r} is provided by {dist}: pip install {dist}"
        return msg

    def restricted(self, keep: set[str]) -> Registry:
        """A copy holding only components from the plugins named in ``keep``."""
        out = Registry()
        for reg in self:
            if reg.origin.plugin in keep:
                out._by_kind[reg.kind][reg.name] = dataclasses.replace(reg)
        return out
