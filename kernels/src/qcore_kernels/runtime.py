"""Compiling and launching the CUDA sources with CuPy, on torch's tensors and stream.

CuPy is imported lazily, on the first launch. Each source is compiled once per process and
device (``cupy.RawModule`` with every template instance of the catalogue as a name
expression); CuPy also caches the binary on disk, keyed by the source text, which is why
local headers are expanded into the text first (a changed header changes the key).
Torch tensors are passed zero-copy as raw device pointers; kernels launch on torch's
current CUDA stream, so they order correctly with torch's own work.
"""

from __future__ import annotations

import ctypes
import functools
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from qcore_kernels.sources import COMMON_OPTIONS, CUDA_DIR, KernelSource, source

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


class _StreamHandle:
    """A raw CUDA stream handle under the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, handle: int) -> None:
        self._handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self._handle)


def external_stream(handle: int, device_index: int | None = None) -> Any:
    """CuPy's view of the CUDA stream ``handle`` (torch's stream, on device ``device_index``
    when known), to launch on with ``with``. ``cupy.cuda.ExternalStream`` while CuPy has it:
    every GPU run of this project has launched through it; CuPy 14 deprecates it, and its
    DeprecationWarning (one per stream) is silenced here. Without it (a later CuPy):
    ``cupy.cuda.Stream.from_external`` on the same handle, which leaves the device to the
    caller (launches here run inside ``cupy.cuda.Device(device_index)``)."""
    import cupy

    cls = getattr(cupy.cuda, "ExternalStream", None)
    if cls is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return cls(handle) if device_index is None else cls(handle, device_index)
    return cupy.cuda.Stream.from_external(_StreamHandle(handle))


class KernelCompileError(RuntimeError):
    """A kernel source did not compile (the message holds NVRTC's log)."""


def expand_includes(src: KernelSource) -> str:
    """The source text with its local ``#include "..."`` headers inlined once each, with
    ``#line`` directives so that compiler messages still name the original file and line."""
    seen: set[str] = set()

    def expand(name: str) -> list[str]:
        out = [f'#line 1 "{name}"']
        for lineno, line in enumerate((CUDA_DIR / name).read_text().splitlines(), start=1):
            m = _INCLUDE.match(line)
            if m and (CUDA_DIR / m.group(1)).is_file():
                if m.group(1) not in seen:
                    seen.add(m.group(1))
                    out += expand(m.group(1))
                    out.append(f'#line {lineno + 1} "{name}"')
                else:
                    out.append("")
            elif line.strip() == "#pragma once":
                out.append("")
            else:
                out.append(line)
        return out

    return "\n".join(expand(src.file)) + "\n"


@functools.lru_cache(maxsize=1)
def cupy_unavailable_reason() -> str | None:
    """Why the CuPy kernels cannot run here, or None. Cheap after the first call."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken CUDA install
        return (
            f"CuPy cannot be imported ({type(exc).__name__}: {exc}); "
            "install it with `pip install qcore-kernels[cuda]`"
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver
        return f"CuPy finds no CUDA driver or device ({type(exc).__name__}: {exc})"
    if count == 0:
        return "CuPy finds no CUDA device"
    return None


def _as_arg(value: Any) -> Any:
    import torch

    if value is None:
        return np.uint64(0)
    if isinstance(value, torch.Tensor):
        if not value.is_cuda:
            raise ValueError(f"a kernel argument is on {value.device}, not on a CUDA device")
        return np.uint64(value.data_ptr())
    if isinstance(value, bool):
        return np.int32(int(value))
    if isinstance(value, int):
        return np.int32(value)
    if isinstance(value, float):
        return np.float32(value)
    return value


#: CUlaunchAttributeID CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (cuda.h).
PROGRAMMATIC_STREAM_SERIALIZATION = 6


class LaunchAttribute(ctypes.Structure):
    """cuda.h's CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union (its
    first int: the programmatic-serialization flag)."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_pad", ctypes.c_char * 60)]


class LaunchConfig(ctypes.Structure):
    """cuda.h's CUlaunchConfig."""

    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


def programmatic_config(
    grid: Sequence[int], block: Sequence[int], shared_mem: int, stream: int
) -> tuple[LaunchConfig, LaunchAttribute]:
    """A cuLaunchKernelEx configuration with programmatic stream serialization on (keep the
    returned attribute alive while the config is used)."""
    attr = LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    g = (tuple(grid) + (1, 1))[:3]
    b = (tuple(block) + (1, 1))[:3]
    config = LaunchConfig(*g, *b, shared_mem, ctypes.c_void_p(stream or None),
                          ctypes.pointer(attr), 1)
    return config, attr


@functools.lru_cache(maxsize=1)
def _driver() -> Any:
    """libcuda with cuLaunchKernelEx (CUDA 12.0+ drivers)."""
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuLaunchKernelEx
    fn.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p)]
    fn.restype = ctypes.c_int
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuGetErrorString.restype = ctypes.c_int
    return lib


def launch_programmatic(
    function: int, grid: Sequence[int], block: Sequence[int], args: Sequence[Any],
    shared_mem: int, stream: int,
) -> None:
    """Launch CUfunction ``function`` with programmatic stream serialization: it may start
    before the kernel ahead of it in ``stream`` ends, and must wait for it (griddepcontrol)
    before reading that kernel's results. ``args``: numpy scalars (``_as_arg``)."""
    values = [np.asarray(a) for a in args]  # each argument's bytes, kept alive here
    params = (ctypes.c_void_p * max(1, len(values)))(*[v.ctypes.data for v in values])
    config, attr = programmatic_config(grid, block, shared_mem, stream)
    lib = _driver()
    err = lib.cuLaunchKernelEx(ctypes.byref(config), ctypes.c_void_p(function), params, None)
    del attr
    if err != 0:
        text = ctypes.c_char_p()
        lib.cuGetErrorString(err, ctypes.byref(text))
        name = text.value.decode() if text.value else "unknown error"
        raise RuntimeError(f"cuLaunchKernelEx (programmatic dependent launch) failed: {err} "
                           f"({name}); launch without it (lut_ops.LUT_PDL = False)")


class CupyLauncher:
    """Launches catalogue kernels on torch CUDA tensors: ``launcher(file, instance, grid,
    block, args, shared_mem=0, programmatic=False)`` (``shared_mem``: dynamic shared memory,
    bytes; ``programmatic``: programmatic dependent launch, for kernels that wait for the
    kernel before them with griddepcontrol before reading its results, on sm_90+).
    Arguments: tensors (device pointers), None (null), numpy scalars, and
    Python ints/floats (as int32/float32)."""

    def __init__(self) -> None:
        self._modules: dict[tuple[str, int], Any] = {}
        self._functions: dict[tuple[str, str, int], Any] = {}
        self._streams: dict[int, Any] = {}
        self._dynamic_smem: dict[int, int] = {}  # id(function) -> opted-in bytes

    def module(self, file: str, device_index: int) -> Any:
        key = (file, device_index)
        mod = self._modules.get(key)
        if mod is None:
            import cupy

            from qcore_kernels.nvrtc import include_dirs

            src = source(file)
            options = tuple(COMMON_OPTIONS) + tuple(f"-I{d}" for d in include_dirs())
            with cupy.cuda.Device(device_index):
                mod = cupy.RawModule(
                    code=expand_includes(src), options=options, name_expressions=list(src.instances)
                )
                try:
                    mod.compile()
                except Exception as exc:  # cupy's CompileException carries the log
                    raise KernelCompileError(
                        f"compiling {file} for device {device_index} failed: {exc}"
                    ) from exc
            self._modules[key] = mod
        return mod

    def function(self, file: str, instance: str, device_index: int) -> Any:
        key = (file, instance, device_index)
        fn = self._functions.get(key)
        if fn is None:
            fn = self.module(file, device_index).get_function(instance)
            self._functions[key] = fn
        return fn

    def __call__(
        self,
        file: str,
        instance: str,
        grid: Sequence[int],
        block: Sequence[int],
        args: Sequence[Any],
        shared_mem: int = 0,
        programmatic: bool = False,
    ) -> None:
        import cupy
        import torch

        device_index = next((a.device.index for a in args if isinstance(a, torch.Tensor)), None)
        if device_index is None:
            device_index = torch.cuda.current_device()
        fn = self.function(file, instance, device_index)
        handle = torch.cuda.current_stream(device_index).cuda_stream
        stream = self._streams.get(handle)
        if stream is None:
            stream = external_stream(handle, device_index)
            self._streams[handle] = stream
        with cupy.cuda.Device(device_index), stream:
            if shared_mem > 48 * 1024 and shared_mem > self._dynamic_smem.get(id(fn), 0):
                # Dynamic shared memory beyond 48 KB is opt-in, per kernel and device.
                fn.max_dynamic_shared_size_bytes = shared_mem
                self._dynamic_smem[id(fn)] = shared_mem
            values = tuple(_as_arg(a) for a in args)
            if programmatic:
                launch_programmatic(fn.kernel.ptr, grid, block, values, shared_mem, handle)
            else:
                fn(tuple(grid), tuple(block), values, shared_mem=shared_mem)


@functools.lru_cache(maxsize=1)
def cupy_launcher() -> CupyLauncher:
    return CupyLauncher()
