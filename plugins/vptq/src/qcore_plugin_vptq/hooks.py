"""Hook implementations of qcore-plugin-vptq. Cheap to import: no torch."""

from __future__ import annotations

from collections.abc import Callable

from qcore import hookimpl
from qcore_plugin_vptq.quantizer import VPTQQuantizer

QCORE_CONTRACT_VERSION = "1.0"


@hookimpl
def qcore_register_quantizers(register: Callable[[type], None]) -> None:
    register(VPTQQuantizer)
