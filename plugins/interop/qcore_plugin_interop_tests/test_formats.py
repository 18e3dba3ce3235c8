"""The three converters layer by layer: compressed-tensors' own code decompresses the
compressed-tensors export to qcore's dense weight bit for bit; GPTQ and AWQ exports match
readers written here from the documented layouts (and compressed-tensors' AutoAWQ
converter); every export imports back unchanged; what a format cannot hold is refused
naming the layer, and what an importer cannot read names the field."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
import torch

from qcore.builtin.int_packer import IntPacker
from qcore.errors import CheckpointError
from qcore.grid import dequantize_int
from qcore.interfaces import QuantizedWeight
from qcore.testing import random_int_weight
from qcore_plugin_interop import hooks
from qcore_plugin_interop.awq import AWQFormat
from qcore_plugin_interop.compressed_tensors import CompressedTensorsFormat
from qcore_plugin_interop.gptq import GPTQFormat

CT, GPTQ, AWQ = CompressedTensorsFormat(), GPTQFormat(), AWQFormat()


# ------------------------------------------------------------------------------ helpers


def record(qweight: QuantizedWeight, **extra: Any) -> dict[str, Any]:
    """The layer record a qcore checkpoint stores for ``qweight`` (int-packed layout), with
    the ``format`` the core adds."""
    packed = IntPacker().pack(qweight)
    return {"layout": packed.layout, "op": "linear", "shape": list(packed.shape),
            "params": dict(packed.params),
            "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                        for k, v in packed.tensors.items()},
            "bias": False, "lowrank": False, "kernel": "auto", "format": "int", **extra}


def export(fmt: Any, weights: dict[str, QuantizedWeight],
           ignore: tuple[str, ...] = ("lm_head",)) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(quantization_config, tensors)`` as ``qcore export`` writes them."""
    layers = {name: record(w) for name, w in weights.items()}
    assert fmt.cannot_express(layers) is None
    tensors = {f"{name}.{key}": value for name, w in weights.items()
               for key, value in fmt.export_layer(w).items()}
    return fmt.export_config(layers, list(ignore)), tensors


def assert_same_weight(got: QuantizedWeight, want: QuantizedWeight, scale_dtype=None) -> None:
    assert got.format == "int" and tuple(got.shape) == tuple(want.shape)
    assert got.params == want.params
    assert set(got.tensors) == set(want.tensors)
    for key, value in want.tensors.items():
        if key == "scales" and scale_dtype is not None:
            assert got.tensors[key].dtype == scale_dtype
            value = value.to(scale_dtype)
        assert got.tensors[key].dtype == value.dtype, key
        assert torch.equal(got.tensors[key], value), key


def without_zero_zeros(qweight: QuantizedWeight) -> QuantizedWeight:
    """GPTQ version 1 stores zero points minus one: keep them at 1 or more."""
    if "zeros" in qweight.tensors:
        qweight.tensors["zeros"].clamp_(min=1)
    return qweight


def stream_values(words: list[int], bits: int, count: int) -> list[int]:
    """The ``count`` values of one little-endian bit stream held in 32-bit words."""
    stream = 0
    for k, word in enumerate(words):
        stream |= (word & 0xFFFFFFFF) << (32 * k)
    return [(stream >> (bits * i)) & ((1 << bits) - 1) for i in range(count)]


# --------------------------------------------------------------------- the plugin itself


def test_hooks_register_the_three_formats_without_importing_torch(qcore_register_plugin) -> None:
    registry = qcore_register_plugin(hooks, "interop").checked_registry()
    assert set(registry.names("checkpoint_format")) == {"awq", "compressed-tensors", "gptq"}
    assert {n: registry.get("checkpoint_format", n).cls.quant_methods
            for n in ("awq", "compressed-tensors", "gptq")} == {
        "awq": {"awq"}, "compressed-tensors": {"compressed-tensors"}, "gptq": {"gptq"}}
    code = ("import sys, qcore_plugin_interop.hooks; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -------------------------------------------------------------------- compressed-tensors


def _ct_decompress(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                   module: str) -> torch.Tensor:
    """compressed-tensors' own decompression of one module's exported tensors."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(config)
    scheme = next(s for s in parsed.config_groups.values()
                  if module in s.targets or s.targets == ["Linear"])
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    local = {k.removeprefix(f"{module}."): v for k, v in tensors.items()
             if k.startswith(f"{module}.")}
    return compressor.decompress(local, scheme)["weight"]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [16, -1], ids=["g16", "per-channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_tensors_decompresses_the_export_to_qcores_weight(
        bits: int, group_size: int, symmetric: bool) -> None:
    pytest.importorskip("compressed_tensors")
    # 48 x 80: neither dimension a multiple of 32, so packed streams end mid-word.
    qweight = random_int_weight(48, 80, bits, group_size, symmetric, seed=bits)
    config, tensors = export(CT, {"layer": qweight})
    assert config["format"] == "pack-quantized"
    assert tensors["layer.weight_packed"].shape == (48, -(-80 * bits // 32))
    assert tensors["layer.weight_scale"].dtype == torch.float32
    if not symmetric:
        assert tensors["layer.weight_zero_point"].shape == (-(-48 * bits // 32),
                                                            qweight.tensors["scales"].shape[1])
    weight = _ct_decompress(config, tensors, "layer")
    assert weight.dtype == torch.float32
    assert torch.equal(weight, dequantize_int(qweight))  # bit for bit


def test_compressed_tensors_unpacks_qcore_codes_as_its_signed_levels() -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    qweight = random_int_weight(40, 96, 3, 32, False, seed=9)
    out = CT.export_layer(qweight)
    levels = unpack_from_int32(out["weight_packed"], 3, torch.Size([40, 96]))
    assert torch.equal(levels.to(torch.int16), qweight.tensors["codes"].to(torch.int16) - 4)
    zp = unpack_from_int32(out["weight_zero_point"], 3, torch.Size([40, 3]), packed_dim=0)
    assert torch.equal(zp.to(torch.int16), qweight.tensors["zeros"].to(torch.int16) - 4)


def test_compressed_tensors_keeps_bfloat16_scales_exact() -> None:
    pytest.importorskip("compressed_tensors")
    qweight = random_int_weight(32, 64, 4, 32, False, scale_dtype=torch.bfloat16, seed=4)
    config, tensors = export(CT, {"layer": qweight})
    assert torch.equal(_ct_decompress(config, tensors, "layer"), dequantize_int(qweight))


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_compressed_tensors_w8a8_is_int_quantized(dynamic: bool) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    qweight = random_int_weight(32, 64, 8, -1, True, act_bits=8,
                                static_input_scale=not dynamic, seed=2)
    config, tensors = export(CT, {"layer": qweight})
    assert config["format"] == "int-quantized"
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    acts = scheme.input_activations
    assert (acts.num_bits, acts.type, acts.symmetric) == (8, "int", True)
    assert (acts.strategy, acts.dynamic) == (("token", True) if dynamic else ("tensor", False))
    assert tensors["layer.weight"].dtype == torch.int8
    assert ("layer.input_scale" in tensors) == (not dynamic)
    if not dynamic:
        assert tensors["layer.input_scale"].dtype == torch.float32
        assert tensors["layer.input_scale"].item() == qweight.tensors["input_scale"].item()
    assert torch.equal(_ct_decompress(config, tensors, "layer"), dequantize_int(qweight))
    back = CT.import_layers(config, dict(tensors))["layer"]
    assert_same_weight(back, qweight, scale_dtype=torch.float32)


def test_compressed_tensors_gives_each_scheme_a_group_naming_its_modules() -> None:
    pytest.importorskip("compressed_tensors")
    weights = {
        "model.layers.0.mlp.up_proj": random_int_weight(64, 32, 4, 16, False, seed=1),
        "model.layers.0.mlp.down_proj": random_int_weight(32, 64, 8, -1, True, act_bits=8,
                                                          seed=2),
        "model.layers.1.mlp.up_proj": random_int_weight(64, 32, 4, 16, False, seed=3),
    }
    config, tensors = export(CT, weights)
    assert config["format"] == "mixed-precision"
    groups = config["config_groups"]
    assert [g["targets"] for g in groups.values()] == [
        ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"],
        ["model.layers.0.mlp.down_proj"]]
    assert [g["format"] for g in groups.values()] == ["pack-quantized", "int-quantized"]
    # The groups are compressed-tensors' own serialisation of its pydantic schemes.
    from compressed_tensors.quantization import QuantizationScheme

    for group in groups.values():
        assert QuantizationScheme.model_validate(group).model_dump() == group
    for name, qweight in weights.items():
        assert torch.equal(_ct_decompress(config, tensors, name), dequantize_int(qweight))
    back = CT.import_layers(config, tensors)
    for name, qweight in weights.items():
        assert_same_weight(back[name], qweight, scale_dtype=torch.float32)
    assert tensors == {}


@pytest.mark.parametrize("case", [
    dict(bits=4, group_size=32), dict(bits=3, group_size=16, symmetric=True),
    dict(bits=8, group_size=-1), dict(bits=1, group_size=32)])
def test_compressed_tensors_round_trip(case: dict[str, Any]) -> None:
    qweight = random_int_weight(40, 64, seed=5, **case)
    config, tensors = export(CT, {"layer": qweight})
    tensors.update({"layer.bias": torch.zeros(40), "other.weight": torch.ones(2, 2)})
    back = CT.import_layers(config, tensors)
    assert_same_weight(back["layer"], qweight, scale_dtype=torch.float32)
    assert set(tensors) == {"layer.bias", "other.weight"}  # consumed tensors are popped


def _legacy_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' packing before 0.18: ``32 // bits`` values per word, none
    straddling, along dim 1."""
    per = 32 // bits
    rows = []
    for row in values.tolist():
        words = [0] * -(-len(row) // per)
        for j, v in enumerate(row):
            words[j // per] |= v << (bits * (j % per))
        rows.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return torch.tensor(rows, dtype=torch.int32)


def test_compressed_tensors_reads_older_releases() -> None:
    """The packing before 0.18 (3 bits: 10 to a word), unpacked int8 zero points, and an
    act-order ``weight_g_idx`` under ``actorder: "group"``."""
    qweight = random_int_weight(24, 64, 3, 16, False, act_order=True, seed=6)
    t = qweight.tensors
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "quantization_status": "compressed", "version": "0.17.1", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                  "num_bits": 3, "type": "int", "symmetric": False, "strategy": "group",
                  "group_size": 16, "actorder": "group", "dynamic": False}}}}
    tensors = {"m.weight_packed": _legacy_pack(t["codes"], 3),
               "m.weight_scale": t["scales"],
               "m.weight_zero_point": (t["zeros"].to(torch.int16) - 4).to(torch.int8),
               "m.weight_shape": torch.tensor([24, 64]),
               "m.weight_g_idx": t["g_idx"]}
    assert tensors["m.weight_packed"].shape == (24, 7)  # a dense stream would take 6 words
    assert_same_weight(CT.import_layers(config, tensors)["m"], qweight)


def test_compressed_tensors_refuses_what_it_cannot_hold() -> None:
    w4 = random_int_weight(32, 64, 4, 32, seed=1)
    assert CT.cannot_express({"a": record(w4)}) is None
    cases = {
        "act-order (g_idx) is not expressible: compressed-tensors 0.20 removed act-order groups":
            random_int_weight(32, 64, 4, 32, act_order=True, seed=1),
        "group size 48 does not divide in_features 64": random_int_weight(32, 64, 4, 48),
        "4-bit activations": random_int_weight(32, 64, 8, -1, True, act_bits=4),
        "activations quantized in groups or on an asymmetric grid": random_int_weight(
            32, 64, 8, -1, True, act_bits=8, act_group_size=32),
        "symmetric per-token or per-tensor int8": random_int_weight(
            32, 64, 8, -1, True, act_bits=8, act_symmetric=False),
    }
    for reason, qweight in cases.items():
        layers = {"a": record(w4), "model.layers.0.mlp.up_proj": record(qweight)}
        message = CT.cannot_express(layers)
        assert message.startswith("model.layers.0.mlp.up_proj: W"), message
        assert reason in message, message
        with pytest.raises(CheckpointError, match=re.escape(reason)):
            CT.export_layer(qweight)
    vq = {**record(w4), "format": "vq", "layout": "vq-packed"}
    assert CT.cannot_express({"lm_head": vq}) == (
        "lm_head: a 'vq' weight (layout 'vq-packed'): the compressed-tensors format stores "
        "integer grids (qcore's 'int' format)")
    assert CT.cannot_express({"x": record(w4, lowrank=True)}) == (
        "x: W4 g32 asym with a low-rank branch: the compressed-tensors format has none")


def _ct_config(**weights: Any) -> dict[str, Any]:
    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": 32, "dynamic": False, **weights}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args}}}


@pytest.mark.parametrize(("change", "message"), [
    (dict(strategy="tensor"), "compressed-tensors config_groups.group_0.weights.strategy = "
     "'tensor' is not supported: qcore reads 'group' and 'channel'"),
    (dict(type="float"), "weights.type = 'float' is not supported"),
    (dict(num_bits=16), "weights.num_bits = 16 is not supported: qcore reads 1 to 8"),
    (dict(strategy="block", block_structure=[128, 128]), "weights.strategy = 'block'"),
])
def test_compressed_tensors_import_names_the_field_it_cannot_read(change, message) -> None:
    _, tensors = export(CT, {"layer": random_int_weight(32, 64, 4, 32, True)})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        CT.import_layers(_ct_config(**change), tensors)


def test_compressed_tensors_import_errors_on_config_and_tensors() -> None:
    _, tensors = export(CT, {"layer": random_int_weight(32, 64, 4, 32, True)})
    for change, message in [
            ({"format": "float-quantized"}, "compressed-tensors format = 'float-quantized' is "
             "not supported"),
            ({"kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme = "),
            ({"quantization_status": "frozen"}, "quantization_status = 'frozen'")]:
        with pytest.raises(CheckpointError, match=message):
            CT.import_layers({**_ct_config(), **change}, dict(tensors))
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
            "dynamic": True}
    config = _ct_config()
    config["config_groups"]["group_0"]["input_activations"] = acts
    with pytest.raises(CheckpointError, match="input_activations.dynamic = True with"):
        CT.import_layers(config, dict(tensors))
    missing = {k: v for k, v in tensors.items() if not k.endswith("weight_shape")}
    with pytest.raises(CheckpointError, match="tensor 'layer.weight_shape' is missing"):
        CT.import_layers(_ct_config(), missing)
    config = _ct_config()
    config["config_groups"]["group_0"]["targets"] = ["re:.*mlp.*"]
    with pytest.raises(CheckpointError, match="layer has quantized tensors but no config group"):
        CT.import_layers(config, dict(tensors))


# ------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("act_order", [False, True], ids=["", "act-order"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_layout_matches_a_reader_of_the_documented_layout(
        bits: int, symmetric: bool, act_order: bool) -> None:
    qweight = without_zero_zeros(random_int_weight(64, 96, bits, 32, symmetric,
                                                   act_order=act_order, seed=bits))
    out = GPTQ.export_layer(qweight)
    t = qweight.tensors
    assert out["qweight"].shape == (96 * bits // 32, 64) and out["qweight"].dtype == torch.int32
    assert out["qzeros"].shape == (3, 64 * bits // 32) and out["qzeros"].dtype == torch.int32
    assert out["scales"].dtype == torch.float16 and torch.equal(out["scales"], t["scales"].t())
    # qweight: each output column is a bit stream of its input codes.
    codes = [stream_values(col, bits, 96) for col in out["qweight"].t().tolist()]
    assert codes == t["codes"].tolist()
    # qzeros: each group's row is a bit stream of its zero points minus 1 (version 1).
    zeros = [[z + 1 for z in stream_values(row, bits, 64)] for row in out["qzeros"].tolist()]
    want = t["zeros"].t().tolist() if not symmetric else [[1 << (bits - 1)] * 64] * 3
    assert zeros == want
    g_idx = t["g_idx"] if act_order else torch.arange(96, dtype=torch.int32) // 32
    assert out["g_idx"].dtype == torch.int32 and torch.equal(out["g_idx"], g_idx)
    # The dense weight GPTQ defines: scales[g_idx] * (qweight - zeros[g_idx]).
    gi = out["g_idx"].long()
    dense = (out["scales"].float()[gi] * (torch.tensor(codes).t().float()
                                          - torch.tensor(zeros).float()[gi])).t()
    assert torch.equal(dense, dequantize_int(qweight))


def test_gptq_3_bit_codes_straddle_words_at_10_and_21() -> None:
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b101
    codes[0, 21] = 0b011
    qweight = QuantizedWeight("int", (32, 32), {"codes": codes.repeat(32, 1),
                                               "scales": torch.ones(32, 1, dtype=torch.float16)},
                              {"bits": 3, "group_size": -1, "symmetric": True, "act_bits": None,
                               "act_dynamic": True})
    words = GPTQ.export_layer(qweight)["qweight"][:, 0].tolist()
    assert [w & 0xFFFFFFFF for w in words] == [0b01 << 30, (0b1 << 0) | (0b1 << 31), 0b1]


@pytest.mark.parametrize("case", [
    dict(bits=4, group_size=32), dict(bits=3, group_size=-1, symmetric=True),
    dict(bits=2, group_size=48, act_order=True), dict(bits=8, group_size=64)])
def test_gptq_round_trip(case: dict[str, Any]) -> None:
    qweight = without_zero_zeros(random_int_weight(32, 128, seed=7, **case))
    config, tensors = export(GPTQ, {"m": qweight})
    tensors["m.bias"] = torch.zeros(32)
    assert_same_weight(GPTQ.import_layers(config, tensors)["m"], qweight)
    assert set(tensors) == {"m.bias"}


def test_gptq_reads_a_checkpoint_without_g_idx() -> None:
    qweight = without_zero_zeros(random_int_weight(32, 96, 3, 32, seed=8))
    config, tensors = export(GPTQ, {"m": qweight})
    del tensors["m.g_idx"]
    assert_same_weight(GPTQ.import_layers(config, tensors)["m"], qweight)


def test_gptq_stores_a_zero_point_of_0_raised_by_one() -> None:
    qweight = without_zero_zeros(random_int_weight(32, 64, 4, 32, seed=3))
    t = qweight.tensors
    t["zeros"][0, 1] = 0
    t["codes"][0, 32:] = t["codes"][0, 32:].clamp(max=14)
    config, tensors = export(GPTQ, {"m": qweight})
    back = GPTQ.import_layers(config, tensors)["m"]
    assert back.tensors["zeros"][0, 1] == 1
    assert torch.equal(back.tensors["codes"][0, 32:], t["codes"][0, 32:] + 1)
    assert torch.equal(dequantize_int(back), dequantize_int(qweight))
    t["codes"][0, 40] = 15  # now the group has no room
    with pytest.raises(CheckpointError, match="row 0, group 1 has zero point 0 and a code of "
                       "15: the gptq format .version 1. stores zero points minus 1"):
        GPTQ.export_layer(qweight)


def test_gptq_config() -> None:
    layers = {"model.layers.0.mlp.up_proj": record(random_int_weight(64, 32, 4, 32, True)),
              "model.layers.0.mlp.down_proj": record(random_int_weight(32, 64, 4, 32, True,
                                                                       act_order=True))}
    config = GPTQ.export_config(layers, ["model.layers.1.mlp.up_proj", "lm_head"])
    assert config == {
        "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True,
        "lm_head": False, "checkpoint_format": "gptq", "pack_dtype": "int32",
        "meta": config["meta"], "dynamic": {r"-:model\.layers\.1\.mlp\.up_proj$": {}}}
    assert config["meta"]["quantizer"][0].startswith("qcore:")
    assert GPTQ.export_config(layers, ["lm_head"])["sym"] is True
    assert "dynamic" not in GPTQ.export_config(layers, ["lm_head"])


def test_gptq_refuses_what_it_cannot_hold() -> None:
    base = record(random_int_weight(32, 64, 4, 32))
    cases = [
        (random_int_weight(32, 64, 5, 64), "W5 g64 asym: the gptq format stores 2, 3, 4 or 8 bits"),
        (random_int_weight(32, 64, 8, -1, True, act_bits=8),
         "W8A8 per-channel sym: 8-bit activations: the gptq format is weight-only"),
        (random_int_weight(32, 64, 4, 32, scale_dtype=torch.bfloat16),
         "W4 g32 asym: bfloat16 scales: the gptq format stores float16 scales"),
        (random_int_weight(32, 40, 3, 8), "W3 g8 asym: in_features 40 at 3 bits does not fill "
         "whole 32-bit words"),
        (random_int_weight(20, 64, 4, 32), "W4 g32 asym: out_features 20 at 4 bits"),
    ]
    for qweight, reason in cases:
        message = GPTQ.cannot_express({"a": base, "model.layers.0.mlp.up_proj": record(qweight)})
        assert message.startswith(f"model.layers.0.mlp.up_proj: {reason}"), message
    assert GPTQ.cannot_express({"a": base, "b": record(random_int_weight(32, 64, 3, 32))}) == (
        "b: bit width 3 where a has 4: the gptq config holds one bit width for the whole "
        "model")
    assert "group size 64 where a has 32" in GPTQ.cannot_express(
        {"a": base, "b": record(random_int_weight(32, 64, 4, 64))})


def test_gptq_scales_must_convert_to_float16_exactly() -> None:
    exact = random_int_weight(32, 64, 4, 32, scale_dtype=torch.bfloat16, seed=1)
    without_zero_zeros(exact)
    assert torch.equal(GPTQ.export_layer(exact)["scales"].t().float(),
                       exact.tensors["scales"].float())
    inexact = random_int_weight(32, 64, 4, 32, scale_dtype=torch.float32, seed=1)
    with pytest.raises(CheckpointError, match="scales are float32 and do not convert to float16 "
                       "exactly: the gptq format stores float16 scales"):
        GPTQ.export_layer(without_zero_zeros(inexact))


def test_gptq_import_reads_v2_zero_points_and_dynamic_overrides() -> None:
    w4 = without_zero_zeros(random_int_weight(32, 64, 4, 32, seed=1))
    w8 = without_zero_zeros(random_int_weight(32, 64, 8, -1, seed=2))
    config, tensors = export(GPTQ, {"a": w4})
    _, more = export(GPTQ, {"b.proj": w8})
    tensors.update(more)
    config["dynamic"] = {r"+:b\..*": {"bits": 8, "group_size": -1}, r"-:c\..*": {}}
    back = GPTQ.import_layers(config, dict(tensors))
    assert_same_weight(back["a"], w4)
    assert_same_weight(back["b.proj"], w8)
    # gptq_v2 stores the zero points as they are: an export of zeros + 1 stores zeros.
    raised = {**w4.tensors, "zeros": (w4.tensors["zeros"] + 1).clamp(max=15)}
    v2 = dict(tensors)
    v2["a.qzeros"] = GPTQ.export_layer(QuantizedWeight("int", w4.shape, raised,
                                                       w4.params))["qzeros"]
    got = GPTQ.import_layers({**config, "checkpoint_format": "gptq_v2"}, v2)["a"]
    assert torch.equal(got.tensors["zeros"], raised["zeros"] - 1)


@pytest.mark.parametrize(("change", "message"), [
    ({"bits": 5}, "gptq bits = 5 is not supported: qcore reads 2, 3, 4 and 8"),
    ({"checkpoint_format": "marlin"}, "gptq checkpoint_format = 'marlin' is not supported"),
    ({"group_size": 0}, "gptq group_size = 0 is not supported"),
    ({"pack_dtype": "int16"}, "gptq pack_dtype = 'int16' is not supported"),
])
def test_gptq_import_names_the_field_it_cannot_read(change, message) -> None:
    config, tensors = export(GPTQ, {"a": random_int_weight(32, 64, 4, 32, True)})
    with pytest.raises(CheckpointError, match=message):
        GPTQ.import_layers({**config, **change}, tensors)


def test_gptq_import_names_a_missing_tensor() -> None:
    config, tensors = export(GPTQ, {"a": random_int_weight(32, 64, 4, 32, True)})
    del tensors["a.qzeros"]
    with pytest.raises(CheckpointError, match="gptq checkpoint: tensor 'a.qzeros' is missing"):
        GPTQ.import_layers(config, tensors)


# -------------------------------------------------------------------------------- AWQ

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_values(words: torch.Tensor) -> list[list[int]]:
    """``[rows, out/8]`` AWQ words -> ``[rows, out]`` values in output order: nibble ``i``
    of word ``w`` holds column ``8*w + AWQ_ORDER[i]``."""
    rows = []
    for row in words.tolist():
        values = [0] * (8 * len(row))
        for w, word in enumerate(row):
            for i in range(8):
                values[8 * w + AWQ_ORDER[i]] = ((word & 0xFFFFFFFF) >> (4 * i)) & 0xF
        rows.append(values)
    return rows


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [32, -1], ids=["g32", "per-channel"])
def test_awq_layout_matches_a_reader_of_the_documented_layout(
        group_size: int, symmetric: bool) -> None:
    qweight = random_int_weight(48, 64, 4, group_size, symmetric, seed=11)
    out = AWQ.export_layer(qweight)
    t = qweight.tensors
    groups = t["scales"].shape[1]
    assert out["qweight"].shape == (64, 6) and out["qzeros"].shape == (groups, 6)
    assert out["scales"].dtype == torch.float16 and torch.equal(out["scales"], t["scales"].t())
    assert awq_values(out["qweight"]) == t["codes"].t().tolist()
    zeros = t["zeros"].t().tolist() if not symmetric else [[8] * 48] * groups
    assert awq_values(out["qzeros"]) == zeros


def test_awq_export_is_what_compressed_tensors_awq_converter_reads() -> None:
    """compressed-tensors' own AutoAWQ GEMM converter (its unpack and reverse order) turns
    the export into its packed format, which it decompresses to qcore's dense weight."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    qweight = random_int_weight(48, 64, 4, 16, False, seed=12)
    config, tensors = export(AWQ, {"layer": qweight})
    converter = AutoAWQConverter.from_autoawq_config(config)
    converted = converter.process(dict(tensors))
    scheme = converter.update_config(None).config_groups["config_group_0"]
    local = {k.removeprefix("layer."): v for k, v in converted.items()}
    weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    # Its dequantization runs in the scales' float16, as AWQ's own kernels do.
    assert torch.equal(weight, dequantize_int(qweight, torch.float16))


@pytest.mark.parametrize("case", [dict(group_size=32), dict(group_size=-1, symmetric=True),
                                  dict(group_size=64, symmetric=True)])
def test_awq_round_trip(case: dict[str, Any]) -> None:
    qweight = random_int_weight(40, 128, 4, seed=13, **case)
    config, tensors = export(AWQ, {"m": qweight})
    assert config == {"quant_method": "awq", "version": "gemm", "bits": 4,
                      "group_size": case["group_size"], "zero_point": True,
                      "modules_to_not_convert": ["lm_head"]}
    tensors["m.bias"] = torch.zeros(40)
    assert_same_weight(AWQ.import_layers(config, tensors)["m"], qweight)
    assert set(tensors) == {"m.bias"}


def test_awq_refuses_what_it_cannot_hold() -> None:
    base = record(random_int_weight(32, 64, 4, 32))
    cases = [
        (random_int_weight(32, 64, 3, 32), "W3 g32 asym: the awq format (GEMM) stores 4 bits"),
        (random_int_weight(32, 64, 4, 32, act_order=True),
         "W4 g32 asym act-order: act-order (g_idx): the awq format has no g_idx"),
        (random_int_weight(20, 64, 4, 32), "W4 g32 asym: out_features 20 is not a multiple of 8"),
        (random_int_weight(32, 80, 4, 32), "W4 g32 asym: group size 32 does not divide "
         "in_features 80"),
        (random_int_weight(32, 64, 4, 32, act_bits=8), "W4A8 g32 asym: 8-bit activations"),
        (random_int_weight(32, 64, 4, 32, scale_dtype=torch.float32),
         "W4 g32 asym: float32 scales: the awq format stores float16 scales"),
    ]
    for qweight, reason in cases:
        message = AWQ.cannot_express({"a": base, "model.layers.0.mlp.up_proj": record(qweight)})
        assert message.startswith(f"model.layers.0.mlp.up_proj: {reason}"), message
    assert AWQ.cannot_express({"a": base, "b": record(random_int_weight(32, 64, 4, -1))}) == (
        "b: group size -1 where a has 32: the awq config holds one group size for the whole "
        "model")


@pytest.mark.parametrize(("change", "message"), [
    ({"version": "gemv"}, "awq version = 'gemv' is not supported: qcore reads 'gemm'"),
    ({"bits": 8}, "awq bits = 8 is not supported: qcore reads 4"),
    ({"zero_point": False}, "awq zero_point = False is not supported"),
])
def test_awq_import_names_the_field_it_cannot_read(change, message) -> None:
    config, tensors = export(AWQ, {"a": random_int_weight(32, 64, 4, 32)})
    with pytest.raises(CheckpointError, match=message):
        AWQ.import_layers({**config, **change}, tensors)
