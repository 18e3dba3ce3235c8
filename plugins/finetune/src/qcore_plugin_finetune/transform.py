"""The ``finetune`` transform (after quantization): block fine-tuning of the quantized
weights' floating-point tensors (codebooks, scales); the work is in
:mod:`qcore_plugin_finetune.tuning`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qcore.interfaces import Transform

if TYPE_CHECKING:
    from qcore.context import BlockContext


class FinetuneTransform(Transform):
    """Tunes codebooks and scales of a quantized block towards the unquantized outputs."""

    name = "finetune"
    after_quantization = True
    formats = frozenset({"vq", "int"})

    @dataclass(frozen=True)
    class Config:
        #: passes over the calibration rows used, one Adam step per calibration batch
        epochs: int = 4
        #: Adam's learning rate (the tensors are normalised codebooks, entries near 1)
        lr: float = 1e-3
        #: calibration rows (sequences) tuned on per block, whole batches from the first
        #: (0: all of them)
        samples: int = 64
        #: seed of the order in which the batches are visited
        seed: int = 0

        def __post_init__(self) -> None:
            checks = [
                (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
                (0 < self.lr < 1, f"lr must be in (0, 1), got {self.lr}"),
                (self.samples >= 0, f"samples must be >= 0 (0: all), got {self.samples}"),
            ]
            for ok, message in checks:
                if not ok:
                    raise ValueError(message)

    def apply(self, ctx: BlockContext) -> None:
        from qcore_plugin_finetune.tuning import finetune_block

        finetune_block(ctx, epochs=self.config.epochs, lr=self.config.lr,
                       samples=self.config.samples, seed=self.config.seed)
