"""The embedded SmolLM2-135M quantized by RTN, GPTQ and AWQ and exported as
compressed-tensors: transformers, in a process that never imports qcore, decompresses it
with compressed-tensors' own code to exactly qcore's weights and gives qcore's perplexity
to 3 decimals. Bounded: 16 x 128 calibration tokens, 4 x 256 eval tokens."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import qcore
from qcore.checkpoint import save
from qcore.eval import perplexity
from qcore.exchange import export
from qcore.pipeline import Pipeline
from qcore.scheme import Scheme
from qcore_plugin_interop_tests._reference import read_with_transformers
from qcore_plugin_interop_tests.test_export import dense_weights

pytestmark = [pytest.mark.embedded, pytest.mark.slow]

#: name -> (pipeline, options, scheme): symmetric and asymmetric, with act-order and
#: without, from each quantizer that makes the int format. Act-order is GPTQ's static
#: kind: compressed-tensors 0.20 stores no g_idx (the tiny-model tests cover the gptq
#: format's g_idx and GPTQ without act-order).
CASES = {
    "rtn W4 g64 sym": ("rtn", {}, dict(bits=4, group_size=64, symmetric=True)),
    "gptq W4 g64 asym, static act-order": (
        "gptq", {"gptq": {"act_order": True, "static_groups": True}},
        dict(bits=4, group_size=64)),
    "awq W4 g64 asym": ("awq", {}, dict(bits=4, group_size=64)),
}


@pytest.fixture(scope="module")
def smollm2():
    from qcore.assets import calibration_windows, embedded_corpus, eval_windows, load_model

    model, tokenizer = load_model()
    calib = calibration_windows(tokenizer, embedded_corpus("calibration"), 16, 128)
    ids = eval_windows(tokenizer, embedded_corpus("eval"), 4, 256)
    return model, tokenizer, calib, ids


@pytest.mark.parametrize("case", list(CASES))
def test_smollm2_export_reads_in_transformers_with_qcores_weights_and_perplexity(
        tmp_path: Path, smollm2, case: str) -> None:
    model, tokenizer, calib, ids = smollm2
    pipeline, options, scheme = CASES[case]
    model = copy.deepcopy(model)
    qcore.quantize(model, Pipeline.from_names(pipeline, scheme=Scheme(**scheme),
                                              options=options), calib, progress=False)
    ckpt = save(model, tmp_path / "ck", tokenizer)
    del model
    out = export(ckpt, tmp_path / "out", "compressed-tensors")
    theirs = read_with_transformers(out, ids, tmp_path)
    assert theirs["qcore_modules"] == []
    ours = qcore.load(ckpt)
    weights = dense_weights(ours)
    assert len(weights) == 210
    for key, weight in weights.items():
        assert torch.equal(theirs["weights"][key], weight), key
    ppl = perplexity(ours, ids, batch_size=4, progress=False)
    assert f"{theirs['ppl']:.3f}" == f"{ppl:.3f}"
