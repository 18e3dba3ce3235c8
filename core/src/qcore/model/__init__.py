"""Reading a model's structure: decoder blocks, linears, input-sharing groups, scale sources.

Everything is found from the module tree and by running blocks, not from per-architecture
tables: see ``find_blocks``, ``describe_block`` and ``capture_block_inputs``.
"""

from __future__ import annotations

from qcore.model.blocks import DecoderBlocks, find_blocks
from qcore.model.capture import (
    BlockCall,
    capture_block_inputs,
    hidden_of,
    move_to,
    replace_hidden,
    run_block,
)
from qcore.model.errors import StructureError
from qcore.model.linears import (
    block_linears,
    is_conv1d,
    is_linear,
    linear_shape,
    set_weight_matrix,
    weight_matrix,
)
from qcore.model.structure import (
    BlockStructure,
    LinearGroup,
    SourceKind,
    describe_block,
    execution_order_stages,
    fold_scales_into_source,
)

__all__ = [
    "BlockCall",
    "BlockStructure",
    "DecoderBlocks",
    "LinearGroup",
    "SourceKind",
    "StructureError",
    "block_linears",
    "capture_block_inputs",
    "describe_block",
    "execution_order_stages",
    "find_blocks",
    "fold_scales_into_source",
    "hidden_of",
    "is_conv1d",
    "is_linear",
    "linear_shape",
    "move_to",
    "replace_hidden",
    "run_block",
    "set_weight_matrix",
    "weight_matrix",
]
