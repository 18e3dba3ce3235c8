"""Hook implementations of qcore-plugin-gptq. Cheap to import: no torch."""

from __future__ import annotations

from collections.abc import Callable

from qcore import hookimpl
from qcore_plugin_gptq.quantizer import GPTQQuantizer

QCORE_CONTRACT_VERSION = "1.0"


@hookimpl
def qcore_register_quantizers(register: Callable[[type], None]) -> None:
    register(GPTQQuantizer)
