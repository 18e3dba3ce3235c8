"""Every catalogue source compiles with NVRTC to a cubin for every architecture, spill-free.

No GPU needed: NVRTC runs on the CPU (``qcore_kernels.nvrtc``). The sample sources under
``compile_samples/`` exercise the same path (fp16/bf16, wmma, libcu++, a local header, name
expressions) independently of the real kernels.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qcore_kernels.nvrtc import (
    CompileError,
    CompileResult,
    compile_cubin,
    include_dirs,
    nvrtc_unavailable_reason,
)
from qcore_kernels.sources import ARCHS, CUDA_DIR, SOURCES

SAMPLES = Path(__file__).parent / "compile_samples"
SAMPLE = SAMPLES / "sample_kernels.cu"
SAMPLE_INSTANCES = ("sample_gemv<__half, 1>", "sample_gemv<__nv_bfloat16, 4>",
                    "sample_wmma<__half>", "sample_wmma<__nv_bfloat16>")

#: (file, instances): the catalogue, then the sample
CASES = [(s.path, s.instances) for s in SOURCES] + [(SAMPLE, SAMPLE_INSTANCES)]

needs_nvrtc = pytest.mark.skipif(nvrtc_unavailable_reason() is not None,
                                 reason=str(nvrtc_unavailable_reason()))


def _options(path: Path) -> tuple[str, ...]:
    return () if path.parent == CUDA_DIR else (f"-I{path.parent}",)


@pytest.fixture(scope="module")
def compiled():
    """``compiled(path, instances, arch) -> CompileResult``, each compile done once.

    Results are cached per (source text hash, name, arch, instances, options); the first use
    starts every case x arch at once on all cores (NVRTC releases the GIL).
    """
    cache = {}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:

        def submit(path: Path, instances, arch: str):
            text = path.read_text()
            key = (hashlib.sha256(text.encode()).hexdigest(), path.name, arch, tuple(instances),
                   _options(path))
            if key not in cache:
                cache[key] = pool.submit(compile_cubin, text, path.name, arch, instances,
                                         _options(path))
            return cache[key]

        for path, instances in CASES:
            if path.exists():
                for arch in ARCHS:
                    submit(path, instances, arch)
        yield lambda path, instances, arch: submit(path, instances, arch).result()
        pool.shutdown(cancel_futures=True)


def _case(compiled, case, arch) -> CompileResult:
    path, instances = case
    if not path.exists():
        pytest.fail(f"{path.name} is in the catalogue but does not exist", pytrace=False)
    return compiled(path, instances, arch)


parametrize_cases = pytest.mark.parametrize("case", CASES, ids=[p.name for p, _ in CASES])
parametrize_archs = pytest.mark.parametrize("arch", ARCHS)


def test_every_cuda_source_is_in_the_catalogue():
    """A .cu file outside sources.SOURCES would escape the compile check and the harness."""
    assert sorted(p.name for p in CUDA_DIR.glob("*.cu")) == sorted(s.file for s in SOURCES)
    w4a4 = next(s for s in SOURCES if s.file == "qk_w4a4.cu")  # int4 mma.sync: sm_80 and up
    assert {i.split("<")[0] for i in w4a4.instances} == {"qk_w4a4_quantize", "qk_w4a4_gemm"}


def test_include_dirs_resolve_the_headers():
    dirs = include_dirs()
    assert dirs[0] == os.path.realpath(CUDA_DIR)
    assert len(dirs) == len(set(dirs))
    for header in ("cuda_fp16.h", "cuda_bf16.h", "mma.h", "cuda/std/cstdint"):
        assert any(Path(d, header).is_file() for d in dirs), f"{header} not in {dirs}"


@needs_nvrtc
@parametrize_cases
@parametrize_archs
def test_compiles_to_cubin(compiled, case, arch):
    r = _case(compiled, case, arch)
    assert r.cubin[:4] == b"\x7fELF" and len(r.cubin) > 1000
    assert set(r.lowered_names) == set(case[1])
    assert all(r.lowered_names.values()), r.lowered_names


@needs_nvrtc
@parametrize_cases
@parametrize_archs
def test_no_register_spills(compiled, case, arch):
    r = _case(compiled, case, arch)
    per_kernel = "\n".join(
        f"  {inst}: {k.registers} registers, spill stores {k.spill_stores} B, "
        f"spill loads {k.spill_loads} B, stack frame {k.stack_frame} B"
        for inst, k in r.kernels.items())
    instance = {low: inst for inst, low in r.lowered_names.items()}
    spills = "\n".join(f"  {instance.get(n, n)}: stores {k.spill_stores} B, loads {k.spill_loads} B"
                       for n, k in r.spills.items())
    if r.spills:
        pytest.fail(f"{r.name} spills registers on {arch}:\n{spills}\nall kernels:\n{per_kernel}",
                    pytrace=False)


@needs_nvrtc
def test_spills_are_detected():
    # a long dependent chain over 40 live values cannot fit in 24 registers
    src = """
    __global__ void heavy(const float* x, float* y) {
        float acc[40];
        for (int i = 0; i < 40; i++) acc[i] = x[threadIdx.x + i];
        for (int j = 0; j < 40; j++)
            for (int i = 0; i < 40; i++) acc[i] = acc[i] * acc[j] + x[i + j];
        float s = 0;
        for (int i = 0; i < 40; i++) s += acc[i];
        y[threadIdx.x] = s;
    }"""
    r = compile_cubin(src, "heavy.cu", "sm_80", ["heavy"], ["--maxrregcount=24"])
    (k,) = r.kernels.values()
    assert k.registers <= 24 and k.spill_stores > 0 and k.spill_loads > 0, k
    assert r.spills == {k.name: k}


@needs_nvrtc
def test_syntax_error_names_file_and_line():
    lines = SAMPLE.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("template"))
    lines.insert(at, "__device__ int broken = ;")  # becomes line at + 1
    with pytest.raises(CompileError) as info:
        compile_cubin("\n".join(lines), "sample_broken.cu", "sm_86", SAMPLE_INSTANCES,
                      [f"-I{SAMPLES}"])
    e = info.value
    assert e.arch == "sm_86" and "sm_86" in str(e)
    assert f"sample_broken.cu({at + 1}): error" in str(e)
    assert f"sample_broken.cu({at + 1}): error" in e.log
