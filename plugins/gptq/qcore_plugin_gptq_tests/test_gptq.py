"""GPTQ: better than round-to-nearest on a layer's output, RTN when the Hessian is the
identity, act-order round trips, Cholesky retries, and true-sequential calibration."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F

from qcore.builtin.int_packer import IntPacker
from qcore.builtin.observers import HessianObserver, MinMaxObserver
from qcore.builtin.rtn import RTNQuantizer
from qcore.builtin.torch_kernels import TorchKernels
from qcore.grid import dequantize_codes, dequantize_int, group_index, minmax_grid, quantize_codes
from qcore.scheme import Scheme
from qcore.testing import BaseQuantizerTests
from qcore_plugin_gptq.options import GPTQOptions
from qcore_plugin_gptq.quantizer import GPTQQuantizer
from qcore_plugin_gptq.solver import GPTQError, gptq, search_grid


def _layer(seed: int = 0, out_f: int = 96, in_f: int = 160, tokens: int = 2048):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g)
    # correlated inputs with uneven channel scales, as in a real network
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = (torch.randn(tokens, in_f, generator=g) @ mix) * torch.rand(in_f, generator=g).mul(3).add(0.1)
    observer = HessianObserver()
    observer.update(x, None)
    return weight, x, observer.compute()


def _output_error(weight, x, dense):
    return float((F.linear(x, weight) - F.linear(x, dense)).norm())


@pytest.mark.parametrize("scheme", [Scheme(4, 32, False), Scheme(4, 64, True), Scheme(3, 64, False),
                                    Scheme(2, 32, False), Scheme(8, -1, True), Scheme(3, 48, False)],
                         ids=lambda s: s.label())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(scheme, act_order):
    weight, x, hessian = _layer()
    gptq_q = GPTQQuantizer(GPTQQuantizer.Config(act_order=act_order))
    rtn = RTNQuantizer()
    e_gptq = _output_error(weight, x, gptq_q.dequantize(gptq_q.quantize(weight, {"hessian": hessian}, scheme)))
    e_rtn = _output_error(weight, x, rtn.dequantize(rtn.quantize(weight, {}, scheme)))
    # 2-bit grids are so coarse that error feedback gains less
    assert e_gptq < (0.97 if scheme.bits == 2 else 0.85) * e_rtn, (e_gptq, e_rtn)


def test_identity_hessian_reduces_to_rtn():
    weight, _, _ = _layer()
    for bits, gs, sym in [(4, 64, False), (3, 32, True), (4, 48, False)]:
        result = gptq(weight, torch.eye(weight.shape[1]), bits=bits, group_size=gs,
                      symmetric=sym, options=GPTQOptions(dampening=0.0, act_order=False,
                                                         shrink_steps=1))
        scales, zeros = minmax_grid(weight, bits, gs, sym)
        codes = quantize_codes(weight, scales, zeros, bits, group_index(weight.shape[1], gs))
        assert torch.equal(result.scales, scales)
        assert torch.equal(result.codes, codes)


def test_group_quantization_equals_one_by_one():
    """q/k/v share a Hessian: solving their stacked rows once equals three solves."""
    weight, _, hessian = _layer()
    parts = [weight[:32], weight[32:48], weight[48:]]
    quantizer = GPTQQuantizer(GPTQQuantizer.Config(act_order=True))
    scheme = Scheme(4, 64, False)
    together = quantizer.quantize_group(parts, {"hessian": hessian}, scheme)
    for part, joint in zip(parts, together):
        alone = quantizer.quantize(part, {"hessian": hessian}, scheme)
        for key in alone.tensors:
            assert torch.equal(alone.tensors[key], joint.tensors[key]), key


def test_act_order_g_idx_round_trips_through_packer_and_kernel():
    weight, x, hessian = _layer(in_f=160)
    quantizer = GPTQQuantizer(GPTQQuantizer.Config(act_order=True))
    qweight = quantizer.quantize(weight, {"hessian": hessian}, Scheme(3, 32, False))
    g_idx = qweight.tensors["g_idx"]
    assert g_idx.dtype == torch.int32 and not torch.equal(g_idx, group_index(160, 32))
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((5,), 32))  # 32 columns a group
    packer = IntPacker()
    unpacked = packer.unpack(packer.pack(qweight))
    for key, tensor in qweight.tensors.items():
        assert torch.equal(unpacked.tensors[key], tensor), key
    kernels = TorchKernels()
    prepared = kernels.prepare(packer.pack(qweight), torch.device("cpu"))
    y = kernels.linear(x[:64], prepared, None)
    assert torch.equal(y, F.linear(x[:64], dequantize_int(qweight)))


def test_static_groups_need_no_g_idx_and_keep_natural_groups():
    weight, x, hessian = _layer()
    quantizer = GPTQQuantizer(GPTQQuantizer.Config(act_order=True, static_groups=True,
                                                   shrink_steps=1))
    scheme = Scheme(4, 32, False)
    qweight = quantizer.quantize(weight, {"hessian": hessian}, scheme)
    assert "g_idx" not in qweight.tensors
    scales, _ = minmax_grid(weight, 4, 32, False)
    assert torch.equal(qweight.tensors["scales"], scales)  # groups fixed before any update
    rtn = RTNQuantizer()
    assert _output_error(weight, x, dequantize_int(qweight)) < _output_error(
        weight, x, rtn.dequantize(rtn.quantize(weight, {}, scheme)))


def test_dead_input_columns_are_zeroed():
    weight, x, _ = _layer()
    x[:, 7] = 0.0
    observer = HessianObserver()
    observer.update(x, None)
    qweight = GPTQQuantizer().quantize(weight, {"hessian": observer.compute()}, Scheme(4, 32, False))
    dense = dequantize_int(qweight)
    assert float(dense[:, 7].abs().max()) == 0.0


def test_cholesky_failure_retries_with_more_dampening_and_says_so(caplog):
    weight = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    indefinite = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4 and -2
    with caplog.at_level(logging.WARNING, logger="qcore.gptq"):
        result = gptq(weight, indefinite, bits=4, group_size=-1, symmetric=False)
    assert result.dampening == pytest.approx(10.0)  # 0.01, 0.1 and 1 fail; 10 works
    assert sum("Cholesky factorisation failed" in r.message for r in caplog.records) == 3


def test_nan_hessian_is_an_error_not_a_silent_rtn():
    weight, _, hessian = _layer()
    hessian[3, 3] = float("nan")
    with pytest.raises(GPTQError, match="NaN"):
        GPTQQuantizer().quantize(weight, {"hessian": hessian}, Scheme(4, 32, False))


def test_hessian_observer_is_the_running_mean_of_2xtx():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 24, generator=g) for n in (5, 17, 100)]
    observer = HessianObserver()
    for batch in batches:
        observer.update(batch, None)
    x = torch.cat(batches)
    torch.testing.assert_close(observer.compute(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)


class TestGPTQConformance(BaseQuantizerTests):
    max_error_steps = None  # GPTQ's codes are not the nearest level: errors move columns

    def relative_error_bound(self, scheme: Scheme) -> float:
        return 3.0 * 2.0 ** (1 - scheme.bits)

    @pytest.fixture
    def quantizer(self) -> GPTQQuantizer:
        return GPTQQuantizer()

    @pytest.fixture
    def observers(self):
        # minmax: static activation scales (needs_for a static-activation scheme)
        return {"hessian": HessianObserver, "minmax": MinMaxObserver}


class TestGPTQActOrderConformance(TestGPTQConformance):
    @pytest.fixture
    def quantizer(self) -> GPTQQuantizer:
        return GPTQQuantizer(GPTQQuantizer.Config(act_order=True))


def test_grid_search_never_loses_to_minmax_on_its_own_objective():
    from qcore_plugin_gptq.solver import search_grid

    g = torch.Generator().manual_seed(5)
    span = torch.randn(64, 32, generator=g) * torch.rand(64, 1, generator=g)
    span[:, 0] *= 6  # an outlier per row: shrinking the range pays off
    for bits, sym in [(4, False), (3, True)]:
        s_min, z_min = minmax_grid(span, bits, -1, sym)
        s_best, z_best = search_grid(span, bits, sym, torch.float16, shrink_steps=20, max_shrink=0.5)

        def err(s, z):
            gi = torch.zeros(32, dtype=torch.int32)
            q = quantize_codes(span, s.reshape(-1, 1), None if z is None else z.reshape(-1, 1), bits, gi)
            from qcore.grid import dequantize_codes
            deq = dequantize_codes(q, s.reshape(-1, 1), None if z is None else z.reshape(-1, 1), bits, gi)
            return (deq - span).abs().pow(2.4).sum(1)

        e_min, e_best = err(s_min, z_min), err(s_best, z_best)
        assert (e_best <= e_min + 1e-6).all()
        assert float(e_best.sum()) < 0.95 * float(e_min.sum())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_gptq_pipeline_beats_rtn_on_tiny_models(arch):
    """End to end through qcore's block-sequential, true-sequential calibration (several
    calibration batches merged into one forward per block), on each architecture."""
    import copy

    from qcore.pipeline import Pipeline
    from qcore.quantize import quantize
    from qcore.testing.models import tiny_causal_lm

    model = tiny_causal_lm(arch, layers=2, tie_word_embeddings=arch in ("opt", "gpt2"))
    g = torch.Generator().manual_seed(2)
    calib = torch.randint(0, 128, (8, 32), generator=g)
    held_out = torch.randint(0, 128, (4, 32), generator=g)
    with torch.no_grad():
        reference = model(held_out).logits
    errors = {}
    for name in ("rtn", "gptq"):
        quantized = copy.deepcopy(model)
        quantize(quantized, Pipeline.from_names(name, scheme=Scheme(bits=3, group_size=32)), calib,
                 batch_size=3, progress=False)
        with torch.no_grad():
            errors[name] = float((quantized(held_out).logits - reference).norm())
    assert errors["gptq"] < errors["rtn"], errors


def test_act_order_checkpoint_round_trips(tmp_path):
    """gate/up (and q/k/v) share one Hessian, so GPTQ gives them one g_idx tensor; the
    checkpoint must store it for each linear (it once kept only the first)."""
    from qcore.checkpoint import load, save
    from qcore.quantize import quantize
    from qcore.testing.models import tiny_causal_lm

    model = tiny_causal_lm("llama", hidden=64, intermediate=128, layers=2)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, "gptq", ids, progress=False)
    mlp = model.model.layers[0].mlp
    assert torch.equal(mlp.gate_proj.g_idx, mlp.up_proj.g_idx)
    save(model, tmp_path / "ck")
    loaded = load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def _exact_hessian(x: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return (2 * x64.T @ x64 / x.shape[0]).float()


def test_hessian_of_bfloat16_inputs_uses_bf16_products_within_their_rounding():
    x = torch.randn(10000, 96, generator=torch.Generator().manual_seed(3)).bfloat16()
    exact = HessianObserver(HessianObserver.Config(bf16_products=False))
    fast = HessianObserver()
    for chunk in x.split(3000):  # batches of several CHUNKs and a remainder
        exact.update(chunk, None)
        fast.update(chunk, None)
    reference = _exact_hessian(x)
    torch.testing.assert_close(exact.compute(), reference, rtol=1e-4, atol=1e-5)
    rel = float((fast.compute() - reference).norm() / reference.norm())
    assert 0 < rel < 2e-3, rel  # only the bf16 rounding of each product differs
    # float32 inputs under float32 calibration never take the bf16 path
    fp = HessianObserver()
    fp.update(x.float(), None)
    torch.testing.assert_close(fp.compute(), reference, rtol=1e-5, atol=1e-6)


def test_hessian_under_bfloat16_calibration_rounds_float32_inputs_as_the_linear_does():
    """A float32 input (a norm's output) of a linear that runs under bf16 autocast: the
    linear multiplies it rounded to bfloat16, and the observer, told ``calib_dtype``,
    takes the Hessian of those rounded values."""
    x = torch.randn(10000, 96, generator=torch.Generator().manual_seed(4)) * 3
    observer = HessianObserver()
    observer.calib_dtype = torch.bfloat16
    observer.update(x, None)
    arrived = HessianObserver()  # the same values, arriving in bfloat16
    arrived.update(x.bfloat16(), None)
    assert torch.equal(observer.compute(), arrived.compute())
    rounded = _exact_hessian(x.bfloat16())
    assert float((observer.compute() - rounded).norm() / rounded.norm()) < 2e-3
    # bf16_products off: float32 products of the inputs as they arrive (not rounded)
    plain = HessianObserver(HessianObserver.Config(bf16_products=False))
    plain.calib_dtype = torch.bfloat16
    plain.update(x, None)
    torch.testing.assert_close(plain.compute(), _exact_hessian(x), rtol=1e-5, atol=1e-5)


def test_bf16_hessian_of_nearly_collinear_inputs_stays_positive_semidefinite():
    """Inputs with a large common component (attention sinks give o_proj such inputs):
    rounding each bf16 product to bfloat16 makes the Hessian indefinite well beyond
    GPTQ's 1% dampening; the observer's centred product does not."""
    g = torch.Generator().manual_seed(7)
    common = torch.randn(96, generator=g) * 4
    basis = torch.randn(24, 96, generator=g)
    x = ((1 + 0.1 * torch.randn(12000, 1, generator=g)) * common
         + 0.05 * torch.randn(12000, 24, generator=g) @ basis).bfloat16()
    reference = _exact_hessian(x).double()
    mean_diag = float(torch.diagonal(reference).mean())
    rounded_products = torch.zeros(96, 96)
    for chunk in x.split(HessianObserver.CHUNK):
        rounded_products.add_(chunk.T @ chunk, alpha=2.0 / x.shape[0])
    observer = HessianObserver()
    observer.update(x, None)
    least = {name: float(torch.linalg.eigvalsh(h.double()).min()) / mean_diag
             for name, h in (("rounded", rounded_products), ("observer", observer.compute()))}
    assert least["rounded"] < -0.01, least  # would need more than GPTQ's 1% dampening
    assert least["observer"] > -1e-3, least
    assert float((observer.compute().double() - reference).norm() / reference.norm()) < 1e-4


# ------------------------------------------------------------- options, one by one


def test_the_quantizers_defaults_are_the_solvers() -> None:
    """One source of truth: the quantizer's Config is the solver's options plus
    true_sequential, with the same defaults, and gptq() without options uses them."""
    config, options = GPTQQuantizer.Config(), GPTQOptions()
    for field in dataclasses.fields(GPTQOptions):
        assert getattr(config, field.name) == getattr(options, field.name), field.name
    assert (options.act_order, options.static_groups, options.shrink_steps) == (True, False, 20)
    weight, _, hessian = _layer(out_f=24, in_f=64)
    scheme = Scheme(3, 32, False)
    via_quantizer = GPTQQuantizer().quantize(weight, {"hessian": hessian}, scheme)
    direct = gptq(weight, hessian, bits=3, group_size=32, symmetric=False)
    assert torch.equal(via_quantizer.tensors["codes"], direct.codes)
    assert torch.equal(via_quantizer.tensors["scales"], direct.scales)
    assert torch.equal(via_quantizer.tensors["g_idx"], direct.g_idx)


def _expected_grid(span, bits, shrink_steps):
    if shrink_steps > 1:
        return search_grid(span, bits, False, torch.float16, shrink_steps, 0.2)
    return minmax_grid(span, bits, -1, False)


@pytest.mark.parametrize("shrink_steps", [1, 20])
@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_each_option_does_what_its_name_says(act_order, static_groups, shrink_steps):
    """On a diagonal Hessian no error propagates, so every combination has a closed
    form: ``act_order`` visits columns by decreasing diagonal, and only dynamic groups
    then follow that order (``g_idx``); ``static_groups`` keeps natural groups; each
    group's grid is the range search's (``shrink_steps`` > 1) or min-max, static or not;
    the codes are the weight rounded on those grids."""
    bits, gs = 3, 32
    weight, _, _ = _layer(out_f=24, in_f=96)
    diag = torch.rand(96, generator=torch.Generator().manual_seed(5)) + 0.5
    options = GPTQOptions(act_order=act_order, static_groups=static_groups,
                          shrink_steps=shrink_steps, dampening=0.0)
    result = gptq(weight, torch.diag(diag), bits=bits, group_size=gs, symmetric=False,
                  options=options)

    order = torch.argsort(diag, descending=True) if act_order else torch.arange(96)
    follows_order = act_order and not static_groups
    assert (result.g_idx is not None) == follows_order
    g_idx = torch.empty(96, dtype=torch.long)
    g_idx[order if follows_order else torch.arange(96)] = torch.arange(96) // gs
    if follows_order:
        assert torch.equal(result.g_idx.long(), g_idx)
    for g in range(3):
        scale, zero = _expected_grid(weight[:, g_idx == g], bits, shrink_steps)
        assert torch.equal(result.scales[:, g], scale.flatten()), g
        assert torch.equal(result.zeros[:, g], zero.flatten()), g
    codes = quantize_codes(weight, result.scales, result.zeros, bits, g_idx)
    assert torch.equal(result.codes, codes)
    if shrink_steps > 1:  # the search does shrink ranges here
        minmax, _ = _expected_grid(weight[:, g_idx == 0], bits, 1)
        assert bool((result.scales[:, 0] < minmax.flatten()).any())


@pytest.mark.parametrize("shrink_steps", [1, 20])
@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_is_the_natural_solve_of_the_permuted_problem(static_groups, shrink_steps):
    """On a dense Hessian: with dynamic groups, act-order equals quantizing the columns
    permuted by decreasing diagonal in natural order; with static groups, the grids are
    the unpermuted weight's, as without act-order."""
    bits, gs = 3, 32
    weight, x, hessian = _layer(out_f=24, in_f=96)
    perm = torch.argsort(torch.diagonal(hessian), descending=True)
    options = GPTQOptions(act_order=True, static_groups=static_groups,
                          shrink_steps=shrink_steps)
    result = gptq(weight, hessian, bits=bits, group_size=gs, symmetric=False, options=options)
    if not static_groups:
        natural = gptq(weight[:, perm], hessian[perm][:, perm], bits=bits, group_size=gs,
                       symmetric=False, options=dataclasses.replace(options, act_order=False))
        assert torch.equal(result.codes[:, perm], natural.codes)
        assert torch.equal(result.scales, natural.scales)
        assert torch.equal(result.g_idx[perm].long(), torch.arange(96) // gs)
    else:
        plain = gptq(weight, hessian, bits=bits, group_size=gs, symmetric=False,
                     options=dataclasses.replace(options, act_order=False))
        assert torch.equal(result.scales, plain.scales)  # grids before any update
        assert not torch.equal(result.codes, plain.codes)  # but another order of updates
    rtn = RTNQuantizer().quantize(weight, {}, Scheme(bits, gs, False))
    dense = dequantize_codes(result.codes, result.scales, result.zeros, bits,
                             result.g_idx if result.g_idx is not None else group_index(96, gs))
    assert _output_error(weight, x, dense) < _output_error(weight, x, dequantize_int(rtn))


def test_invalid_options_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="shrink_steps must be >= 1"):
        GPTQQuantizer.Config(shrink_steps=0)
    with pytest.raises(ValueError, match=r"max_shrink must be in \[0, 1\), got 1.0"):
        GPTQOptions(max_shrink=1.0)
