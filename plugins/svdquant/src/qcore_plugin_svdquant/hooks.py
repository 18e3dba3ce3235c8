"""Hook implementations of qcore-plugin-svdquant. Cheap to import: no torch."""

from __future__ import annotations

from collections.abc import Callable

from qcore import hookimpl
from qcore_plugin_svdquant.observer import InputSampleObserver
from qcore_plugin_svdquant.transforms import SVDQuant

QCORE_CONTRACT_VERSION = "1.4"


@hookimpl
def qcore_register_observers(register: Callable[[type], None]) -> None:
    register(InputSampleObserver)


@hookimpl
def qcore_register_transforms(register: Callable[[type], None]) -> None:
    register(SVDQuant)
