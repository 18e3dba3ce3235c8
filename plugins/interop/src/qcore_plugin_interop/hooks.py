"""Hook implementations of qcore-plugin-interop. Cheap to import: no torch."""

from __future__ import annotations

from collections.abc import Callable

from qcore import hookimpl
from qcore_plugin_interop.awq import AWQFormat
from qcore_plugin_interop.compressed_tensors import CompressedTensorsFormat
from qcore_plugin_interop.gptq import GPTQFormat

QCORE_CONTRACT_VERSION = "1.3"


@hookimpl
def qcore_register_checkpoint_formats(register: Callable[[type], None]) -> None:
    register(CompressedTensorsFormat)
    register(GPTQFormat)
    register(AWQFormat)
