"""NVRTC through ctypes: compile CUDA sources to cubin without a GPU or a CUDA driver.

CuPy's compile entry points need a driver, so the compile check calls NVRTC directly. The
library comes from the ``nvidia-cuda-nvrtc`` wheel (or a CUDA toolkit); the headers from
``nvidia-cuda-runtime`` (``cuda_fp16.h``), ``nvidia-cuda-crt`` (``mma.h``) and CuPy's bundled
CCCL (``cuda/std/...``). ``include_dirs()`` is also what the runtime passes to CuPy.

Resource usage comes from ptxas itself: ``--ptxas-options=-v`` makes NVRTC append ptxas'
report (registers, stack frame, spill stores/loads, smem, cmem) to the program log, which
``compile_cubin`` parses. The parse is checked: every instance must have a full report.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .sources import COMMON_OPTIONS, CUDA_DIR, KernelSource

#: How to get NVRTC and the headers (the pins CI uses are in requirements-dev.txt).
INSTALL_HINT = (
    "pip install nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 "
    "nvidia-cuda-crt==13.0.88 (or qcore-kernels[compile-check]), or set CUDA_PATH to a toolkit"
)


class CompileError(Exception):
    """NVRTC rejected a source; the message holds the log (``file(line): error ...``)."""

    def __init__(self, name: str, arch: str, log: str):
        super().__init__(name, arch, log)
        self.name, self.arch, self.log = name, arch, log

    def __str__(self) -> str:
        return f"NVRTC could not compile {self.name} for {self.arch}:\n{self.log.strip()}"


@dataclass(frozen=True)
class KernelResources:
    """ptxas' report for one function (``entry``: a ``__global__`` kernel). Sizes in bytes."""

    name: str
    entry: bool
    registers: int = 0  # reported for entry functions only
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0  # per-thread local memory of the frame (spills, local arrays)
    shared: int = 0  # static shared memory
    constant: int = 0  # cmem[0]: kernel parameters and driver constants
    barriers: int = 0

    @property
    def spilled(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


@dataclass(frozen=True)
class CompileResult:
    name: str
    arch: str
    cubin: bytes
    log: str
    #: name expression (instance) -> lowered (mangled) kernel name
    lowered_names: dict[str, str]
    #: mangled name -> ptxas report, for every function ptxas compiled (kernels and
    #: non-inlined device functions)
    resources: dict[str, KernelResources]
    seconds: float

    @property
    def kernels(self) -> dict[str, KernelResources]:
        """Per instance (name expression): its kernel's resource usage."""
        return {inst: self.resources[low] for inst, low in self.lowered_names.items()}

    @property
    def spills(self) -> dict[str, KernelResources]:
        """Every function (kernel or device function) that spills registers."""
        return {n: r for n, r in self.resources.items() if r.spilled}


# --- locating files ---------------------------------------------------------------------


def _dist_files(dist: str) -> list[tuple[tuple[str, ...], Path]]:
    """(path parts relative to site-packages, absolute path) of each file a distribution
    recorded; empty when it is not installed."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return []
    return [(f.parts, Path(d.locate_file(f))) for f in d.files or []]


def _wheel_include_dirs(dist: str) -> list[Path]:
    """A wheel's ``include`` folders (``nvidia/cu13/include``, ``nvidia/cuda_runtime/include``)."""
    dirs: list[Path] = []
    for parts, path in _dist_files(dist):
        if "include" in parts[:-1]:
            root = path.parents[len(parts) - 2 - parts.index("include")]
            if root not in dirs:
                dirs.append(root)
    return dirs


def _cupy_include_dirs() -> list[Path]:
    """CuPy's headers and its bundled CCCL (libcu++ for ``cuda/std``, CUB, Thrust).

    Found without importing CuPy (which would load the CUDA runtime).
    """
    try:
        spec = importlib.util.find_spec("cupy")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    inc = Path(next(iter(spec.submodule_search_locations)), "_core", "include")
    cccl = inc / "cupy" / "_cccl"
    return [inc, cccl / "libcudacxx", cccl / "cub", cccl / "thrust"]


def _toolkit_roots() -> list[Path]:
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return [Path(r) for r in roots if r]


def include_dirs() -> list[str]:
    """``-I`` folders for compiling the kernels, first match wins; only existing ones, deduped.

    The project's ``cuda`` folder, then the headers of the installed wheels
    (nvidia-cuda-runtime, nvidia-cuda-crt, nvidia-cuda-cccl, CuPy and its CCCL), then the
    toolkits of ``$CUDA_PATH``, ``$CUDA_HOME`` and ``/usr/local/cuda`` (``include`` and its
    ``include/cccl``). Never raises: a missing package only means fewer folders.
    """
    candidates = [CUDA_DIR]
    for dist in ("nvidia-cuda-runtime", "nvidia-cuda-crt", "nvidia-cuda-cccl"):
        for inc in _wheel_include_dirs(dist):
            candidates += [inc, inc / "cccl"]
    candidates += _cupy_include_dirs()
    for root in _toolkit_roots():
        candidates += [root / "include", root / "include" / "cccl"]
    seen: dict[str, None] = {}
    for c in candidates:
        try:
            if c.is_dir():
                seen.setdefault(os.path.realpath(c))
        except OSError:
            continue
    return list(seen)


# --- loading NVRTC ----------------------------------------------------------------------

_LIB_NAME = re.compile(r"libnvrtc\.so(\.\d+)*|nvrtc64_\d+(_0)?\.dll")


def _nvrtc_candidates() -> Iterator[str]:
    for _, f in _dist_files("nvidia-cuda-nvrtc"):
        if _LIB_NAME.fullmatch(f.name):
            yield str(f)
    for root in _toolkit_roots():
        for sub in ("lib64", "lib", "bin"):
            for f in sorted((root / sub).glob("*nvrtc*"), reverse=True):
                if _LIB_NAME.fullmatch(f.name):
                    yield str(f)
    if found := ctypes.util.find_library("nvrtc"):
        yield found


@cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the NVRTC library, its path) or (None, why not)."""
    errors = []
    for path in _nvrtc_candidates():
        # libnvrtc dlopens libnvrtc-builtins by name; the wheels set no RPATH for it, so
        # load it first from the same folder (the loader then reuses it).
        for b in sorted(Path(path).parent.glob("libnvrtc-builtins.so*")):
            if ".alt." not in b.name:
                try:
                    ctypes.CDLL(str(b), mode=ctypes.RTLD_GLOBAL)
                    break
                except OSError:
                    pass
        try:
            lib = ctypes.CDLL(path)
            lib.nvrtcGetCUBIN  # noqa: B018  (NVRTC >= 11.1)
        except (OSError, AttributeError) as e:
            errors.append(f"{path}: {e}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                           ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                           ctypes.c_void_p]
        for fn in ("nvrtcAddNameExpression", "nvrtcGetProgramLog", "nvrtcGetCUBIN"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        for fn in ("nvrtcGetProgramLogSize", "nvrtcGetCUBINSize"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                            ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcGetLoweredName.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                            ctypes.POINTER(ctypes.c_char_p)]
        return lib, path
    return None, "; ".join(errors) or "no libnvrtc in the nvidia-cuda-nvrtc wheel or a toolkit"


def nvrtc_unavailable_reason() -> str | None:
    """Why NVRTC cannot be used here (what to install), or None when it can."""
    lib, why = _load()
    return None if lib is not None else f"NVRTC library not found ({why}): {INSTALL_HINT}"


def nvrtc_library() -> str:
    """Path of the NVRTC library in use."""
    lib, path = _load()
    if lib is None:
        raise RuntimeError(nvrtc_unavailable_reason())
    return path


def nvrtc_version() -> tuple[int, int]:
    lib, _ = _load()
    if lib is None:
        raise RuntimeError(nvrtc_unavailable_reason())
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


# --- ptxas' report ---------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_USED_EXTRA = {"barriers": re.compile(r"used (\d+) barriers"),
               "shared": re.compile(r"(\d+) bytes smem"),
               "constant": re.compile(r"(\d+) bytes cmem\[0\]")}


def _ptxas_report(log: str) -> dict[str, dict]:
    """Per function, the fields of ``KernelResources`` found in ptxas' ``-v`` output::

        ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
        ptxas info    : Function properties for _Z1kPf
        ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 18 registers, used 1 barriers, 4096 bytes smem, 360 bytes cmem[0]

    Non-inlined device functions get a ``Function properties`` block but no ``Used`` line.
    """
    funcs: dict[str, dict] = {}
    entry = current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m[1]
            funcs.setdefault(entry, {"entry": True})
        elif m := _PROPERTIES.search(line):
            current = m[1]
            funcs.setdefault(current, {"entry": False})
        elif (m := _FRAME.search(line)) and current:
            funcs[current].update(stack_frame=int(m[1]), spill_stores=int(m[2]),
                                  spill_loads=int(m[3]))
        elif (m := _USED.search(line)) and entry:
            funcs[entry]["registers"] = int(m[1])
            for key, rx in _USED_EXTRA.items():
                if found := rx.search(line):
                    funcs[entry][key] = int(found[1])
    return funcs


# --- compiling --------------------------------------------------------------------------


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")


def _read(lib: ctypes.CDLL, prog: ctypes.c_void_p, what: str) -> bytes:
    size = ctypes.c_size_t()
    _check(lib, getattr(lib, f"nvrtcGet{what}Size")(prog, ctypes.byref(size)), what)
    buf = ctypes.create_string_buffer(size.value)
    _check(lib, getattr(lib, f"nvrtcGet{what}")(prog, buf), what)
    return buf.raw


def compile_cubin(
    source_text: str,
    name: str,
    arch: str,
    instances: Sequence[str],
    options: Sequence[str] = (),
) -> CompileResult:
    """Compile ``source_text`` (program ``name``, e.g. ``qk_wq.cu``) to a cubin for ``arch``.

    Every instance (a name expression such as ``qk_wq_mma<4, __half, 1, 2, 4>``) is instantiated
    and lowered. Options: ``--gpu-architecture=<arch>``, ``COMMON_OPTIONS``, ptxas' verbose
    report, ``options`` and ``-I`` for each of ``include_dirs()``. Raises ``CompileError``.
    """
    if not re.fullmatch(r"sm_\d+[af]?", arch):
        raise ValueError(f"arch must be a real architecture such as 'sm_80' (cubin), not {arch!r}")
    lib, _ = _load()
    if lib is None:
        raise RuntimeError(nvrtc_unavailable_reason())
    opts = [f"--gpu-architecture={arch}", *COMMON_OPTIONS, "--ptxas-options=-v", *options]
    opts += [f"-I{d}" for d in include_dirs()]
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source_text.encode(), name.encode(),
                                       0, None, None), "nvrtcCreateProgram")
    try:
        for inst in instances:
            _check(lib, lib.nvrtcAddNameExpression(prog, inst.encode()), inst)
        start = time.perf_counter()
        status = lib.nvrtcCompileProgram(prog, len(opts),
                                         (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts)))
        seconds = time.perf_counter() - start
        log = _read(lib, prog, "ProgramLog").rstrip(b"\0").decode(errors="replace")
        if status != 0:
            raise CompileError(name, arch, log)
        cubin = _read(lib, prog, "CUBIN")
        lowered = {}
        for inst in instances:
            out = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(prog, inst.encode(), ctypes.byref(out)), inst)
            lowered[inst] = out.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    report = _ptxas_report(log)
    incomplete = [low for low in lowered.values()
                  if not {"registers", "spill_stores"} <= report.get(low, {}).keys()]
    if incomplete:
        raise RuntimeError(f"no complete ptxas report for {incomplete} in the NVRTC log of "
                           f"{name} ({arch}); has its format changed?\n{log}")
    resources = {n: KernelResources(n, **fields) for n, fields in report.items()}
    return CompileResult(name, arch, cubin, log, lowered, resources, seconds)


def compile_source(src: KernelSource, arch: str, options: Sequence[str] = ()) -> CompileResult:
    """Compile a catalogue source for ``arch`` with all its instances."""
    return compile_cubin(src.read(), src.file, arch, src.instances, options)
