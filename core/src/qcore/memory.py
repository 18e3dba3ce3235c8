"""Handing memory back to the operating system during block-by-block quantization.

Two things keep a long run's resident memory above what it holds: glibc keeps freed heap
pages (:func:`trim_heap` returns them), and weights loaded from safetensors are views of
one private mapping of the file (transformers maps the file instead of copying it), so a
weight replaced by a quantized layer frees nothing when its last reference goes: the pages
a forward read stay mapped, and those written to (dequantized weights, copied on write)
stay resident too, until the whole model is freed. :func:`release_file_pages` drops them.
Both do nothing where they do not apply (not Linux, not glibc, not a file mapping).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable
from typing import Any

import torch

#: ``madvise`` advice (Linux): drop the pages; a private file mapping reads the file again.
MADV_DONTNEED = 4


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc's ``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop the resident pages of CPU tensors that are views of a private file mapping;
    return how many bytes were released.

    Only whole pages inside each tensor's bytes are dropped, so neighbouring tensors of
    the same file keep theirs. Call it on tensors nothing will read again (the weights of
    replaced layers): a later read sees the file's original bytes, not what was written
    into the tensor since it was loaded. Anonymous memory (ordinary tensors) is never
    touched; it is freed when its last reference goes.
    """
    libc = _libc()
    spans = [_byte_span(t) for t in tensors if t.device.type == "cpu" and t.numel()]
    if libc is None or not spans:
        return 0
    page = _page_size()
    mappings = _private_file_mappings()
    released = 0
    for start, end in spans:
        if not any(lo <= start and end <= hi for lo, hi in mappings):
            continue
        first = -(-start // page) * page  # whole pages only
        last = end // page * page
        if last > first and libc.madvise(first, last - first, MADV_DONTNEED) == 0:
            released += last - first
    return released


def _byte_span(tensor: torch.Tensor) -> tuple[int, int]:
    """First and one-past-last address of the bytes a (strided) tensor covers."""
    elements = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(),
                                                                   strict=True))
    return tensor.data_ptr(), tensor.data_ptr() + elements * tensor.element_size()


def _private_file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private mappings of files (``/proc/self/maps``)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            # address perms offset device inode [path]; inode 0: anonymous memory
            if len(fields) == 6 and fields[1].endswith("p") and fields[4] != "0" \
                    and fields[5].startswith("/"):
                lo, hi = fields[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@functools.cache
def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _libc() -> Any:
    """glibc with ``malloc_trim`` and ``madvise`` typed, loaded once (each
    ``ctypes.CDLL`` object is a reference cycle), or None (not Linux, not glibc)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc
