"""Bit-packing of unsigned integer codes into int32 words along each row.

Every 32 codes of ``bits`` bits fill exactly ``bits`` 32-bit words: code ``k`` of a
chunk occupies stream bits ``k*bits .. k*bits + bits - 1``, word ``w`` holds stream bits
``32*w .. 32*w + 31`` (least significant first). Works for any width from 1 to 16 bits
(widths that do not divide 32, such as 3 or 12, straddle words), and round-trips exactly.
The ``int-packed`` layout stores 1..8-bit weight codes this way, ``vq-packed`` its
codebook indices (up to 16 bits).
"""

from __future__ import annotations

import torch

MAX_BITS = 16

#: Codes handled at once (rows are processed in blocks of about this many codes), which
#: bounds the int64 working memory to a few tens of MB whatever the tensor's size.
_CODES_PER_BLOCK = 1 << 21


def packed_words(n_codes: int, bits: int) -> int:
    return -(-n_codes // 32) * bits


def _stream_positions(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For code ``k`` (0..31) of a chunk: the word its low bits go to, and their shift."""
    offset = torch.arange(32, device=device, dtype=torch.int64) * bits
    return offset // 32, offset % 32


def _rows_per_block(rows: int, n_codes: int) -> int:
    return max(1, min(rows, _CODES_PER_BLOCK // max(1, n_codes)))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer ``[rows, n]`` codes (uint8, int16, int32 or int64, each in
    ``0 .. 2**bits - 1``) -> int32 ``[rows, ceil(n/32)*bits]``."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits}: qcore.bitpack stores 1 to {MAX_BITS} bits per code")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor (uint8, int16, int32), "
                         f"got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, n], got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    if codes.numel():
        high, low = int(codes.max()), int(codes.min())
        if high >= (1 << bits):
            raise ValueError(f"a code is {high}, which does not fit in {bits} bits")
        if low < 0:
            raise ValueError(f"a code is {low}: codes are unsigned (0 .. {(1 << bits) - 1}); "
                             "store codes of 16 bits in an int32 tensor, not int16")
    chunks = -(-n // 32)
    out = torch.empty(rows, chunks * bits, dtype=torch.int32, device=codes.device)
    if not out.numel():
        return out
    word, shift = _stream_positions(bits, codes.device)
    # A code whose bits run past its word leaves its high bits in the next word.
    straddle = (shift + bits > 32).nonzero().flatten()
    step = _rows_per_block(rows, chunks * 32)
    for start in range(0, rows, step):
        block = codes[start:start + step].to(torch.int64)
        if n != chunks * 32:
            block = torch.nn.functional.pad(block, (0, chunks * 32 - n))
        block = block.view(-1, chunks, 32)
        # Codes never share a bit, so adding their shifted values is an exact OR.
        words = torch.zeros(block.shape[0], chunks, bits, dtype=torch.int64, device=codes.device)
        words.index_add_(2, word, (block << shift) & 0xFFFFFFFF)
        if straddle.numel():
            words.index_add_(2, word[straddle] + 1, block[..., straddle] >> (32 - shift[straddle]))
        words = torch.where(words >= 2**31, words - 2**32, words)
        out[start:start + step] = words.view(-1, chunks * bits).to(torch.int32)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, n_codes: int,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact inverse of :func:`pack_codes`: ``[rows, n_codes]`` codes in ``dtype``
    (default: uint8 up to 8 bits, int32 above)."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits}: qcore.bitpack stores 1 to {MAX_BITS} bits per code")
    rows, n_words = packed.shape
    chunks = n_words // bits
    if chunks * bits != n_words or chunks * 32 < n_codes:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not hold {n_codes} "
                         f"{bits}-bit codes per row")
    if dtype is None:
        dtype = torch.uint8 if bits <= 8 else torch.int32
    out = torch.empty(rows, n_codes, dtype=dtype, device=packed.device)
    if not out.numel():
        return out
    word, shift = _stream_positions(bits, packed.device)
    # The word after each code's first one (clamped at the chunk's end, where no code
    # straddles): its bits land above ``bits`` for codes that do not straddle, and are masked.
    next_word = (word + 1).clamp(max=bits - 1)
    mask = (1 << bits) - 1
    step = _rows_per_block(rows, chunks * 32)
    for start in range(0, rows, step):
        words = (packed[start:start + step].to(torch.int64) & 0xFFFFFFFF).view(-1, chunks, bits)
        low = words.index_select(2, word) >> shift
        high = words.index_select(2, next_word) << (32 - shift)
        codes = ((low | high) & mask).view(-1, chunks * 32)
        out[start:start + step] = codes[:, :n_codes].to(dtype)
    return out
