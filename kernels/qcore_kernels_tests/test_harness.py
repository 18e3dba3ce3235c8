"""The CPU harness runs unchanged CUDA SIMT kernels on the CPU and matches torch/numpy.

The kernels are the samples in ``harness_samples/sample_simt.cu``; every check compares
with a reference computed here. Broken kernels (deadlocks, an endless loop) must raise
promptly, wrong arguments and compile errors must say what was wrong.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

import qcore_kernels.harness as harness_module
from qcore_kernels.harness import CpuHarness, HarnessError, harness_unavailable_reason
from qcore_kernels.sources import KernelSource

pytestmark = pytest.mark.skipif(harness_unavailable_reason() is not None,
                                reason=str(harness_unavailable_reason()))

SAMPLE = Path(__file__).parent / "harness_samples" / "sample_simt.cu"
INSTANCES = (
    "block_sum", "warp_rows", "round_trip<__half>", "round_trip<__nv_bfloat16>", "dp4a",
    "affine_2d", "transpose<16, __half>", "histogram", "arrival_order", "hello",
    "divergent_barrier", "split_barriers", "missing_lane", "crossed_barriers", "spin",
    "check_positive",
)


@pytest.fixture(scope="module")
def harness() -> CpuHarness:
    return CpuHarness(path=SAMPLE, instances=INSTANCES)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _line(code: str, after: str = "") -> int:
    """The line of the sample on which ``code`` stands (the first one after ``after``)."""
    lines = SAMPLE.read_text().splitlines()
    start = next(i for i, text in enumerate(lines) if after in text)
    return next(i for i, text in enumerate(lines[start:], start + 1) if code in text)


def _assert_still_works(harness: CpuHarness) -> None:
    x = torch.randn(100, generator=_gen(7))
    out = torch.zeros(2)
    harness.launch("block_sum", 2, 64, [x, out, 100])
    torch.testing.assert_close(out, torch.stack([x[:64].sum(), x[64:].sum()]))


# --------------------------------------------------------------------------------------------
# Kernels against references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [64, 256, 1024])
def test_block_sum_matches_torch(harness, threads):
    n = 1000
    x = torch.randn(n, generator=_gen(0))
    blocks = -(-n // threads)
    out = torch.full((blocks,), float("nan"))
    harness.launch("block_sum", blocks, threads, [x, out, n])
    ref = torch.nn.functional.pad(x, (0, blocks * threads - n)).view(blocks, threads).sum(1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cols", [70, 20])
def test_warp_shuffles_match_torch(harness, cols):
    rows = 6  # 4 rows per block: the second block's last two warps return at once
    x = torch.randn(rows, cols, generator=_gen(1))
    sums, maxima, prefix = (torch.full((rows, 32), float("nan")) for _ in range(3))
    harness.launch("warp_rows", 2, (32, 4), [x, sums, maxima, prefix, rows, cols])
    torch.testing.assert_close(sums, x.sum(1, keepdim=True).expand(rows, 32), rtol=1e-5, atol=1e-5)
    assert torch.equal(maxima, x.amax(1, keepdim=True).expand(rows, 32))
    first = torch.nn.functional.pad(x[:, :32], (0, max(0, 32 - cols)))
    torch.testing.assert_close(prefix, first.cumsum(1), rtol=1e-5, atol=1e-5)


def _rounding_cases() -> torch.Tensor:
    special = [0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"),
               1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8,  # half / bf16 ties to even
               65504.0, 65519.0, 65520.0, 1e6, 3.4e38, -3.4e38,  # half overflow
               # half subnormals
               2**-14, 2**-14 - 2**-25, 2**-24, 2**-25, 3 * 2**-25, 2**-26, 5e-8, -3e-6,
               1e-39, 1.5e-40, -2**-133, 2**-149, 1.17e-38]  # float / bf16 subnormals
    g = _gen(2)
    exponents = torch.randint(-30, 20, (4000,), generator=g).float()
    spread = torch.randn(4000, generator=g) * torch.exp2(exponents)
    return torch.cat([torch.tensor(special), spread])


@pytest.mark.parametrize(("instance", "dtype"), [("round_trip<__half>", torch.float16),
                                                 ("round_trip<__nv_bfloat16>", torch.bfloat16)])
def test_16bit_rounding_matches_torch(harness, instance, dtype):
    x = _rounding_cases()
    n = x.numel()
    rounded = torch.zeros(n, dtype=dtype)
    back = torch.zeros(n)
    harness.launch(instance, -(-n // 128), 128, [x, rounded, back, n])
    ref = x.to(dtype)
    nan = ref.isnan()
    assert torch.equal(rounded.isnan(), nan) and torch.equal(back.isnan(), nan)
    assert torch.equal(rounded.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])
    assert torch.equal(back[~nan], ref.float()[~nan])


def test_dp4a_matches_numpy(harness):
    rng = np.random.default_rng(3)
    n = 300
    a, b, c = (rng.integers(-(2**31), 2**31, n, dtype=np.int64).astype(np.int32) for _ in range(3))
    a[:4] = b[:4] = [-1, 2**31 - 1, -(2**31), 0x7F7F7F7F]  # extremes and wrap-around
    out = np.zeros(n, np.int32)
    out_u = np.zeros(n, np.uint32)
    harness.launch("dp4a", 3, 128, [torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c),
                                    torch.from_numpy(out), out_u, n])
    signed = (a.view(np.int8).reshape(n, 4).astype(np.int64)
              * b.view(np.int8).reshape(n, 4).astype(np.int64)).sum(1) + c
    unsigned = (a.view(np.uint8).reshape(n, 4).astype(np.int64)
                * b.view(np.uint8).reshape(n, 4).astype(np.int64)).sum(1) + c.view(np.uint32)
    np.testing.assert_array_equal(out, signed.astype(np.int32))  # modulo 2^32, as the GPU wraps
    np.testing.assert_array_equal(out_u, unsigned.astype(np.uint32))


def test_2d_grid_indexing(harness):
    rows, cols = 37, 45
    a = torch.randn(rows, cols, generator=_gen(4))
    out = torch.full((rows, cols), float("nan"))
    harness.launch("affine_2d", (3, 5), (16, 8), [a, out, rows, cols, 0.5])
    r = torch.arange(rows, dtype=torch.float32)[:, None]
    c = torch.arange(cols, dtype=torch.float32)[None, :]
    torch.testing.assert_close(out, 0.5 * a + r - 2 * c)


def test_templated_shared_memory_transpose(harness):
    rows, cols = 40, 24
    x = torch.randn(rows, cols, generator=_gen(5)).half()
    out = torch.zeros(cols, rows, dtype=torch.half)
    # The name is looked up whatever its spacing.
    harness.launch("transpose<16,__half>", (2, 3), (16, 16), [x, out, rows, cols])
    assert torch.equal(out, x.T)


def test_atomics_and_a_partial_warp(harness):
    n = 144  # 3 blocks of 48 threads: warps of 32 and 16 lanes
    x = torch.randint(0, 10, (n,), generator=_gen(6), dtype=torch.int32)
    counts = torch.zeros(10, dtype=torch.int32)
    lane0 = torch.full((n,), -1, dtype=torch.int32)
    harness.launch("histogram", 3, 48, [x, counts, lane0, n])
    assert torch.equal(counts, torch.bincount(x, minlength=10).int())
    i = torch.arange(n, dtype=torch.int32)
    assert torch.equal(lane0, i - (i % 48) % 32)


@pytest.mark.parametrize("order", [None, "forward", "reverse"])
def test_block_order(harness, monkeypatch, order):
    """Blocks run in the grid's linear order (x fastest), or in reverse with
    QK_CPU_BLOCK_ORDER=reverse, read at each launch."""
    if order is None:
        monkeypatch.delenv("QK_CPU_BLOCK_ORDER", raising=False)
    else:
        monkeypatch.setenv("QK_CPU_BLOCK_ORDER", order)
    counter = torch.zeros(1, dtype=torch.int32)
    arrivals = torch.full((12,), -1, dtype=torch.int32)
    harness.launch("arrival_order", (4, 3), 32, [counter, arrivals])
    linear = torch.arange(12, dtype=torch.int32)
    assert torch.equal(arrivals, linear.flip(0) if order == "reverse" else linear)


def test_printf_reaches_stdout(harness, capfd):
    harness.launch("hello", 2, 32, [np.int32(7)])
    assert "hello 7 from block 1" in capfd.readouterr().out


def test_parameters_are_reported(harness):
    params = harness.parameters("transpose<16, __half>")
    assert [p.type for p in params] == ["const __half*", "__half*", "int", "int"]
    assert [p.size for p in params] == [8, 8, 4, 4]


# --------------------------------------------------------------------------------------------
# Broken kernels fail fast, and the harness stays usable
# --------------------------------------------------------------------------------------------


DIVERGENT = _line("if (threadIdx.x < 16) __syncthreads();")
ODD = _line("__syncthreads();", after="if (threadIdx.x % 2)")
EVEN = _line("__syncthreads();", after="out[threadIdx.x] = 2")


# Which thread notices first depends on the scheduling; both messages name the culprit's kind.
@pytest.mark.parametrize(("instance", "message"), [
    ("divergent_barrier",
     rf"(returns from the kernel while \d+ thread\(s\) wait for it in __syncthreads\(\) at "
     rf".*sample_simt.cu:{DIVERGENT}|reaches __syncthreads\(\) at .*sample_simt.cu:{DIVERGENT}, "
     r"but \d+ thread\(s\) of its block have returned from the kernel)"),
    ("split_barriers", rf"divergent __syncthreads: .* at .*sample_simt.cu:({ODD}|{EVEN}) while .* "
                       rf"at .*sample_simt.cu:({ODD}|{EVEN})"),
    ("missing_lane",
     r"(thread \(5,0,0\) .* returns from the kernel while lanes .* wait for it in "
     r"__shfl_xor_sync\(\)|calls __shfl_xor_sync\(\) .* but lane\(s\) 0x00000020 of its warp "
     r"have returned)"),
    ("crossed_barriers",
     r"deadlock in block \(0,0,0\) .*: 16 thread\(s\) wait in __syncthreads\(\) at "
     r".*sample_simt.cu:\d+; warp 0 lanes 0xffff0000 wait in __shfl_xor_sync\(\)"),
])
def test_barrier_misuse_raises_at_once(harness, instance, message):
    out = torch.zeros(32, dtype=torch.float32 if instance == "missing_lane" else torch.int32)
    start = time.monotonic()
    with pytest.raises(HarnessError, match=message):
        harness.launch(instance, 2, 32, [out])
    assert time.monotonic() - start < 2.0
    _assert_still_works(harness)


def test_endless_loop_hits_the_watchdog(harness):
    flag = torch.zeros(1, dtype=torch.int32)
    start = time.monotonic()
    with pytest.raises(HarnessError, match=r"no thread reached a barrier or returned for 0.3 s"):
        harness.launch("spin", 1, 32, [flag], timeout=0.3)
    assert time.monotonic() - start < 3.0
    _assert_still_works(harness)  # the spinning thread was cancelled


def test_trap_stops_the_launch(harness):
    x = torch.arange(64, dtype=torch.int32)
    harness.launch("check_positive", 2, 32, [x])
    x[40] = -1
    with pytest.raises(HarnessError, match=r"thread \(8,0,0\) of block \(1,0,0\): __trap\(\) at"):
        harness.launch("check_positive", 2, 32, [x])


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------


X = torch.zeros(4)


@pytest.mark.parametrize(("args", "message"), [
    ([X, X], r"block_sum takes 3 arguments \(const float\*, float\*, int\), got 2"),
    ([X, X, np.int64(4)], r"argument 2 \(int\) takes 4 bytes, got int64 \(8 bytes\)"),
    ([X, X, 4.0], r"argument 2 \(int\) is an integer; got float32"),
    ([X, X, torch.tensor(4)], r"argument 2 \(int\) is passed by value; got a Tensor"),
    ([X, 3, 4], r"argument 1 \(float\*\) is a pointer: pass a CPU tensor"),
    ([torch.zeros(4, 2).T, X, 4], r"argument 0 \(const float\*\): .* not contiguous"),
    ([X, X, 2**40], r"does not fit int32"),
])
def test_wrong_arguments_are_explained(harness, args, message):
    with pytest.raises(HarnessError, match=message):
        harness.launch("block_sum", 1, 32, args)


def test_wrong_launch_configuration_is_explained(harness):
    args = [torch.zeros(4), torch.zeros(4), 4]
    with pytest.raises(HarnessError, match=r"has 2048 threads; at most 1024"):
        harness.launch("block_sum", 1, (64, 32), args)
    with pytest.raises(HarnessError, match=r"grid must be an int or 1 to 3 ints"):
        harness.launch("block_sum", (1, 1, 1, 1), 32, args)
    with pytest.raises(HarnessError, match=r"'block_sums' is not an instance built for sample"):
        harness.launch("block_sums", 1, 32, args)


def test_compile_error_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("QCORE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad_kernel.cu"
    bad.write_text("__global__ void bad(int* out) {\n"
                   "    out[threadIdx.x] = 1;\n"
                   "    out[0] = undeclared_name;\n"
                   "}\n")
    with pytest.raises(HarnessError, match=r"bad_kernel.cu:3:\d+: error: 'undeclared_name' was"):
        CpuHarness(path=bad, instances=["bad"])


def test_tensor_core_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("QCORE_CACHE", str(tmp_path / "cache"))
    wmma = tmp_path / "wmma_kernel.cu"
    wmma.write_text("#include <mma.h>\n__global__ void k(int* out) {}\n")
    with pytest.raises(HarnessError, match=r"<mma.h> \(WMMA, tensor cores\) cannot run in the CPU"):
        CpuHarness(path=wmma, instances=["k"])
    entry = KernelSource("qk_wq.cu", ("simt<1>", "wmma<1>"), tensor_core_instances=("wmma<1>",))
    monkeypatch.setattr(harness_module, "source", lambda file: entry)
    with pytest.raises(HarnessError, match=r"\['wmma<1>'\] use tensor cores and cannot run in the"):
        CpuHarness("qk_wq.cu", instances=["wmma<1>"])


def test_library_is_cached_and_rebuilt_when_a_header_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("QCORE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "value.cuh").write_text("constexpr int VALUE = 1;\n")
    cu = tmp_path / "store.cu"
    cu.write_text('#include "value.cuh"\n'
                  "__global__ void store(int* out) { out[threadIdx.x] = VALUE; }\n")
    first = CpuHarness(path=cu, instances=["store"])
    assert first.library.parent == tmp_path / "cache" / "harness"
    built_at = first.library.stat().st_mtime_ns
    assert CpuHarness(path=cu, instances=["store"]).library.stat().st_mtime_ns == built_at
    (tmp_path / "value.cuh").write_text("constexpr int VALUE = 2;\n")
    second = CpuHarness(path=cu, instances=["store"])
    assert second.library != first.library
    out = torch.zeros(32, dtype=torch.int32)
    second.launch("store", 1, 32, [out])
    assert torch.equal(out, torch.full((32,), 2, dtype=torch.int32))


def test_missing_compiler_is_reported(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-qcore")
    assert "no-such-compiler-qcore" in harness_unavailable_reason()
    monkeypatch.delenv("CXX")
    assert harness_unavailable_reason() is None
