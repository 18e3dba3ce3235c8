"""The CuPy kernels on a GPU: numerics against the torch reference over shapes that are and
are not multiples of the tiles, the provider inside QuantLinear, and stream ordering.

Skipped without CuPy and a CUDA device; ``kernels/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from qcore_kernels.testing import Case, assert_close, run_w8a8_case, run_wq_case

pytestmark = pytest.mark.gpu


def _wq_cases() -> list[Case]:
    shapes = [  # (path, m, n, k, group, symmetric, act_order)
        ("mma", 1, 1000, 4160, 64, False, False),  # k = 65 * 64: not a multiple of 128
        ("mma", 3, 1000, 4096, 128, True, True),
        ("mma", 16, 1002, 800, 32, False, False),  # n not a multiple of 16
        ("mma", 33, 1000, 4160, 64, False, False),  # two blocks along M, odd m
        ("mma", 255, 384, 800, 32, True, True),  # 4 blocks along M
        ("mma", 20, 129, 96, -1, False, False),  # per channel, k smaller than a chunk
        ("mma", 1, 14336, 4096, 64, False, False),  # 32 channels per block
        ("mma", 2, 4096, 14336, 64, False, False),  # K split over blocks (gridDim.z)
        ("dequant", 1027, 1000, 4160, 128, False, False),  # last group of 64 columns
        (None, 2, 512, 1024, 64, False, False),  # auto path
        (None, 300, 512, 1024, 64, True, False),
    ]
    return [
        Case(m, n, k, bits, group, sym, act, dtype, path)
        for path, m, n, k, group, sym, act in shapes
        for bits in (4, 8)
        for dtype in ("float16", "bfloat16")
    ]


def _w8a8_cases() -> list[Case]:
    shapes = [
        ("gemv", 1, 1000, 4112),
        ("gemv", 5, 1002, 4096),
        ("gemv", 16, 256, 96),
        ("gemm", 33, 1000, 4112),
        ("gemm", 255, 384, 800),
        ("gemm", 2049, 512, 1024),
        ("intmm", 33, 1000, 4112),
        ("intmm", 2049, 512, 1024),
        (None, 7, 512, 1024),
        (None, 300, 512, 1024),
    ]
    return [
        Case(m, n, k, 8, -1, True, False, dtype, path, static=static)
        for path, m, n, k in shapes
        for dtype in ("float16", "bfloat16")
        for static in (False, True)
    ]


@pytest.mark.parametrize("case", _wq_cases(), ids=lambda c: c.id)
def test_weight_only_kernels_match_the_reference(case, launcher):
    y, ref = run_wq_case(case, launcher, "cuda")
    assert_close(y, ref, case)


@pytest.mark.parametrize("case", _w8a8_cases(), ids=lambda c: c.id)
def test_w8a8_kernels_match_the_reference(case, launcher):
    y, ref = run_w8a8_case(case, launcher, "cuda")
    assert_close(y, ref, case)


def test_token_tiles_agree_with_each_other(launcher):
    """Every token of a 16-token tile equals the same token computed alone (M = 1)."""
    from qcore_kernels.layouts import to_wq
    from qcore_kernels.ops import wq_linear
    from qcore_kernels.testing import random_int_packed

    w = to_wq(random_int_packed(256, 512, 4, 64, seed=5), torch.float16, "cuda")
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(0)).half().cuda()
    together = wq_linear(x, w, None, launcher, path="mma")
    alone = torch.cat([wq_linear(x[i : i + 1], w, None, launcher, path="mma") for i in range(16)])
    assert torch.equal(together, alone)


def test_kernels_launch_on_torchs_current_stream(launcher):
    """The input is written on a side stream after a long sleep; a kernel launched on any
    other stream would read it before it is written."""
    from qcore_kernels.layouts import to_wq
    from qcore_kernels.ops import wq_linear
    from qcore_kernels.testing import random_int_packed

    w = to_wq(random_int_packed(512, 1024, 4, 64, seed=6), torch.float16, "cuda")
    src = torch.randn(4, 1024, generator=torch.Generator().manual_seed(1)).half().cuda()
    expected = wq_linear(src, w, None, launcher)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.zeros_like(src)
        torch.cuda._sleep(200_000_000)
        x.copy_(src)
        y = wq_linear(x, w, None, launcher)
    side.synchronize()
    assert torch.equal(y, expected)


def test_quantized_model_selects_the_cupy_kernels_and_matches_torch(launcher):
    from qcore.qlinear import QuantLinear
    from qcore.quantize import quantize
    from qcore.testing.models import tiny_causal_lm

    model = tiny_causal_lm("llama", hidden=128, intermediate=256, layers=2, seed=0)
    ids = torch.randint(
        0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)
    )
    quantize(model, "rtn", ids, progress=False)
    model = model.half().cuda().eval()
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        logits = model(ids.cuda()).logits.float()
        assert {layer.provider_name for layer in layers} == {"cupy-wq"}
        assert "kernel=cupy-wq" in repr(model)
        for layer in layers:
            layer.kernel = "torch"
            layer._providers.clear()
        reference = model(ids.cuda()).logits.float()
    assert {layer.provider_name for layer in layers} == {"torch"}
    err = float((logits - reference).abs().max() / reference.abs().max())
    assert err < 1e-2, err


def test_a_shape_outside_the_declaration_runs_on_torch(launcher):
    """in_features 80 is not a multiple of 32: auto picks the torch provider, never a wrong
    result."""
    from qcore.qlinear import QuantLinear
    from qcore_kernels.testing import random_int_packed

    packed = random_int_packed(64, 80, 4, 16, seed=2)
    layer = QuantLinear(packed, op="linear").half().cuda()
    x = torch.randn(3, 80, device="cuda", dtype=torch.float16)
    layer(x)
    assert layer.provider_name == "torch"
