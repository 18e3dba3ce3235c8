"""Helpers for plugins: the one public entry point to the core's shared code.

A plugin's own code imports from ``qcore`` (``hookimpl``), the contract modules
(``qcore.interfaces``, ``qcore.context``, ``qcore.scheme``, ``qcore.errors``), the
testing kit (``qcore.testing``) and this module; everything else in the core is internal
and may change between releases. Each name here is documented in docs/plugins.md
("Helpers for plugins: `qcore.ops`") and keeps its signature within a contract major
version (added in contract 1.2).

Importing this module is cheap (no torch): each name loads its module on first use, so a
plugin's hooks module may import from it.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports at the end are for type checkers only)
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name -> (module, attribute in it)
_WHERE: dict[str, tuple[str, str]] = {
    # running a block, and quantized layers
    "forward": ("qcore.calibration", "forward"),
    "QuantLinear": ("qcore.qlinear", "QuantLinear"),
    # a model's linears and scale sources
    "weight_matrix": ("qcore.model.linears", "weight_matrix"),
    "set_weight_matrix": ("qcore.model.linears", "set_weight_matrix"),
    "fold_scales_into_source": ("qcore.model.structure", "fold_scales_into_source"),
    # the integer grid ("int" format)
    "n_groups": ("qcore.grid", "n_groups"),
    "group_index": ("qcore.grid", "group_index"),
    "max_code": ("qcore.grid", "max_code"),
    "grid_from_range": ("qcore.grid", "grid_from_range"),
    "minmax_grid": ("qcore.grid", "minmax_grid"),
    "zero_points": ("qcore.grid", "zero_points"),
    "quantize_codes": ("qcore.grid", "quantize_codes"),
    "dequantize_codes": ("qcore.grid", "dequantize_codes"),
    "effective_g_idx": ("qcore.grid", "effective_g_idx"),
    "dequantize_int": ("qcore.grid", "dequantize_int"),
    "quantize_activations": ("qcore.grid", "quantize_activations"),
    "quantize_activation_groups": ("qcore.grid", "quantize_activation_groups"),
    "fake_quantize_activations": ("qcore.grid", "fake_quantize_activations"),
    "make_int_weight": ("qcore.builtin.rtn", "make_int_weight"),
    "IntPacker": ("qcore.builtin.int_packer", "IntPacker"),
    "INT_LAYOUT": ("qcore.builtin.int_packer", "LAYOUT"),
    # the codebook format ("vq")
    "VQPacker": ("qcore.codebook", "VQPacker"),
    "VQ_LAYOUT": ("qcore.codebook", "LAYOUT"),
    "VQ_INDEX_TENSORS": ("qcore.codebook", "INDEX_TENSORS"),
    "vq_params": ("qcore.codebook", "vq_params"),
    "validate_vq": ("qcore.codebook", "validate_vq"),
    "n_vectors": ("qcore.codebook", "n_vectors"),
    "main_columns": ("qcore.codebook", "main_columns"),
    "decode_part": ("qcore.codebook", "decode_part"),
    "assemble_weight": ("qcore.codebook", "assemble_weight"),
    "dequantize_vq": ("qcore.codebook", "dequantize_vq"),
    "bits_per_weight": ("qcore.codebook", "bits_per_weight"),
    # bit packing
    "pack_codes": ("qcore.bitpack", "pack_codes"),
    "unpack_codes": ("qcore.bitpack", "unpack_codes"),
    # second-order methods (GPTQ, VPTQ)
    "inverse_hessian_factor": ("qcore.second_order", "inverse_hessian_factor"),
    "HessianFactorError": ("qcore.second_order", "HessianFactorError"),
    # files
    "cache_dir": ("qcore.assets", "cache_dir"),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'qcore.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(where[0]), where[1])
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from qcore.assets import cache_dir
    from qcore.bitpack import pack_codes, unpack_codes
    from qcore.builtin.int_packer import LAYOUT as INT_LAYOUT
    from qcore.builtin.int_packer import IntPacker
    from qcore.builtin.rtn import make_int_weight
    from qcore.calibration import forward
    from qcore.codebook import INDEX_TENSORS as VQ_INDEX_TENSORS
    from qcore.codebook import LAYOUT as VQ_LAYOUT
    from qcore.codebook import (
        VQPacker,
        assemble_weight,
        bits_per_weight,
        decode_part,
        dequantize_vq,
        main_columns,
        n_vectors,
        validate_vq,
        vq_params,
    )
    from qcore.grid import (
        dequantize_codes,
        dequantize_int,
        effective_g_idx,
        fake_quantize_activations,
        grid_from_range,
        group_index,
        max_code,
        minmax_grid,
        n_groups,
        quantize_activation_groups,
        quantize_activations,
        quantize_codes,
        zero_points,
    )
    from qcore.model.linears import set_weight_matrix, weight_matrix
    from qcore.model.structure import fold_scales_into_source
    from qcore.qlinear import QuantLinear
    from qcore.second_order import HessianFactorError, inverse_hessian_factor
