"""Loading qcore checkpoints through ``transformers.AutoModelForCausalLM.from_pretrained``.

transformers lets a third party register a quantization config and an ``HfQuantizer``
under a ``quant_method`` name. :func:`register` adds ``"qcore"``: before the weights are
loaded, every layer named in the checkpoint's ``quantization_config`` is replaced by a
:class:`~qcore.qlinear.QuantLinear` with empty tensors of the recorded dtypes and shapes,
which transformers then fills from the safetensors file like any other buffer.
``import qcore`` arranges for this to happen when transformers' quantizer registry is
first imported (see :mod:`qcore._hf_hook`), so no transformers import is paid by
``import qcore`` itself.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qcore.checkpoint import QUANT_METHOD, check_distributions, quantized_layers
from qcore.interfaces import PackedWeight
from qcore.errors import CheckpointError
from qcore.qlinear import QuantLinear

_registered = False


class QcoreConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a qcore checkpoint, as transformers holds it."""

    def __init__(self, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]
        self.record = {k: v for k, v in kwargs.items() if k != "quant_method"}
        for key, value in self.record.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **self.record}


class QcoreHfQuantizer(HfQuantizer):
    """Builds QuantLinear layers for a pre-quantized qcore checkpoint."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        from qcore.checkpoint import read_quantization_config  # noqa: F401  (format check below)

        record = self.quantization_config.to_dict()  # type: ignore[attr-defined]
        from qcore.checkpoint import FORMAT_VERSION
        from qcore.errors import CheckpointError

        if int(record.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format {record.get('format_version')} is newer than "
                                  f"this qcore reads ({FORMAT_VERSION}): upgrade qcore")
        check_distributions(record)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None else torch.float32

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        record = self.quantization_config.to_dict()  # type: ignore[attr-defined]
        for name, layer in record["layers"].items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            device = next(old.parameters()).device if any(True for _ in old.parameters()) else "cpu"
            tensors = {k: torch.empty(meta["shape"], dtype=getattr(torch, meta["dtype"]), device=device)
                       for k, meta in layer["tensors"].items()}
            bias = getattr(old, "bias", None) if layer.get("bias") else None
            lowrank = None
            branch = layer.get("lowrank")
            if branch:
                if not isinstance(branch, dict):
                    raise CheckpointError(f"layer {name}: its low-rank branch has no recorded "
                                          "rank and dtype; load it with qcore.load")
                rank, out_f, in_f = int(branch["rank"]), *layer["shape"]
                dtype = getattr(torch, branch["dtype"])
                lowrank = (torch.empty(rank, in_f, dtype=dtype, device=device),
                           torch.empty(out_f, rank, dtype=dtype, device=device))
            packed = PackedWeight(layout=layer["layout"], shape=tuple(layer["shape"]),  # type: ignore[arg-type]
                                  tensors=tensors, params=dict(layer["params"]))
            new = QuantLinear(packed, op=layer["op"], bias=None if bias is None else bias.detach(),
                              kernel=layer.get("kernel", "auto"), lowrank=lowrank)
            setattr(parent, child, new)  # the loader fills every buffer, the branch's too

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> None:
        from qcore.quantize import QCORE_ATTR

        record = self.quantization_config.to_dict()  # type: ignore[attr-defined]
        for layer in quantized_layers(model).values():
            layer._providers.clear()
        setattr(model, QCORE_ATTR, {k: record[k] for k in ("pipeline", "distributions", "blocks", "calibration")
                                    if k in record})

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True


def register() -> None:
    """Register ``quant_method = "qcore"`` with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QcoreConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QcoreHfQuantizer)
    _registered = True
