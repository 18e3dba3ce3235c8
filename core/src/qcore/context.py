"""What a transform sees of the block it edits."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from qcore.interfaces import Quantizer
    from qcore.model import BlockStructure
    from qcore.scheme import Scheme

log = logging.getLogger("qcore")

BlockCall = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class BlockContext:
    """One decoder block during quantization.

    ``inputs`` are the calibration calls of the block (args, kwargs per batch, on CPU),
    computed by the already-quantized earlier blocks. ``stats[linear][observer]`` holds
    what the step's observers collected on them. ``quantizer`` is the pipeline's
    quantizer, so that a search quantizes candidates exactly as they will be quantized.
    After quantization (``Transform.after_quantization``) ``block`` holds the quantized
    layers and ``targets`` what the unquantized block computed.
    """

    index: int
    block: nn.Module
    structure: BlockStructure
    inputs: list[BlockCall]
    stats: dict[str, dict[str, Any]]
    scheme: Scheme
    quantizer: Quantizer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: For after-quantization transforms only: the unquantized model's outputs (hidden
    #: states, float32, on CPU) of this block on the unquantized model's own inputs, one
    #: tensor per call of ``inputs``; None before quantization.
    targets: list[torch.Tensor] | None = None
    log: logging.Logger = log

    def fake_quantize(self, weight: torch.Tensor, stats: dict[str, Any] | None = None) -> torch.Tensor:
        """``weight`` quantized and dequantized by the pipeline's quantizer and scheme."""
        q = self.quantizer.quantize(weight.float(), stats or {}, self.scheme)
        return self.quantizer.dequantize(q).to(weight.dtype)

    def run_block(self) -> list[torch.Tensor]:
        """The block's outputs (hidden states) on every calibration batch, on CPU."""
        from qcore.calibration import forward

        outs = []
        with torch.inference_mode():
            for args, kwargs in self.inputs:
                outs.append(forward(self.block, args, kwargs, self.device).to("cpu"))
        return outs

    def add_lowrank_branch(self, linear: str, down: torch.Tensor, up: torch.Tensor) -> None:
        """Register a 16-bit (or float) branch ``x -> (x @ down.T) @ up.T`` added to linear
        ``linear``'s output; the transform must have subtracted ``up @ down`` from its
        weight so the block's function is unchanged. From then on the core adds the
        branch to the linear's output in every pass over the block (later observations,
        the sequential quantizer) until the QuantLinear that holds it replaces the
        linear."""
        self.lowrank[linear] = (down.detach().contiguous(), up.detach().contiguous())
