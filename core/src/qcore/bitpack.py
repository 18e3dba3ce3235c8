"""Bit-packing of unsigned integer codes into int32 words along each row.

Every 32 codes of ``bits`` bits fill exactly ``bits`` 32-bit words: code ``k`` of a
chunk occupies stream bits ``k*bits .. k*bits + bits - 1``, word ``w`` holds stream bits
``32*w .. 32*w + 31`` (least significant first). Works for any width from 1 to 8 bits
(3-bit codes straddle words), and round-trips exactly.
"""

from __future__ import annotations

import torch

_ROWS_PER_CHUNK = 512


def packed_words(n_codes: int, bits: int) -> int:
    return -(-n_codes // 32) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[rows, n]`` codes (each < 2**bits) -> int32 ``[rows, ceil(n/32)*bits]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: the int packer stores 1 to 8 bits per code")
    rows, n = codes.shape
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code is {int(codes.max())}, which does not fit in {bits} bits")
    chunks = -(-n // 32)
    padded = torch.zeros(rows, chunks * 32, dtype=torch.int64, device=codes.device)
    padded[:, :n] = codes.to(torch.int64)
    out = torch.empty(rows, chunks * bits, dtype=torch.int32, device=codes.device)
    bit_shift = torch.arange(bits, device=codes.device, dtype=torch.int64)
    word_shift = torch.arange(32, device=codes.device, dtype=torch.int64)
    for start in range(0, rows, _ROWS_PER_CHUNK):
        block = padded[start:start + _ROWS_PER_CHUNK].view(-1, chunks, 32, 1)
        stream = ((block >> bit_shift) & 1).reshape(-1, chunks, bits, 32)
        words = (stream << word_shift).sum(-1)  # 0 .. 2**32 - 1
        words = torch.where(words >= 2**31, words - 2**32, words)
        out[start:start + _ROWS_PER_CHUNK] = words.reshape(-1, chunks * bits).to(torch.int32)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_codes`: uint8 ``[rows, n_codes]``."""
    rows, n_words = packed.shape
    chunks = n_words // bits
    if chunks * bits != n_words or chunks * 32 < n_codes:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not hold {n_codes} "
                         f"{bits}-bit codes per row")
    out = torch.empty(rows, n_codes, dtype=torch.uint8, device=packed.device)
    bit_shift = torch.arange(bits, device=packed.device, dtype=torch.int64)
    word_shift = torch.arange(32, device=packed.device, dtype=torch.int64)
    for start in range(0, rows, _ROWS_PER_CHUNK):
        words = packed[start:start + _ROWS_PER_CHUNK].to(torch.int64) & 0xFFFFFFFF
        stream = (words.view(-1, chunks, bits, 1) >> word_shift) & 1
        per_code = stream.reshape(-1, chunks, 32, bits)
        codes = (per_code << bit_shift).sum(-1).reshape(-1, chunks * 32)
        out[start:start + _ROWS_PER_CHUNK] = codes[:, :n_codes].to(torch.uint8)
    return out
