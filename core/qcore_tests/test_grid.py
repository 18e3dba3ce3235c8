"""Integer grids (the ``"int"`` format's conventions) and bit-packing, with numbers."""

from __future__ import annotations

import pytest
import torch

from qcore.bitpack import pack_codes, packed_words, unpack_codes
from qcore.builtin.rtn import RTNQuantizer
from qcore.grid import (
    dequantize_codes,
    dequantize_int,
    fake_quantize_activations,
    group_index,
    minmax_grid,
    n_groups,
    quantize_codes,
)
from qcore.scheme import Scheme

F32 = RTNQuantizer(RTNQuantizer.Config(scale_dtype="float32"))


def rtn(weight: list[list[float]], **scheme) -> dict[str, torch.Tensor]:
    return F32.quantize(torch.tensor(weight), {}, Scheme(**scheme)).tensors


# ---------------------------------------------------------------------- symmetric grid


def test_symmetric_4bit_scale_is_absmax_over_7_5_with_levels_minus8_to_7() -> None:
    # max|w| = 0.9375 = 7.5 * 0.125: the scale is exactly 0.125 and the implicit zero is 8.
    t = rtn([[0.9375, -0.5, 0.0625, 0.3, -0.9375, 0.0]], bits=4, group_size=-1, symmetric=True)
    assert "zeros" not in t
    assert t["scales"].tolist() == [[0.125]]
    # w/scale = 7.5 -> 8 (clamped to level 7), -4, 0.5 -> 0 (half to even), 2.4 -> 2,
    # -7.5 -> -8, 0 -> 0; codes are levels + 8.
    assert t["codes"].tolist() == [[15, 4, 8, 10, 0, 8]]
    deq = dequantize_codes(t["codes"], t["scales"], None, 4, group_index(6, -1))
    assert deq.tolist() == [[0.875, -0.5, 0.0, 0.25, -1.0, 0.0]]


@pytest.mark.parametrize("bits,divisor", [(2, 1.5), (3, 3.5), (4, 7.5), (8, 127.5)])
def test_symmetric_scale_divisor_per_bit_width(bits: int, divisor: float) -> None:
    t = rtn([[3.0, -1.0, 0.5]], bits=bits, group_size=-1, symmetric=True)
    assert t["scales"].item() == pytest.approx(3.0 / divisor, rel=1e-7)
    assert int(t["codes"].max()) == (1 << bits) - 1  # +3.0 lands on the top level


# --------------------------------------------------------------------- asymmetric grid


def test_asymmetric_scale_and_zero_point() -> None:
    # Range [-0.2, 0.55]: scale = 0.75 / 15 = 0.05, zero = round(0.2 / 0.05) = 4.
    t = rtn([[-0.2, 0.55, 0.0, 0.1]], bits=4, group_size=-1, symmetric=False)
    assert t["scales"].item() == pytest.approx(0.05, rel=1e-6)
    assert t["zeros"].dtype == torch.uint8 and t["zeros"].tolist() == [[4]]
    assert t["codes"].tolist() == [[0, 15, 4, 6]]
    deq = dequantize_int(F32.quantize(torch.tensor([[-0.2, 0.55, 0.0, 0.1]]), {},
                                      Scheme(bits=4, group_size=-1, symmetric=False)))
    torch.testing.assert_close(deq, torch.tensor([[-0.2, 0.55, 0.0, 0.1]]), rtol=0, atol=1e-6)


def test_asymmetric_range_always_contains_zero() -> None:
    # All positive: the range is [0, 0.6], scale 0.04, zero point 0, so 0 stays exact.
    t = rtn([[0.3, 0.6, 0.12]], bits=4, group_size=-1, symmetric=False)
    assert t["scales"].item() == pytest.approx(0.04, rel=1e-6)
    assert t["zeros"].tolist() == [[0]]
    assert t["codes"].tolist() == [[8, 15, 3]]  # 7.5 -> 8 (half to even), 15, 3


def test_all_zero_group_dequantizes_to_zero() -> None:
    for symmetric in (True, False):
        scheme = Scheme(bits=3, group_size=4, symmetric=symmetric)
        qweight = F32.quantize(torch.zeros(2, 8), {}, scheme)
        assert torch.equal(dequantize_int(qweight), torch.zeros(2, 8))
        assert bool((qweight.tensors["scales"] > 0).all())


# ---------------------------------------------------------------------------- groups


def test_non_dividing_group_size_gives_a_shorter_last_group_with_its_own_scale() -> None:
    w = torch.tensor([[1.5, -0.75, 0.0, 0.3, 7.5, 1.0, 2.0, -3.0, 0.15, -0.075]])
    qweight = F32.quantize(w, {}, Scheme(bits=4, group_size=4, symmetric=True))
    assert n_groups(10, 4) == 3
    assert group_index(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    # Groups [0:4], [4:8], [8:10]: scales max|w| / 7.5 of each.
    torch.testing.assert_close(qweight.tensors["scales"], torch.tensor([[0.2, 1.0, 0.02]]))
    deq = dequantize_int(qweight)
    assert float((deq[0, 8:] - w[0, 8:]).abs().max()) <= 0.01 + 1e-7  # half its own step


def test_per_channel_has_one_scale_per_row() -> None:
    w = torch.randn(5, 37, generator=torch.Generator().manual_seed(0))
    t = F32.quantize(w, {}, Scheme(bits=4, group_size=-1, symmetric=True)).tensors
    assert t["scales"].shape == (5, 1)
    torch.testing.assert_close(t["scales"][:, 0], w.abs().amax(1) / 7.5)


def test_grouped_scales_match_a_hand_loop() -> None:
    w = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    scales, zeros = minmax_grid(w, 3, 32, symmetric=False, scale_dtype=torch.float32)
    for g, start in enumerate(range(0, 100, 32)):
        part = w[:, start:start + 32]
        lo, hi = part.amin(1).clamp(max=0), part.amax(1).clamp(min=0)
        torch.testing.assert_close(scales[:, g], (hi - lo) / 7)
        assert torch.equal(zeros[:, g], torch.round(-lo / scales[:, g]).to(torch.uint8))


def test_codes_are_chosen_on_the_stored_float16_scales() -> None:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    qweight = RTNQuantizer().quantize(w, {}, Scheme(bits=4, group_size=16, symmetric=False))
    t = qweight.tensors
    assert t["scales"].dtype == torch.float16
    g_idx = group_index(64, 16)
    again = quantize_codes(w, t["scales"], t["zeros"], 4, g_idx)
    assert torch.equal(again, t["codes"])


def test_act_order_g_idx_selects_each_columns_group() -> None:
    codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)
    scales = torch.tensor([[1.0, 10.0]])
    zeros = torch.tensor([[1, 2]], dtype=torch.uint8)
    g_idx = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    deq = dequantize_codes(codes, scales, zeros, 2, g_idx)
    assert deq.tolist() == [[(0 - 2) * 10.0, (1 - 1) * 1.0, (2 - 2) * 10.0, (3 - 1) * 1.0]]


def test_dynamic_activation_quantization_uses_per_token_absmax_over_127() -> None:
    x = torch.tensor([[1.27, -0.5, 0.004], [0.0, 0.0, 0.0]])
    y = fake_quantize_activations(x, 8)
    torch.testing.assert_close(y[0], torch.tensor([1.27, -0.5, 0.0]), rtol=0, atol=1e-6)
    assert torch.equal(y[1], torch.zeros(3))
    static = fake_quantize_activations(torch.tensor([[0.05, 2.0]]), 8, torch.tensor(0.1))
    torch.testing.assert_close(static, torch.tensor([[0.0, 2.0]]))  # 0.5 -> 0, 20 -> 20


# ---------------------------------------------------------------------------- bitpack


def reference_pack(row: list[int], bits: int) -> list[int]:
    """The documented bit stream, with Python integers: code k at bits k*bits.., 32-bit
    words least significant first, read as signed int32."""
    stream = 0
    for k, code in enumerate(row):
        stream |= code << (k * bits)
    n_words = packed_words(len(row), bits)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 31, 33, 100])
def test_bitpack_round_trip_and_layout(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=g).to(torch.uint8)
    codes[0, 0] = (1 << bits) - 1  # the sign bit of a word gets set somewhere
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, packed_words(n, bits))
    assert packed.shape[1] == -(-n // 32) * bits
    for r in range(3):
        assert packed[r].tolist() == reference_pack(codes[r].tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_bitpack_3bit_codes_straddle_words() -> None:
    codes = torch.full((1, 32), 7, dtype=torch.uint8)  # 96 one-bits: three full words
    assert pack_codes(codes, 3).tolist() == [[-1, -1, -1]]
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b110  # stream bits 30..32: bit 31 of word 0 and bit 0 of word 1
    assert pack_codes(codes, 3).tolist() == [[-(1 << 31), 1, 0]]


def test_bitpack_errors_say_what_was_wrong() -> None:
    with pytest.raises(ValueError, match="1 to 16 bits"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 17)
    with pytest.raises(ValueError, match="code is 8, which does not fit in 3 bits"):
        pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="does not hold 40"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 3, 40)
