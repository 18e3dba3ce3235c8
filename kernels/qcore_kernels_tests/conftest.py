"""Fixtures shared by the kernels' tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def launcher():
    """The CuPy launcher on this machine's GPU; skips the test without CuPy, a CUDA device
    or compute capability 8.0."""
    import torch

    from qcore_kernels.runtime import cupy_launcher, cupy_unavailable_reason

    reason = cupy_unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = "torch sees no CUDA device"
    if reason is None and torch.cuda.get_device_capability() < (8, 0):
        reason = "the kernels need compute capability 8.0 or higher"
    if reason is not None:
        pytest.skip(reason)
    return cupy_launcher()


@pytest.fixture
def registry(qcore_register_plugin, qcore_registry):
    """The registry with qcore-kernels' providers registered."""
    from qcore_kernels import hooks

    qcore_register_plugin(hooks, name="kernels", distribution="qcore-kernels")
    return qcore_registry


@pytest.fixture
def cupy_present(monkeypatch):
    """Pretend CuPy and a GPU are present (selection only; nothing is launched)."""
    import qcore_kernels.runtime as runtime

    monkeypatch.setattr(runtime, "cupy_unavailable_reason", lambda: None)
