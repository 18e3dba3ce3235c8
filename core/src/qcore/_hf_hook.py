"""Register qcore with transformers when transformers' quantizer registry is imported.

``import qcore`` must stay cheap (no transformers import), yet
``AutoModelForCausalLM.from_pretrained(qcore_checkpoint)`` should work once qcore is
imported. A meta-path finder waits for ``transformers.quantizers.auto`` to be executed and
then calls :func:`qcore.hf.register`; if it is already imported, registration is immediate.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from typing import Any

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        from qcore.hf import register

        register()
    except Exception as exc:  # never break the user's transformers import
        logging.getLogger("qcore").warning(
            "qcore could not register its checkpoint format with transformers (%s: %s); "
            "load qcore checkpoints with qcore.load(path)", type(exc).__name__, exc)


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                loader = spec.loader
                original = loader.exec_module

                def exec_module(module: Any, original: Any = original) -> None:
                    original(module)
                    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]
                    _register()

                loader.exec_module = exec_module  # type: ignore[method-assign]
                return spec
        return None


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
