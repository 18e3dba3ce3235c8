"""qcore-plugin-finetune: block fine-tuning of codebooks (``vq``) and group scales
(``int``) after quantization, through the core's after-quantization contract."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import qcore_plugin_finetune
import torch
from qcore_plugin_finetune.transform import FinetuneTransform

import qcore
from qcore.checkpoint import load, save
from qcore.errors import ConfigError, UnknownComponentError
from qcore.interfaces import Transform
from qcore.ops import QuantLinear, VQPacker, validate_vq
from qcore.pipeline import Pipeline
from qcore.quantize import quantize
from qcore.scheme import Scheme
from qcore.testing import BaseTransformTests, ToyVQQuantizer, isolated_plugin_manager, make_plugin
from qcore.testing.models import tiny_causal_lm


def tiny_model(arch: str, layers: int = 2) -> torch.nn.Module:
    return tiny_causal_lm(arch, layers=layers, tie_word_embeddings=False)


@pytest.fixture
def make_tiny_model():
    return tiny_model


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def toy_vq(qcore_register_plugin) -> None:
    """The kit's toy vq quantizer, and this plugin, in an isolated registry. Attributed
    to installed distributions, so that loading a checkpoint finds every one it was made
    with."""
    import qcore_plugin_finetune.hooks

    manager = qcore_register_plugin(make_plugin("toy_vq", quantizers=[ToyVQQuantizer]),
                                    distribution="qcore", version=qcore.__version__)
    manager.register_module(qcore_plugin_finetune.hooks, "finetune", "qcore-plugin-finetune",
                            qcore_plugin_finetune.__version__)


class TestFinetuneConforms(BaseTransformTests):
    """Declarations and options; the block's function changes by design (it is tuned
    after quantization), so the kit's function-preservation check is off."""

    preserves_function = False

    @pytest.fixture
    def transform(self) -> Transform:
        return FinetuneTransform()


def test_qcore_plugins_lists_finetune_from_its_distribution(capsys) -> None:
    from qcore.cli import main

    assert main(["plugins", "--json"]) == 0
    plugins = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    assert plugins["finetune"]["distribution"] == "qcore-plugin-finetune"
    assert plugins["finetune"]["components"] == {"transform": ["finetune"]}
    assert "transform" not in plugins["builtin"]["components"]


def test_finetune_is_an_after_quantization_transform_of_the_int_and_vq_formats() -> None:
    assert FinetuneTransform.after_quantization
    assert FinetuneTransform.formats == frozenset({"int", "vq"})
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        FinetuneTransform.Config(epochs=0)


# ------------------------------------------------------------------------------ vq

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
        {"name": "finetune", "options": {**FINETUNE, "seed": 0}, "after_quantization": True}]
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


# ------------------------------------------------------------------------------ int


def test_finetune_after_rtn_tunes_the_group_scales_only(make_tiny_model) -> None:
    """``rtn,finetune``: codes and zero points stay as rounded, the float16 group scales
    move, and the model comes closer to the unquantized one (measured: logits error 28%
    lower on the calibration rows, 13% on others)."""
    import copy

    calib = torch.randint(0, 128, (32, 32), generator=torch.Generator().manual_seed(1))
    held_out = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    fp = make_tiny_model("llama")
    models = {}
    for names in ("rtn", "rtn,finetune"):
        models[names] = copy.deepcopy(fp)
        quantize(models[names], Pipeline.from_names(
            names, scheme=Scheme(bits=3, group_size=32),
            options={"finetune": {"epochs": 5, "lr": 1e-2}} if "," in names else None),
            calib, batch_size=4, progress=False)
    with torch.no_grad():
        errors = {(names, i): float((m(ids).logits - fp(ids).logits).pow(2).mean())
                  for names, m in models.items() for i, ids in enumerate((calib, held_out))}
    assert errors["rtn,finetune", 0] < 0.8 * errors["rtn", 0], errors
    assert errors["rtn,finetune", 1] < 0.95 * errors["rtn", 1], errors
    plain = {n: m for n, m in models["rtn"].named_modules() if isinstance(m, QuantLinear)}
    for name, layer in models["rtn,finetune"].named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(layer.qweight, plain[name].qweight)
            assert torch.equal(layer.zeros, plain[name].zeros)
            assert layer.scales.dtype == torch.float16
            assert not torch.equal(layer.scales, plain[name].scales), name


def test_finetune_refuses_layers_that_quantize_activations(make_tiny_model, calib_ids) -> None:
    model = make_tiny_model("llama")
    pipeline = Pipeline.from_names("rtn,finetune", scheme=Scheme(bits=8, act_bits=8))
    with pytest.raises(ConfigError) as raised:
        quantize(model, pipeline, calib_ids, batch_size=2, progress=False)
    assert str(raised.value).startswith("finetune tunes weight-only layers; block 0's ")
    assert str(raised.value).endswith(" also quantize their inputs (act_bits 8): drop "
                                      "finetune from the pipeline or quantize weights only")


# ---------------------------------------------------------------- without the plugin


def test_without_the_plugin_a_pipeline_naming_finetune_says_what_to_install() -> None:
    registry = isolated_plugin_manager().registry  # qcore's built-ins alone
    with pytest.raises(UnknownComponentError) as raised:
        Pipeline.from_names("rtn,finetune", registry=registry)
    assert str(raised.value).endswith(
        "'finetune' is provided by qcore-plugin-finetune: pip install qcore-plugin-finetune")
    with pytest.raises(UnknownComponentError) as raised:
        Pipeline.from_spec({"quantizer": "rtn", "transforms": ["finetune"]}).validate(registry)
    assert str(raised.value) == (
        "Unknown transform: 'finetune'. Installed transforms: none. 'finetune' is provided "
        "by qcore-plugin-finetune: pip install qcore-plugin-finetune")


def test_a_checkpoint_from_when_finetune_was_built_in_loads_without_the_plugin(
        make_tiny_model, tmp_path) -> None:
    """Before qcore-plugin-finetune, ``finetune`` came with qcore: such a checkpoint lists
    the step in its pipeline, without the distribution or the ``after_quantization`` mark.
    It loads, runs and inspects where the plugin is absent (disabled here), since its
    layers are plain ``int`` layers."""
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    model = make_tiny_model("llama")
    quantize(model, Pipeline.from_names("rtn,finetune", scheme=Scheme(bits=4, group_size=32),
                                        options={"finetune": {"epochs": 1}}),
             calib, batch_size=4, progress=False)
    path = save(model, tmp_path / "ck")
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    made_with = config["quantization_config"]["distributions"]
    assert made_with.pop("qcore-plugin-finetune") == qcore_plugin_finetune.__version__
    (step,) = config["quantization_config"]["pipeline"]["transforms"]
    assert step.pop("after_quantization") is True
    config_file.write_text(json.dumps(config))
    ids = calib[:2]
    with torch.no_grad():
        want = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch; import qcore.checkpoint as c; from qcore.plugins import "
            "get_registry\n"
            "assert get_registry().find('transform', 'finetune') is None\n"
            f"m = c.load({str(path)!r})\n"
            f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
            "with torch.no_grad():\n"
            f"    torch.save(m(ids).logits, {str(tmp_path / 'got.pt')!r})\n"
            "from qcore.cli import main\n"
            f"sys.exit(main(['inspect', {str(path)!r}]))\n")
    env = {**__import__("os").environ, "QCORE_DISABLE_PLUGINS": "finetune"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    # Without the plugin nor the mark, the step reads in its recorded place.
    assert "pipeline     finetune,rtn  (W4 g32 asym)" in result.stdout, result.stdout
    assert torch.equal(torch.load(tmp_path / "got.pt"), want)
