"""qcore: a quantization toolkit built as a plugin ecosystem.

Importing ``qcore`` is cheap (no torch): plugins import ``hookimpl`` from here.
Heavier entry points (``Pipeline``, ``load``, ``quantize``) are resolved on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

#: Version of the plugin contract (hook names, their arguments, the component interfaces).
#: A plugin built for another major version is refused at load time.
CONTRACT_VERSION = "1.4"

PROJECT_NAME = "qcore"

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for plugin hook implementations: ``@hookimpl def qcore_register_quantizers(register)``."""

if TYPE_CHECKING:
    from qcore.pipeline import Pipeline

__all__ = ["CONTRACT_VERSION", "Pipeline", "__version__", "hookimpl", "load", "quantize"]


from qcore import _hf_hook  # noqa: E402

_hf_hook.install()


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from qcore.pipeline import Pipeline

        return Pipeline
    if name == "load":
        from qcore.checkpoint import load

        return load
    if name == "quantize":
        from qcore.quantize import quantize

        return quantize
    raise AttributeError(f"module 'qcore' has no attribute {name!r}")
