"""Registration of the CuPy kernel providers through the ``qcore`` entry point.

Cheap to import: no torch, no CuPy (the providers import them when they run)."""

from __future__ import annotations

from collections.abc import Callable

from qcore import hookimpl
from qcore_kernels.providers import PROVIDERS

QCORE_CONTRACT_VERSION = "1.0"


@hookimpl
def qcore_register_kernels(register: Callable[[type], None]) -> None:
    for provider in PROVIDERS:
        register(provider)
