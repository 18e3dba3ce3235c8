"""The codebook provider cupy-lut: declared support and the core's selection (no GPU needed)."""

from __future__ import annotations

import dataclasses

import pytest

from qcore.errors import KernelNotFoundError
from qcore.interfaces import KernelRequest
from qcore.kernel_select import rank_providers, select_kernel
from qcore.testing import BaseKernelProviderTests
from qcore_kernels.providers import PROVIDERS, CupyLUTLinear

LUT = KernelRequest(
    op="lut_linear",
    layout="vq-packed",
    bits=2,
    group_size=-1,
    symmetric=False,
    in_features=4096,
    out_features=4096,
    dtype="float16",
    device="cuda",
    compute_capability=(9, 0),
)


def test_the_hooks_register_cupy_lut():
    assert CupyLUTLinear in PROVIDERS
    assert CupyLUTLinear.support.priority == 100


@pytest.mark.parametrize(
    "request_",
    [
        LUT,
        dataclasses.replace(LUT, dtype="bfloat16", bits=3, in_features=4097, out_features=11),
        dataclasses.replace(LUT, compute_capability=(8, 0), bits=4),
    ],
)
def test_auto_picks_cupy_lut_on_a_supported_gpu(registry, cupy_present, request_):
    assert select_kernel(registry, request_).name == "cupy-lut"


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"device": "cpu"}, "device cpu"),
        ({"dtype": "float32"}, "dtype float32"),
        ({"compute_capability": (7, 5)}, "compute capability"),
        ({"compute_capability": None}, "compute capability"),
        ({"bits": 17}, "bits 17"),
    ],
)
def test_requests_outside_cupy_lut_fall_back_to_torch_lut_with_the_reason(
    registry, cupy_present, change, reason
):
    request = dataclasses.replace(LUT, **change)
    assert reason in CupyLUTLinear.unsupported_reason(request)
    assert select_kernel(registry, request).name == "torch-lut"


def test_without_cupy_or_gpu_auto_uses_torch_lut_and_names_why(registry, monkeypatch):
    import qcore_kernels.runtime as runtime

    monkeypatch.setattr(
        runtime, "cupy_unavailable_reason", lambda: "CuPy finds no CUDA driver or device (test)"
    )
    ranked = dict((cls.name, reason) for cls, reason in rank_providers(registry, LUT))
    assert ranked["cupy-lut"] == "unavailable: CuPy finds no CUDA driver or device (test)"
    assert select_kernel(registry, LUT).name == "torch-lut"
    with pytest.raises(KernelNotFoundError, match="cupy-lut.*CuPy finds no CUDA driver"):
        select_kernel(registry, LUT, prefer="cupy-lut")


def test_linear_requests_never_pick_cupy_lut(registry, cupy_present):
    request = dataclasses.replace(LUT, op="linear", layout="int-packed", bits=4, group_size=64)
    assert "op 'linear'" in CupyLUTLinear.unsupported_reason(request)
    assert select_kernel(registry, request).name != "cupy-lut"


def test_gemv_limits_are_explained():
    from qcore_kernels.support import lut_gemv_unsupported_reason

    assert "vector size 5" in lut_gemv_unsupported_reason(5, [(256, 8)], 4, 48 * 1024)
    # 16-bit indices with a full codebook of 8-wide vectors: 1 MB of fp16 values
    reason = lut_gemv_unsupported_reason(8, [(65536, 16)], 4, 227 * 1024)
    assert "65536 x 8" in reason and "shared memory" in reason
    # v = 6, 12 bits: 48 KB of codebook fits an H100 block (227 KB opt-in), not 48 KB
    assert lut_gemv_unsupported_reason(6, [(4096, 12)], 32, 227 * 1024) is None
    assert lut_gemv_unsupported_reason(6, [(4096, 12)], 4, 48 * 1024) is not None


# On a machine with CuPy and a GPU this runs every declared request through the kernels
# against the reference (plain, residual, outliers + scale, everything + offset; vector
# sizes 4, 6, 5, 3); here it checks the declaration and finds no device.
class TestCupyLUTConformance(BaseKernelProviderTests):
    @pytest.fixture
    def provider(self):
        return CupyLUTLinear()
