"""The CuPy providers' declared support and the core's data-driven selection (no GPU needed)."""

from __future__ import annotations

import dataclasses

import pytest

from qcore.errors import KernelNotFoundError
from qcore.interfaces import KernelRequest
from qcore.kernel_select import rank_providers, select_kernel
from qcore.testing import BaseKernelProviderTests
from qcore_kernels.providers import CupyW4A4Linear, CupyW8A8Linear, CupyWQLinear

W4 = KernelRequest(
    op="linear",
    layout="int-packed",
    bits=4,
    group_size=64,
    symmetric=False,
    in_features=4096,
    out_features=4096,
    dtype="float16",
    device="cuda",
    compute_capability=(9, 0),
)
W8A8 = dataclasses.replace(W4, bits=8, group_size=-1, symmetric=True, act_bits=8)
W4A4 = dataclasses.replace(W4, symmetric=True, act_bits=4, act_group_size=64, lowrank_rank=32)


@pytest.mark.parametrize(
    "request_, provider",
    [
        (W4, "cupy-wq"),
        (
            dataclasses.replace(W4, bits=8, symmetric=True, dtype="bfloat16", act_order=True),
            "cupy-wq",
        ),
        (dataclasses.replace(W4, group_size=-1, in_features=4128), "cupy-wq"),
        (W8A8, "cupy-w8a8"),
        (dataclasses.replace(W8A8, act_dynamic=False, in_features=4112), "cupy-w8a8"),
        (W4A4, "cupy-w4a4"),
        (dataclasses.replace(W4A4, symmetric=False, act_symmetric=False, lowrank_rank=0,
                             dtype="bfloat16", in_features=4160), "cupy-w4a4"),
    ],
)
def test_auto_picks_the_cupy_provider_on_a_supported_gpu(
    registry, cupy_present, request_, provider
):
    assert select_kernel(registry, request_).name == provider


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"device": "cpu"}, "device cpu"),
        ({"dtype": "float32"}, "dtype float32"),
        ({"bits": 3}, "bits 3"),
        ({"group_size": 48}, "group size 48"),
        ({"in_features": 4104}, "in_features 4104 not a multiple of 32"),
        ({"compute_capability": (7, 5)}, "compute capability"),
        ({"act_bits": 8}, "act_bits=8"),
    ],
)
def test_requests_outside_the_wq_kernels_fall_back_to_torch_with_the_reason(
    registry, cupy_present, change, reason
):
    request = dataclasses.replace(W4, **change)
    assert reason in CupyWQLinear.unsupported_reason(request)
    assert select_kernel(registry, request).name == "torch"


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"symmetric": False}, "symmetric"),
        ({"group_size": 128}, "group size 128 not in [-1]"),
        ({"act_order": True}, "act-order"),
        ({"in_features": 4104}, "in_features 4104 not a multiple of 16"),
        ({"act_bits": None}, "act_bits=None"),
    ],
)
def test_requests_outside_the_w8a8_kernels_are_refused(registry, cupy_present, change, reason):
    assert reason in CupyW8A8Linear.unsupported_reason(dataclasses.replace(W8A8, **change))


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"act_group_size": -1}, "activation group size -1 not in [64]"),
        ({"act_group_size": 128}, "activation group size 128 not in [64]"),
        ({"group_size": 128}, "group size 128 not in [64]"),
        ({"act_bits": 8}, "act_bits=8"),
        ({"bits": 8}, "bits 8"),
        ({"act_dynamic": False}, "static activation scales"),
        ({"act_order": True}, "act-order"),
        ({"in_features": 4128}, "in_features 4128 not a multiple of 64"),
        ({"compute_capability": (7, 5)}, "compute capability"),
    ],
)
def test_requests_outside_the_w4a4_kernels_fall_back_to_torch_with_the_reason(
    registry, cupy_present, change, reason
):
    request = dataclasses.replace(W4A4, **change)
    assert reason in CupyW4A4Linear.unsupported_reason(request)
    assert select_kernel(registry, request).name == "torch"


def test_w4a4_provider_declares_the_fused_low_rank_branch():
    assert CupyW4A4Linear.support.lowrank
    assert not CupyWQLinear.support.lowrank and not CupyW8A8Linear.support.lowrank


def test_without_cupy_or_gpu_auto_uses_torch_and_names_why(registry, monkeypatch):
    import qcore_kernels.runtime as runtime

    monkeypatch.setattr(
        runtime, "cupy_unavailable_reason", lambda: "CuPy finds no CUDA driver or device (test)"
    )
    ranked = dict((cls.name, reason) for cls, reason in rank_providers(registry, W4))
    assert ranked["cupy-wq"] == "unavailable: CuPy finds no CUDA driver or device (test)"
    assert select_kernel(registry, W4).name == "torch"
    with pytest.raises(KernelNotFoundError, match="cupy-wq.*CuPy finds no CUDA driver"):
        select_kernel(registry, W4, prefer="cupy-wq")


def test_importing_the_hooks_loads_neither_torch_nor_cupy():
    import subprocess
    import sys

    code = ("import sys, qcore_kernels.hooks; "
            "print(sorted(m for m in ('torch', 'cupy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# On a machine with CuPy and a GPU these run every declared request through the
# kernels against the reference; here they check the declaration and find no device.
class TestCupyWQConformance(BaseKernelProviderTests):
    @pytest.fixture
    def provider(self):
        return CupyWQLinear()


class TestCupyW8A8Conformance(BaseKernelProviderTests):
    @pytest.fixture
    def provider(self):
        return CupyW8A8Linear()


class TestCupyW4A4Conformance(BaseKernelProviderTests):
    @pytest.fixture
    def provider(self):
        return CupyW4A4Linear()
