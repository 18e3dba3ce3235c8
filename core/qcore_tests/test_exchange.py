"""The core's side of other formats (qcore.exchange) without any format installed: what
to install is named, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qcore
from qcore.checkpoint import save
from qcore.errors import CheckpointError
from qcore.exchange import export, write_safetensors
from qcore.testing.models import tiny_causal_lm, tiny_tokenizer


@pytest.fixture
def checkpoint(tmp_path: Path, qcore_plugin_manager) -> Path:
    model = tiny_causal_lm("llama", layers=1)
    qcore.quantize(model, "rtn", None, progress=False)
    return save(model, tmp_path / "ck", tiny_tokenizer())


def test_export_without_a_format_installed_names_the_distribution(checkpoint: Path) -> None:
    out = checkpoint.parent / "out"
    with pytest.raises(CheckpointError, match="unknown export format 'gptq'; installed formats: "
                       "none. 'gptq' is provided by qcore-plugin-interop: pip install "
                       "qcore-plugin-interop"):
        export(checkpoint, out, "gptq")
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["ck"]


def test_a_foreign_checkpoint_without_its_reader_names_the_distribution(
        checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "x"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method 'compressed-tensors', which no "
                       "installed checkpoint format reads: .* pip install qcore-plugin-interop"):
        qcore.load(checkpoint)


def test_export_into_the_checkpoint_itself_is_refused(checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="already exists"):
        export(checkpoint, checkpoint, "gptq")
    with pytest.raises(CheckpointError, match="OUT is the checkpoint itself"):
        export(checkpoint, checkpoint, "gptq", overwrite=True)
    assert (checkpoint / "model.safetensors").is_file()


def test_large_exports_are_sharded_with_the_index_transformers_reads(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {f"layer{i}.weight": torch.full((64, 64), float(i)) for i in range(5)}
    names = write_safetensors(tensors, tmp_path, shard_bytes=3 * 64 * 64 * 4)
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    assert set(index["weight_map"]) == set(tensors)
    for key, file in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / file))[key], tensors[key])
