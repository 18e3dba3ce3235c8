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
    ``act_group_size``: input columns of one token that share an activation scale (``-1`` =
    the whole token; e.g. 64 for W4A4, whose scales are dynamic). ``act_symmetric``: a
    symmetric activation grid (levels ``±(2**(act_bits-1) - 1)``) or an asymmetric one
    with an integer zero point per scale (dynamic scales only).
    """

    bits: int = 4
    group_size: int = 64
    symmetric: bool = False
    act_bits: int | None = None
    act_dynamic: bool = True
    act_group_size: int = PER_CHANNEL
    act_symmetric: bool = True

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
        if isinstance(self.act_group_size, bool) or not isinstance(self.act_group_size, int) or (
            self.act_group_size != PER_CHANNEL and self.act_group_size < 1
        ):
            raise ConfigError(f"act_group_size={self.act_group_size!r} is invalid: use a positive "
                              "integer (e.g. 64) or -1 for one activation scale per token")
        grouped = self.act_group_size != PER_CHANNEL or not self.act_symmetric
        if grouped and self.act_bits is None:
            raise ConfigError("act_group_size and act_symmetric describe quantized activations: "
                              "set act_bits too (e.g. --act-bits 4), or leave them at their "
                              "defaults for weight-only quantization")
        if grouped and not self.act_dynamic:
            raise ConfigError("static activation scales are one symmetric scale per tensor: "
                              "drop --static-act to use activation groups or an asymmetric "
                              "activation grid (their scales are computed at run time)")

    @property
    def per_channel(self) -> bool:
        return self.group_size == PER_CHANNEL

    def label(self) -> str:
        """Short human label, e.g. ``W4 g64 asym``, ``W8A8 per-channel sym`` or
        ``W4A4 g64 sym act-g64`` (activations in groups of 64; ``act-asym`` when their grid
        is asymmetric)."""
        w = f"W{self.bits}" + (f"A{self.act_bits}" if self.act_bits else "")
        g = "per-channel" if self.per_channel else f"g{self.group_size}"
        label = f"{w} {g} {'sym' if self.symmetric else 'asym'}"
        if self.act_group_size != PER_CHANNEL:
            label += f" act-g{self.act_group_size}"
        if not self.act_symmetric:
            label += " act-asym"
        return label

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
