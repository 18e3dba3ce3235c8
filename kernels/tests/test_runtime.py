"""The text the runtime hands to CuPy: local headers inlined, compiler messages still
pointing at the original files and lines."""

from __future__ import annotations

import pytest

from qcore_kernels.nvrtc import CompileError, compile_cubin, nvrtc_unavailable_reason
from qcore_kernels.runtime import expand_includes
from qcore_kernels.sources import COMMON_OPTIONS, CUDA_DIR, SOURCES, KernelSource

needs_nvrtc = pytest.mark.skipif(
    nvrtc_unavailable_reason() is not None, reason=str(nvrtc_unavailable_reason())
)


def test_local_headers_are_inlined_once_each():
    text = expand_includes(SOURCES[0])
    assert '#include "' not in text
    assert text.count("namespace qk {\n\nconstexpr unsigned FULL_MASK") == 1  # qk_common.cuh once
    assert "#pragma once" not in text


@needs_nvrtc
def test_the_expanded_text_compiles_without_the_kernel_include_dir():
    src = SOURCES[0]
    result = compile_cubin(
        expand_includes(src),
        src.file,
        "sm_90",
        [i for i in src.instances if "mma<4, __half, 1, 2" in i],
        COMMON_OPTIONS,
    )
    assert result.cubin[:4] == b"\x7fELF"


@needs_nvrtc
def test_errors_in_an_inlined_header_name_the_header_and_its_line(tmp_path, monkeypatch):
    import qcore_kernels.runtime as runtime

    header = (CUDA_DIR / "qk_common.cuh").read_text().splitlines()
    line = header.index("namespace qk {") + 2
    header.insert(line, "this is not C++;")
    (tmp_path / "qk_common.cuh").write_text("\n".join(header) + "\n")
    (tmp_path / "qk_mma.cuh").write_text((CUDA_DIR / "qk_mma.cuh").read_text())
    (tmp_path / "qk_wq.cu").write_text((CUDA_DIR / "qk_wq.cu").read_text())
    monkeypatch.setattr(runtime, "CUDA_DIR", tmp_path)
    src = KernelSource("qk_wq.cu", ("qk_wq_mma<4, __half, 1, 2, 4>",))
    with pytest.raises(CompileError, match=rf"qk_common\.cuh\({line + 1}\): error"):
        compile_cubin(expand_includes(src), src.file, "sm_80", src.instances, COMMON_OPTIONS)
