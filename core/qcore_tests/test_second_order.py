"""qcore.second_order: the inverse-Hessian factor shared by GPTQ and VPTQ."""

from __future__ import annotations

import logging

import pytest
import torch

from qcore.second_order import HessianFactorError, inverse_hessian_factor


def test_the_factor_is_the_upper_cholesky_factor_of_the_dampened_inverse():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen, dtype=torch.float64)
    hessian = 2 * x.T @ x
    upper, damp = inverse_hessian_factor(hessian, 0.01)
    assert damp == 0.01
    assert torch.equal(upper, torch.triu(upper))
    dampened = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(dampened), rtol=1e-9, atol=1e-12)


def test_a_failed_factorisation_retries_with_more_dampening_and_says_so(caplog):
    hessian = torch.diag(torch.tensor([1.0, 1.0, -1.5]))  # indefinite: mean diagonal 1/6
    with caplog.at_level(logging.WARNING, logger="qcore.vptq"):
        _, damp = inverse_hessian_factor(hessian, 0.01, method="VPTQ", option="vptq.dampening")
    assert damp == pytest.approx(10.0)  # 1.5 < 10 * (1/6) first holds at 10
    assert len(caplog.records) == 3
    assert "VPTQ: Cholesky factorisation failed with dampening 0.01" in caplog.records[0].message


def test_an_unfixable_hessian_raises_the_callers_error_naming_the_option():
    class MyError(HessianFactorError):
        pass

    hessian = torch.full((3, 3), float("nan"))
    with pytest.raises(MyError, match=r"raise --set vptq\.dampening"):
        inverse_hessian_factor(hessian, 0.01, method="VPTQ", option="vptq.dampening", error=MyError)
