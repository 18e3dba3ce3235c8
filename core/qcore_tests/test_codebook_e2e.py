"""A quantizer producing the ``"vq"`` format runs through the whole core: pipeline
validation finds the ``vq`` packer and the ``torch-lut`` kernel, QuantLinear computes
with ``lut_linear``, checkpoints save and load, ``qcore inspect`` counts the bits."""

from __future__ import annotations

import json

import pytest
import torch

import qcore
from qcore.checkpoint import load, save
from qcore.cli import main
from qcore.codebook import VQPacker, bits_per_weight, dequantize_vq, validate_vq
from qcore.pipeline import Pipeline
from qcore.qlinear import QuantLinear
from qcore.quantize import quantize
from qcore.scheme import Scheme
from qcore.testing import BaseQuantizerTests, ToyVQQuantizer, make_plugin

ToyVQ = ToyVQQuantizer
N_OUTLIERS = ToyVQQuantizer.n_outliers


class TestToyVQConforms(BaseQuantizerTests):
    """The kit's quantizer tests accept a vq quantizer (validate_vq, dequantize_vq)."""

    @pytest.fixture
    def quantizer(self) -> ToyVQ:
        return ToyVQ()

    def relative_error_bound(self, scheme: Scheme) -> float:
        return 0.9  # a toy codebook drawn from the weight's own vectors


@pytest.fixture
def toy_vq(qcore_register_plugin) -> None:
    # Attributed to the qcore distribution, which is installed, so that loading the
    # checkpoint finds every distribution it was made with.
    qcore_register_plugin(make_plugin("toy_vq", quantizers=[ToyVQ]), distribution="qcore",
                          version=qcore.__version__)


def test_pipeline_validation_finds_the_vq_packer_and_lut_kernel(toy_vq) -> None:
    resolved = Pipeline.from_names("toy-vq", scheme=Scheme(bits=2)).validate()
    assert (resolved.packer.name, resolved.packer.layout, resolved.packer.op) == (
        "vq", "vq-packed", "lut_linear")
    assert resolved.kernel == "torch-lut"


def test_quantize_save_load_inspect(toy_vq, make_tiny_model, calib_ids, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = make_tiny_model("llama")
    originals = {name: m.weight.detach().clone() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in name}
    quantize(model, Pipeline.from_names("toy-vq", scheme=Scheme(bits=2)), calib_ids,
             progress=False)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(originals)

    # Each layer holds the packed toy weight and computes x @ W.T with W = dequantize_vq.
    quantizer = ToyVQ()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    q_proj = "model.layers.0.self_attn.q_proj"
    qweight = quantizer.quantize(originals[q_proj].float(), {}, Scheme(bits=2))
    layer = layers[q_proj]
    back = VQPacker().unpack(layer.packed())
    validate_vq(back)
    assert all(torch.equal(back.tensors[k], qweight.tensors[k]) for k in qweight.tensors)
    torch.testing.assert_close(layer(x), x @ dequantize_vq(qweight).T, rtol=1e-5, atol=1e-5)
    assert layer.provider_name == "torch-lut"
    assert "layout=vq-packed, W2 v4 i8 +res i4 +outliers(3 cols, i3)" in repr(layer)

    ids = calib_ids[:2]
    with torch.no_grad():
        want = model(ids).logits
    out = save(model, tmp_path / "ck")
    loaded = load(out)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, want)
    assert loaded.get_submodule(q_proj).layout == "vq-packed"

    # qcore inspect: the exact stored bits per weight, per format and in total.
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    total_bits = sum(bits_per_weight(m.packed()) * m.out_features * m.in_features
                     for m in layers.values())
    total_weights = sum(m.out_features * m.in_features for m in layers.values())
    assert info["bits_per_weight"] == pytest.approx(total_bits / total_weights, rel=1e-12)
    record = info["layers"][q_proj]
    assert record["bits_per_weight"] == bits_per_weight(layer.packed())
    assert record["format"] == "vq-packed W2 v4 i8 +res i4 +outliers(3 cols, i3)"
    assert (record["kernel_cpu"], record["kernel_cuda"]) == ("torch-lut", "torch-lut")
    # q_proj 64 x 64: main part 61 columns -> 16 vectors; 8-bit indices: 8 words per row,
    # 4-bit residual: 4 words, 3-bit outliers (1 vector): 3 words; codebooks 256 x 4,
    # 16 x 4 and 8 x 4 float16; outlier_cols 3 int32; scale 64 float16.
    q_bits = 64 * (8 + 4 + 3) * 32 + (256 + 16 + 8) * 4 * 16 + 3 * 32 + 64 * 16
    assert record["bits_per_weight"] == q_bits / (64 * 64)

    assert main(["inspect", str(out), "--layers"]) == 0
    printed = capsys.readouterr().out
    assert f"bits/weight  {info['bits_per_weight']:.3f} over quantized layers" in printed
    assert "x vq-packed W2 v4 i8 +res i4 +outliers(3 cols, i3) (" in printed
    assert f"{record['bits_per_weight']:.3f} b/w  kernel auto: cpu=torch-lut" in printed
