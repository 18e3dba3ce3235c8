"""qcore-plugin-svdquant end to end: the transform, the observer, W4A4 checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import qcore
from qcore.builtin.observers import MinMaxObserver
from qcore.checkpoint import load, save
from qcore.checkpoint_info import inspect_checkpoint
from qcore.errors import ConfigError
from qcore.pipeline import Pipeline
from qcore.qlinear import QuantLinear
from qcore.scheme import Scheme
from qcore.testing import BaseObserverTests, BaseTransformTests
from qcore.testing.models import tiny_causal_lm
from qcore_plugin_svdquant.observer import InputSampleObserver
from qcore_plugin_svdquant.transforms import SVDQuant

W4A4 = Scheme(bits=4, group_size=32, act_bits=4, act_group_size=32)
OBSERVERS = {"minmax": MinMaxObserver, "input-sample": InputSampleObserver}


def _ids(seed: int, rows: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- observer


def test_input_sample_keeps_evenly_spaced_rows_within_its_bound():
    obs = InputSampleObserver(InputSampleObserver.Config(max_rows=16))
    x = torch.arange(100 * 3, dtype=torch.float32).reshape(100, 3)
    for chunk in x.split(7):  # batches that do not line up with the stride
        obs.update(chunk, None)
    sample = obs.compute()
    assert 8 <= sample.shape[0] <= 16
    rows = (sample[:, 0] / 3).long()
    gaps = rows.diff()
    assert rows[0] == 0 and bool((gaps == gaps[0]).all())  # one stride over all 100 rows
    assert rows[-1] >= 100 - gaps[0]  # reaches the end of the calibration set


def test_input_sample_keeps_everything_below_its_bound():
    obs = InputSampleObserver()
    x = torch.randn(40, 5)
    obs.update(x[:25], None)
    obs.update(x[25:], None)
    assert torch.equal(obs.compute(), x)


class TestInputSampleConformance(BaseObserverTests):
    @pytest.fixture
    def observer(self):
        return InputSampleObserver()


# --------------------------------------------------------------------------- transform


class TestSVDQuantConformance(BaseTransformTests):
    """Smoothing and the split together preserve the block's function (the kit adds the
    registered branches back)."""

    @pytest.fixture
    def transform(self):
        return SVDQuant(SVDQuant.Config(rank=4, grid=5, iters=3))

    @pytest.fixture
    def observers(self):
        return OBSERVERS


class TestSmoothingOnlyConformance(BaseTransformTests):
    """Smoothing alone (rank 0) preserves the block's function."""

    @pytest.fixture
    def transform(self):
        return SVDQuant(SVDQuant.Config(rank=0, alpha=0.5))

    @pytest.fixture
    def observers(self):
        return OBSERVERS


def _model(seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama with the activation outliers trained models have: four
    channels of each norm's output 30x larger than the rest."""
    model = tiny_causal_lm(hidden=128, intermediate=256, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 40, 77, 101]] *= 30
    return model


def _quantized(pipeline: str, scheme: Scheme = W4A4, seed: int = 0, **options):
    model = _model(seed)
    pipe = Pipeline.from_names(pipeline, scheme=scheme, options=options or None)
    qcore.quantize(model, pipe, _ids(1), progress=False)
    return model


def _error(model, reference, ids) -> float:
    with torch.no_grad():
        want = reference(ids).logits
        return float((model(ids).logits - want).norm() / want.norm())


def test_svdquant_beats_smoothing_which_beats_rtn_on_w4a4():
    """On a tiny random Llama with outlier channels, the logits' error against the float
    model's on held-out ids (measured: RTN 0.467, smoothing 0.285, rank 16 0.195)."""
    reference = _model()
    ids = _ids(7, rows=4)
    rtn = _error(_quantized("rtn"), reference, ids)
    smooth = _error(_quantized("svdquant", svdquant={"rank": 0}), reference, ids)
    branch = _error(_quantized("svdquant", svdquant={"rank": 16}), reference, ids)
    assert branch < 0.8 * smooth and smooth < 0.8 * rtn, (branch, smooth, rtn)


def test_parts_switch_off():
    model = _quantized("svdquant", svdquant={"rank": 0, "smooth": False})
    reference = _model()
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, reference.model.layers[0].input_layernorm.weight)  # no smoothing
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.lowrank_down is None for m in layers)  # no branch
    rtn = _quantized("rtn")
    # Nothing on: exactly round-to-nearest.
    for a, b in zip(layers, [m for m in rtn.modules() if isinstance(m, QuantLinear)], strict=True):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


def test_rank_larger_than_a_layer_is_refused():
    with pytest.raises(ConfigError, match=r"rank 100 exceeds linear 'self_attn.k_proj' of "
                       r"block 0 \(\[64 x 128\], rank at most 64\); choose "
                       r"--set svdquant.rank=N with N <= 64"):
        _quantized("svdquant", svdquant={"rank": 100})


def test_composes_with_gptq_on_the_residual():
    pytest.importorskip("qcore_plugin_gptq")
    model = _quantized("svdquant,gptq", svdquant={"rank": 8})
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.lowrank_down.shape == (8, 256)
    assert "g_idx" in layer.tensor_names  # GPTQ's act-order
    assert layer.params["act_bits"] == 4 and layer.params["act_group_size"] == 32
    assert "low-rank r8" in repr(layer)


# ------------------------------------------------------------------------ checkpoints


def test_branch_round_trips_through_the_checkpoint_and_from_pretrained(tmp_path):
    """The low-rank buffers survive save/load and transformers' from_pretrained after
    `import qcore`: bit-identical logits on CPU; `qcore inspect` counts the branch."""
    from qcore.testing.models import tiny_tokenizer

    model = _quantized("svdquant", svdquant={"rank": 8})
    ids = _ids(9, rows=2)
    with torch.no_grad():
        expected = model(ids).logits
    path = save(model, tmp_path / "ck", tiny_tokenizer())
    loaded = load(path)
    layer = loaded.model.layers[1].self_attn.q_proj
    assert layer.lowrank_down.dtype == torch.float16 and layer.lowrank_down.shape == (8, 128)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import torch, qcore\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        "layer = m.model.layers[1].self_attn.q_proj\n"
        "assert type(layer).__name__ == 'QuantLinear' and layer.lowrank_down.shape == (8, 128)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)

    info = inspect_checkpoint(path)
    q = info["layers"]["model.layers.1.self_attn.q_proj"]
    # W4 g32 asym: 4 bits + a float16 scale and a uint8 zero per 32 weights = 4.75 bits;
    # the rank-8 branch adds 16 * 8 * (128 + 128) / (128 * 128) = 2 bits.
    assert q["bits_per_weight"] == pytest.approx(4.75 + 2.0)
    assert "+low-rank r8" in q["format"] and "A4" in q["format"] and "act-g32" in q["format"]
    assert info["scheme"] == "W4A4 g32 asym act-g32"
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert [t["name"] for t in config["pipeline"]["transforms"]] == ["svdquant"]
    assert config["distributions"]["qcore-plugin-svdquant"]


def test_export_refuses_a_branch_before_writing(tmp_path):
    pytest.importorskip("qcore_plugin_interop")
    from qcore.errors import CheckpointError
    from qcore.exchange import export

    path = save(_quantized("svdquant", svdquant={"rank": 4}), tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"cannot be written as compressed-tensors: layer "
                       r"model\.layers\.0\.mlp\.down_proj has a low-rank branch \(SVDQuant\), "
                       r"which no exchange format stores \(14 such layers\)"):
        export(path, tmp_path / "out", "compressed-tensors")
    assert not (tmp_path / "out").exists()
