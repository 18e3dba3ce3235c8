"""Calibration paths: statistics once per input-sharing group, and a sequential
quantizer seeing the activations of the already-quantized earlier groups."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from qcore.builtin.observers import HessianObserver
from qcore.builtin.rtn import RTNQuantizer
from qcore.calibration import merge_calls
from qcore.interfaces import Observer
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


def test_merge_calls_of_consecutive_rows_of_one_tensor_is_a_view():
    """The next block's calls are row slices of one block output: merging them copies
    nothing (a copy would hold a second block's activations during the forward)."""
    hidden = torch.randn(5, 4, 8)
    mask = torch.ones(5, 1, 4, 4)
    calls = [((hidden[a:b],), {"attention_mask": mask[a:b]}) for a, b in ((0, 2), (2, 4), (4, 5))]
    args, kwargs = merge_calls(calls)
    assert torch.equal(args[0], hidden) and args[0].data_ptr() == hidden.data_ptr()
    assert torch.equal(kwargs["attention_mask"], mask)
    # not consecutive (rows out of order): concatenated into a new tensor
    shuffled = [calls[1], calls[0], calls[2]]
    args, _ = merge_calls(shuffled)
    assert torch.equal(args[0], torch.cat([hidden[2:4], hidden[0:2], hidden[4:5]]))
    assert args[0].data_ptr() != hidden.data_ptr()


def test_merge_calls_leaves_no_reference_cycle_holding_the_calls():
    import gc
    import weakref

    calls = [((torch.randn(2, 4, 8),), {"use_cache": False}) for _ in range(3)]
    first = weakref.ref(calls[0][0][0])
    gc.disable()
    try:
        merged = merge_calls(calls)
        del calls
        assert first() is None  # freed by reference counting alone
    finally:
        gc.enable()
    assert merged[0][0].shape == (6, 4, 8)


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
            for exact, fast in zip(results[None], results[torch.bfloat16], strict=True)]
    assert all(0 < r < 0.05 for r in rels), rels  # bf16 activations: close, not equal


def test_bfloat16_calibration_hessian_of_a_float32_norm_output_is_taken_as_the_linear_sees_it(
        qcore_register_plugin, make_tiny_model, calib_ids):
    """Block 0's q/k/v read the embeddings through a float32 RMSNorm; under bf16 autocast
    q/k/v multiply that input rounded to bfloat16, and so does the Hessian observer (it is
    told the calibration dtype although its hook runs outside autocast)."""
    qcore_register_plugin(make_plugin("recording", quantizers=[SequentialRecordingRTN]))
    model = make_tiny_model("llama", layers=1)
    block = find_blocks(model).blocks[0]
    with torch.no_grad():
        normed = torch.cat([block.input_layernorm(args[0]) for args, _ in
                            capture_block_inputs(model, find_blocks(model), calib_ids, 3)])
    x = normed.reshape(-1, normed.shape[-1])
    assert x.dtype == torch.float32
    by_hand = HessianObserver()  # the same values, arriving rounded to bfloat16
    by_hand.update(x.bfloat16(), None)
    not_rounded = HessianObserver()
    not_rounded.update(x, None)
    SequentialRecordingRTN.seen.clear()
    pipeline = Pipeline.from_names(SequentialRecordingRTN.name,
                                   scheme=Scheme(bits=4, group_size=16))
    quantize(model, pipeline, calib_ids, batch_size=3, progress=False, calib_dtype=torch.bfloat16)
    n_qkv, hessian = SequentialRecordingRTN.seen[0]
    assert n_qkv == 3
    assert torch.equal(hessian, by_hand.compute())
    assert not torch.equal(hessian, not_rounded.compute())
    x64 = x.bfloat16().double()
    exact = (2 * x64.T @ x64 / x.shape[0]).float()
    assert float((hessian - exact).norm() / exact.norm()) < 4e-3  # bf16 rounding, 144 tokens


class CalibDtypeObserver(Observer):
    """Records the calibration dtype it is told, once per update."""

    name = "calib-dtype"
    seen: ClassVar[list[torch.dtype | None]] = []

    def update(self, inputs, outputs):
        type(self).seen.append(self.calib_dtype)

    def compute(self):
        return torch.zeros(1)


class NeedsCalibDtype(RTNQuantizer):
    name = "needs-calib-dtype"
    needs = frozenset({"calib-dtype"})

    def needs_for(self, scheme):
        return self.needs


class SequentialNeedsCalibDtype(NeedsCalibDtype):
    name = "sequential-needs-calib-dtype"
    sequential = True


@pytest.mark.parametrize("quantizer", [NeedsCalibDtype, SequentialNeedsCalibDtype])
def test_observers_are_told_the_calibration_dtype(qcore_register_plugin, make_tiny_model,
                                                  calib_ids, quantizer):
    qcore_register_plugin(make_plugin("calib-dtype", observers=[CalibDtypeObserver],
                                      quantizers=[quantizer]))
    for dtype in (None, torch.bfloat16):
        CalibDtypeObserver.seen.clear()
        quantize(make_tiny_model("llama", layers=1), Pipeline.from_names(quantizer.name),
                 calib_ids, batch_size=3, progress=False, calib_dtype=dtype)
        # four input groups; one update per group (sequential: one merged forward) or
        # per calibration batch (two batches of 3 rows)
        assert CalibDtypeObserver.seen == [dtype] * (4 if quantizer.sequential else 8)


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


def test_quantize_blocks_consumes_block_0_calls(qcore_register_plugin, make_tiny_model, calib_ids):
    """The caller's list of captured inputs is emptied (and its tensors freed) before
    block 0 runs: otherwise the caller would hold block 0's activations all run long."""
    import weakref

    from qcore.calibration import quantize_blocks

    qcore_register_plugin(make_plugin("recording", quantizers=[SequentialRecordingRTN]))
    model = make_tiny_model("llama", layers=2)
    blocks = find_blocks(model)
    calls = capture_block_inputs(model, blocks, calib_ids, 3)
    captured = weakref.ref(calls[0][0][0])
    freed_before_block_0 = []
    block_0 = blocks.blocks[0]
    handle = block_0.register_forward_pre_hook(
        lambda *_: freed_before_block_0.append(captured() is None))
    resolved = Pipeline.from_names(SequentialRecordingRTN.name,
                                   scheme=Scheme(bits=4, group_size=16)).validate()
    try:
        reports = quantize_blocks(blocks, calls, resolved, torch.device("cpu"), progress=False)
    finally:
        handle.remove()
    assert calls == [] and len(reports) == 2
    assert freed_before_block_0 and all(freed_before_block_0)
