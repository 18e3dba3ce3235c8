"""Hook implementations of qcore-plugin-finetune. Cheap to import: no torch."""

from __future__ import annotations

from collections.abc import Callable

from qcore import hookimpl
from qcore_plugin_finetune.transform import FinetuneTransform

QCORE_CONTRACT_VERSION = "1.2"


@hookimpl
def qcore_register_transforms(register: Callable[[type], None]) -> None:
    register(FinetuneTransform)
