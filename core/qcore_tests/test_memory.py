"""Handing memory back: the pages of weights that are views of a file mapping."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from qcore.memory import release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux madvise")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _mapped(path, values: torch.Tensor) -> torch.Tensor:
    """``values`` written to ``path`` and mapped back privately, as safetensors loads them."""
    path.write_bytes(values.numpy().tobytes())
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=values.numel() * 4)
    return torch.empty(0).set_(storage).view(values.shape)


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) == 6 and head[5] == str(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_released_pages_of_a_mapped_weight_read_the_file_again(tmp_path):
    floats_per_page = PAGE // 4
    original = torch.arange(4 * floats_per_page, dtype=torch.float32)
    mapped = _mapped(tmp_path / "w.bin", original)
    # a weight that starts and ends inside a page, as tensors of a safetensors file do
    weight = mapped[100:100 + 2 * floats_per_page + 50]
    weight.mul_(-1.0)  # written, as dequantized weights are (copied on write)
    assert _resident_kib(tmp_path / "w.bin") >= 3 * PAGE // 1024

    released = release_file_pages([weight])

    assert released == PAGE  # the one whole page inside the weight's bytes
    whole = slice(floats_per_page, 2 * floats_per_page)  # that page
    assert torch.equal(mapped[whole], original[whole])  # the file's bytes again
    # the partly covered pages keep what was written: neighbours share them
    assert torch.equal(mapped[100:floats_per_page], -original[100:floats_per_page])
    assert torch.equal(mapped[:100], original[:100])
    end = 100 + 2 * floats_per_page + 50
    assert torch.equal(mapped[2 * floats_per_page:end], -original[2 * floats_per_page:end])


def test_resident_memory_of_a_mapped_weight_goes(tmp_path):
    original = torch.randn(64 * PAGE // 4, generator=torch.Generator().manual_seed(0))
    mapped = _mapped(tmp_path / "w.bin", original)
    float(mapped.sum())  # read: every page resident
    before = _resident_kib(tmp_path / "w.bin")
    assert release_file_pages([mapped]) == 64 * PAGE
    assert _resident_kib(tmp_path / "w.bin") <= before - 64 * PAGE // 1024
    assert torch.equal(mapped, original)  # read back from the file


def test_anonymous_memory_is_never_touched():
    weight = torch.randn(16 * PAGE // 4, generator=torch.Generator().manual_seed(1))
    expected = weight.clone()
    assert release_file_pages([weight, weight[::2]]) == 0
    assert torch.equal(weight, expected)
