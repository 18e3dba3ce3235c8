"""Hook implementations of qcore-plugin-awq. Cheap to import: no torch."""

from __future__ import annotations

from collections.abc import Callable

from qcore import hookimpl
from qcore_plugin_awq.observer import AbsMeanObserver
from qcore_plugin_awq.transforms import AWQClip, AWQScales

QCORE_CONTRACT_VERSION = "1.0"


@hookimpl
def qcore_register_observers(register: Callable[[type], None]) -> None:
    register(AbsMeanObserver)


@hookimpl
def qcore_register_transforms(register: Callable[[type], None]) -> None:
    register(AWQScales)
    register(AWQClip)
