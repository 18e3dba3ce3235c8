"""Quantizing tiny models end to end: block-sequential calibration, QuantLinear, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import qcore.calibration as calibration
from qcore.builtin.int_packer import IntPacker
from qcore.checkpoint import load, save
from qcore.errors import CheckpointError, ConfigError
from qcore.grid import dequantize_int
from qcore.model import find_blocks, weight_matrix
from qcore.pipeline import Pipeline
from qcore.qlinear import QuantLinear
from qcore.quantize import quantize
from qcore.scheme import Scheme

ARCHS = ["llama", "qwen2", "opt", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_block_linear_becomes_a_quantlinear_holding_the_rtn_weight(make_tiny_model, arch, calib_ids):
    model = make_tiny_model(arch)
    blocks = find_blocks(model)
    originals = {f"{i}.{n}": weight_matrix(m).detach().clone()
                 for i, b in enumerate(blocks.blocks) for n, m in b.named_modules()
                 if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    quantize(model, "rtn", calib_ids, batch_size=3, progress=False)
    rtn = Pipeline.from_names("rtn").validate().quantizer
    scheme = Scheme()
    for key, weight in originals.items():
        index, name = key.split(".", 1)
        layer = blocks.blocks[int(index)].get_submodule(name)
        assert isinstance(layer, QuantLinear)
        stored = dequantize_int(IntPacker().unpack(layer.packed()))
        expected = rtn.dequantize(rtn.quantize(weight.float(), {}, scheme))
        assert torch.equal(stored, expected)
        # 4-bit asymmetric RTN: every weight within half a step of its group's grid.
        assert (stored - weight).abs().max() <= layer.scales.float().max() / 2 + 1e-6


def test_block_sequential_inputs_equal_whole_model_capture(make_tiny_model, monkeypatch, calib_ids):
    """Block i is calibrated on the outputs of the already-quantized blocks before it,
    exactly what the finished quantized model feeds block i."""
    model = make_tiny_model("llama", layers=3)
    seen: dict[int, torch.Tensor] = {}
    original = calibration.quantize_block

    def recording(index, block, calls, resolved, device, structures=None, targets=None):
        seen[index] = torch.cat([args[0] for args, _ in calls])
        return original(index, block, calls, resolved, device, structures, targets)

    monkeypatch.setattr(calibration, "quantize_block", recording)
    # static activation scales need the minmax observer, so calibration data flows
    scheme = Scheme(bits=3, act_bits=8, act_dynamic=False)
    quantize(model, Pipeline.from_names("rtn", scheme=scheme), calib_ids, batch_size=2,
             progress=False)
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = [block.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: captured.setdefault(i, []).append(
            (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
        for i, block in enumerate(find_blocks(model).blocks)]
    with torch.no_grad():
        for start in range(0, calib_ids.shape[0], 2):
            model(input_ids=calib_ids[start:start + 2], use_cache=False)
    for h in hooks:
        h.remove()
    assert sorted(seen) == [0, 1, 2]
    for i in range(3):
        torch.testing.assert_close(seen[i], torch.cat(captured[i]), rtol=1e-5, atol=1e-5)
    # and the quantized blocks changed what later blocks see (3-bit is far from exact)
    assert not torch.allclose(seen[2], torch.zeros_like(seen[2]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_round_trip_gives_identical_logits(make_tiny_model, arch, calib_ids, tmp_path):
    model = make_tiny_model(arch)
    quantize(model, Pipeline.from_names("rtn", scheme=Scheme(bits=3, group_size=24)),
             calib_ids, progress=False)
    with torch.no_grad():
        before = model(calib_ids).logits
    path = save(model, tmp_path / "ck")
    loaded = load(path)
    with torch.no_grad():
        after = loaded(calib_ids).logits
    assert torch.equal(before, after)
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "qcore"
    assert qconfig["pipeline"]["quantizer"]["name"] == "rtn"
    assert qconfig["pipeline"]["scheme"]["bits"] == 3
    assert "qcore" in qconfig["distributions"]
    assert len(qconfig["layers"]) == sum(isinstance(m, QuantLinear) for m in model.modules())


def test_save_refuses_existing_directory_and_leaves_it_untouched(make_tiny_model, calib_ids, tmp_path):
    model = make_tiny_model("llama")
    quantize(model, "rtn", calib_ids, progress=False)
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        save(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary leftovers


def test_interrupted_save_leaves_no_partial_checkpoint(make_tiny_model, monkeypatch, calib_ids, tmp_path):
    model = make_tiny_model("llama")
    quantize(model, "rtn", calib_ids, progress=False)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_is_a_clear_error(make_tiny_model, calib_ids, tmp_path):
    model = make_tiny_model("llama")
    quantize(model, "rtn", calib_ids, progress=False)
    path = save(model, tmp_path / "ck")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load(path)


def test_missing_plugin_and_newer_format_are_named(make_tiny_model, calib_ids, tmp_path):
    model = make_tiny_model("llama")
    quantize(model, "rtn", calib_ids, progress=False)
    path = save(model, tmp_path / "ck")
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["distributions"]["qcore-plugin-notinstalled"] = "0.3.0"
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError,
                       match="needs qcore-plugin-notinstalled.*pip install qcore-plugin-notinstalled"):
        load(path)
    config["quantization_config"]["format_version"] = 99
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format 99.*upgrade qcore"):
        load(path)


def test_weight_only_rtn_needs_no_calibration_pass(make_tiny_model, monkeypatch, calib_ids):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("RTN weight-only must not run the model on calibration data")

    monkeypatch.setattr("qcore.quantize.capture_block_inputs", forbidden)
    model = make_tiny_model("llama")
    result = quantize(model, "rtn", None, progress=False)
    assert result.n_layers == 14
    assert model.qcore_quantization["calibration"] is None
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize(make_tiny_model("llama"), Pipeline.from_names(
            "rtn", scheme=Scheme(bits=8, act_bits=8, act_dynamic=False)), None, progress=False)


def test_quantizing_twice_is_refused(make_tiny_model, calib_ids):
    model = make_tiny_model("llama")
    quantize(model, "rtn", calib_ids, progress=False)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(model, "rtn", calib_ids, progress=False)


def test_group_size_that_does_not_divide_and_act_quantization(make_tiny_model, calib_ids):
    model = make_tiny_model("llama")
    scheme = Scheme(bits=8, group_size=-1, symmetric=True, act_bits=8, act_dynamic=False)
    with torch.no_grad():
        ref = model(calib_ids).logits
    quantize(model, Pipeline.from_names("rtn", scheme=scheme), calib_ids, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.input_scale.ndim == 0 and float(layer.input_scale) > 0
    with torch.no_grad():
        out = model(calib_ids).logits
    # W8A8 barely moves a tiny model's logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_load_state_dict_after_a_forward_runs_the_loaded_weights(make_tiny_model, calib_ids):
    """The kernels' prepared weights are conversions of a QuantLinear's tensors: after
    ``load_state_dict`` (in-place copies into the same tensors) or a ``copy_`` into one of
    them, the next forward runs the new weights, not the ones prepared before."""
    import copy

    model = make_tiny_model("llama")
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in other.model.layers.parameters():  # another float model, same structure
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    for m in (model, other):
        quantize(m, Pipeline.from_names("rtn", scheme=Scheme(bits=4, group_size=32)),
                 calib_ids, progress=False)
    with torch.no_grad():
        mine, theirs = model(calib_ids).logits, other(calib_ids).logits
        assert (mine - theirs).abs().max() > 1e-3  # two different quantized models
        pointers = {n: t.data_ptr() for n, t in model.state_dict().items()}
        model.load_state_dict(other.state_dict())
        assert {n: t.data_ptr() for n, t in model.state_dict().items()} == pointers  # in place
        assert torch.equal(model(calib_ids).logits, theirs)
        layer, source = model.model.layers[1].mlp.up_proj, other.model.layers[1].mlp.up_proj
        layer.scales.mul_(2)  # one tensor changed in place: this layer runs it
        changed = model(calib_ids).logits
        assert (changed - theirs).abs().max() > 1e-3
        layer.scales.copy_(source.scales)
        assert torch.equal(model(calib_ids).logits, theirs)


def test_quantlinear_repr_names_format_and_kernel(make_tiny_model, calib_ids):
    model = make_tiny_model("llama")
    quantize(model, Pipeline.from_names("rtn", scheme=Scheme(bits=4, group_size=32, symmetric=True)),
             calib_ids, progress=False)
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        model(calib_ids[:1])
    assert repr(layer) == ("QuantLinear(in_features=96, out_features=64, layout=int-packed, "
                           "W4 g32 sym, kernel=torch)")


def test_transformers_from_pretrained_loads_a_qcore_checkpoint(make_tiny_model, calib_ids, tmp_path):
    """After `import qcore`, transformers' own loader rebuilds the QuantLinears (fresh
    process: the registration must happen on transformers' first import)."""
    import subprocess
    import sys

    model = make_tiny_model("llama")
    quantize(model, Pipeline.from_names("rtn", scheme=Scheme(bits=4, group_size=32)), calib_ids,
             progress=False)
    with torch.no_grad():
        expected = model(calib_ids).logits
    path = save(model, tmp_path / "ck")
    torch.save(calib_ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch, qcore\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(path)!r})\n"
        "assert type(m.model.layers[0].mlp.down_proj).__name__ == 'QuantLinear'\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(got, expected)


def test_qcore_quantize_is_callable_after_its_module_was_imported(make_tiny_model, calib_ids):
    """``import qcore.checkpoint`` imports the ``qcore.quantize`` module, which then shadows
    the lazily exported function of the same name; calling it must still quantize."""
    import qcore
    import qcore.checkpoint  # noqa: F401

    for _ in range(2):
        result = qcore.quantize(make_tiny_model("llama"), "rtn", calib_ids, progress=False)
        assert result.n_layers > 0


