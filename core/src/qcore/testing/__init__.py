"""qcore's conformance kit for plugin authors: a pytest plugin and base test classes.

Subclass a base class and supply your component through a fixture, pandas-extension
style::

    import pytest
    from qcore.testing import BaseQuantizerTests

    class TestMyQuantizer(BaseQuantizerTests):
        @pytest.fixture
        def quantizer(self):
            return MyQuantizer()

The fixtures ``qcore_plugin_manager``, ``qcore_registry`` and ``qcore_register_plugin``
come from the pytest plugin :mod:`qcore.testing.plugin`, which a test session turns on
with ``-p qcore.testing.plugin`` (docs/plugins.md, "Testing with qcore.testing"). Importing this package is cheap; the base classes (and torch) load
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qcore.testing.plugin import isolated_plugin_manager, make_plugin

if TYPE_CHECKING:
    from qcore.testing.base import (
        BaseCheckpointFormatTests,
        BaseKernelProviderTests,
        BaseObserverTests,
        BasePackerTests,
        BaseQuantizerTests,
        BaseTransformTests,
        ToyVQQuantizer,
        int_layer_record,
        random_int_weight,
        random_vq_weight,
        reference_linear,
    )

_FROM_BASE = {
    "BaseCheckpointFormatTests",
    "BaseKernelProviderTests",
    "BaseObserverTests",
    "BasePackerTests",
    "BaseQuantizerTests",
    "BaseTransformTests",
    "ToyVQQuantizer",
    "int_layer_record",
    "random_int_weight",
    "random_vq_weight",
    "reference_linear",
}

__all__ = [
    "BaseCheckpointFormatTests",
    "BaseKernelProviderTests",
    "BaseObserverTests",
    "BasePackerTests",
    "BaseQuantizerTests",
    "BaseTransformTests",
    "ToyVQQuantizer",
    "int_layer_record",
    "isolated_plugin_manager",
    "make_plugin",
    "random_int_weight",
    "random_vq_weight",
    "reference_linear",
]


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from qcore.testing import base

        return getattr(base, name)
    raise AttributeError(f"module 'qcore.testing' has no attribute {name!r}")
