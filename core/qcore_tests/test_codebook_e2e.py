"""A quantizer producing the ``"vq"`` format runs through the whole core: pipeline
validation finds the ``vq`` packer and the ``torch-lut`` kernel, QuantLinear computes
with ``lut_linear``, checkpoints save and load, ``qcore inspect`` counts the bits."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import qcore
from qcore.builtin.vq_packer import VQPacker
from qcore.checkpoint import load, save
from qcore.cli import main
from qcore.codebook import bits_per_weight, dequantize_vq, validate_vq
from qcore.interfaces import QuantizedWeight, Quantizer
from qcore.pipeline import Pipeline
from qcore.qlinear import QuantLinear
from qcore.quantize import quantize
from qcore.scheme import Scheme
from qcore.testing import BaseQuantizerTests, make_plugin

VECTOR_SIZE = 4
N_OUTLIERS = 3


def nearest_rows(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(vectors, codebook.float()).argmin(1).to(torch.int32)


def vectors_of(columns: torch.Tensor) -> torch.Tensor:
    """``[out, width]`` -> ``[out * n_vec, v]``, the partial last vector zero-padded."""
    out_f, width = columns.shape
    pad = -width % VECTOR_SIZE
    return torch.nn.functional.pad(columns, (0, pad)).reshape(-1, VECTOR_SIZE)


class ToyVQ(Quantizer):
    """Toy vector quantizer: rows scaled to unit max, the 3 largest columns as outliers,
    codebooks drawn from the weight's own vectors (nearest row), one residual stage."""

    name = "toy-vq"
    produces = "vq"
    supported_bits = frozenset({2, 3})

    def quantize(self, weight: torch.Tensor, stats: Any, scheme: Scheme) -> QuantizedWeight:
        out_f, in_f = weight.shape
        scale = weight.abs().amax(1).clamp(min=1e-6).to(torch.float16)
        w = weight / scale.float()[:, None]
        outlier_cols = w.norm(dim=0).topk(N_OUTLIERS).indices.sort().values
        keep = torch.ones(in_f, dtype=torch.bool)
        keep[outlier_cols] = False
        main = vectors_of(w[:, keep])
        index_bits = scheme.bits * VECTOR_SIZE
        g = torch.Generator().manual_seed(0)
        codebook = main[torch.randperm(len(main), generator=g)[:1 << index_bits]].half()
        indices = nearest_rows(main, codebook)
        residual = main - codebook.float()[indices.long()]
        res_codebook = residual[torch.randperm(len(main), generator=g)[:16]].half()
        res_indices = nearest_rows(residual, res_codebook)
        outliers = vectors_of(w[:, outlier_cols])
        outlier_codebook = outliers[:8].half()
        tensors = {
            "indices": indices.view(out_f, -1), "codebook": codebook,
            "res_indices": res_indices.view(out_f, -1), "res_codebook": res_codebook,
            "outlier_cols": outlier_cols.to(torch.int32),
            "outlier_indices": nearest_rows(outliers, outlier_codebook).view(out_f, -1),
            "outlier_codebook": outlier_codebook, "scale": scale,
        }
        params = {"bits": scheme.bits, "vector_size": VECTOR_SIZE, "index_bits": index_bits,
                  "res_index_bits": 4, "outlier_index_bits": 3, "n_outliers": N_OUTLIERS}
        return QuantizedWeight(format="vq", shape=(out_f, in_f), tensors=tensors, params=params)


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


# ------------------------------------------------------------------------------ finetune

FINETUNE = {"epochs": 5, "lr": 1e-2, "samples": 0}
TUNED = ("codebook", "res_codebook", "outlier_codebook", "scale")


def quantized_copies(make_tiny_model, calib_ids, *options: dict[str, Any] | None):
    """The unquantized tiny Llama, and one copy quantized by toy-vq per entry of
    ``options`` (None: toy-vq alone; else ``toy-vq,finetune`` with those options),
    calibrated on ``calib_ids`` in batches of 4 rows."""
    torch.manual_seed(0)
    fp = make_tiny_model("llama")
    copies = []
    for opts in options:
        model = make_tiny_model("llama")
        model.load_state_dict(fp.state_dict())
        names = "toy-vq" if opts is None else "toy-vq,finetune"
        quantize(model, Pipeline.from_names(names, scheme=Scheme(bits=2),
                                            options=None if opts is None else {"finetune": opts}),
                 calib_ids, batch_size=4, progress=False)
        copies.append(model)
    return fp, copies


def layers_of(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def logits_error(model: torch.nn.Module, fp: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits - fp(ids).logits).pow(2).mean())


def test_finetune_tunes_codebooks_and_scales_towards_the_unquantized_model(
        toy_vq, make_tiny_model, tmp_path) -> None:
    # 32 rows of 32 tokens: the toy's 14 layers hold 17k tuned values, which 6 rows
    # would overfit (measured: 8x lower error on them, 10% on other rows).
    calib = torch.randint(0, 128, (32, 32), generator=torch.Generator().manual_seed(1))
    fp, (plain, tuned, again) = quantized_copies(make_tiny_model, calib, None, FINETUNE,
                                                 FINETUNE)
    held_out = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(9))
    # Closer to the unquantized model on the calibration rows (measured 5.2x) and on
    # others (2.7x).
    assert logits_error(tuned, fp, calib) < 0.3 * logits_error(plain, fp, calib)
    assert logits_error(tuned, fp, held_out) < 0.5 * logits_error(plain, fp, held_out)
    plain_layers, tuned_layers = layers_of(plain), layers_of(tuned)
    assert len(tuned_layers) == 14
    for name, layer in tuned_layers.items():
        base = plain_layers[name]
        # Every index and the outlier columns as the quantizer chose them; only the
        # float16 tensors moved (each layer's codebook at least).
        for key in ("indices", "res_indices", "outlier_indices", "outlier_cols"):
            assert torch.equal(getattr(layer, key), getattr(base, key)), (name, key)
        assert all(getattr(layer, key).dtype == torch.float16 for key in TUNED)
        assert not torch.equal(layer.codebook, base.codebook), name
        validate_vq(VQPacker().unpack(layer.packed()))
    # Deterministic: a second run makes the same tensors, bit for bit.
    again_layers = layers_of(again)
    assert all(torch.equal(getattr(layer, key), getattr(again_layers[name], key))
               for name, layer in tuned_layers.items() for key in layer.tensor_names)
    # The checkpoint records the step with its options, and loads to the same model.
    assert tuned.qcore_quantization["pipeline"]["transforms"] == [
        {"name": "finetune", "options": {**FINETUNE, "seed": 0}}]
    loaded = load(save(tuned, tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(loaded(held_out).logits, tuned(held_out).logits)


def test_finetune_keeps_the_quantizers_tensors_when_the_error_does_not_drop(
        toy_vq, make_tiny_model, calib_ids, caplog) -> None:
    # A learning rate of 0.5 throws the normalised codebooks far off: the tuned tensors
    # give a larger block error than the quantizer's, so each block keeps the latter.
    with caplog.at_level("INFO", logger="qcore"):
        _, (plain, tuned) = quantized_copies(make_tiny_model, calib_ids, None,
                                             {"epochs": 2, "lr": 0.5, "samples": 4})
    plain_layers = layers_of(plain)
    assert all(torch.equal(getattr(layer, key), getattr(plain_layers[name], key))
               for name, layer in layers_of(tuned).items() for key in layer.tensor_names)
    kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finetune block")]
    assert len(kept) == 2
    for message in kept:  # "finetune block 0: output mse A -> A (4 rows, 2 epochs)"
        before, after = message.split("mse ")[1].split(" (")[0].split(" -> ")
        assert before == after and message.endswith("(4 rows, 2 epochs)")
