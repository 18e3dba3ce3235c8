"""The codebook format ``"vq"``: dense weight, checks, bit-packing up to 16 bits, size."""

from __future__ import annotations

import pytest
import torch

from qcore.bitpack import pack_codes, packed_words, unpack_codes
from qcore.builtin.int_packer import IntPacker
from qcore.codebook import VQPacker, bits_per_weight, dequantize_vq, validate_vq
from qcore.interfaces import QuantizedWeight
from qcore.testing import BasePackerTests, random_int_weight, random_vq_weight

F16 = torch.float16


def small_vq_weight() -> QuantizedWeight:
    """2 x 7, vectors of 3; outlier columns 1 and 5, so the main part has 5 columns (two
    vectors, the last one partial) and the outlier part 2 (one partial vector). The main
    codebook has 3 rows for 2-bit indices (fewer rows than the width allows)."""
    tensors = {
        "indices": torch.tensor([[0, 2], [1, 0]], dtype=torch.int32),
        "codebook": torch.tensor([[1, 2, 3], [-1, 0.5, 4], [0.25, -2, 8]], dtype=F16),
        "res_indices": torch.tensor([[1, 0], [0, 1]], dtype=torch.int32),
        "res_codebook": torch.tensor([[0, 0, 0], [0.5, 0.5, -1]], dtype=F16),
        "outlier_cols": torch.tensor([1, 5], dtype=torch.int32),
        "outlier_indices": torch.tensor([[1], [0]], dtype=torch.int32),
        "outlier_codebook": torch.tensor([[10, 20, 30], [-10, -20, -30]], dtype=F16),
        "scale": torch.tensor([2, 0.5], dtype=F16),
        "offset": torch.tensor([1, -1], dtype=F16),
    }
    params = {"bits": 1, "vector_size": 3, "index_bits": 2, "res_index_bits": 1,
              "outlier_index_bits": 1, "n_outliers": 2}
    return QuantizedWeight(format="vq", shape=(2, 7), tensors=tensors, params=params)


# ------------------------------------------------------------------------ dense weight


def test_dequantize_vq_hand_computed() -> None:
    # Row 0: main vectors c0 + r1 = [1.5, 2.5, 2], c2 + r0 = [0.25, -2, 8] -> the first 5
    # values go to columns 0, 2, 3, 4, 6; outlier vector o1 = [-10, -20, (-30 dropped)]
    # to columns 1, 5; then * 2 + 1.
    # Row 1: c1 + r0 = [-1, 0.5, 4], c0 + r1 = [1.5, 2.5, 2]; o0 = [10, 20]; * 0.5 - 1.
    want = torch.tensor([[1.5, -10, 2.5, 2, 0.25, -20, -2],
                         [-1, 10, 0.5, 4, 1.5, 20, 2.5]])
    want = want * torch.tensor([[2.0], [0.5]]) + torch.tensor([[1.0], [-1.0]])
    dense = dequantize_vq(small_vq_weight())
    assert dense.dtype == torch.float32 and dense.shape == (2, 7)
    assert dense.tolist() == want.tolist()
    assert dense.tolist() == [[4, -19, 6, 5, 1.5, -39, -3], [-1.5, 4, -0.75, 1, -0.25, 9, 0.25]]


def test_dequantize_vq_without_optional_parts() -> None:
    q = small_vq_weight()
    for key in ("res_indices", "res_codebook", "outlier_cols", "outlier_indices",
                "outlier_codebook", "scale", "offset"):
        del q.tensors[key]
    q.shape = (2, 5)
    q.params.update(res_index_bits=0, outlier_index_bits=0, n_outliers=0)
    assert dequantize_vq(q).tolist() == [[1, 2, 3, 0.25, -2], [-1, 0.5, 4, 1, 2]]


def test_dequantize_vq_matches_a_loop_over_vectors() -> None:
    q = random_vq_weight(5, 37, 4, 6, res_index_bits=3, n_outliers=6, outlier_index_bits=2,
                         scale=True, offset=True, seed=3)
    t, v = q.tensors, 4
    outlier = t["outlier_cols"].tolist()
    main = [c for c in range(37) if c not in outlier]
    want = torch.zeros(5, 37)
    for r in range(5):
        for j, col in enumerate(main):
            vec, k = divmod(j, v)
            want[r, col] = (t["codebook"][t["indices"][r, vec], k].float()
                            + t["res_codebook"][t["res_indices"][r, vec], k].float())
        for j, col in enumerate(outlier):
            vec, k = divmod(j, v)
            want[r, col] = t["outlier_codebook"][t["outlier_indices"][r, vec], k].float()
        want[r] = want[r] * t["scale"][r].float() + t["offset"][r].float()
    torch.testing.assert_close(dequantize_vq(q), want, rtol=0, atol=0)
    assert dequantize_vq(q, torch.float16).dtype == torch.float16


@pytest.mark.parametrize(("change", "message"), [
    (lambda q: q.tensors.__setitem__("indices", q.tensors["indices"].long()),
     r"'indices' is torch.int64, the format stores it as torch.int32"),
    (lambda q: q.tensors["indices"].__setitem__((0, 0), 3),
     r"'indices' holds values 0..3, but 'codebook' has 3 rows \(valid indices 0..2\)"),
    (lambda q: q.tensors.__setitem__("codebook", torch.zeros(5, 3, dtype=F16)),
     r"'codebook' has shape \(5, 3\), expected \[rows, vector_size=3\] with 1 <= rows <= "
     r"2\*\*2 = 4"),
    (lambda q: q.tensors.__setitem__("outlier_cols", torch.tensor([5, 1], dtype=torch.int32)),
     "outlier_cols must be strictly increasing"),
    (lambda q: q.tensors.__setitem__("outlier_cols", torch.tensor([1, 7], dtype=torch.int32)),
     r"outlier_cols holds 1..7, outside the input columns 0..6"),
    (lambda q: q.tensors.pop("scale"), "'offset' needs 'scale'"),
    (lambda q: q.tensors.__setitem__("bias", q.tensors.pop("offset")),
     r"unknown tensor\(s\) \['bias'\]; the per-channel offset is called 'offset'"),
    (lambda q: q.tensors.pop("res_codebook"),
     r"res_index_bits=1 but tensor\(s\) \['res_codebook'\] are missing"),
    (lambda q: q.params.__setitem__("res_index_bits", 0),
     r"res_index_bits=0 says there is no res_indices"),
    (lambda q: q.params.__setitem__("index_bits", 17), "index_bits=17 must be in 1..16"),
    (lambda q: q.params.pop("vector_size"), "param 'vector_size' is missing"),
    (lambda q: q.tensors.__setitem__("scale", torch.ones(2)),
     "'scale' is torch.float32, the format stores it as torch.float16"),
])
def test_validate_vq_says_what_is_wrong(change, message) -> None:
    q = small_vq_weight()
    validate_vq(q)
    change(q)
    with pytest.raises(ValueError, match=message):
        validate_vq(q)


# ------------------------------------------------------------------------- bitpack


def reference_pack(row: list[int], bits: int) -> list[int]:
    stream = 0
    for k, code in enumerate(row):
        stream |= code << (k * bits)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(packed_words(len(row), bits))]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("bits", range(9, 17))
@pytest.mark.parametrize("n", [1, 31, 33, 70])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_bitpack_wide_codes_round_trip_and_layout(bits: int, n: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=g).to(dtype)
    codes[0, 0] = (1 << bits) - 1
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-n // 32) * bits)
    for r in range(3):
        assert packed[r].tolist() == reference_pack(codes[r].tolist(), bits)
    back = unpack_codes(packed, bits, n)
    assert back.dtype == torch.int32 and torch.equal(back, codes.to(torch.int32))


def test_bitpack_12_and_13_bit_codes_straddle_words() -> None:
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 2] = 0xFFF  # 12 bits at stream bits 24..35: 8 in word 0, 4 in word 1
    assert pack_codes(codes, 12)[0, :2].tolist() == [-(1 << 24), 0xF]
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 5] = 0b1_0000_0000_0011  # 13 bits at stream bits 65..77: in word 2 only
    codes[0, 7] = 0x1FFF  # stream bits 91..103: 5 bits in word 2, 8 in word 3
    assert pack_codes(codes, 13)[0, 2:4].tolist() == [(0b11 << 1) | (1 << 13) | -(1 << 27), 0xFF]
    assert torch.equal(unpack_codes(pack_codes(codes, 13), 13, 32), codes)


def test_bitpack_int16_codes_and_uint8_default() -> None:
    codes = torch.tensor([[0, 32767, 5]], dtype=torch.int16)
    assert unpack_codes(pack_codes(codes, 15), 15, 3, torch.int16).tolist() == [[0, 32767, 5]]
    small = torch.tensor([[1, 255]], dtype=torch.uint8)
    assert unpack_codes(pack_codes(small, 8), 8, 2).dtype == torch.uint8
    with pytest.raises(ValueError, match="a code is -1: codes are unsigned"):
        pack_codes(torch.tensor([[-1]], dtype=torch.int16), 16)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_codes(torch.zeros(1, 3), 4)


def test_bitpack_many_rows_in_bounded_blocks() -> None:
    codes = torch.randint(0, 1 << 14, (3000, 700), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int32)
    assert torch.equal(unpack_codes(pack_codes(codes, 14), 14, 700), codes)


def test_int_packer_still_refuses_wide_codes() -> None:
    q = random_int_weight(2, 32, 4, 32)
    q.params["bits"] = 9
    with pytest.raises(ValueError, match="1 to 8 bits"):
        IntPacker().pack(q)


# -------------------------------------------------------------------------- packer


class TestVQPacker(BasePackerTests):
    @pytest.fixture
    def packer(self) -> VQPacker:
        return VQPacker()

    def test_default_weights_cover_the_format(self, quantized_weights) -> None:
        assert {q.params["index_bits"] for q in quantized_weights} >= set(range(9, 17))
        assert any("res_indices" in q.tensors for q in quantized_weights)
        assert any("outlier_cols" in q.tensors and "offset" in q.tensors
                   for q in quantized_weights)

    def test_indices_are_bit_packed(self) -> None:
        q = small_vq_weight()
        packed = VQPacker().pack(q)
        assert packed.layout == "vq-packed"
        # 2-bit indices [0, 2] and [1, 0]: one chunk of 32 indices = 2 words per row.
        assert packed.tensors["indices"].tolist() == [[0 | 2 << 2, 0], [1, 0]]
        assert packed.tensors["res_indices"].tolist() == [[0b01], [0b10]]
        assert packed.tensors["outlier_indices"].tolist() == [[1], [0]]
        assert packed.tensors["codebook"] is q.tensors["codebook"]
        assert torch.equal(dequantize_vq(VQPacker().unpack(packed)), dequantize_vq(q))

    def test_pack_checks_the_weight(self) -> None:
        q = small_vq_weight()
        q.tensors["indices"] = q.tensors["indices"] + 5
        with pytest.raises(ValueError, match="'indices' holds values 5..7"):
            VQPacker().pack(q)


# ---------------------------------------------------------------------- bits per weight


def test_bits_per_weight_vq_exact() -> None:
    # 4096 x 4096, vectors of 6 -> 683 vectors per row (the last partial), 12-bit
    # indices -> 22 chunks of 32 indices = 264 words per row; codebook 4096 x 6 float16;
    # scale 4096 float16.
    out_f = in_f = 4096
    q = random_vq_weight(out_f, in_f, 6, 12, scale=True, max_codebook_rows=None, seed=0)
    packed = VQPacker().pack(q)
    assert packed.tensors["indices"].shape == (4096, 264)
    want = (4096 * 264 * 32 + 4096 * 6 * 16 + 4096 * 16) / (4096 * 4096)
    assert want == 2.08984375
    assert bits_per_weight(packed) == want


def test_bits_per_weight_int_exact() -> None:
    # 4-bit, group 128, asymmetric, 256 x 256: 32 words of codes, 2 float16 scales and 2
    # uint8 zero points per row.
    packed = IntPacker().pack(random_int_weight(256, 256, 4, 128))
    assert bits_per_weight(packed) == (32 * 32 + 2 * 16 + 2 * 8) / 256 == 4.1875
