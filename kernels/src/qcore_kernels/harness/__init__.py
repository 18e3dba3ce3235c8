"""A CPU harness that runs the project's unchanged CUDA SIMT kernels, for tests without a GPU.

The ``.cu`` file is compiled as C++20 by the host compiler (g++ or clang++) with
``qk_cpu_shim.h`` force-included and ``QK_CPU_HARNESS`` (and ``__CUDA_ARCH__`` = 800) defined;
the stub headers under ``include/`` make ``<cuda_fp16.h>``, ``<cuda_bf16.h>`` and
``<cuda/std/cstdint>`` resolve, and ``<mma.h>`` stops the build with an ``#error``.

Execution model: a launch starts one OS thread per CUDA thread of a block (created once per
launch, 1 MiB stacks); the threads run the grid's blocks one after another, all meeting at a
block-end barrier, so a static ``__shared__`` array is each block's shared memory.
``__syncthreads`` is a barrier over the block, a warp intrinsic one over the warp's lanes
(linear thread id / 32) with an exchange buffer. Threads really run concurrently.

What it covers (SIMT code): thread/block indexing over 1-3-D grids and blocks, static
``__shared__`` memory, ``__syncthreads``, the ``*_sync`` warp intrinsics (shuffles, ballot,
``__syncwarp``), integer and float arithmetic (``__half``/``__nv_bfloat16`` with the GPU's
round-to-nearest-even conversions, ``__dp4a``, bit intrinsics, saturating float-to-int),
atomics, ``__trap`` and ``printf``. Barrier misuse is reported at once, naming the thread and
the file and line: a divergent ``__syncthreads`` (reached at different places), a thread that
returns while others wait for it (an early ``return`` before ``__syncthreads``, a lane missing
from a shuffle), threads waiting at barriers that cannot complete. A watchdog fails a launch
in which no thread reaches a barrier or returns for ``timeout`` seconds (an endless loop) and
cancels the stuck threads.

The qcore kernels keep their tensor-core code in ``qk_mma.cuh`` (``WarpTile``, wmma; and
``mma_16816`` and ``mma_s4_16864``, PTX ``mma.sync`` on fp16/bf16 and int4), which the
harness build replaces by SIMT code with the same contract: their kernels run here (loads,
dequantization, shared-memory layout, fragment layout, split-K reduction, epilogue), all but
the tensor-core instructions themselves, which only the GPU tests
(``qcore_kernels_tests/test_kernels_gpu.py`` and the like) check.

What it cannot check: tensor cores (``<mma.h>``/WMMA, ``mma.sync``) and any inline PTX
(``asm``), async copies (``cp.async``, TMA), dynamic shared memory (``extern __shared__``);
the memory model and timing (every access is coherent and blocks never run concurrently, so
inter-block races and a missing ``__threadfence`` go unnoticed); races that happen to work
with the chosen scheduling; out-of-bounds reads and writes (not detected: they read or corrupt
host memory, or crash the process); ``--use_fast_math`` effects (flush-to-zero, approximate
``expf`` and division: the CPU computes IEEE results, so compare with a tolerance);
performance.

Blocks run in the grid's linear order (x fastest), or in reverse with
``QK_CPU_BLOCK_ORDER=reverse`` in the environment at launch time: a kernel whose blocks
communicate (an ordered split-K reduction, a counter the last block reads) should give the
same result either way.

Rules for kernel authors: blocks of up to 1024 threads, any shape; a partial last warp is
allowed (its absent lanes are left out of warp collectives, and reading one returns the
reader's own value). Every thread of a block must reach each ``__syncthreads`` (no early
``return`` before one, even of a whole warp); the lanes in a shuffle's mask must all call the
same intrinsic with the same mask. Launches are serialized within the process; each costs
about 0.2 ms per block plus ~0.1 ms per barrier or shuffle (128 threads, 2 cores), so keep
test grids to hundreds of blocks.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from qcore.ops import cache_dir
from qcore_kernels.sources import source

__all__ = ["CpuHarness", "HarnessError", "Parameter", "harness_unavailable_reason"]

HARNESS_DIR = Path(__file__).parent
SHIM = HARNESS_DIR / "qk_cpu_shim.h"
INCLUDE_DIR = HARNESS_DIR / "include"
CXX_FLAGS: tuple[str, ...] = (
    "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread",
    # CUDA code type-puns through pointers freely; nvcc does not exploit it, so neither may g++.
    "-fno-strict-aliasing",
    # Each library keeps its own symbols (static shared memory, thread-locals).
    "-fvisibility=hidden",
    "-Wno-unknown-pragmas", "-DQK_CPU_HARNESS",
)
#: g++ only: inline and template statics stay local to their library (clang has no such flag).
GCC_FLAGS: tuple[str, ...] = ("-fno-gnu-unique",)
#: Result codes of qk_cpu::run.
_OK, _FAILED, _THREADS_LEFT = 0, 1, 2
_POINTER, _INTEGER, _FLOATING = 0, 1, 2
_MAX_BLOCK = (1024, 1024, 64)
_MAX_GRID = (2**31 - 1, 65535, 65535)

_LAUNCH_LOCK = threading.Lock()
_STUCK_LIBRARIES: dict[Path, str] = {}

_EXPORTS = """
extern "C" {
#define QK_EXPORT __attribute__((visibility("default")))
QK_EXPORT unsigned qk_cpu_count() { return sizeof qk_cpu_instances / sizeof qk_cpu_instances[0]; }
QK_EXPORT unsigned qk_cpu_nparams(unsigned i) { return qk_cpu_instances[i].nparams; }
QK_EXPORT size_t qk_cpu_param_size(unsigned i, unsigned p) { return qk_cpu_instances[i].sizes[p]; }
QK_EXPORT int qk_cpu_param_kind(unsigned i, unsigned p) { return qk_cpu_instances[i].kinds[p]; }
QK_EXPORT const char* qk_cpu_param_type(unsigned i, unsigned p) {
    return qk_cpu_instances[i].types[p];
}
QK_EXPORT int qk_cpu_launch(unsigned i, const unsigned* dims, void** args, double timeout_s,
                            char* err, size_t err_len) {
    const qk_cpu::Instance& k = qk_cpu_instances[i];
    return k.launch(k.kernel, dim3(dims[0], dims[1], dims[2]), dim3(dims[3], dims[4], dims[5]),
                    args, timeout_s, err, err_len);
}
}
"""


class HarnessError(RuntimeError):
    """A kernel could not be compiled, was launched wrongly, or failed while running on the CPU.

    The message names the file and line (compiler errors), the parameter (argument errors) or
    the thread and barrier (deadlocks).
    """


@dataclass(frozen=True)
class Parameter:
    """One kernel parameter as the compiler sees it."""

    type: str  # C++ spelling, e.g. "const __half*"
    size: int  # sizeof, bytes
    kind: int  # 0 pointer, 1 integer, 2 floating (float, double, __half, __nv_bfloat16), 3 other

    @property
    def is_pointer(self) -> bool:
        return self.kind == _POINTER


# --------------------------------------------------------------------------------------------
# Compiler
# --------------------------------------------------------------------------------------------


def _compiler() -> str | None:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def harness_unavailable_reason() -> str | None:
    """Why the CPU harness cannot run here (no C++ compiler), or None when it can."""
    if _compiler() is None:
        wanted = f"$CXX={os.environ['CXX']}" if os.environ.get("CXX") else "g++, c++ or clang++"
        return f"the CPU kernel harness needs a C++20 compiler; none found ({wanted} on PATH)"
    return None


@cache
def _compiler_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout


def _harness_headers() -> list[Path]:
    return [SHIM, *sorted(p for p in INCLUDE_DIR.rglob("*") if p.is_file())]


def _local_headers(cu: Path) -> list[Path]:
    """The headers next to the .cu file: a change to any of them must rebuild it."""
    return sorted(p for p in cu.parent.iterdir() if p.suffix in {".cuh", ".h", ".hpp", ".inl"})


def _translation_unit(cu: Path, instances: Sequence[str]) -> str:
    entries = "".join(f"    qk_cpu::instance(&{name}),\n" for name in instances)
    return (
        f"// Generated by qcore_kernels.harness: launchers for {cu.name}.\n"
        f'#include "{cu}"\n\n'
        f"static const qk_cpu::Instance qk_cpu_instances[] = {{\n{entries}}};\n{_EXPORTS}"
    )


def _flags(compiler: str) -> tuple[str, ...]:
    return CXX_FLAGS if "clang" in _compiler_version(compiler) else CXX_FLAGS + GCC_FLAGS


def _library_path(compiler: str, cu: Path, unit: str) -> Path:
    """Where the library for this (compiler, flags, generated unit, headers, source) lives."""
    digest = hashlib.sha256()
    for part in (compiler, _compiler_version(compiler), *_flags(compiler), unit):
        digest.update(part.encode() + b"\0")
    for header in (*_harness_headers(), cu, *_local_headers(cu)):
        digest.update(header.read_bytes() + b"\0")
    return cache_dir() / "harness" / f"{cu.stem}-{digest.hexdigest()[:20]}.so"


def _build(cu: Path, instances: Sequence[str]) -> Path:
    """Compiles (once per content hash) and returns the shared library's path."""
    compiler = _compiler()
    if compiler is None:
        raise HarnessError(harness_unavailable_reason())
    unit = _translation_unit(cu, instances)
    library = _library_path(compiler, cu, unit)
    if library.exists():
        return library
    out_dir = library.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compile in a private folder, then rename: parallel processes never see a partial file.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        unit_path = Path(tmp) / f"{cu.stem}_launchers.cpp"
        unit_path.write_text(unit)
        command = [compiler, *_flags(compiler), "-I", str(INCLUDE_DIR), "-include", str(SHIM),
                   "-x", "c++", str(unit_path), "-o", str(Path(tmp) / "lib.so")]
        # LC_ALL=C: plain quotes in the messages, whatever the user's locale.
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "LC_ALL": "C"})
        if done.returncode != 0:
            raise HarnessError(
                f"compiling {cu} for the CPU harness failed ({Path(compiler).name} exit "
                f"{done.returncode}):\n{done.stderr.strip()[-8000:]}"
            )
        os.replace(Path(tmp) / "lib.so", library)
    return library


@cache
def _load(library: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library))
    lib.qk_cpu_count.restype = ctypes.c_uint
    lib.qk_cpu_nparams.argtypes = [ctypes.c_uint]
    lib.qk_cpu_nparams.restype = ctypes.c_uint
    for name, restype in (("qk_cpu_param_size", ctypes.c_size_t),
                          ("qk_cpu_param_kind", ctypes.c_int),
                          ("qk_cpu_param_type", ctypes.c_char_p)):
        getattr(lib, name).argtypes = [ctypes.c_uint, ctypes.c_uint]
        getattr(lib, name).restype = restype
    lib.qk_cpu_launch.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
                                  ctypes.c_double, ctypes.c_char_p, ctypes.c_size_t]
    lib.qk_cpu_launch.restype = ctypes.c_int
    return lib


def _normalize(name: str) -> str:
    return re.sub(r"\s*([<>,*&()])\s*", r"\1", " ".join(name.split()))


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _dims(value: int | Sequence[int], what: str, limits: tuple[int, int, int]) -> tuple[int, ...]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise HarnessError(f"{what} must be an int or 1 to 3 ints, got {value!r}")
    dims = (*(int(d) for d in dims), *(1,) * (3 - len(dims)))
    if any(not 1 <= d <= limit for d, limit in zip(dims, limits, strict=True)):
        raise HarnessError(f"{what} {dims} is out of range: each of x, y, z from 1 to {limits}")
    return dims


def _pointer_value(value: object, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise HarnessError(f"{where}: the tensor is on {value.device}; the CPU harness needs a "
                               "CPU tensor (.cpu())")
        if not value.is_contiguous():
            raise HarnessError(f"{where}: the tensor (shape {tuple(value.shape)}, strides "
                               f"{value.stride()}) is not contiguous; pass .contiguous()")
        return value.data_ptr()
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous:
            raise HarnessError(f"{where}: the array is not C-contiguous; pass "
                               "np.ascontiguousarray()")
        return value.ctypes.data
    raise HarnessError(f"{where} is a pointer: pass a CPU tensor, a numpy array or None, "
                       f"got {type(value).__name__}")


def _scalar_bytes(value: object, param: Parameter, where: str) -> bytes:
    if isinstance(value, (torch.Tensor, np.ndarray)) or value is None:
        got = "None" if value is None else type(value).__name__
        raise HarnessError(f"{where} is passed by value; got a {got}, pass a numpy scalar")
    if isinstance(value, (bytes, bytearray)):
        scalar = value
    else:
        if isinstance(value, bool):
            value = np.bool_(value)
        elif isinstance(value, int):
            if not -(2**31) <= value < 2**31:
                raise HarnessError(f"{where}: the Python int {value} does not fit int32; pass "
                                   "a numpy scalar of the parameter's type")
            value = np.int32(value)
        elif isinstance(value, float):
            value = np.float32(value)
        if not isinstance(value, np.generic):
            raise HarnessError(f"{where}: cannot pass a {type(value).__name__}; pass a numpy "
                               "scalar, a Python int (int32) or float (float32)")
        if param.kind == _INTEGER and value.dtype.kind not in "iub":
            raise HarnessError(f"{where} is an integer; got {value.dtype} {value!r}")
        if param.kind == _FLOATING and value.dtype.kind != "f":
            raise HarnessError(f"{where} is floating point; got {value.dtype} {value!r}")
        scalar = value.tobytes()
    if len(scalar) != param.size:
        shown = f"{len(scalar)} bytes"
        if isinstance(value, np.generic):
            shown = f"{value.dtype} ({shown})"
        raise HarnessError(f"{where} takes {param.size} bytes, got {shown}; pass a numpy scalar of "
                           f"that size (a Python int is passed as int32, a float as float32)")
    return bytes(scalar)


# --------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------


class CpuHarness:
    """One CUDA source compiled for the CPU, with launchers for its kernel instances.

    ``CpuHarness("qk_wq.cu")`` takes a catalogue source (``qcore_kernels.sources``) and by
    default its SIMT instances; ``CpuHarness(path=..., instances=[...])`` any file. Instances
    are template name expressions (``"qk_wq_gemv<4, __half, 1>"``) or plain kernel names.
    ``timeout`` (seconds) is the watchdog's limit without progress at a barrier.
    """

    def __init__(self, file: str | None = None, *, path: str | os.PathLike[str] | None = None,
                 instances: Sequence[str] | None = None, timeout: float = 10.0) -> None:
        if (file is None) == (path is None):
            raise HarnessError("give either a catalogue file name or path=, not both or neither")
        if file is not None:
            try:
                kernel_source = source(file)
            except KeyError as exc:
                raise HarnessError(str(exc.args[0])) from None
            cu = kernel_source.path
            tensor_core = set(kernel_source.tensor_core_instances)
            if instances is None:
                instances = [i for i in kernel_source.instances if i not in tensor_core]
            refused = [i for i in instances if i in tensor_core]
            if refused:
                raise HarnessError(f"{refused} use tensor cores and cannot run in the CPU harness")
        else:
            cu = Path(path).resolve()
            if not instances:
                raise HarnessError(f"name the kernel instances of {cu} to build (instances=[...])")
        if not cu.is_file():
            raise HarnessError(f"no CUDA source at {cu}")
        self.path: Path = cu
        self.instances: tuple[str, ...] = tuple(instances)
        self.timeout = timeout
        self.library: Path = _build(cu, self.instances)
        self._lib = _load(self.library)
        self._index = {_normalize(name): i for i, name in enumerate(self.instances)}

    def parameters(self, instance: str) -> tuple[Parameter, ...]:
        """The parameters of ``instance``: C++ type, size and kind, in order."""
        i = self._instance_index(instance)
        lib = self._lib
        return tuple(
            Parameter(
                type=re.sub(r".*\[(?:with )?T = (.*)\]$", r"\1",  # g++ / clang spellings
                            lib.qk_cpu_param_type(i, p).decode()),
                size=lib.qk_cpu_param_size(i, p),
                kind=lib.qk_cpu_param_kind(i, p),
            )
            for p in range(lib.qk_cpu_nparams(i))
        )

    def launch(self, instance: str, grid: int | Sequence[int], block: int | Sequence[int],
               args: Sequence[object], *, timeout: float | None = None) -> None:
        """Runs ``instance<<<grid, block>>>(*args)`` on the CPU and returns when it is done.

        ``args``: CPU contiguous tensors or numpy arrays (their data pointer), None (a null
        pointer), numpy scalars by value, Python ``int`` as int32, ``float`` as float32, or
        ``bytes`` of the parameter's size. Raises :class:`HarnessError` on a wrong argument, a
        deadlock, a watchdog timeout or ``__trap()``.
        """
        i = self._instance_index(instance)
        params = self.parameters(instance)
        grid3 = _dims(grid, "grid", _MAX_GRID)
        block3 = _dims(block, "block", _MAX_BLOCK)
        if block3[0] * block3[1] * block3[2] > 1024:
            raise HarnessError(f"block {block3} has {block3[0] * block3[1] * block3[2]} threads; "
                               "at most 1024")
        if len(args) != len(params):
            raise HarnessError(f"{instance} takes {len(params)} arguments "
                               f"({', '.join(p.type for p in params)}), got {len(args)}")
        buffers = []
        for n, (value, param) in enumerate(zip(args, params, strict=True)):
            where = f"{instance}: argument {n} ({param.type})"
            if param.is_pointer:
                buffers.append(ctypes.c_void_p(_pointer_value(value, where)))
            else:
                data = _scalar_bytes(value, param, where)
                buffers.append(ctypes.create_string_buffer(data, len(data)))
        argv = (ctypes.c_void_p * max(len(buffers), 1))(*(ctypes.addressof(b) for b in buffers))
        dims = (ctypes.c_uint * 6)(*grid3, *block3)
        err = ctypes.create_string_buffer(4096)
        with _LAUNCH_LOCK:
            if self.library in _STUCK_LIBRARIES:
                raise HarnessError(f"{self.path.name} cannot launch again in this process: "
                                   f"{_STUCK_LIBRARIES[self.library]}")
            limit = self.timeout if timeout is None else timeout
            rc = self._lib.qk_cpu_launch(i, dims, argv, limit, err, len(err))
        message = err.value.decode(errors="replace")
        if rc == _THREADS_LEFT:
            _STUCK_LIBRARIES[self.library] = (f"threads of an earlier {instance} launch are still "
                                              "running")
            raise HarnessError(f"{instance} failed and some of its threads could not be stopped "
                               f"(the library cannot be used again in this process): {message}")
        if rc != _OK:
            raise HarnessError(f"{instance} <<<{grid3}, {block3}>>> failed: {message}")

    def _instance_index(self, instance: str) -> int:
        try:
            return self._index[_normalize(instance)]
        except KeyError:
            raise HarnessError(f"{instance!r} is not an instance built for {self.path.name}; "
                               f"built: {list(self.instances)}") from None
