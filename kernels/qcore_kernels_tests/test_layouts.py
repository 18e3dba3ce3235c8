"""The kernels' own layouts, converted from the core's int-packed layout (CPU, torch only)."""

from __future__ import annotations

import pytest
import torch

from qcore.builtin.torch_kernels import TorchKernels
from qcore_kernels.layouts import (
    LayoutError,
    chunk_columns,
    pack_wq_codes,
    to_w8a8,
    to_wq,
    unpack_wq_codes,
)
from qcore_kernels.testing import random_int_packed


@pytest.mark.parametrize("bits,k", [(4, 320), (8, 96), (4, 256)])
def test_wq_codes_round_trip_and_bit_positions(bits, k):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 1 << bits, (3, k), generator=gen).to(torch.uint8)
    words = pack_wq_codes(codes, bits)
    chunk = chunk_columns(bits)
    assert words.dtype == torch.int32 and words.shape == (3, -(-k // chunk) * 16)
    assert torch.equal(unpack_wq_codes(words, bits, k), codes)
    # By hand, from qk_wq.cu's contract: word i of a row holds columns i * vals ..; value e
    # (bits * e) is column 2e of the word for e < vals / 2, else column 2(e - vals/2) + 1.
    vals = 32 // bits
    for i in (0, 3, words.shape[1] - 1):
        word = int(words[1, i]) & 0xFFFFFFFF
        for e in range(vals):
            col = i * vals + (2 * e if e < vals // 2 else 2 * (e - vals // 2) + 1)
            expected = int(codes[1, col]) if col < k else 0
            assert (word >> (bits * e)) & ((1 << bits) - 1) == expected


@pytest.mark.parametrize(
    "bits,group,symmetric,act_order",
    [
        (4, 64, False, False),
        (4, 32, True, False),
        (4, 128, False, True),
        (8, 64, True, True),
        (4, -1, False, False),
        (8, 96, False, False),  # 96: groups do not divide 320
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wq_layout_dequantizes_to_the_torch_providers_weight(
    bits, group, symmetric, act_order, dtype
):
    packed = random_int_packed(
        48, 320, bits, group, symmetric=symmetric, act_order=act_order, seed=3
    )
    ref = TorchKernels().prepare(packed, torch.device("cpu")).dequantize(dtype)
    w = to_wq(packed, dtype, "cpu")
    assert (w.perm is not None) == act_order
    dense = w.dequantize()
    if w.perm is not None:
        ref = ref[:, w.perm]
    assert dense.dtype == dtype
    assert torch.equal(dense, ref)  # bit-exact: same casts, same products


def test_wq_layout_refuses_what_the_kernels_cannot_hold():
    with pytest.raises(LayoutError, match="in_features 80 not a multiple of 32"):
        to_wq(random_int_packed(8, 80, 4, 16), torch.float16, "cpu")
    with pytest.raises(LayoutError, match="group size 48"):
        to_wq(random_int_packed(8, 96, 4, 48), torch.float16, "cpu")
    with pytest.raises(LayoutError, match=r"bits 3 not in \[4, 8\]"):
        to_wq(random_int_packed(8, 64, 3, 32), torch.float16, "cpu")


def test_w8a8_layout_holds_signed_codes_and_scales():
    packed = random_int_packed(16, 64, 8, -1, symmetric=True, act_bits=8, seed=2)
    w = to_w8a8(packed, "cpu")
    ref = TorchKernels().prepare(packed, torch.device("cpu")).dequantize(torch.float32)
    assert w.wq.dtype == torch.int8 and w.input_scale is None
    assert torch.equal(w.wq.float() * w.wscale[:, None], ref)
    static = to_w8a8(
        random_int_packed(16, 64, 8, -1, symmetric=True, act_bits=8, static_scale=True), "cpu"
    )
    assert static.input_scale is not None and static.input_scale.shape == (1,)
    with pytest.raises(LayoutError, match="symmetric"):
        to_w8a8(random_int_packed(16, 64, 8, -1, symmetric=False, act_bits=8), "cpu")
    with pytest.raises(LayoutError, match="per-channel"):
        to_w8a8(random_int_packed(16, 64, 8, 32, symmetric=True, act_bits=8), "cpu")
