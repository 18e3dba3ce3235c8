"""What the kernels accept beyond ``KernelSupport``'s fields. No torch import."""

from __future__ import annotations

#: in_features must be a multiple of this for the ``qk-wq`` kernels (16-byte code loads).
WQ_IN_MULTIPLE = 32
#: in_features must be a multiple of this for the ``qk-w8a8`` kernels (16-byte loads).
W8A8_IN_MULTIPLE = 16


def wq_unsupported_reason(bits: int, group_size: int, in_features: int) -> str | None:
    if bits not in (4, 8):
        return f"bits {bits} not in [4, 8]"
    if in_features % WQ_IN_MULTIPLE:
        return f"in_features {in_features} not a multiple of {WQ_IN_MULTIPLE}"
    if group_size != -1 and group_size % 32:
        return f"group size {group_size} is neither -1 (per channel) nor a multiple of 32"
    return None


def w8a8_unsupported_reason(
    bits: int, group_size: int, symmetric: bool, act_bits: int | None, in_features: int
) -> str | None:
    if bits != 8 or act_bits != 8:
        return f"W{bits}A{act_bits} is not W8A8"
    if group_size != -1:
        return f"group size {group_size}: the W8A8 kernels take per-channel scales (-1)"
    if not symmetric:
        return "the W8A8 kernels take symmetric weights"
    if in_features % W8A8_IN_MULTIPLE:
        return f"in_features {in_features} not a multiple of {W8A8_IN_MULTIPLE}"
    return None
