"""Finding a model's repeated decoder blocks, without per-architecture tables."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qcore.model.errors import StructureError
from qcore.model.linears import is_linear

__all__ = ["DecoderBlocks", "find_blocks"]


@dataclass
class DecoderBlocks:
    """The repeated decoder blocks of a model and where they live (``"model.layers"``)."""

    path: str
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return len(self.blocks)


def _has_linear(module: nn.Module) -> bool:
    from qcore.qlinear import QuantLinear  # blocks of an already-quantized model count too

    return any(is_linear(m) or isinstance(m, QuantLinear) for m in module.modules())


def _inside(path: str, parent: str) -> bool:
    """True when module ``path`` lies strictly below module ``parent``."""
    return parent == "" or path.startswith(parent + ".")


def find_blocks(model: nn.Module) -> DecoderBlocks:
    """The largest ``nn.ModuleList`` whose children are one class and contain linears.

    Lists nested inside another qualifying list's children (experts inside a layer) are
    not candidates. Ties on length go to the list with more parameters, then to the first.
    Raises ``StructureError`` naming the model class when no such list exists.
    """
    model_name = type(model).__name__
    lists = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    same_class = [
        (path, mlist) for path, mlist in lists if len({type(child) for child in mlist}) == 1
    ]
    candidates = [(p, m) for p, m in same_class if all(_has_linear(child) for child in m)]
    outermost = [
        (p, m) for p, m in candidates if not any(_inside(p, q) for q, _ in candidates if q != p)
    ]
    if not outermost:
        if same_class:
            found = ", ".join(f"'{p}' ({len(m)} x {type(m[0]).__name__})" for p, m in same_class)
            raise StructureError(
                f"{model_name}: no repeated decoder blocks with linear layers; "
                f"same-class nn.ModuleLists found without linears in every child: {found}"
            )
        raise StructureError(
            f"{model_name}: no repeated decoder blocks found (no nn.ModuleList whose "
            "children are all one class and contain linear layers)"
        )

    def size(item: tuple[str, nn.ModuleList]) -> tuple[int, int]:
        _, mlist = item
        return len(mlist), sum(p.numel() for p in mlist.parameters())

    best = max(outermost, key=size)  # max keeps the first of equals
    return DecoderBlocks(path=best[0], blocks=best[1])
