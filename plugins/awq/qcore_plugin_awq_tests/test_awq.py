"""qcore-plugin-awq: the observer, the scale and clip searches, function preservation on
Llama, Qwen2 and OPT blocks, and composition with the core's quantizers."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from qcore_plugin_awq import hooks
from qcore_plugin_awq.observer import AbsMeanObserver
from qcore_plugin_awq.search import (
    awq_scales,
    fake_quantize,
    output_error,
    search_alpha,
    search_clip,
)
from qcore_plugin_awq.transforms import AWQClip, AWQScales

from qcore.builtin.observers import HessianObserver
from qcore.builtin.rtn import RTNQuantizer
from qcore.scheme import Scheme
from qcore.testing import BaseObserverTests, BaseTransformTests

SRC = Path(__file__).resolve().parents[1] / "src" / "qcore_plugin_awq"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _block_context(model: torch.nn.Module, transform, index: int = 0):
    """A BlockContext for block ``index`` with the transform's statistics observed."""
    from qcore.calibration import observe
    from qcore.context import BlockContext
    from qcore.model import capture_block_inputs, describe_block, find_blocks

    blocks = find_blocks(model)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (6, 16), generator=_gen(3))
    calls = capture_block_inputs(model, blocks, ids, batch_size=3)
    block = blocks.blocks[index]
    structure = describe_block(block, *calls[0])
    observers = {"absmean": AbsMeanObserver, "hessian": HessianObserver}
    stats = observe(
        block,
        calls,
        structure,
        structure.groups,
        {n: observers[n] for n in transform.needs},
        torch.device("cpu"),
    )
    return BlockContext(
        index=index,
        block=block,
        structure=structure,
        inputs=calls,
        stats=stats,
        scheme=Scheme(bits=4, group_size=32),
        quantizer=RTNQuantizer(),
    )


def _tiny(arch: str, **kw) -> torch.nn.Module:
    from qcore.testing.models import tiny_causal_lm

    return tiny_causal_lm(arch, hidden=64, intermediate=128, layers=2, **kw)


# ------------------------------------------------------------------------ observer


def test_absmean_is_the_mean_magnitude_over_all_tokens():
    batches = [
        torch.randn(n, 16, generator=_gen(n)) * torch.linspace(0.1, 5, 16) for n in (7, 1, 30)
    ]
    obs = AbsMeanObserver()
    for b in batches:
        obs.update(b, None)
    expected = torch.cat(batches).abs().mean(0)
    torch.testing.assert_close(obs.compute(), expected, rtol=1e-6, atol=0)


class TestAbsMeanConformance(BaseObserverTests):
    @pytest.fixture
    def observer(self):
        return AbsMeanObserver()


# ------------------------------------------------------------------------- search math


@pytest.mark.parametrize("group_size", [32, 48, -1])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_fake_quantize_is_the_rtn_quantizers_grid(group_size, symmetric, bits):
    w = torch.randn(24, 80, generator=_gen(1))
    scheme = Scheme(bits=bits, group_size=group_size, symmetric=symmetric)
    rtn = RTNQuantizer()
    expected = rtn.dequantize(rtn.quantize(w, {}, scheme))
    assert torch.equal(fake_quantize(w, scheme, torch.float16), expected)


def _salient_layer(seed: int = 0):
    """A linear whose inputs have 4 channels 30x larger than the rest (as in LLMs)."""
    x = torch.randn(2048, 128, generator=_gen(seed))
    x[:, :4] *= 30
    w = torch.randn(64, 128, generator=_gen(seed + 1)) * 0.05
    return w, x, x.abs().mean(0), x.T @ x


def test_alpha_zero_is_plain_rtn_and_the_search_lowers_the_output_error():
    w, x, x_mean, h = _salient_layer()
    scheme = Scheme(bits=4, group_size=32)
    quantize = lambda ws, s: fake_quantize(ws, scheme, torch.float16)  # noqa: E731
    assert torch.equal(awq_scales(x_mean, 0.0), torch.ones(128))
    alpha, s, errors = search_alpha(w, x_mean, h, 20, quantize)
    rtn_err = float(((x @ w.T - x @ fake_quantize(w, scheme, torch.float16).T) ** 2).sum())
    awq_err = float(
        ((x @ w.T - x @ (fake_quantize(w * s, scheme, torch.float16) / s).T) ** 2).sum()
    )
    assert errors[0] == pytest.approx(rtn_err, rel=1e-3)  # the Hessian form is the output error
    assert min(errors) == pytest.approx(awq_err, rel=1e-3)
    assert alpha > 0 and awq_err < 0.7 * rtn_err
    s_norm = awq_scales(x_mean, alpha)
    assert float(s_norm.max() * s_norm.min()) == pytest.approx(1.0, rel=1e-5)


def test_clip_search_never_raises_and_lowers_the_group_errors():
    w = torch.randn(32, 128, generator=_gen(4)) * 0.02
    w[torch.rand(32, 128, generator=_gen(5)) < 0.01] *= 12  # heavy-tailed weights
    x = torch.randn(4096, 128, generator=_gen(6))
    h = x.T @ x
    scheme = Scheme(bits=3, group_size=64)
    factors = search_clip(w, h, scheme, torch.float16, 20, 0.5)
    assert factors.shape == (32, 2) and bool(((factors <= 1) & (factors >= 0.5)).all())
    assert bool((factors < 1).any())
    plain = w - fake_quantize(w, scheme, torch.float16)
    clipped = w - fake_quantize(w, scheme, torch.float16, factors.repeat_interleave(1, 1))
    for g in range(2):
        cols = slice(64 * g, 64 * (g + 1))
        e_plain = ((plain[:, cols] @ h[cols, cols]) * plain[:, cols]).sum(1)
        e_clip = ((clipped[:, cols] @ h[cols, cols]) * clipped[:, cols]).sum(1)
        assert bool((e_clip <= e_plain * (1 + 1e-5)).all())
    assert float(output_error(clipped, h)) < float(output_error(plain, h))


# ------------------------------------------------------------ transforms on real blocks


@pytest.mark.parametrize(
    "arch, kw",
    [
        ("llama", {"kv_heads": 4}),  # no grouped-query attention: v -> o folds too
        ("llama", {}),
        ("qwen2", {}),
        ("opt", {}),
    ],
)
def test_scaled_and_folded_block_computes_the_same_function(arch, kw):
    model = _tiny(arch, **kw)
    ctx = _block_context(model, AWQScales())
    before = torch.cat(ctx.run_block())
    weights = {n: m.weight.detach().clone() for n, m in ctx.structure.linears.items()}
    AWQScales(AWQScales.Config(alpha=0.5)).apply(ctx)
    after = torch.cat(ctx.run_block())
    torch.testing.assert_close(after, before, rtol=2e-5, atol=2e-5 * float(before.abs().max()))
    with_source = [g for g in ctx.structure.groups if g.source is not None]
    assert len(with_source) >= 3
    for group in with_source:  # the weights really were scaled
        for name in group.names:
            assert not torch.allclose(ctx.structure.linears[name].weight, weights[name])


def test_groups_without_a_scale_source_are_named_in_the_log(caplog):
    model = _tiny("llama")  # grouped-query attention: v_proj's outputs are not o_proj's inputs
    ctx = _block_context(model, AWQScales())
    with caplog.at_level(logging.INFO, logger="qcore"):
        AWQScales().apply(ctx)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "self_attn.o_proj" in warned[0].getMessage()
    assert "without AWQ scales" in warned[0].getMessage()
    assert any("α=" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


class TestAWQConformance(BaseTransformTests):
    @pytest.fixture
    def transform(self):
        return AWQScales(AWQScales.Config(alpha=0.5))

    @pytest.fixture
    def observers(self):
        return {"absmean": AbsMeanObserver, "hessian": HessianObserver}


class TestAWQClipConformance(BaseTransformTests):
    preserves_function = False  # clipping is lossy by design

    @pytest.fixture
    def transform(self):
        return AWQClip()

    @pytest.fixture
    def observers(self):
        return {"hessian": HessianObserver}


# ------------------------------------------------------------------------- pipelines


def _salient_model() -> torch.nn.Module:
    """A tiny Llama whose norms give a few hidden channels 50x the others' magnitude."""
    model = _tiny("llama", kv_heads=4)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 50
            layer.post_attention_layernorm.weight[:3] *= 50
    return model


@pytest.mark.parametrize(
    "pipeline, baseline", [("awq", "rtn"), ("awq,awq-clip", "rtn"), ("awq,gptq", "gptq")]
)
def test_awq_beats_its_quantizer_alone_on_a_model_with_salient_channels(pipeline, baseline):
    from qcore.quantize import quantize

    model = _salient_model()
    ids = torch.randint(0, 128, (8, 32), generator=_gen(7))
    with torch.no_grad():
        ref = model(ids).logits
    errors = {}
    for names in (baseline, pipeline):
        m = copy.deepcopy(model)
        quantize(m, names, ids, progress=False)
        with torch.no_grad():
            errors[names] = float((m(ids).logits - ref).pow(2).mean())
    assert errors[pipeline] < 0.5 * errors[baseline], errors


def test_awq_then_gptq_composes_and_round_trips_a_checkpoint(tmp_path):
    from qcore.checkpoint import load, save
    from qcore.qlinear import QuantLinear
    from qcore.quantize import quantize

    model = _salient_model()
    ids = torch.randint(0, 128, (8, 32), generator=_gen(8))
    result = quantize(model, "awq,gptq", ids, progress=False)
    assert result is not None
    assert model.qcore_quantization["pipeline"]["transforms"][0]["name"] == "awq"
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 7
    save(model, tmp_path / "ck")
    loaded = load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_without_the_gptq_plugin_awq_gptq_names_the_distribution(
    qcore_register_plugin, qcore_registry
):
    from qcore.errors import QcoreError
    from qcore.pipeline import Pipeline

    qcore_register_plugin(hooks, name="awq", distribution="qcore-plugin-awq")
    Pipeline.from_names("awq", registry=qcore_registry).validate(qcore_registry)
    with pytest.raises(QcoreError, match="qcore-plugin-gptq"):
        Pipeline.from_names("awq,gptq", registry=qcore_registry).validate(qcore_registry)


def test_the_plugin_does_not_import_the_gptq_plugin():
    for path in SRC.glob("*.py"):
        assert "qcore_plugin_gptq" not in path.read_text(), path.name


def test_block_objective_scores_candidates_by_the_blocks_output(caplog):
    """objective="block": α is the one whose quantized group changes the block's output
    least; the search leaves the unquantized block's function unchanged."""
    from qcore_plugin_awq.transforms import _BlockScore

    model = _salient_model()
    ctx = _block_context(model, AWQScales())
    before = torch.cat(ctx.run_block())
    group = next(g for g in ctx.structure.groups if g.source is not None)
    w = torch.cat([ctx.structure.linears[n].weight.detach() for n in group.names])
    score = _BlockScore(ctx, group.names, samples=3)
    assert len(score.calls) == 1 and score(w) == 0.0  # the fp weights change nothing
    assert score(w * 1.01) > 0
    with caplog.at_level(logging.INFO, logger="qcore"):
        AWQScales(AWQScales.Config(objective="block", block_samples=3)).apply(ctx)
    after = torch.cat(ctx.run_block())
    torch.testing.assert_close(after, before, rtol=2e-5, atol=2e-5 * float(before.abs().max()))
    import re

    alphas = [float(a) for r in caplog.records for a in re.findall(r"α=([0-9.]+)", r.getMessage())]
    assert alphas and max(alphas) > 0, alphas


def test_awq_rescales_its_statistics_so_clip_needs_no_second_observation(monkeypatch):
    """After folding, the statistics AWQ leaves in ctx.stats equal a fresh observation of
    the edited block, and the core then runs awq-clip without observing again."""
    import qcore.calibration as calibration
    from qcore.quantize import quantize

    model = _salient_model()
    ctx = _block_context(model, AWQScales())
    AWQScales().apply(ctx)
    fresh = _block_context(model, AWQScales()).stats
    for name, stats in ctx.stats.items():
        for key in ("absmean", "hessian"):
            scale = float(fresh[name][key].abs().max())
            torch.testing.assert_close(stats[key], fresh[name][key], rtol=1e-3, atol=1e-5 * scale)

    calls = []
    original = calibration.observe
    monkeypatch.setattr(
        calibration, "observe", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    quantize(
        _salient_model(),
        "awq,awq-clip",
        torch.randint(0, 128, (4, 32), generator=_gen(1)),
        progress=False,
    )
    assert len(calls) == 2 * 2  # per block: AWQ's observation and RTN's (none for awq-clip)
