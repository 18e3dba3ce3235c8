"""The `qcore` command on a tiny model directory: quantize, eval, inspect, plugins, and
bad input that must fail clearly without writing anything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qcore.cli import EXIT_ERROR, EXIT_INTERRUPTED, main


def _quantize_args(model_dir, out, *extra):
    return ["quantize", str(model_dir), "--calib", str(model_dir.parent / "calib.txt"),
            "--samples", "4", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
            "--out", str(out), *extra]


def test_quantize_eval_inspect_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(_quantize_args(tiny_model_dir, out, "--bits", "3", "--group-size", "48", "--sym",
                               "--eval", "--corpus", str(tmp_path / "calib.txt"),
                               "--eval-windows", "4")) == 0
    printed = capsys.readouterr().out
    before = float(printed.split("perplexity before: ")[1].split()[0])
    after = float(printed.split("perplexity after: ")[1].split()[0])
    assert before > 1 and after > 1 and before != after
    assert f"checkpoint: {out}" in printed
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    assert main(["eval", str(out), "--corpus", str(tmp_path / "calib.txt"), "--windows", "4",
                 "--seq-len", "32", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["perplexity"] == pytest.approx(after, rel=1e-3)

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_quantized"] == 14
    assert info["pipeline_short"] == "rtn"
    assert info["formats"] == {"int-packed W3 g48 sym": 14}
    # 3-bit codes + one fp16 scale per group of 48 (the last group of a row is shorter),
    # no zero points when symmetric; (out, in) of q, k, v, o, gate, up, down per block
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]
    bits = sum(3 * o * i + 16 * o * -(-i // 48) for o, i in shapes)
    assert info["bits_per_weight"] == pytest.approx(bits / sum(o * i for o, i in shapes))
    assert info["size_bytes"] < info["fp16_bytes"] * 2  # embeddings stay fp32 in this tiny model
    layer = info["layers"]["model.layers.0.self_attn.q_proj"]
    assert (layer["kernel"], layer["kernel_cpu"], layer["kernel_cuda"]) == ("auto", "torch", "torch")


def test_plugins_json_lists_builtins_quickly_without_torch():
    code = ("import sys, time; t = time.perf_counter(); from qcore.cli import main; "
            "main(['plugins', '--json']); "
            "assert 'torch' not in sys.modules, 'qcore plugins imported torch'; "
            "print(time.perf_counter() - t, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout)
    assert report["qcore"] == {"version": "0.1.0", "contract": "1.4"}  # the contract's version
    builtin = next(p for p in report["plugins"] if p["name"] == "builtin")
    assert builtin["distribution"] == "qcore"
    assert builtin["components"] == {"observer": ["minmax", "hessian"], "quantizer": ["rtn"],
                                     "packer": ["int", "vq"],
                                     "kernel": ["torch", "torch-lut"]}


def test_plugins_requirements_prints_pins(capsys):
    assert main(["plugins", "--requirements"]) == 0
    assert "qcore==0.1.0" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("flags, message", [
    (["--bits", "9"], "supports bits"),
    (["--bits", "0"], "bits=0 is out of range"),
    (["--group-size", "0"], "group_size=0 is invalid"),
    (["--pipeline", "gptq"], "pip install qcore-plugin-gptq"),
    (["--pipeline", "rtn", "--set", "rtn.scale_dtype=int4"], "expects one of"),
    (["--pipeline", "rtn", "--set", "rtn.shrink=2"], "valid options: scale_dtype"),
    (["--samples", "0"], "--samples must be at least 1"),
])
def test_bad_options_fail_before_loading_and_write_nothing(qcore_plugin_manager, tiny_model_dir, tmp_path,
                                                          capsys, flags, message):
    # qcore_plugin_manager: built-ins only, whatever else is installed here
    out = tmp_path / "ck"
    assert main(_quantize_args(tiny_model_dir, out, *flags)) == EXIT_ERROR
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_refused_unless_overwrite(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(_quantize_args(tiny_model_dir, out)) == EXIT_ERROR
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(_quantize_args(tiny_model_dir, out, "--overwrite")) == 0
    assert not (out / "precious.txt").exists()


@pytest.mark.parametrize("content, message", [("", "empty"), ("too short", "one window needs 32")])
def test_calibration_text_empty_or_shorter_than_a_window(tiny_model_dir, tmp_path, capsys, content, message):
    calib = tmp_path / "short.txt"
    calib.write_text(content)
    out = tmp_path / "ck"
    args = _quantize_args(tiny_model_dir, out)
    args[args.index("--calib") + 1] = str(calib)
    assert main(args) == EXIT_ERROR
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_model_directory_without_weights(tmp_path, capsys):
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    (tmp_path / "calib.txt").write_text("x")
    assert main(_quantize_args(empty, tmp_path / "ck")) == EXIT_ERROR
    assert "safetensors" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_ctrl_c_during_quantization_leaves_no_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import qcore.calibration

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qcore.calibration, "quantize_block_weights", interrupt)
    out = tmp_path / "ck"
    assert main(_quantize_args(tiny_model_dir, out)) == EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "tiny-llama"]


def test_recipe_file(tiny_model_dir, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[scheme]\nbits = 2\ngroup_size = 16\n\n[quantizer]\nname = "rtn"\n'
                      'options = { scale_dtype = "float32" }\n')
    out = tmp_path / "ck"
    assert main(_quantize_args(tiny_model_dir, out, "--recipe", str(recipe))) == 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["pipeline"]["scheme"]["bits"] == 2
    assert qconfig["pipeline"]["quantizer"]["options"] == {"scale_dtype": "float32"}
    from qcore.checkpoint import load

    layer = load(out).model.layers[0].self_attn.q_proj
    assert layer.scales.dtype == torch.float32 and layer.params["group_size"] == 16
