"""The kernels' own layouts, converted from the core's int-packed layout (CPU, torch only)."""

from __future__ import annotations

import pytest
import torch

from qcore.builtin.torch_kernels import TorchKernels
from qcore.ops import IntPacker
from qcore_kernels.layouts import (
    LayoutError,
    chunk_columns,
    pack_signed_nibbles,
    pack_wq_codes,
    to_w4a4,
    to_w8a8,
    to_wq,
    unpack_signed_nibbles,
    unpack_wq_codes,
)
from qcore_kernels.testing import random_int_packed, random_w4a4_packed


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


def test_signed_nibbles_round_trip_in_the_cores_bit_order():
    values = torch.randint(-8, 8, (5, 192), generator=torch.Generator().manual_seed(3))
    words = pack_signed_nibbles(values)
    assert words.dtype == torch.int32 and words.shape == (5, 24)
    assert torch.equal(unpack_signed_nibbles(words, 192), values.to(torch.int8))
    # column 8w + i in bits 4i .. 4i+3 of word w, two's complement
    word = int(words[2, 7]) & 0xFFFFFFFF
    for i in range(8):
        assert (word >> (4 * i)) & 0xF == int(values[2, 56 + i]) & 0xF
    # the int4 operand of a symmetric weight is the core's packed word with each code ^ 8
    packed = random_w4a4_packed(6, 128, seed=1)
    codes = IntPacker().unpack(packed).tensors["codes"]
    flipped = packed.tensors["qweight"] ^ -0x77777778  # 0x88888888 as int32
    assert torch.equal(pack_signed_nibbles(codes.int() - 8), flipped)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_w4a4_layout_dequantizes_to_the_torch_providers_weight(symmetric):
    packed = random_w4a4_packed(44, 320, symmetric=symmetric, act_symmetric=not symmetric,
                                seed=5)
    ref = TorchKernels().prepare(packed, torch.device("cpu")).dequantize(torch.float32)
    w = to_w4a4(packed, "cpu")
    assert w.n_padded == 48 and w.qweight.shape == (48, 40) and w.scales.shape == (5, 48)
    assert torch.equal(w.dequantize(), ref)  # bit-exact: integer levels times the same scales
    assert w.act_symmetric is not symmetric and (w.zeros is None) is symmetric
    # each group's sum of integer levels (code - zero), the padded channels all zero
    qw = IntPacker().unpack(packed)
    zeros = qw.tensors["zeros"].int() if not symmetric else torch.full((44, 5), 8)
    levels = qw.tensors["codes"].int().view(44, 5, 64) - zeros[..., None]
    assert torch.equal(w.sums[:, :44], levels.sum(-1).t().int())
    assert not w.sums[:, 44:].any() and not w.scales[:, 44:].any()
    assert not unpack_signed_nibbles(w.qweight[44:], 320).any()
    assert w.lowrank(torch.float16) is None and w.rank == 0


@pytest.mark.parametrize("rank", [8, 32, 40])
def test_w4a4_layout_pads_the_low_rank_branch_to_whole_tiles(rank):
    packed = random_w4a4_packed(20, 128, rank=rank, dtype=torch.bfloat16, seed=2)
    w = to_w4a4(packed, "cpu")
    padded = -(-rank // 32) * 32
    down, up = w.lowrank(torch.float16)
    assert w.rank == rank and down.dtype == up.dtype == torch.float16
    assert down.shape == (padded, 128) and up.shape == (24, padded)
    assert torch.equal(down[:rank], packed.tensors["lowrank_down"].half())
    assert torch.equal(up[:20, :rank], packed.tensors["lowrank_up"].half())
    assert not down[rank:].any() and not up[20:].any() and not up[:, rank:].any()
    assert w.lowrank(torch.float16)[0] is down  # cast once per dtype


def test_w4a4_layout_refuses_what_the_kernels_cannot_hold():
    def weight(**params):
        packed = random_w4a4_packed(8, 128)
        packed.params.update(params)
        return packed

    with pytest.raises(LayoutError, match="activation group size -1"):
        to_w4a4(weight(act_group_size=-1), "cpu")
    with pytest.raises(LayoutError, match="W4A8 is not W4A4"):
        to_w4a4(weight(act_bits=8), "cpu")
    with pytest.raises(LayoutError, match="group size 32"):
        to_w4a4(random_int_packed(8, 128, 4, 32, act_bits=4), "cpu")
    with pytest.raises(LayoutError, match="static activation scales"):
        to_w4a4(weight(act_dynamic=False), "cpu")
    with pytest.raises(LayoutError, match="in_features 96 not a multiple of 64"):
        to_w4a4(random_w4a4_packed(8, 96), "cpu")
    act_order = random_int_packed(8, 128, 4, 64, act_order=True, act_bits=4)
    act_order.params["act_group_size"] = 64
    with pytest.raises(LayoutError, match="act-order"):
        to_w4a4(act_order, "cpu")
    one_sided = random_w4a4_packed(8, 128, rank=4)
    del one_sided.tensors["lowrank_up"]
    with pytest.raises(LayoutError, match="needs both lowrank_down and lowrank_up"):
        to_w4a4(one_sided, "cpu")
    wrong = random_w4a4_packed(8, 128, rank=4)
    wrong.tensors["lowrank_up"] = wrong.tensors["lowrank_up"][:, :3]
    with pytest.raises(LayoutError, match=r"lowrank_up \[8, rank\]"):
        to_w4a4(wrong, "cpu")
