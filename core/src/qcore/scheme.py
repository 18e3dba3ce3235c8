"""The quantization scheme a pipeline applies: bits, groups, symmetry, activations."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from qcore.errors import ConfigError

#: ``group_size`` value meaning one group per output channel (the whole input row).
PER_CHANNEL = -1


@dataclass(frozen=True)
class Scheme:
    """What the quantized model stores and computes with.

    ``bits``: weight bit-width. ``group_size``: input columns that share one scale
    (``-1`` = one scale per output channel); a group size that does not divide the input
    dimension leaves the last group of each row shorter. ``symmetric``: a grid centred on
    zero (no zero point) or an asymmetric grid with an integer zero point.
    ``act_bits``: activation bit-width (``None`` = weight-only, activations stay in the
    model's float dtype). ``act_dynamic``: activation scales computed per token at run time
    (True) or one static per-tensor scale fixed during calibration (False).
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    act_bits: int | None = None
    act_dynamic: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise ConfigError(f"bits={self.bits!r} is out of range: use an integer from 1 to 16 "
                              "(each quantizer's supported widths, e.g. 2 to 8, are checked by validate())")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size != PER_CHANNEL and self.group_size < 1
        ):
            raise ConfigError(f"group_size={self.group_size!r} is invalid: use a positive integer "
                              "(e.g. 64 or 128) or -1 for one scale per output channel")
        if self.act_bits is not None and (
            isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int)
            or not 2 <= self.act_bits <= 16
        ):
            raise ConfigError(f"act_bits={self.act_bits!r} is invalid: use 8 (or 4) for "
                              "weight-activation quantization, or leave it unset for weight-only")

    @property
    def per_channel(self) -> bool:
        return self.group_size == PER_CHANNEL

    def label(self) -> str:
        """Short human label, e.g. ``W4 g64 asym`` or ``W8A8 per-channel sym``."""
        w = f"W{self.bits}" + (f"A{self.act_bits}" if self.act_bits else "")
        g = "per-channel" if self.per_channel else f"g{self.group_size}"
        return f"{w} {g} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scheme:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown scheme option(s) {', '.join(unknown)}; "
                              f"valid options: {', '.join(sorted(valid))}")
        return cls(**dict(data))
