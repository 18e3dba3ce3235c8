"""The math of qcore-plugin-svdquant: randomized SVD, the low-rank split, smoothing."""

from __future__ import annotations

import pytest
import torch

from qcore.scheme import Scheme
from qcore_plugin_svdquant.lowrank import (
    branch_of,
    lowrank_split,
    output_error,
    randomized_svd,
    rtn_quantizer,
    smoothing_scales,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rank_r(out_f: int, in_f: int, r: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g)


RTN4 = rtn_quantizer(Scheme(bits=4, group_size=32), torch.float16)


def test_randomized_svd_finds_the_leading_triplets():
    a = torch.randn(120, 80, generator=_gen(1))
    u, s, vh = randomized_svd(a, 8, power_iters=4)
    assert u.shape == (120, 16) and s.shape == (16,) and vh.shape == (16, 80)  # 8 + oversample
    u, s, vh = u[:, :8], s[:8], vh[:8]
    exact = torch.linalg.svdvals(a)[:8]
    # On a matrix with a flat spectrum, power iterations bring the values close.
    torch.testing.assert_close(s, exact, rtol=0.05, atol=0)
    assert torch.allclose(u.T @ u, torch.eye(8), atol=1e-4)
    assert torch.allclose(vh @ vh.T, torch.eye(8), atol=1e-4)
    # Seeded: the same call gives the same factors, bit for bit.
    u2, s2, vh2 = randomized_svd(a, 8, power_iters=4)
    u2, s2, vh2 = u2[:, :8], s2[:8], vh2[:8]
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(vh, vh2)


def test_randomized_svd_is_exact_on_a_low_rank_matrix():
    a = _rank_r(100, 70, 6)
    u, s, vh = randomized_svd(a, 6)
    torch.testing.assert_close(u[:, :6] @ torch.diag(s[:6]) @ vh[:6], a, rtol=0, atol=1e-4)


@pytest.mark.parametrize("r", [1, 8, 32])
def test_the_branch_reproduces_a_weight_of_its_rank_exactly(r):
    w = _rank_r(64, 96, r, seed=r)
    split = lowrank_split(w, r, RTN4, dtype=torch.float32)
    assert split.down.shape == (r, 96) and split.up.shape == (64, r)
    torch.testing.assert_close(split.up @ split.down, w, rtol=0, atol=1e-4 * w.abs().max().item())
    # Nothing is left for the 4-bit residual to get wrong.
    assert split.residual.abs().max() <= 1e-4 * w.abs().max()
    assert split.errors[split.chosen] <= 1e-3 * float(w.norm())


def test_split_is_exact_and_the_refits_never_do_worse_than_the_svd():
    g = _gen(2)
    w = torch.randn(96, 128, generator=g) * 0.02
    w[:, 5] += 0.5  # an outlier column, as smoothing leaves them
    split = lowrank_split(w, 16, RTN4, iters=30, dtype=torch.float16)
    assert split.down.dtype == torch.float16 and split.up.dtype == torch.float16
    # w = branch as stored + residual, exactly in float32
    torch.testing.assert_close(split.up.float() @ split.down.float() + split.residual, w,
                               rtol=0, atol=1e-6)
    assert split.errors[split.chosen] == min(split.errors)
    assert split.errors[split.chosen] < split.errors[0]  # the refits help here
    assert len(split.errors) <= 31
    plain = float((w - RTN4(w)).norm())
    assert split.errors[split.chosen] < 0.7 * plain


def test_rank_zero_is_no_branch():
    w = torch.randn(8, 64, generator=_gen(3))
    split = lowrank_split(w, 0, RTN4)
    assert split.down.shape == (0, 64) and split.up.shape == (8, 0)
    assert torch.equal(split.residual, w)


def test_branch_of_splits_singular_values_evenly():
    w = _rank_r(20, 30, 3)
    down, up, basis = branch_of(w, 3, torch.float32)
    assert basis.shape == (30, 11)
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-4, atol=1e-5)


def test_smoothing_scales():
    x_span = torch.tensor([1.0, 4.0, 16.0])
    w_span = torch.tensor([1.0, 1.0, 1.0])
    s = smoothing_scales(x_span, w_span, 0.5, 0.5)
    # s ∝ sqrt(x_span), normalised so that max · min = 1
    torch.testing.assert_close(s, torch.tensor([0.5, 1.0, 2.0]))
    assert torch.equal(smoothing_scales(x_span, w_span, 0.0, 0.0), torch.ones(3))


def test_smoothing_lowers_the_w4a4_error_of_outlier_channels():
    g = _gen(4)
    x = torch.randn(256, 128, generator=g)
    x[:, :4] *= 40  # activation outliers in 4 channels
    w = torch.randn(64, 128, generator=g) * 0.05
    scheme = Scheme(bits=4, group_size=64, act_bits=4, act_group_size=64)
    quantize = rtn_quantizer(scheme, torch.float16)
    ref = x @ w.T
    x_span = x.abs().amax(0)
    plain = output_error(x, [w], None, 0, quantize, scheme, iters=0, dtype=torch.float16,
                         reference=ref)
    smoothed = output_error(x, [w], smoothing_scales(x_span, w.abs().amax(0), 0.5, 0.5), 0,
                            quantize, scheme, iters=0, dtype=torch.float16, reference=ref)
    with_branch = output_error(x, [w], smoothing_scales(x_span, w.abs().amax(0), 0.5, 0.5),
                               16, quantize, scheme, iters=5, dtype=torch.float16,
                               reference=ref)
    assert smoothed < 0.5 * plain
    assert with_branch < smoothed
