"""Registration of the kernel providers through the ``qcore`` entry point: the CuPy ones
(CUDA) and the CPU ones on torch's packed-weight operators.

Cheap to import: no torch, no CuPy (the providers import them when they run)."""

from __future__ import annotations

from collections.abc import Callable

from qcore import hookimpl
from qcore_kernels.cpu_packed import CpuInt4Kernels, CpuInt8Kernels, CpuW8A8Kernels
from qcore_kernels.providers import PROVIDERS

QCORE_CONTRACT_VERSION = "1.2"


@hookimpl
def qcore_register_kernels(register: Callable[[type], None]) -> None:
    for provider in (*PROVIDERS, CpuInt4Kernels, CpuInt8Kernels, CpuW8A8Kernels):
        register(provider)
