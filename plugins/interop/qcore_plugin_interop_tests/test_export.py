"""``qcore export`` and the import of other tools' checkpoints, end to end, on tiny random
models: the export is a complete model directory that transformers (through
compressed-tensors' own decompression) reads in a process that never imports qcore, with
exactly qcore's weights; every format loads back into qcore unchanged; a checkpoint made
by compressed-tensors' own compressor runs on qcore's kernels; bad input writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qcore
from qcore.builtin.int_packer import IntPacker
from qcore.checkpoint import save
from qcore.cli import main
from qcore.errors import CheckpointError
from qcore.exchange import export
from qcore.grid import dequantize_int
from qcore.pipeline import Pipeline
from qcore.qlinear import QuantLinear
from qcore.scheme import Scheme
from qcore.testing.models import tiny_causal_lm, tiny_tokenizer
from qcore_plugin_interop_tests._reference import read_with_transformers

FORMATS = ("compressed-tensors", "gptq", "awq")


def make_checkpoint(folder: Path, pipeline: str = "rtn", seed: int = 0,
                    options: dict | None = None, **scheme) -> Path:
    """A tiny Llama (hidden 64, MLP 128, grouped-query attention) quantized by ``pipeline``
    and saved as a qcore checkpoint."""
    model = tiny_causal_lm("llama", layers=2, hidden=64, intermediate=128, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    calib = torch.randint(0, 120, (8, 32), generator=generator)
    qcore.quantize(model, Pipeline.from_names(pipeline, scheme=Scheme(**scheme),
                                              options=options or {}), calib, progress=False)
    return save(model, folder, tiny_tokenizer())


def dense_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """qcore's own dense float32 weight of every quantized linear."""
    return {f"{name}.weight": dequantize_int(IntPacker().unpack(m.packed()))
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def ids_for_eval() -> torch.Tensor:
    return torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(5))


def nothing_written(out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}.")
                                        for p in out.parent.iterdir())


# ------------------------------------------------------------------------ the directory


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_is_a_complete_model_directory(tmp_path: Path, fmt: str) -> None:
    ckpt = make_checkpoint(tmp_path / "ck", bits=4, group_size=32)
    out = export(ckpt, tmp_path / "out", fmt)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == {"compressed-tensors": "compressed-tensors",
                                       "gptq": "gptq", "awq": "awq"}[fmt]
    if fmt == "compressed-tensors":
        assert qconfig["ignore"] == ["lm_head"]
    # No temporary directory is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "out"]


def test_cli_exports_and_qcore_reads_the_export(tmp_path: Path, capsys) -> None:
    ckpt = make_checkpoint(tmp_path / "ck", bits=4, group_size=32)
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--format", "gptq"]) == 0
    assert f"as gptq: {tmp_path / 'out'}" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "imported from gptq" in text and "14 x int-packed W4 g32 asym" in text
    assert main(["eval", str(tmp_path / "out"), "--windows", "2", "--seq-len", "16",
                 "--corpus", str(_corpus(tmp_path))]) == 0
    exported = capsys.readouterr().out
    assert main(["eval", str(ckpt), "--windows", "2", "--seq-len", "16",
                 "--corpus", str(_corpus(tmp_path))]) == 0
    assert capsys.readouterr().out == exported  # the same perplexity, to every printed digit


def _corpus(tmp_path: Path) -> Path:
    from qcore.testing.models import TINY_CORPUS

    path = tmp_path / "corpus.txt"
    path.write_text(TINY_CORPUS)
    return path


# --------------------------------------------------------- verified by the other side


CASES = {
    "rtn W4 g32 asym": ("rtn", {}, dict(bits=4, group_size=32)),
    "rtn W4 g32 sym": ("rtn", {}, dict(bits=4, group_size=32, symmetric=True)),
    "rtn W8 per-channel sym": ("rtn", {}, dict(bits=8, group_size=-1, symmetric=True)),
    "gptq W4 g32 asym static act-order": (
        "gptq", {"gptq": {"act_order": True, "static_groups": True}}, dict(bits=4, group_size=32)),
    "gptq W3 g32 sym static act-order": (
        "gptq", {"gptq": {"act_order": True, "static_groups": True}},
        dict(bits=3, group_size=32, symmetric=True)),
    "gptq W4 g32 sym, no act-order": ("gptq", {"gptq": {"act_order": False}},
                                      dict(bits=4, group_size=32, symmetric=True)),
    "rtn W8A8 per-channel sym, dynamic per-token activations": (
        "rtn", {}, dict(bits=8, group_size=-1, symmetric=True, act_bits=8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_reads_the_compressed_tensors_export_with_qcores_weights(
        tmp_path: Path, case: str) -> None:
    pipeline, options, scheme = CASES[case]
    ckpt = make_checkpoint(tmp_path / "ck", pipeline, options=options, **scheme)
    out = export(ckpt, tmp_path / "out", "compressed-tensors")
    ours = qcore.load(ckpt)
    ids = ids_for_eval()
    theirs = read_with_transformers(out, ids, tmp_path)
    assert theirs["qcore_modules"] == []  # the reading process never imported qcore
    for key, weight in dense_weights(ours).items():
        assert torch.equal(theirs["weights"][key], weight), key  # bit for bit
    if scheme.get("act_bits"):
        # transformers' decompressed model runs float activations; the engines that serve
        # int-quantized checkpoints (vLLM) quantize them as the config says.
        group = json.loads((out / "config.json").read_text())["quantization_config"][
            "config_groups"]["group_0"]
        assert group["input_activations"]["dynamic"] is True
        assert group["input_activations"]["strategy"] == "token"
        assert group["input_activations"]["num_bits"] == 8
        return
    torch.testing.assert_close(theirs["logits"], logits(ours, ids), rtol=0, atol=1e-5)


#: The most each format expresses: act-order with g_idx in gptq, static act-order (no
#: g_idx) in compressed-tensors 0.20, none in awq.
ACT_ORDER = {"gptq": {"act_order": True}, "compressed-tensors": {"static_groups": True},
             "awq": {"act_order": False}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_back_into_qcore_unchanged(tmp_path: Path, fmt: str) -> None:
    options = {"gptq": ACT_ORDER[fmt]}
    ckpt = make_checkpoint(tmp_path / "ck", "gptq", options=options, bits=4, group_size=32)
    out = export(ckpt, tmp_path / "out", fmt)
    ours, back = qcore.load(ckpt), qcore.load(out)
    want, got = dense_weights(ours), dense_weights(back)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    ids = ids_for_eval()
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), rtol=0, atol=0)


# ------------------------------------------------------------------ import of theirs


def compressed_tensors_checkpoint(folder: Path, symmetric: bool) -> Path:
    """A tiny Llama quantized and saved by compressed-tensors' own code (W4, group 32):
    its quantization lifecycle calibrates min-max weight ranges, its ModelCompressor
    packs them, transformers saves the directory."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )

    model = tiny_causal_lm("llama", layers=2, hidden=64, intermediate=128, seed=3)
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
               "group_size": 32}
    config = QuantizationConfig.model_validate({
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head"], "quantization_status": "frozen",
        "format": "pack-quantized"})
    apply_quantization_config(model, config)
    _calibrate_weights(model)
    for module in model.modules():
        if hasattr(module, "quantization_status"):
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _calibrate_weights(model: torch.nn.Module) -> None:
    """Min-max weight scales and zero points of each group, as compressed-tensors'
    ``calculate_qparams`` computes them."""
    from compressed_tensors.quantization.utils import calculate_qparams

    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        out_f, in_f = module.weight.shape
        w = module.weight.detach().reshape(out_f, in_f // args.group_size, args.group_size)
        mins, maxs = w.amin(2), w.amax(2)
        scale, zero = calculate_qparams(mins, maxs, args)
        module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
        module.weight_zero_point.data.copy_(zero.to(module.weight_zero_point.dtype))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_a_checkpoint_compressed_tensors_wrote_runs_on_qcores_kernels(
        tmp_path: Path, symmetric: bool) -> None:
    folder = compressed_tensors_checkpoint(tmp_path / "ct", symmetric)
    ids = ids_for_eval()
    theirs = read_with_transformers(folder, ids, tmp_path)
    model = qcore.load(folder)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for key, weight in dense_weights(model).items():
        assert torch.equal(weight, theirs["weights"][key]), key
    for layer in layers.values():  # before the first forward: no provider chosen yet
        layer.kernel = "torch"
    torch.testing.assert_close(logits(model, ids), theirs["logits"], rtol=0, atol=1e-5)
    assert {m.provider_name for m in layers.values()} == {"torch"}


# ------------------------------------------------------------------------- bad input


def test_an_unknown_format_is_refused_before_writing(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck", bits=4, group_size=32)
    with pytest.raises(CheckpointError, match="unknown export format 'gguf'; installed formats: "
                       "awq, compressed-tensors, gptq"):
        export(ckpt, tmp_path / "out", "gguf")
    assert nothing_written(tmp_path / "out")


def test_an_existing_out_is_kept_without_overwrite(tmp_path: Path, capsys) -> None:
    ckpt = make_checkpoint(tmp_path / "ck", bits=4, group_size=32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(ckpt), str(out), "--format", "gptq"]) == 2
    assert "already exists; choose another OUT or pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export(ckpt, out, "gptq", overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_a_checkpoint_a_format_cannot_express_names_the_formats_that_can(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck", "gptq", options={"gptq": {"act_order": True}},
                           bits=4, group_size=32)
    with pytest.raises(CheckpointError) as info:
        export(ckpt, tmp_path / "out", "awq")
    message = str(info.value)
    assert "cannot be written as awq: model.layers.0." in message
    assert message.endswith("Formats that can express it: gptq")
    # compressed-tensors 0.20 stores no g_idx: static act-order is what it expresses.
    with pytest.raises(CheckpointError, match="cannot be written as compressed-tensors: "
                       "model.layers.0.* act-order .*Formats that can express it: gptq$"):
        export(ckpt, tmp_path / "out", "compressed-tensors")
    assert nothing_written(tmp_path / "out")


def test_a_non_integer_checkpoint_is_refused(tmp_path: Path, qcore_register_plugin) -> None:
    import qcore_plugin_interop.hooks
    from qcore.testing import ToyVQQuantizer, make_plugin

    qcore_register_plugin(qcore_plugin_interop.hooks, "interop")
    qcore_register_plugin(make_plugin("toyvq", quantizers=[ToyVQQuantizer]))
    ckpt = make_checkpoint(tmp_path / "ck", "toy-vq", bits=2, group_size=-1)
    for fmt in FORMATS:
        with pytest.raises(CheckpointError, match=f"cannot be written as {fmt}: .*No installed "
                           "format can express it; it stays a qcore checkpoint"):
            export(ckpt, tmp_path / "out", fmt)
    assert nothing_written(tmp_path / "out")


def test_a_float_model_is_not_a_checkpoint_to_export(tmp_path: Path) -> None:
    tiny_causal_lm("llama").save_pretrained(tmp_path / "float")
    with pytest.raises(CheckpointError, match="is not a quantized checkpoint .* it is a float "
                       "model; quantize it with `qcore quantize` first"):
        export(tmp_path / "float", tmp_path / "out", "gptq")
    assert nothing_written(tmp_path / "out")


def test_a_config_the_importer_cannot_read_names_the_field(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck", bits=4, group_size=32)
    out = export(ckpt, tmp_path / "out", "compressed-tensors")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="strategy = 'tensor'"):
        qcore.load(out)


def test_a_quant_method_no_format_reads_is_named(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck", bits=4, group_size=32)
    out = export(ckpt, tmp_path / "out", "gptq")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "bitsandbytes"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method 'bitsandbytes', which no installed "
                       "checkpoint format reads"):
        qcore.load(out)
