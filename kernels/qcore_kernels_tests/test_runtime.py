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


def _cuda_h() -> str | None:
    from pathlib import Path

    from qcore_kernels.nvrtc import include_dirs

    return next((d for d in include_dirs() if (Path(d) / "cuda.h").is_file()), None)


@pytest.mark.skipif(_cuda_h() is None, reason="no cuda.h among the kernel include folders")
def test_programmatic_launch_structs_match_cuda_h(tmp_path):
    """The ctypes CUlaunchConfig / CUlaunchAttribute of the programmatic launch have cuda.h's
    sizes and field offsets (compiled with the C compiler against the installed header), and
    the attribute id is cuda.h's."""
    import ctypes
    import shutil
    import subprocess

    from qcore_kernels.runtime import (
        PROGRAMMATIC_STREAM_SERIALIZATION,
        LaunchAttribute,
        LaunchConfig,
    )

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    fields = [f for f, _ in LaunchConfig._fields_]
    prog = tmp_path / "layout.c"
    prog.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <cuda.h>\nint main(void) {\n"
        '  printf("%zu %zu %zu %d\\n", sizeof(CUlaunchConfig), sizeof(CUlaunchAttribute), '
        "offsetof(CUlaunchAttribute, value), "
        "(int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);\n"
        + "".join(f'  printf("%zu\\n", offsetof(CUlaunchConfig, {f}));\n' for f in fields)
        + "  return 0;\n}\n"
    )
    exe = tmp_path / "layout"
    subprocess.run([cc, str(prog), f"-I{_cuda_h()}", "-o", str(exe)], check=True,
                   capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    config_size, attr_size, value_offset, attr_id = map(int, out[:4])
    assert ctypes.sizeof(LaunchConfig) == config_size == 56
    assert ctypes.sizeof(LaunchAttribute) == attr_size == 72
    assert LaunchAttribute.value.offset == value_offset == 8
    assert PROGRAMMATIC_STREAM_SERIALIZATION == attr_id == 6
    assert [getattr(LaunchConfig, f).offset for f in fields] == [int(v) for v in out[4:]]


def test_programmatic_config_fills_every_field():
    from qcore_kernels.runtime import programmatic_config

    config, attr = programmatic_config((7, 2), (256,), 70656, 0x1234)
    assert (config.gridDimX, config.gridDimY, config.gridDimZ) == (7, 2, 1)
    assert (config.blockDimX, config.blockDimY, config.blockDimZ) == (256, 1, 1)
    assert config.sharedMemBytes == 70656 and config.hStream == 0x1234
    assert config.numAttrs == 1
    assert (config.attrs[0].id, config.attrs[0].value) == (attr.id, attr.value) == (6, 1)
    assert programmatic_config((1,), (32,), 0, 0)[0].hStream is None  # the legacy stream


def test_programmatic_launch_marshals_arguments_and_reports_errors(monkeypatch):
    """launch_programmatic hands cuLaunchKernelEx the function, the config and a pointer to
    each argument's bytes (read back here through a stand-in driver); a driver error is
    raised with its name and the way out."""
    import ctypes

    import numpy as np

    import qcore_kernels.runtime as runtime

    seen = {}

    class FakeDriver:
        result = 0

        def cuLaunchKernelEx(self, config, function, params, extra):  # noqa: N802
            cfg = config._obj
            seen.update(grid=(cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ), smem=cfg.sharedMemBytes,
                        stream=cfg.hStream, attr=(cfg.attrs[0].id, cfg.attrs[0].value),
                        function=function.value, extra=extra)
            seen["args"] = (ctypes.c_uint64.from_address(params[0]).value,
                            ctypes.c_int32.from_address(params[1]).value,
                            ctypes.c_float.from_address(params[2]).value)
            return self.result

        def cuGetErrorString(self, err, out):  # noqa: N802
            out._obj.value = b"CUDA_ERROR_INVALID_VALUE"
            return 0

    fake = FakeDriver()
    monkeypatch.setattr(runtime, "_driver", lambda: fake)
    args = [np.uint64(0xDEADBEEF00), np.int32(-7), np.float32(0.5)]
    runtime.launch_programmatic(0xABC, (3, 2, 1), (128, 1, 1), args, 4096, 77)
    assert seen == {"grid": (3, 2, 1), "smem": 4096, "stream": 77, "attr": (6, 1),
                    "function": 0xABC, "extra": None, "args": (0xDEADBEEF00, -7, 0.5)}
    fake.result = 1
    with pytest.raises(RuntimeError, match=r"failed: 1 \(CUDA_ERROR_INVALID_VALUE\).*LUT_PDL"):
        runtime.launch_programmatic(0xABC, (1,), (32,), args, 0, 0)


def test_external_stream_wraps_torchs_handle_without_a_deprecation_warning(monkeypatch):
    """Kernels launch on torch's stream through CuPy's view of its handle: ExternalStream
    while CuPy has it (its CuPy 14 DeprecationWarning silenced), else Stream.from_external
    under the CUDA stream protocol; either way the view's pointer is the handle. Neither
    needs a driver to be made."""
    import warnings

    cupy = pytest.importorskip("cupy")
    from qcore_kernels.runtime import external_stream

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would raise here
        stream = external_stream(0x5A5A0, 0)
        assert stream.ptr == 0x5A5A0 and stream.device_id == 0
        assert external_stream(0x5A5B0).ptr == 0x5A5B0
    assert isinstance(stream, cupy.cuda.ExternalStream)

    monkeypatch.delattr(cupy.cuda, "ExternalStream")
    stream = external_stream(0x5A5C0, 0)
    assert type(stream) is cupy.cuda.Stream and stream.ptr == 0x5A5C0
