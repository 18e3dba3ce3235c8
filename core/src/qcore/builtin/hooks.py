"""Hook implementations of the built-in plugin. Cheap to import: no torch."""

from __future__ import annotations

from typing import Callable

from qcore import hookimpl
from qcore.builtin.int_packer import IntPacker
from qcore.builtin.observers import HessianObserver, MinMaxObserver
from qcore.builtin.rtn import RTNQuantizer
from qcore.builtin.torch_kernels import TorchKernels
from qcore.builtin.torch_lut_kernels import TorchLUTKernels
from qcore.codebook import VQPacker

QCORE_CONTRACT_VERSION = "1.4"


@hookimpl
def qcore_register_observers(register: Callable[[type], None]) -> None:
    register(MinMaxObserver)
    register(HessianObserver)


@hookimpl
def qcore_register_quantizers(register: Callable[[type], None]) -> None:
    register(RTNQuantizer)


@hookimpl
def qcore_register_packers(register: Callable[[type], None]) -> None:
    register(IntPacker)
    register(VQPacker)


@hookimpl
def qcore_register_kernels(register: Callable[[type], None]) -> None:
    register(TorchKernels)
    register(TorchLUTKernels)
