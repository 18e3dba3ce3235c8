"""Calibration paths: statistics once per input-sharing group, and a sequential
quantizer seeing the activations of the already-quantized earlier groups."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from qcore.builtin.rtn import RTNQuantizer
from qcore.calibration import merge_calls
from qcore.model import capture_block_inputs, find_blocks
from qcore.pipeline import Pipeline
from qcore.quantize import quantize
from qcore.scheme import Scheme
from qcore.testing import make_plugin


class RecordingRTN(RTNQuantizer):
    """RTN that needs the Hessian and records the one it is given for each group."""

    name = "recording-rtn"
    needs = frozenset({"hessian"})
    seen: ClassVar[list[tuple[int, torch.Tensor]]] = []

    def needs_for(self, scheme: Scheme) -> frozenset[str]:
        return self.needs

    def quantize_group(self, weights, stats: Any, scheme: Scheme):
        type(self).seen.append((len(weights), stats["hessian"].clone()))
        return super().quantize_group(weights, stats, scheme)


class SequentialRecordingRTN(RecordingRTN):
    name = "sequential-recording-rtn"
    sequential = True


def _group_input_hessians(model, calib_ids) -> list[torch.Tensor]:
    """Hessians of each group's input when the (quantized) block 0 runs on its inputs."""
    blocks = find_blocks(model)
    block = blocks.blocks[0]
    firsts = [block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.down_proj]
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, m in enumerate(firsts)]
    with torch.no_grad():
        for args, kwargs in capture_block_inputs(model, blocks, calib_ids, 3):
            block(*args, **kwargs)
    for h in hooks:
        h.remove()
    return [2 * torch.cat(x).T @ torch.cat(x) / torch.cat(x).shape[0] for x in inputs.values()]


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_quantizer_sees_quantized_earlier_groups(qcore_register_plugin, make_tiny_model,
                                                            calib_ids, sequential):
    cls = SequentialRecordingRTN if sequential else RecordingRTN
    qcore_register_plugin(make_plugin("recording", quantizers=[cls]))
    cls.seen.clear()
    model = make_tiny_model("llama", layers=1)
    reference = _group_input_hessians(model, calib_ids)  # full-precision activations
    quantize(model, Pipeline.from_names(cls.name, scheme=Scheme(bits=2, group_size=16)), calib_ids,
             batch_size=3, progress=False)
    # one call per input-sharing group: q/k/v, o, gate/up, down
    assert [n for n, _ in cls.seen] == [3, 1, 2, 1]
    quantized = _group_input_hessians(model, calib_ids)
    seen = [h for _, h in cls.seen]
    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(seen[0], reference[0]) < 1e-5  # the block's input: quantization did not touch it
    for i in (1, 2, 3):
        expected = quantized[i] if sequential else reference[i]
        other = reference[i] if sequential else quantized[i]
        assert rel(seen[i], expected) < 1e-5
        assert rel(seen[i], other) > 0.05  # 2-bit q/k/v change what o_proj receives


def test_merge_calls_concatenates_batch_tensors_and_keeps_shared_ones():
    rotary = (torch.randn(1, 5, 4), torch.randn(1, 5, 4))
    calls = [((torch.randn(b, 5, 8),), {"position_embeddings": rotary, "attention_mask": torch.ones(b, 1, 5, 5),
                                        "use_cache": False}) for b in (2, 2, 1)]
    args, kwargs = merge_calls(calls)
    assert torch.equal(args[0], torch.cat([c[0][0] for c in calls]))
    assert kwargs["attention_mask"].shape == (5, 1, 5, 5)
    assert kwargs["position_embeddings"][0] is rotary[0]
    assert kwargs["use_cache"] is False


def test_bfloat16_calibration_forwards_keep_float32_statistics(qcore_register_plugin, make_tiny_model,
                                                               calib_ids):
    qcore_register_plugin(make_plugin("recording", quantizers=[SequentialRecordingRTN]))
    results = {}
    for dtype in (None, torch.bfloat16):
        SequentialRecordingRTN.seen.clear()
        model = make_tiny_model("llama", layers=2)
        quantize(model, Pipeline.from_names(SequentialRecordingRTN.name, scheme=Scheme(bits=4, group_size=16)),
                 calib_ids, batch_size=3, progress=False, calib_dtype=dtype)
        results[dtype] = [h for _, h in SequentialRecordingRTN.seen]
        assert all(h.dtype == torch.float32 for h in results[dtype])
        assert model.qcore_quantization["calibration"] == {
            "samples": 6, "seq_len": 24, "dtype": "bfloat16" if dtype else "float32"}
    rels = [float((exact - fast).norm() / exact.norm())
            for exact, fast in zip(results[None], results[torch.bfloat16])]
    assert rels[0] == 0.0  # block 0's q/k/v read the embeddings through a float32 norm
    assert all(0 < r < 0.05 for r in rels[1:]), rels  # bf16 activations: close, not equal


def _output_observer_classes():
    """An observer whose statistic depends on each linear's outputs, and quantizers
    (plain and sequential) that record the statistic's size per weight."""
    from qcore.interfaces import Observer

    class OutputAbsMaxObserver(Observer):
        name = "output-absmax"
        needs_outputs = True

        def __init__(self, config=None):
            super().__init__(config)
            self.absmax = None

        def update(self, inputs, outputs):
            m = outputs.abs().amax(0)
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)

        def compute(self):
            return self.absmax

    class NeedsOutputs(RTNQuantizer):
        name = "needs-outputs"
        needs = frozenset({"output-absmax"})
        seen: ClassVar[list[tuple[int, int]]] = []

        def needs_for(self, scheme):
            return self.needs

        def quantize_group(self, weights, stats, scheme):
            for w in weights:
                type(self).seen.append((w.shape[0], stats["output-absmax"].shape[0]))
            return super().quantize_group(weights, stats, scheme)

    class SequentialNeedsOutputs(NeedsOutputs):
        name = "sequential-needs-outputs"
        sequential = True

    return OutputAbsMaxObserver, NeedsOutputs, SequentialNeedsOutputs


@pytest.mark.parametrize("sequential", [False, True])
def test_output_statistics_are_per_linear(qcore_register_plugin, make_tiny_model, calib_ids, sequential):
    observer, plain, seq = _output_observer_classes()
    quantizer = seq if sequential else plain
    qcore_register_plugin(make_plugin("outputs", observers=[observer], quantizers=[quantizer]))
    quantizer.seen.clear()
    model = make_tiny_model("llama", layers=1)
    quantize(model, Pipeline.from_names(quantizer.name), calib_ids, batch_size=3, progress=False)
    # q, k, v, o, gate, up, down: each quantized alone with its own output statistic
    assert quantizer.seen == [(64, 64), (32, 32), (32, 32), (64, 64), (96, 96), (96, 96), (64, 64)]
