"""Base test classes that a plugin author subclasses, one per component kind.

Each class asks for its component through one fixture (``quantizer``, ``packer``,
``provider``, ``observer``, ``transform``) that the subclass defines; the other fixtures
have defaults that the subclass may override (the weight, the schemes, the statistics,
the quantized weights to pack, the kernel requests...). Every test checks behaviour with
numbers: a packer round-trips exactly, a kernel matches ``dequantize`` + ``F.linear``,
a quantizer's error is bounded by its grid.

Random data is seeded: the same code gives the same tensors on every run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

from qcore.errors import ConfigError
from qcore.interfaces import (
    KNOWN_OPS,
    Component,
    KernelProvider,
    KernelRequest,
    KernelSupport,
    Observer,
    PackedWeight,
    Packer,
    QuantizedWeight,
    Quantizer,
    Transform,
)
from qcore.options import build_config, config_to_dict
from qcore.scheme import PER_CHANNEL, Scheme

__all__ = [
    "BaseKernelProviderTests",
    "BaseObserverTests",
    "BasePackerTests",
    "BaseQuantizerTests",
    "BaseTransformTests",
    "random_int_weight",
    "random_vq_weight",
    "reference_linear",
]

#: Characters a component name must not hold: the short form ``"awq,gptq"`` splits on
#: commas, ``kind:name`` on the colon, and names are stripped of whitespace.
_FORBIDDEN_IN_NAMES = re.compile(r"[\s,:]")

#: Calibration batches of an observer test: ``(inputs, outputs)`` of a linear.
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]

#: Ops whose signature is ``(x, prepared, bias) -> y``: the ones the kernel tests call.
LINEAR_OPS = ("linear", "lut_linear")


def _must_override(fixture: str, what: str) -> None:
    pytest.fail(f"override the {fixture!r} fixture in your test class to return {what}",
                pytrace=False)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------- test data helpers


def random_int_weight(
    out_features: int,
    in_features: int,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    *,
    act_order: bool = False,
    act_bits: int | None = None,
    static_input_scale: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    seed: int = 0,
    act_group_size: int = PER_CHANNEL,
    act_symmetric: bool = True,
) -> QuantizedWeight:
    """A random (seeded) weight in the ``"int"`` format: codes uniform over
    ``0 .. 2**bits - 1``, positive scales, random zero points when asymmetric, a random
    act-order ``g_idx`` (each group keeps ``group_size`` columns, in shuffled positions)
    and a static ``input_scale`` when asked."""
    g = _generator(seed)
    groups = 1 if group_size == PER_CHANNEL else math.ceil(in_features / group_size)
    codes = torch.randint(0, 1 << bits, (out_features, in_features), generator=g,
                          dtype=torch.int64).to(torch.uint8)
    scales = (torch.rand(out_features, groups, generator=g) * 0.05 + 0.005).to(scale_dtype)
    tensors: dict[str, torch.Tensor] = {"codes": codes, "scales": scales}
    if not symmetric:
        tensors["zeros"] = torch.randint(0, 1 << bits, (out_features, groups), generator=g,
                                         dtype=torch.int64).to(torch.uint8)
    if act_order:
        natural = (torch.zeros(in_features, dtype=torch.int64) if group_size == PER_CHANNEL
                   else torch.arange(in_features) // group_size)
        perm = torch.randperm(in_features, generator=g)
        g_idx = torch.empty(in_features, dtype=torch.int64)
        g_idx[perm] = natural
        tensors["g_idx"] = g_idx.to(torch.int32)
    if static_input_scale:
        tensors["input_scale"] = (torch.rand((), generator=g) * 0.05 + 0.01).float()
    params: dict[str, Any] = {"bits": bits, "group_size": group_size, "symmetric": symmetric,
                              "act_bits": act_bits,
                              "act_dynamic": not static_input_scale}
    if act_bits is not None:
        params.update(act_group_size=act_group_size, act_symmetric=act_symmetric)
    return QuantizedWeight(format="int", shape=(out_features, in_features), tensors=tensors,
                           params=params)


def _first_act_group(support: KernelSupport) -> int:
    if support.act_group_sizes is None:
        return 64
    grouped = sorted(g for g in support.act_group_sizes if g != PER_CHANNEL)
    return grouped[0] if grouped else PER_CHANNEL


def _nearest_rows(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(vectors, codebook.float()).argmin(1).to(torch.int32)


def _vectors_of(columns: torch.Tensor, vector_size: int) -> torch.Tensor:
    """``[out, width]`` -> ``[out * n_vec, v]``, the partial last vector zero-padded."""
    pad = -columns.shape[1] % vector_size
    return torch.nn.functional.pad(columns, (0, pad)).reshape(-1, vector_size)


class ToyVQQuantizer(Quantizer):
    """A small, deterministic quantizer of the ``"vq"`` format with every optional part
    (a residual stage, outlier columns, a per-channel scale), for testing what consumes
    vq weights: packers, kernels, after-quantization transforms. Rows are scaled to unit
    maximum, the 3 columns of largest norm are the outliers, and each codebook is drawn
    from the weight's own vectors (the nearest row is chosen). Not a method: its error
    is large. Name ``toy-vq``; bits 2 or 3 (index bits ``4 * bits``, vectors of 4)."""

    name = "toy-vq"
    produces = "vq"
    supported_bits = frozenset({2, 3})
    vector_size = 4
    n_outliers = 3

    def quantize(self, weight: torch.Tensor, stats: Any, scheme: Scheme) -> QuantizedWeight:
        v = self.vector_size
        out_f, in_f = weight.shape
        scale = weight.abs().amax(1).clamp(min=1e-6).to(torch.float16)
        w = weight / scale.float()[:, None]
        outlier_cols = w.norm(dim=0).topk(self.n_outliers).indices.sort().values
        keep = torch.ones(in_f, dtype=torch.bool)
        keep[outlier_cols] = False
        main = _vectors_of(w[:, keep], v)
        index_bits = scheme.bits * v
        g = torch.Generator().manual_seed(0)
        codebook = main[torch.randperm(len(main), generator=g)[:1 << index_bits]].half()
        indices = _nearest_rows(main, codebook)
        residual = main - codebook.float()[indices.long()]
        res_codebook = residual[torch.randperm(len(main), generator=g)[:16]].half()
        res_indices = _nearest_rows(residual, res_codebook)
        outliers = _vectors_of(w[:, outlier_cols], v)
        outlier_codebook = outliers[:8].half()
        tensors = {
            "indices": indices.view(out_f, -1), "codebook": codebook,
            "res_indices": res_indices.view(out_f, -1), "res_codebook": res_codebook,
            "outlier_cols": outlier_cols.to(torch.int32),
            "outlier_indices": _nearest_rows(outliers, outlier_codebook).view(out_f, -1),
            "outlier_codebook": outlier_codebook, "scale": scale,
        }
        params = {"bits": scheme.bits, "vector_size": v, "index_bits": index_bits,
                  "res_index_bits": 4, "outlier_index_bits": 3, "n_outliers": self.n_outliers}
        return QuantizedWeight(format="vq", shape=(out_f, in_f), tensors=tensors, params=params)


def random_vq_weight(
    out_features: int,
    in_features: int,
    vector_size: int,
    index_bits: int,
    *,
    res_index_bits: int = 0,
    n_outliers: int = 0,
    outlier_index_bits: int = 0,
    scale: bool = False,
    offset: bool = False,
    max_codebook_rows: int | None = 256,
    bits: int | None = None,
    seed: int = 0,
) -> QuantizedWeight:
    """A random (seeded) weight in the ``"vq"`` format (``docs/codebook-format.md``):
    Gaussian float16 codebooks of ``min(2**index_bits, max_codebook_rows)`` rows (fewer
    rows than the index width allows, as the format permits; ``None``: all), uniform
    indices, a smaller residual codebook when ``res_index_bits``, ``n_outliers`` random
    outlier columns when ``outlier_index_bits``, and a per-channel ``scale`` and
    ``offset`` when asked. ``bits`` (the nominal bits per weight) defaults to
    ``round(index_bits / vector_size)``, at least 1."""
    from qcore.codebook import n_vectors

    g = _generator(seed)

    def stage(n_vec: int, width_bits: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
        rows = 1 << width_bits
        if max_codebook_rows is not None:
            rows = min(rows, max_codebook_rows)
        codebook = (torch.randn(rows, vector_size, generator=g) * spread).to(torch.float16)
        indices = torch.randint(0, rows, (out_features, n_vec), generator=g, dtype=torch.int32)
        return indices, codebook

    n_main = in_features - (n_outliers if outlier_index_bits else 0)
    tensors: dict[str, torch.Tensor] = {}
    tensors["indices"], tensors["codebook"] = stage(n_vectors(n_main, vector_size), index_bits,
                                                    0.05)
    if res_index_bits:
        tensors["res_indices"], tensors["res_codebook"] = stage(
            n_vectors(n_main, vector_size), res_index_bits, 0.01)
    if outlier_index_bits:
        cols = torch.randperm(in_features, generator=g)[:n_outliers].sort().values
        tensors["outlier_cols"] = cols.to(torch.int32)
        tensors["outlier_indices"], tensors["outlier_codebook"] = stage(
            n_vectors(n_outliers, vector_size), outlier_index_bits, 0.2)
    if scale or offset:
        tensors["scale"] = (torch.rand(out_features, generator=g) + 0.5).to(torch.float16)
    if offset:
        tensors["offset"] = (torch.randn(out_features, generator=g) * 0.01).to(torch.float16)
    params: dict[str, Any] = {
        "bits": bits if bits is not None else max(1, round(index_bits / vector_size)),
        "vector_size": vector_size, "index_bits": index_bits, "res_index_bits": res_index_bits,
        "outlier_index_bits": outlier_index_bits,
        "n_outliers": n_outliers if outlier_index_bits else 0}
    return QuantizedWeight(format="vq", shape=(out_features, in_features), tensors=tensors,
                           params=params)


def _vq_weights_for_tests(out_features: int, in_features: int, seed: int,
                          bits: int | None = None) -> QuantizedWeight:
    """One of four vq structures, by ``seed``: plain, residual, outliers with a scale,
    everything (the vector size does not divide ``in_features`` in the last three)."""
    variant = seed % 4
    vector_size = (4, 6, 5, 3)[variant]
    index_bits = (8, 12, 10, 16)[variant]
    n_outliers = max(1, in_features // 10) if variant >= 2 else 0
    return random_vq_weight(
        out_features, in_features, vector_size, index_bits,
        res_index_bits=(0, 9, 0, 4)[variant], n_outliers=n_outliers,
        outlier_index_bits=8 if n_outliers else 0, scale=variant >= 2, offset=variant == 3,
        bits=bits, seed=seed)


def _dense_of(qweight: QuantizedWeight, fixture: str) -> torch.Tensor:
    """The dense float32 weight of a weight in a core format (``"int"``, ``"vq"``)."""
    if qweight.format == "int":
        from qcore.grid import dequantize_int

        return dequantize_int(qweight)
    if qweight.format == "vq":
        from qcore.codebook import dequantize_vq

        return dequantize_vq(qweight)
    _must_override(fixture, f"a function QuantizedWeight -> dense float32 weight for format "
                            f"{qweight.format!r}")
    raise AssertionError  # unreachable


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act_bits: int | None = None,
    input_scale: torch.Tensor | None = None,
    act_group_size: int = PER_CHANNEL,
    act_symmetric: bool = True,
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The torch reference of a quantized linear, in float32: activations fake-quantized
    as the scheme says (per token, or with the static ``input_scale``, or per group of
    ``act_group_size`` columns on a symmetric or asymmetric grid), then ``F.linear`` with
    the dense (dequantized) ``weight``, plus the low-rank branch ``(x downᵀ) upᵀ`` of
    the unquantized ``x`` when ``lowrank = (down, up)`` is given."""
    from qcore.grid import fake_quantize_activations

    xq = x
    if act_bits is not None:
        xq = fake_quantize_activations(x, act_bits, input_scale, act_group_size, act_symmetric)
    y = F.linear(xq.float(), weight.float().to(x.device), None if bias is None else bias.float())
    if lowrank is not None:
        down, up = (t.float().to(x.device) for t in lowrank)
        y = y + (x.float() @ down.T) @ up.T
    return y


def _tensors_of(value: Any, where: str = "statistic") -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(where, value)]
    if isinstance(value, Mapping):
        out = []
        for key, item in value.items():
            out += _tensors_of(item, f"{where}[{key!r}]")
        return out
    raise AssertionError(f"{where} is a {type(value).__name__}; an observer's statistic is "
                         "a tensor or a dict of tensors")


def _assert_same_tensors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor],
                         what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: tensors {sorted(got)} != {sorted(want)}"
    for key in want:
        assert got[key].dtype == want[key].dtype, (
            f"{what}: {key!r} has dtype {got[key].dtype}, expected {want[key].dtype}")
        assert tuple(got[key].shape) == tuple(want[key].shape), (
            f"{what}: {key!r} has shape {tuple(got[key].shape)}, expected "
            f"{tuple(want[key].shape)}")
        assert torch.equal(got[key].cpu(), want[key].cpu()), f"{what}: {key!r} differs"


def _clone_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in tensors.items()}


# --------------------------------------------------------------------- every component


class _ComponentChecks:
    """Checks every kind shares; ``component`` is the instance under test."""

    kind: ClassVar[str] = ""

    def test_name_is_usable(self, component: Component) -> None:
        name = type(component).name
        assert isinstance(name, str) and name, (
            f"{type(component).__qualname__}.name must be a non-empty string")
        assert not _FORBIDDEN_IN_NAMES.search(name), (
            f"name {name!r} holds whitespace, ',' or ':', which pipelines use as separators")

    def test_kind_matches_base(self, component: Component) -> None:
        assert type(component).kind == self.kind, (
            f"{type(component).__qualname__} is a {type(component).kind!r}, not a {self.kind!r}")

    def test_config_is_frozen_dataclass(self, component: Component) -> None:
        cls = type(component)
        assert dataclasses.is_dataclass(cls.Config), f"{cls.__qualname__}.Config is not a dataclass"
        assert cls.Config.__dataclass_params__.frozen, (  # type: ignore[attr-defined]
            f"{cls.__qualname__}.Config must be @dataclass(frozen=True)")
        assert isinstance(component.config, cls.Config), (
            f"the instance's config is a {type(component.config).__name__}, "
            f"not {cls.__qualname__}.Config")
        default = cls.Config()  # a pipeline that names the component without options
        for f in dataclasses.fields(cls.Config):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(default, f.name, getattr(default, f.name))

    def test_config_round_trips_through_options(self, component: Component) -> None:
        # A checkpoint records the options as JSON; loading must rebuild the same Config.
        cls = type(component)
        options = config_to_dict(component.config)
        text = json.dumps(options)
        rebuilt = build_config(cls, json.loads(text))
        assert rebuilt == component.config, (
            f"options {text} rebuild {rebuilt!r}, not {component.config!r}")
        assert build_config(cls, {}) == cls.Config()

    def test_unknown_option_is_rejected(self, component: Component) -> None:
        with pytest.raises(ConfigError, match="no_such_option"):
            build_config(type(component), {"no_such_option": 1})


# ------------------------------------------------------------------------ quantizers


class BaseQuantizerTests(_ComponentChecks):
    """Conformance tests of a :class:`~qcore.interfaces.Quantizer`.

    Fixtures to define: ``quantizer`` (an instance). Fixtures you may override:
    ``weight`` (float32 ``[out, in]``), ``schemes`` (the schemes to try), ``observers``
    (observer classes by statistic name), ``calibration_inputs``, ``stats``.

    Class attributes: ``max_error_steps`` bounds ``|w - dequantize|`` per element in
    steps of the element's group scale for the ``"int"`` format (``0.5`` for
    round-to-nearest; ``None`` for methods whose codes are not the nearest level, such as
    GPTQ or clipping searches); :meth:`relative_error_bound` bounds
    ``||w - dequantize|| / ||w||`` for any format.
    """

    kind = "quantizer"
    max_error_steps: ClassVar[float | None] = 0.5

    def relative_error_bound(self, scheme: Scheme) -> float:
        """Bound on ``||w - dequantize(quantize(w))|| / ||w||`` for a Gaussian weight.
        Round-to-nearest reaches about ``2**(1 - bits)``."""
        return 1.5 * 2.0 ** (1 - scheme.bits)

    # ---- fixtures

    @pytest.fixture
    def quantizer(self) -> Quantizer:
        _must_override("quantizer", "an instance of your Quantizer")
        raise AssertionError  # unreachable

    @pytest.fixture
    def component(self, quantizer: Quantizer) -> Quantizer:
        return quantizer

    @pytest.fixture
    def weight(self) -> torch.Tensor:
        """float32 ``[16, 160]``: group size 32 divides 160, 64 does not."""
        return torch.randn(16, 160, generator=_generator(0))

    @pytest.fixture
    def schemes(self, quantizer: Quantizer) -> list[Scheme]:
        """A few bit-widths the quantizer supports, per channel and grouped (32 divides
        the default weight's 160 columns, 64 does not), symmetric and asymmetric: every
        layout at 4 bits, two of them (in turn) at the other widths."""
        supported = sorted(quantizer.supported_bits)
        bits = [b for b in (2, 3, 4, 8) if b in supported] or supported[:3]
        layouts = [(PER_CHANNEL, True), (32, False), (64, False), (32, True)]
        schemes = []
        for i, b in enumerate(bits):
            chosen = layouts if b == 4 else [layouts[i % 4], layouts[(i + 1) % 4]]
            schemes += [Scheme(bits=b, group_size=gs, symmetric=sym) for gs, sym in chosen]
        return schemes

    @pytest.fixture
    def observers(self) -> Mapping[str, type[Observer]]:
        """Observer classes by statistic name, run on ``calibration_inputs`` to make
        ``stats``. Add yours (e.g. ``{"hessian": HessianObserver}``)."""
        from qcore.builtin.observers import MinMaxObserver

        return {"minmax": MinMaxObserver}

    @pytest.fixture
    def calibration_inputs(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """Two batches of float32 ``[tokens, in_features]`` inputs."""
        g = _generator(1)
        return [torch.randn(tokens, weight.shape[1], generator=g) for tokens in (96, 64)]

    @pytest.fixture
    def stats(self, weight: torch.Tensor, observers: Mapping[str, type[Observer]],
              calibration_inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
        """Each observer of ``observers`` run over ``calibration_inputs``."""
        out = {}
        for name, cls in observers.items():
            observer = cls()
            for x in calibration_inputs:
                observer.update(x, F.linear(x, weight) if cls.needs_outputs else None)
            out[name] = observer.compute()
        return out

    def quantize(self, quantizer: Quantizer, weight: torch.Tensor, stats: Mapping[str, Any],
                 scheme: Scheme) -> QuantizedWeight:
        needs = quantizer.needs_for(scheme)
        missing = sorted(set(needs) - set(stats))
        if missing:
            pytest.fail(f"quantizer {quantizer.name!r} needs {missing} under "
                        f"{scheme.label()}: add their observers to the 'observers' fixture "
                        "or override 'stats'", pytrace=False)
        return quantizer.quantize(weight.clone(), {k: stats[k] for k in needs}, scheme)

    # ---- declarations

    def test_declarations(self, quantizer: Quantizer) -> None:
        cls = type(quantizer)
        assert isinstance(cls.produces, str) and cls.produces, "produces must name a format"
        assert isinstance(cls.needs, frozenset) and all(isinstance(n, str) for n in cls.needs)
        assert isinstance(cls.supported_bits, frozenset) and cls.supported_bits
        assert all(isinstance(b, int) and 1 <= b <= 16 for b in cls.supported_bits), (
            f"supported_bits {sorted(cls.supported_bits)} must be integers from 1 to 16")
        assert None in cls.supported_act_bits or cls.supported_act_bits, (
            "supported_act_bits must hold None (weight-only) or bit-widths")
        assert all(b is None or (isinstance(b, int) and 2 <= b <= 16)
                   for b in cls.supported_act_bits)
        assert isinstance(cls.sequential, bool)

    # ---- the result

    def test_quantize_produces_declared_format(self, quantizer: Quantizer, weight: torch.Tensor,
                                               stats: Mapping[str, Any],
                                               schemes: Sequence[Scheme]) -> None:
        for scheme in schemes:
            qweight = self.quantize(quantizer, weight, stats, scheme)
            assert isinstance(qweight, QuantizedWeight), f"{scheme.label()}: not a QuantizedWeight"
            assert qweight.format == quantizer.produces, (
                f"{scheme.label()}: format {qweight.format!r}, but the quantizer declares "
                f"produces = {quantizer.produces!r}")
            assert tuple(qweight.shape) == tuple(weight.shape), (
                f"{scheme.label()}: shape {qweight.shape} != weight shape {tuple(weight.shape)}")
            assert all(isinstance(t, torch.Tensor) for t in qweight.tensors.values())
            json.dumps(qweight.params)  # params travel in the checkpoint's JSON

    def test_int_format_tensors(self, quantizer: Quantizer, weight: torch.Tensor,
                                stats: Mapping[str, Any], schemes: Sequence[Scheme]) -> None:
        if quantizer.produces != "int":
            pytest.skip(f"produces {quantizer.produces!r}, not 'int'")
        out_f, in_f = weight.shape
        for scheme in schemes:
            label = scheme.label()
            t = self.quantize(quantizer, weight, stats, scheme)
            params, t = t.params, t.tensors
            groups = 1 if scheme.per_channel else math.ceil(in_f / scheme.group_size)
            for key, want in (("bits", scheme.bits), ("group_size", scheme.group_size),
                              ("symmetric", scheme.symmetric), ("act_bits", scheme.act_bits)):
                assert params.get(key) == want, (
                    f"{label}: params[{key!r}] = {params.get(key)!r}, expected {want!r}")
            codes = t["codes"]
            assert codes.dtype == torch.uint8 and tuple(codes.shape) == (out_f, in_f), (
                f"{label}: codes must be uint8 {[out_f, in_f]}, "
                f"got {codes.dtype} {list(codes.shape)}")
            assert int(codes.max()) <= (1 << scheme.bits) - 1, (
                f"{label}: code {int(codes.max())} does not fit in {scheme.bits} bits")
            scales = t["scales"]
            assert scales.is_floating_point() and tuple(scales.shape) == (out_f, groups), (
                f"{label}: scales must be float [{out_f}, {groups}], got {scales.dtype} "
                f"{list(scales.shape)}")
            assert bool(torch.isfinite(scales.float()).all() and (scales.float() > 0).all()), (
                f"{label}: scales must be finite and positive")
            if "zeros" in t:
                zeros = t["zeros"]
                assert zeros.dtype == torch.uint8 and tuple(zeros.shape) == (out_f, groups), (
                    f"{label}: zeros must be uint8 [{out_f}, {groups}]")
                assert int(zeros.max()) <= (1 << scheme.bits) - 1
            else:
                assert scheme.symmetric, f"{label}: an asymmetric grid needs 'zeros'"
            if "g_idx" in t:
                g_idx = t["g_idx"]
                assert g_idx.dtype == torch.int32 and tuple(g_idx.shape) == (in_f,)
                assert 0 <= int(g_idx.min()) and int(g_idx.max()) < groups

    def test_dequantize_shape_and_dtype(self, quantizer: Quantizer, weight: torch.Tensor,
                                        stats: Mapping[str, Any],
                                        schemes: Sequence[Scheme]) -> None:
        for scheme in schemes:
            dense = quantizer.dequantize(self.quantize(quantizer, weight, stats, scheme))
            assert dense.dtype == torch.float32 and tuple(dense.shape) == tuple(weight.shape), (
                f"{scheme.label()}: dequantize gave {dense.dtype} {list(dense.shape)}")

    def test_dequantize_error_within_grid_step(self, quantizer: Quantizer, weight: torch.Tensor,
                                               stats: Mapping[str, Any],
                                               schemes: Sequence[Scheme]) -> None:
        if quantizer.produces != "int" or self.max_error_steps is None:
            pytest.skip("bound in grid steps applies to 'int' round-to-nearest quantizers")
        from qcore.grid import effective_g_idx

        for scheme in schemes:
            qweight = self.quantize(quantizer, weight, stats, scheme)
            scales = qweight.tensors["scales"]
            step = scales.float()[:, effective_g_idx(qweight).long()]
            # Scales are stored rounded (e.g. to float16) after the range was measured:
            # the grid then spans (2**bits - 1) steps of a scale off by up to one unit
            # in the last place, so its end can fall short of the weight's extreme.
            roundoff = (0.0 if scales.dtype == torch.float32
                        else float(torch.finfo(scales.dtype).eps) / 2)
            slack = ((1 << scheme.bits) - 1) * roundoff + 1e-4
            error = (weight - quantizer.dequantize(qweight)).abs()
            worst = float((error / step).max())
            assert worst <= self.max_error_steps + slack, (
                f"{scheme.label()}: max |w - dequantize| is {worst:.4f} grid steps, over "
                f"{self.max_error_steps} (+{slack:.4f} for the scales' rounding)")

    def test_dequantize_relative_error(self, quantizer: Quantizer, weight: torch.Tensor,
                                       stats: Mapping[str, Any], schemes: Sequence[Scheme]) -> None:
        for scheme in schemes:
            dense = quantizer.dequantize(self.quantize(quantizer, weight, stats, scheme))
            relative = float((weight - dense).norm() / weight.norm())
            bound = self.relative_error_bound(scheme)
            assert relative <= bound, (
                f"{scheme.label()}: ||w - dequantize|| / ||w|| = {relative:.4f} > {bound:.4f}")

    def test_int_dequantize_follows_the_format(self, quantizer: Quantizer, weight: torch.Tensor,
                                               stats: Mapping[str, Any],
                                               schemes: Sequence[Scheme]) -> None:
        if quantizer.produces != "int":
            pytest.skip(f"produces {quantizer.produces!r}, not 'int'")
        from qcore.grid import dequantize_int

        for scheme in schemes:
            qweight = self.quantize(quantizer, weight, stats, scheme)
            torch.testing.assert_close(quantizer.dequantize(qweight), dequantize_int(qweight),
                                       rtol=0, atol=0,
                                       msg=lambda m, s=scheme: f"{s.label()}: {m}")

    def test_vq_dequantize_follows_the_format(self, quantizer: Quantizer,
                                              weight: torch.Tensor, stats: Mapping[str, Any],
                                              schemes: Sequence[Scheme]) -> None:
        if quantizer.produces != "vq":
            pytest.skip(f"produces {quantizer.produces!r}, not 'vq'")
        from qcore.codebook import dequantize_vq, validate_vq

        for scheme in schemes:
            qweight = self.quantize(quantizer, weight, stats, scheme)
            validate_vq(qweight)  # raises with what is wrong
            assert qweight.params.get("bits") == scheme.bits, (
                f"{scheme.label()}: params['bits'] = {qweight.params.get('bits')!r}, "
                f"expected the scheme's nominal {scheme.bits}")
            torch.testing.assert_close(quantizer.dequantize(qweight), dequantize_vq(qweight),
                                       rtol=0, atol=0,
                                       msg=lambda m, s=scheme: f"{s.label()}: {m}")

    def test_deterministic(self, quantizer: Quantizer, weight: torch.Tensor,
                           stats: Mapping[str, Any], schemes: Sequence[Scheme]) -> None:
        # Different global RNG states: a method that draws random numbers must seed its own
        # generator, or checkpoints are not reproducible.
        for scheme in schemes:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                first = self.quantize(quantizer, weight, stats, scheme)
                torch.manual_seed(2)
                second = self.quantize(quantizer, weight, stats, scheme)
            assert first.params == second.params
            _assert_same_tensors(second.tensors, first.tensors, f"{scheme.label()}, second run")

    def test_quantize_group_matches_one_by_one(self, quantizer: Quantizer,
                                               weight: torch.Tensor, stats: Mapping[str, Any],
                                               schemes: Sequence[Scheme]) -> None:
        # The core quantizes an input-sharing group (q/k/v) at once with shared statistics;
        # the result must be each linear's own. Float summation order may put a few
        # weights on the neighbouring level when a group is solved stacked.
        other = torch.randn(8, weight.shape[1], generator=_generator(4))
        for scheme in schemes:
            given = {k: stats[k] for k in quantizer.needs_for(scheme) if k in stats}
            group = quantizer.quantize_group([weight.clone(), other.clone()], given, scheme)
            assert len(group) == 2, f"{scheme.label()}: quantize_group returned {len(group)}"
            for w, grouped in zip((weight, other), group, strict=True):
                single = self.quantize(quantizer, w, stats, scheme)
                assert grouped.format == single.format and grouped.params == single.params
                assert tuple(grouped.shape) == tuple(w.shape)
                apart = (quantizer.dequantize(grouped) - quantizer.dequantize(single)).abs()
                moved = float((apart > 1e-5 * float(w.abs().max())).float().mean())
                assert moved <= 0.01, (
                    f"{scheme.label()}: {moved:.1%} of the weights differ between "
                    "quantize_group() and quantize() one linear at a time")

    def test_weight_and_stats_not_modified(self, quantizer: Quantizer, weight: torch.Tensor,
                                           stats: Mapping[str, Any],
                                           schemes: Sequence[Scheme]) -> None:
        scheme = schemes[0]
        needs = quantizer.needs_for(scheme)
        given = {k: stats[k] for k in needs if k in stats}
        before = [(name, t.clone()) for name, t in _tensors_of(given, "stats")]
        w = weight.clone()
        quantizer.quantize(w, given, scheme)
        assert torch.equal(w, weight), "quantize() modified the weight it was given in place"
        for (name, t_before), (_, t_after) in zip(before, _tensors_of(given, "stats"),
                                                  strict=True):
            assert torch.equal(t_before, t_after), f"quantize() modified {name} in place"

    def test_every_supported_bit_width(self, quantizer: Quantizer, weight: torch.Tensor,
                                       stats: Mapping[str, Any]) -> None:
        for bits in sorted(quantizer.supported_bits):
            scheme = Scheme(bits=bits, group_size=32, symmetric=False)
            qweight = self.quantize(quantizer, weight, stats, scheme)
            dense = quantizer.dequantize(qweight)
            assert bool(torch.isfinite(dense).all()), f"{bits} bits: non-finite weights"
            if quantizer.produces == "int":
                assert qweight.params["bits"] == bits
                assert int(qweight.tensors["codes"].max()) < (1 << bits)

    def test_unsupported_bits_rejected_by_validate(self, quantizer: Quantizer,
                                                   qcore_plugin_manager: Any) -> None:
        from qcore.pipeline import Pipeline, Step
        from qcore.testing.plugin import make_plugin

        cls = type(quantizer)
        unsupported = [b for b in range(1, 9) if b not in cls.supported_bits]
        if not unsupported:
            pytest.skip("supports every bit-width from 1 to 8")
        registry = qcore_plugin_manager.registry
        known = registry.find("quantizer", cls.name)
        if known is None:
            qcore_plugin_manager.register_module(make_plugin("quantizer_under_test",
                                                             quantizers=[cls]),
                                                 "quantizer_under_test")
            qcore_plugin_manager.raise_errors()
            registry = qcore_plugin_manager.registry
        elif known.cls is not cls:
            pytest.skip(f"a built-in quantizer is also named {cls.name!r}")
        for bits in unsupported:
            pipeline = Pipeline(quantizer=Step(cls.name), scheme=Scheme(bits=bits))
            with pytest.raises(ConfigError, match=f"not {bits}"):
                pipeline.validate(registry)

    def test_activation_bits(self, quantizer: Quantizer, weight: torch.Tensor,
                             stats: Mapping[str, Any]) -> None:
        act_bits = sorted(b for b in quantizer.supported_act_bits if b is not None)
        if not act_bits:
            pytest.skip("weight-only quantizer")
        for bits in act_bits:
            for dynamic in (True, False):
                scheme = Scheme(bits=sorted(quantizer.supported_bits)[-1], group_size=PER_CHANNEL,
                                symmetric=True, act_bits=bits, act_dynamic=dynamic)
                qweight = self.quantize(quantizer, weight, stats, scheme)
                if quantizer.produces != "int":
                    continue
                assert qweight.params["act_bits"] == bits
                assert qweight.params["act_dynamic"] == dynamic
                if dynamic:
                    assert "input_scale" not in qweight.tensors, (
                        f"{scheme.label()} dynamic: no static input_scale expected")
                else:
                    scale = qweight.tensors.get("input_scale")
                    assert scale is not None, f"{scheme.label()} static: input_scale missing"
                    assert scale.dtype == torch.float32 and scale.numel() == 1
                    assert float(scale) > 0


# --------------------------------------------------------------------------- packers


class BasePackerTests(_ComponentChecks):
    """Conformance tests of a :class:`~qcore.interfaces.Packer`.

    Fixtures to define: ``packer`` (an instance). For a packer of the ``"int"`` format,
    ``quantized_weights`` defaults to random weights for every supported bit-width up to
    8, a dividing and a non-dividing group size, per channel, symmetric, act-order and
    a static input scale; for the ``"vq"`` format to :func:`random_vq_weight` weights
    with index widths from 1 to 16 bits, residual and outlier stages, partial last
    vectors, scale and offset; for any other format override it.
    """

    kind = "packer"

    @pytest.fixture
    def packer(self) -> Packer:
        _must_override("packer", "an instance of your Packer")
        raise AssertionError  # unreachable

    @pytest.fixture
    def component(self, packer: Packer) -> Packer:
        return packer

    @pytest.fixture
    def quantized_weights(self, packer: Packer) -> list[QuantizedWeight]:
        if packer.format == "vq":
            out = [_vq_weights_for_tests(7, 50, seed) for seed in range(4)]
            out += [random_vq_weight(3, 40, 2, b, res_index_bits=b % 3, max_codebook_rows=None,
                                     seed=10 + b)
                    for b in (1, 2, 3, 5, 7, 9, 11, 13, 14, 15, 16)]
            return out
        if packer.format != "int":
            _must_override("quantized_weights",
                           f"a list of QuantizedWeight of format {packer.format!r}")
        out = []
        for seed, bits in enumerate(b for b in sorted(packer.supported_bits) if b <= 8):
            out += [
                random_int_weight(6, 100, bits, 32, symmetric=False, seed=seed),  # 100 = 3*32 + 4
                random_int_weight(5, 75, bits, 25, symmetric=True, seed=seed),
                random_int_weight(3, 40, bits, PER_CHANNEL, symmetric=False, seed=seed),
                random_int_weight(4, 100, bits, 32, act_order=True, act_bits=8,
                                  static_input_scale=True, seed=seed),
            ]
        return out

    def test_declarations(self, packer: Packer) -> None:
        cls = type(packer)
        assert isinstance(cls.format, str) and cls.format, "format must name a logical format"
        assert isinstance(cls.layout, str) and cls.layout, "layout must name a storage layout"
        assert cls.op in KNOWN_OPS, f"op {cls.op!r} is not one of {sorted(KNOWN_OPS)}"
        assert isinstance(cls.priority, int)
        assert cls.supported_bits and all(isinstance(b, int) and b >= 1 for b in cls.supported_bits)

    def test_quantized_weights_are_of_the_format(
            self, packer: Packer, quantized_weights: Sequence[QuantizedWeight]) -> None:
        assert quantized_weights, "quantized_weights is empty"
        for qweight in quantized_weights:
            assert qweight.format == packer.format

    def test_pack_writes_the_layout(self, packer: Packer,
                                    quantized_weights: Sequence[QuantizedWeight]) -> None:
        for qweight in quantized_weights:
            packed = packer.pack(qweight)
            assert isinstance(packed, PackedWeight)
            assert packed.layout == packer.layout, (
                f"packed layout {packed.layout!r} != the packer's layout {packer.layout!r}")
            assert tuple(packed.shape) == tuple(qweight.shape)

    def test_round_trip_is_exact(self, packer: Packer,
                                 quantized_weights: Sequence[QuantizedWeight]) -> None:
        for i, qweight in enumerate(quantized_weights):
            back = packer.unpack(packer.pack(qweight))
            what = f"quantized_weights[{i}] ({qweight.params})"
            assert back.format == qweight.format, what
            assert tuple(back.shape) == tuple(qweight.shape), what
            assert back.params == qweight.params, f"{what}: params {back.params}"
            _assert_same_tensors(back.tensors, qweight.tensors, f"{what} after pack+unpack")

    def test_pack_does_not_modify_its_input(self, packer: Packer,
                                            quantized_weights: Sequence[QuantizedWeight]) -> None:
        for qweight in quantized_weights:
            before = _clone_tensors(qweight.tensors)
            packer.pack(qweight)
            _assert_same_tensors(qweight.tensors, before, "the QuantizedWeight after pack()")

    def test_packed_weight_is_storable(self, packer: Packer,
                                       quantized_weights: Sequence[QuantizedWeight]) -> None:
        # What a checkpoint holds: plain contiguous tensors in safetensors, params in JSON;
        # loading reads them back into a PackedWeight that must unpack to the same weight.
        from safetensors.torch import load, save

        for qweight in quantized_weights:
            packed = packer.pack(qweight)
            for key, tensor in packed.tensors.items():
                assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), (
                    f"tensor key {key!r}: use letters, digits and '_' (stored as <module>.<key>)")
                assert type(tensor) is torch.Tensor, f"{key!r} is a {type(tensor).__name__}"
                assert tensor.is_contiguous(), f"{key!r} is not contiguous"
            stored = load(save({k: t.cpu() for k, t in packed.tensors.items()}))
            params = json.loads(json.dumps(packed.params))
            shape = (packed.shape[0], packed.shape[1])
            reloaded = PackedWeight(layout=packed.layout, shape=shape, tensors=stored,
                                    params=params)
            back = packer.unpack(reloaded)
            _assert_same_tensors(back.tensors, qweight.tensors, "unpack after safetensors")


# ---------------------------------------------------------------- checkpoint formats


def int_layer_record(qweight: QuantizedWeight) -> dict[str, Any]:
    """The record a qcore checkpoint stores for an ``"int"`` layer (as
    :class:`~qcore.interfaces.CheckpointFormat` receives it, ``format`` included)."""
    packed = _int_packer().pack(qweight)
    return {"format": "int", "layout": packed.layout, "op": "linear",
            "shape": list(packed.shape), "params": dict(packed.params),
            "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                        for k, v in packed.tensors.items()},
            "bias": False, "lowrank": False}


def _int_packer() -> Packer:
    from qcore.builtin.int_packer import IntPacker

    return IntPacker()


class BaseCheckpointFormatTests(_ComponentChecks):
    """Conformance tests of a :class:`~qcore.interfaces.CheckpointFormat` (contract 1.3).

    Fixtures to define: ``checkpoint_format`` (an instance). ``quantized_weights``
    defaults to random ``"int"`` weights (2, 3, 4 and 8 bits; groups of 32 and per
    channel; symmetric and asymmetric; act-order; 8-bit activations, static and dynamic),
    16 x 64. Every weight the format says it can express (``cannot_express`` None) must
    come back from ``import_layers(export_config(...), export_layer(...))`` with the same
    dense weight, bit for bit, the same scheme, and all its tensors consumed; every other
    weight must get a reason naming the layer. ``export_layer`` may still refuse a weight
    whose values the format cannot store with a ``CheckpointError``.
    """

    kind = "checkpoint_format"
    layer = "model.layers.0.mlp.up_proj"

    @pytest.fixture
    def checkpoint_format(self) -> Any:
        _must_override("checkpoint_format", "an instance of your CheckpointFormat")
        raise AssertionError  # unreachable

    @pytest.fixture
    def component(self, checkpoint_format: Any) -> Any:
        return checkpoint_format

    @pytest.fixture
    def quantized_weights(self) -> list[QuantizedWeight]:
        out = []
        for seed, bits in enumerate((2, 3, 4, 8)):
            out += [
                random_int_weight(16, 64, bits, 32, symmetric=False, seed=seed),
                random_int_weight(16, 64, bits, 32, symmetric=True, seed=seed),
                random_int_weight(16, 64, bits, PER_CHANNEL, symmetric=True, seed=seed),
                random_int_weight(16, 64, bits, 32, act_order=True, seed=seed),
            ]
        out += [random_int_weight(16, 64, 8, PER_CHANNEL, symmetric=True, act_bits=8, seed=9),
                random_int_weight(16, 64, 8, PER_CHANNEL, symmetric=True, act_bits=8,
                                  static_input_scale=True, seed=10)]
        return out

    def test_declarations(self, checkpoint_format: Any) -> None:
        methods = type(checkpoint_format).quant_methods
        assert isinstance(methods, frozenset)
        assert all(isinstance(m, str) and m for m in methods)

    def _express(self, fmt: Any, qweight: QuantizedWeight) -> str | None:
        reason = fmt.cannot_express({self.layer: int_layer_record(qweight)})
        assert reason is None or (isinstance(reason, str) and self.layer in reason), (
            f"cannot_express must return None or a reason naming the layer, got {reason!r}")
        return reason

    def test_what_it_expresses_comes_back_bit_for_bit(
            self, checkpoint_format: Any, quantized_weights: Sequence[QuantizedWeight]) -> None:
        from safetensors.torch import load, save

        from qcore.errors import CheckpointError
        from qcore.grid import dequantize_int

        round_trips = 0
        for i, qweight in enumerate(quantized_weights):
            what = f"quantized_weights[{i}] ({qweight.params})"
            if self._express(checkpoint_format, qweight) is not None:
                continue
            try:
                exported = checkpoint_format.export_layer(qweight)
            except CheckpointError:
                continue  # values this format cannot store (documented as allowed)
            for key, tensor in exported.items():
                assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{what}: key {key!r}"
                assert type(tensor) is torch.Tensor and tensor.is_contiguous(), f"{what}: {key}"
            config = checkpoint_format.export_config(
                {self.layer: int_layer_record(qweight)}, ["lm_head"])
            config = json.loads(json.dumps(config))  # what config.json holds
            tensors = load(save({f"{self.layer}.{k}": v.cpu() for k, v in exported.items()}))
            imported = checkpoint_format.import_layers(config, tensors)
            assert set(imported) == {self.layer}, f"{what}: imported {sorted(imported)}"
            assert not tensors, f"{what}: tensors left unconsumed: {sorted(tensors)}"
            back = _int_packer().unpack(_int_packer().pack(imported[self.layer]))
            assert tuple(back.shape) == tuple(qweight.shape), what
            for key in ("bits", "group_size", "act_bits"):
                assert back.params.get(key) == qweight.params.get(key), f"{what}: {key}"
            if qweight.params.get("act_bits"):
                assert back.params.get("act_dynamic") == qweight.params.get("act_dynamic"), what
            assert torch.equal(dequantize_int(back), dequantize_int(qweight)), (
                f"{what}: the imported dense weight differs from the exported one")
            round_trips += 1
        assert round_trips, "the format expressed none of quantized_weights"

    def test_codebook_layers_are_refused_with_a_reason(self, checkpoint_format: Any) -> None:
        record = {"format": "vq", "layout": "vq-packed", "op": "lut_linear",
                  "shape": [16, 64], "params": {"bits": 2, "vector_size": 4},
                  "tensors": {"indices": {"dtype": "int32", "shape": [16, 16]}},
                  "bias": False, "lowrank": False}
        reason = checkpoint_format.cannot_express({self.layer: record})
        assert isinstance(reason, str) and self.layer in reason

    def test_a_missing_tensor_is_an_error_never_another_weight(
            self, checkpoint_format: Any, quantized_weights: Sequence[QuantizedWeight]) -> None:
        from qcore.errors import CheckpointError

        for qweight in quantized_weights:
            if self._express(checkpoint_format, qweight) is not None:
                continue
            try:
                exported = checkpoint_format.export_layer(qweight)
            except CheckpointError:
                continue
            config = json.loads(json.dumps(checkpoint_format.export_config(
                {self.layer: int_layer_record(qweight)}, [])))
            for dropped in exported:
                tensors = {f"{self.layer}.{k}": v for k, v in exported.items() if k != dropped}
                try:
                    imported = checkpoint_format.import_layers(config, tensors)
                except CheckpointError:
                    continue
                # A reader may find layers by one tensor (without it there is no layer) or
                # read an optional tensor's default (GPTQ's natural-order g_idx): never a
                # different weight.
                if self.layer in imported:
                    from qcore.grid import dequantize_int

                    assert torch.equal(dequantize_int(imported[self.layer]),
                                       dequantize_int(qweight)), (
                        f"without {dropped!r} the layer must be an error, absent, or the same "
                        "weight (an optional tensor's default), never a different weight")


# --------------------------------------------------------------------------- kernels


_TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


def _available_devices() -> dict[str, tuple[int, int] | None]:
    devices: dict[str, tuple[int, int] | None] = {"cpu": None}
    if torch.cuda.is_available():
        devices["cuda"] = tuple(torch.cuda.get_device_capability())  # type: ignore[assignment]
    return devices


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class BaseKernelProviderTests(_ComponentChecks):
    """Conformance tests of a :class:`~qcore.interfaces.KernelProvider`.

    Fixtures to define: ``provider`` (an instance). Fixtures you may override:
    ``packers`` (instances writing the layouts you declare; default: the installed
    built-ins' packers of those layouts), ``kernel_requests`` (default: built from your
    ``support`` declaration, on the devices present), ``make_quantized_weight`` (request,
    seed -> QuantizedWeight; default for the ``"int"`` and ``"vq"`` formats: for
    ``"vq"``, ``request.bits`` is only the nominal width and the seed picks one of four
    structures: plain, residual, outliers with a scale, all of them with an offset) and
    ``dequantize`` (QuantizedWeight -> dense float32; default for ``"int"`` and
    ``"vq"``).

    Each request the provider declares support for is run through ``prepare`` and the
    op, and compared with :func:`reference_linear` to :attr:`tolerance` for its dtype.
    """

    kind = "kernel"
    #: Largest allowed ``|y - y_ref|`` relative to ``max |y_ref|`` (and to ``|y_ref|``),
    #: by activation dtype.
    tolerance: ClassVar[Mapping[str, float]] = _TOLERANCE

    @pytest.fixture
    def provider(self) -> KernelProvider:
        _must_override("provider", "an instance of your KernelProvider")
        raise AssertionError  # unreachable

    @pytest.fixture
    def component(self, provider: KernelProvider) -> KernelProvider:
        return provider

    @pytest.fixture
    def packers(self, provider: KernelProvider, qcore_registry: Any) -> list[Packer]:
        layouts = provider.support.layouts
        found = [reg.cls() for reg in qcore_registry.of_kind("packer")
                 if reg.cls.layout in layouts]  # type: ignore[attr-defined]
        if not found:
            _must_override("packers", f"packer instances writing the layouts {sorted(layouts)}")
        return found  # type: ignore[return-value]

    @pytest.fixture
    def make_quantized_weight(self) -> Callable[[KernelRequest, Packer, int], QuantizedWeight]:
        def make(request: KernelRequest, packer: Packer, seed: int) -> QuantizedWeight:
            if packer.format == "vq":
                return _vq_weights_for_tests(request.out_features, request.in_features, seed,
                                             bits=request.bits)
            if packer.format != "int":
                _must_override("make_quantized_weight",
                               f"a function (request, packer, seed) -> QuantizedWeight of "
                               f"format {packer.format!r}")
            per_token = request.act_group_size == PER_CHANNEL and request.act_symmetric
            return random_int_weight(
                request.out_features, request.in_features, request.bits, request.group_size,
                request.symmetric, act_order=request.act_order, act_bits=request.act_bits,
                static_input_scale=(request.act_bits is not None and per_token
                                    and seed % 2 == 1),
                seed=seed, act_group_size=request.act_group_size,
                act_symmetric=request.act_symmetric)
        return make

    @pytest.fixture
    def dequantize(self) -> Callable[[QuantizedWeight], torch.Tensor]:
        def dense(qweight: QuantizedWeight) -> torch.Tensor:
            return _dense_of(qweight, "dequantize")
        return dense

    @pytest.fixture
    def kernel_requests(self, provider: KernelProvider,
                        packers: Sequence[Packer]) -> list[KernelRequest]:
        return self.declared_requests(provider.support, packers)

    def declared_requests(self, support: KernelSupport,
                          packers: Iterable[Packer]) -> list[KernelRequest]:
        """Requests covering the declaration on the devices present here: every
        (bits, group size, symmetry) combination, then each other declared value
        (act-order, dtypes, devices, activation bits) once. ``None`` (any) is sampled."""
        devices = {d: cc for d, cc in _available_devices().items() if d in support.devices}
        if support.min_compute_capability is not None:
            devices = {d: cc for d, cc in devices.items()
                       if cc is not None and cc >= support.min_compute_capability}
        if not devices:
            return []
        device = "cpu" if "cpu" in devices else sorted(devices)[0]
        dtype = "float32" if "float32" in support.dtypes else sorted(support.dtypes)[0]
        requests: list[KernelRequest] = []
        for packer in packers:
            if packer.layout not in support.layouts or packer.op not in support.ops:
                continue
            if packer.op not in LINEAR_OPS:
                continue
            bits_pool = packer.supported_bits if support.bits is None else support.bits
            bits_pool = frozenset(bits_pool) & frozenset(packer.supported_bits)
            bits = sorted(b for b in bits_pool if b in {2, 3, 4, 8}) or sorted(bits_pool)[:3]
            if support.group_sizes is None:
                group_sizes = [PER_CHANNEL, 32, 64]
            else:
                group_sizes = sorted(support.group_sizes)
            symmetries = sorted(support.symmetric)
            act_widths = sorted(b for b in support.act_bits if b is not None)
            if not (bits and group_sizes and symmetries
                    and (None in support.act_bits or act_widths)):
                continue
            act_bits_default = None if None in support.act_bits else act_widths[0]

            request = functools.partial(self._request, support, packer, devices,
                                        act_bits=act_bits_default, device=device, dtype=dtype)

            for b in bits:
                for gs in group_sizes:
                    for sym in symmetries:
                        requests.append(request(b, gs, sym))
            b = 4 if 4 in bits else bits[-1]
            gs, sym = group_sizes[-1], symmetries[0]
            if support.act_order:
                requests.append(request(b, gs, sym, act_order=True))
            requests += [request(b, gs, sym, dtype=dt)
                         for dt in sorted(support.dtypes) if dt != dtype]
            requests += [request(b, gs, sym, device=dev)
                         for dev in sorted(devices) if dev != device]
            # Twice each: make_quantized_weight gives odd seeds a static input scale.
            other_act_bits = sorted(a for a in support.act_bits
                                    if a is not None and a != act_bits_default)
            requests += [request(b, gs, sym, act_bits=ab) for ab in other_act_bits
                         for _ in range(2)]
            # Activation groups and grids (contract 1.4): each declared value once, at the
            # widest declared activation width; a group size that divides in_features.
            if act_widths:
                ab = act_widths[-1]
                groups_pool = ([64] if support.act_group_sizes is None
                               else sorted(g for g in support.act_group_sizes if g != PER_CHANNEL))
                for ag in groups_pool:
                    for asym in sorted(support.act_symmetric):
                        requests.append(request(b, gs, sym, act_bits=ab, act_group_size=ag,
                                                act_symmetric=asym))
                if False in support.act_symmetric and PER_CHANNEL in (
                        support.act_group_sizes or {PER_CHANNEL}):
                    requests.append(request(b, gs, sym, act_bits=ab, act_symmetric=False))
            # A low-rank branch, for providers that compute it in their op.
            if support.lowrank:
                requests += [request(b, gs, sym, **(
                    {"act_bits": act_widths[-1], "act_group_size": _first_act_group(support)}
                    if act_widths else {}), lowrank_rank=r) for r in (1, 8)]
        return requests

    @staticmethod
    def _request(support: KernelSupport, packer: Packer,
                 devices: Mapping[str, tuple[int, int] | None], bits: int, group_size: int,
                 symmetric: bool, *, act_bits: int | None, device: str, dtype: str,
                 **changes: Any) -> KernelRequest:
        in_multiple = support.in_features_multiple
        if group_size == PER_CHANNEL:
            in_f = _round_up(96, in_multiple)
        elif in_multiple == 1 and support.group_sizes is None:
            in_f = group_size * 2 + group_size // 2  # a shorter last group
        else:
            in_f = 2 * math.lcm(group_size, in_multiple)
        # A provider that only quantizes activations in groups (or asymmetrically) gets
        # requests in what it declares.
        groups = support.act_group_sizes
        act_group = (PER_CHANNEL if groups is None or PER_CHANNEL in groups
                     else sorted(groups)[0])
        fields: dict[str, Any] = dict(
            op=packer.op, layout=packer.layout, bits=bits, group_size=group_size,
            symmetric=symmetric, in_features=in_f,
            out_features=_round_up(24, support.out_features_multiple),
            act_bits=act_bits, act_order=False, dtype=dtype, device=device,
            compute_capability=devices[device], act_group_size=act_group,
            act_symmetric=True in support.act_symmetric)
        fields.update(changes)
        act_group = fields.get("act_group_size", PER_CHANNEL)
        if (fields["act_bits"] is not None and act_group != PER_CHANNEL
                and fields["in_features"] % act_group and support.act_group_sizes is not None):
            # Whole activation groups for a provider that names its group sizes; one that
            # takes any keeps the shorter last group.
            fields["in_features"] = 2 * math.lcm(act_group, in_multiple,
                                                 1 if group_size == PER_CHANNEL else group_size)
        return KernelRequest(**fields)

    def _run(self, provider: KernelProvider, packer: Packer, request: KernelRequest,
             make_quantized_weight: Callable[..., QuantizedWeight],
             dequantize: Callable[[QuantizedWeight], torch.Tensor],
             seed: int) -> tuple[torch.Tensor, torch.Tensor, PackedWeight, dict[str, torch.Tensor]]:
        qweight = make_quantized_weight(request, packer, seed)
        packed = packer.pack(qweight)
        device = torch.device(request.device)
        dtype = getattr(torch, request.dtype)
        g = _generator(seed + 1000)
        # The core hands ops 2-D inputs: QuantLinear flattens the leading dimensions.
        x = torch.randn(5, request.in_features, generator=g).to(device=device, dtype=dtype)
        bias = torch.randn(request.out_features, generator=g).to(device=device, dtype=dtype)
        lowrank = None
        if request.lowrank_rank:  # as QuantLinear hands a fusing provider its branch
            down = (torch.randn(request.lowrank_rank, request.in_features, generator=g) * 0.05)
            up = (torch.randn(request.out_features, request.lowrank_rank, generator=g) * 0.05)
            lowrank = (down.to(torch.float16).to(device), up.to(torch.float16).to(device))
            packed.tensors["lowrank_down"], packed.tensors["lowrank_up"] = lowrank
        before = _clone_tensors(packed.tensors)
        prepared = provider.prepare(packed, device)
        y = getattr(provider, request.op)(x, prepared, bias)
        want = reference_linear(x, dequantize(qweight), bias, request.act_bits,
                                qweight.tensors.get("input_scale"), request.act_group_size,
                                request.act_symmetric, lowrank)
        return y, want, packed, before

    def _check_close(self, y: torch.Tensor, want: torch.Tensor, request: KernelRequest) -> None:
        from qcore.kernel_select import describe

        assert tuple(y.shape) == tuple(want.shape), (
            f"{describe(request)}: output shape {list(y.shape)}, expected {list(want.shape)}")
        assert y.dtype == getattr(torch, request.dtype), (
            f"{describe(request)}: output dtype {y.dtype}, expected {request.dtype}")
        assert y.device.type == request.device
        tol = self.tolerance[request.dtype]
        got, want = y.float().cpu(), want.float().cpu()
        error = (got - want).abs()
        allowed = tol * want.abs().max() + tol * want.abs()
        worst = float((error - allowed).max())
        assert worst <= 0, (
            f"{describe(request)}: max |y - reference| = {float(error.max()):.3g} exceeds "
            f"{tol} x max|reference| ({float(want.abs().max()):.3g}) + {tol} x |reference|")

    def test_declarations(self, provider: KernelProvider) -> None:
        s = type(provider).support
        assert isinstance(s, KernelSupport), "support must be a KernelSupport"
        assert s.ops and s.ops <= KNOWN_OPS, (
            f"ops {sorted(s.ops)} must be among {sorted(KNOWN_OPS)}")
        assert s.layouts and all(isinstance(x, str) and x for x in s.layouts)
        assert s.dtypes <= {"float32", "float16", "bfloat16"}, f"dtypes {sorted(s.dtypes)}"
        assert s.devices and all(isinstance(d, str) for d in s.devices)
        assert s.in_features_multiple >= 1 and s.out_features_multiple >= 1
        assert isinstance(s.priority, int)

    def test_declared_ops_are_implemented(self, provider: KernelProvider) -> None:
        for op in provider.support.ops & set(LINEAR_OPS):
            assert getattr(type(provider), op) is not getattr(KernelProvider, op), (
                f"support declares op {op!r} but {type(provider).__qualname__} does not "
                f"override {op}()")

    def test_unavailable_reason_never_raises(self, provider: KernelProvider) -> None:
        reason = type(provider).unavailable_reason()
        assert reason is None or (isinstance(reason, str) and reason), (
            f"unavailable_reason() must return None or a non-empty reason, got {reason!r}")

    def test_declared_requests_are_supported(self, provider: KernelProvider,
                                             kernel_requests: Sequence[KernelRequest]) -> None:
        from qcore.kernel_select import describe

        for request in kernel_requests:
            reason = type(provider).unsupported_reason(request)
            assert reason is None, f"{describe(request)} is declared but refused: {reason}"

    def test_requests_outside_the_declaration_get_a_reason(
            self, provider: KernelProvider, kernel_requests: Sequence[KernelRequest]) -> None:
        s = type(provider).support
        base = kernel_requests[0] if kernel_requests else KernelRequest(
            op=sorted(s.ops)[0], layout=sorted(s.layouts)[0],
            bits=min(s.bits) if s.bits else 4,
            group_size=min(s.group_sizes) if s.group_sizes else 32,
            symmetric=sorted(s.symmetric)[0],
            in_features=s.in_features_multiple * 64, out_features=s.out_features_multiple * 64,
            act_bits=None if None in s.act_bits else sorted(b for b in s.act_bits if b)[0],
            dtype=sorted(s.dtypes)[0], device=sorted(s.devices)[0],
            compute_capability=s.min_compute_capability)
        outside: dict[str, KernelRequest] = {
            "op": dataclasses.replace(base, op="no_such_op"),
            "layout": dataclasses.replace(base, layout="no-such-layout"),
            "device": dataclasses.replace(base, device="no_such_device"),
        }
        if s.bits is not None:
            bits = next(b for b in range(1, 33) if b not in s.bits)
            outside["bits"] = dataclasses.replace(base, bits=bits)
        if s.group_sizes is not None:
            outside["group_size"] = dataclasses.replace(
                base, group_size=next(g for g in (7, 13, 1000003) if g not in s.group_sizes))
        if len(s.symmetric) == 1:
            outside["symmetric"] = dataclasses.replace(base, symmetric=not next(iter(s.symmetric)))
        missing_act = [b for b in (None, 8, 4, 3) if b not in s.act_bits]
        if missing_act:
            outside["act_bits"] = dataclasses.replace(base, act_bits=missing_act[0])
        if not s.act_order:
            outside["act_order"] = dataclasses.replace(base, act_order=True)
        missing_dtypes = sorted({"float32", "float16", "bfloat16"} - s.dtypes)
        if missing_dtypes:
            outside["dtype"] = dataclasses.replace(base, dtype=missing_dtypes[0])
        if s.in_features_multiple > 1:
            outside["in_features"] = dataclasses.replace(base, in_features=base.in_features + 1)
        if s.out_features_multiple > 1:
            outside["out_features"] = dataclasses.replace(base, out_features=base.out_features + 1)
        if s.min_compute_capability is not None:
            major, minor = s.min_compute_capability
            below = (major, minor - 1) if minor else (major - 1, 9)
            outside["compute_capability"] = dataclasses.replace(base, compute_capability=below)
        for what, request in outside.items():
            reason = type(provider).unsupported_reason(request)
            assert isinstance(reason, str) and reason, (
                f"a request whose {what} is outside the declaration was accepted: {request}")

    def test_op_matches_reference(self, provider: KernelProvider, packers: Sequence[Packer],
                                  kernel_requests: Sequence[KernelRequest],
                                  make_quantized_weight: Callable[..., QuantizedWeight],
                                  dequantize: Callable[[QuantizedWeight], torch.Tensor]) -> None:
        reason = type(provider).unavailable_reason()
        if reason is not None:
            pytest.skip(f"provider unavailable here: {reason}")
        if not kernel_requests:
            pytest.skip("no declared request can run on the devices present here")
        by_layout = {p.layout: p for p in packers}
        for seed, request in enumerate(kernel_requests):
            y, want, packed, before = self._run(provider, by_layout[request.layout], request,
                                                make_quantized_weight, dequantize, seed)
            self._check_close(y, want, request)
            _assert_same_tensors(packed.tensors, before, "the PackedWeight after prepare() + op")


# -------------------------------------------------------------------------- observers


class BaseObserverTests(_ComponentChecks):
    """Conformance tests of an :class:`~qcore.interfaces.Observer`.

    Fixtures to define: ``observer`` (an instance). You may override
    ``observer_batches`` (a list of ``(inputs, outputs)``). Set ``split_invariant =
    False`` if your statistic legitimately depends on how tokens are split in batches.
    """

    kind = "observer"
    split_invariant: ClassVar[bool] = True
    #: Relative tolerance of the batch-split comparison (float32 summation order).
    rtol: ClassVar[float] = 1e-5

    @pytest.fixture
    def observer(self) -> Observer:
        _must_override("observer", "an instance of your Observer")
        raise AssertionError  # unreachable

    @pytest.fixture
    def component(self, observer: Observer) -> Observer:
        return observer

    @pytest.fixture
    def observer_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Three batches (7, 5 and 9 tokens) through a 24 -> 12 linear."""
        g = _generator(2)
        weight = torch.randn(12, 24, generator=g)
        batches = []
        for tokens in (7, 5, 9):
            x = torch.randn(tokens, 24, generator=g) * torch.linspace(0.1, 3.0, 24)
            batches.append((x, F.linear(x, weight)))
        return batches

    @staticmethod
    def fresh(observer: Observer) -> Observer:
        return type(observer)(observer.config)

    def observe(self, observer: Observer,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        instance = self.fresh(observer)
        for x, y in batches:
            instance.update(x, y if type(observer).needs_outputs else None)
        return instance.compute()

    def test_declarations(self, observer: Observer) -> None:
        assert isinstance(type(observer).needs_outputs, bool)

    def test_statistic_is_finite_tensors(self, observer: Observer,
                                         observer_batches: Batches) -> None:
        stat = self.observe(observer, observer_batches)
        tensors = _tensors_of(stat)
        assert tensors, "compute() returned no tensor"
        for where, t in tensors:
            assert bool(torch.isfinite(t).all()), f"{where} holds non-finite values"

    def test_deterministic(self, observer: Observer,
                           observer_batches: Batches) -> None:
        first = _tensors_of(self.observe(observer, observer_batches))
        second = _tensors_of(self.observe(observer, observer_batches))
        for (where, a), (_, b) in zip(first, second, strict=True):
            assert torch.equal(a, b), f"{where} differs between two identical runs"

    def test_batch_split_invariance(self, observer: Observer,
                                    observer_batches: Batches) -> None:
        if not self.split_invariant:
            pytest.skip("split_invariant = False")
        whole = (torch.cat([x for x, _ in observer_batches]),
                 torch.cat([y for _, y in observer_batches]))
        split = _tensors_of(self.observe(observer, observer_batches))
        joined = _tensors_of(self.observe(observer, [whole]))
        for (where, a), (_, b) in zip(split, joined, strict=True):
            torch.testing.assert_close(a, b, rtol=self.rtol, atol=self.rtol * float(b.abs().max()),
                                       msg=lambda m, w=where: f"{w}: batches of 7, 5, 9 tokens "
                                                              f"vs one batch of 21: {m}")

    def test_inputs_not_modified(self, observer: Observer,
                                 observer_batches: Batches) -> None:
        copies = [(x.clone(), y.clone()) for x, y in observer_batches]
        self.observe(observer, observer_batches)
        for (x, y), (x0, y0) in zip(observer_batches, copies, strict=True):
            assert torch.equal(x, x0) and torch.equal(y, y0), "update() modified its inputs"

    def test_single_batch(self, observer: Observer,
                          observer_batches: Batches) -> None:
        stat = self.observe(observer, observer_batches[:1])
        assert _tensors_of(stat)


# ------------------------------------------------------------------------- transforms


class BaseTransformTests(_ComponentChecks):
    """Conformance tests of a :class:`~qcore.interfaces.Transform`.

    Fixtures to define: ``transform`` (an instance). By default the transform is applied
    to block 0 of a tiny random Llama (``block_model``), through a real
    :class:`~qcore.context.BlockContext` (calibration inputs, structure with input-sharing
    groups and scale sources, the statistics of the observers in ``observers`` that the
    transform needs, a 4-bit RTN quantizer), and the block's outputs on its calibration
    inputs must not change beyond ``rtol`` (relative). Low-rank branches the transform
    registers (``ctx.add_lowrank_branch``) are added to their linears' outputs when
    comparing. Override ``block_model``, ``block_context`` or ``block_forward`` for
    another block; set ``preserves_function = False`` to skip the comparison.
    """

    kind = "transform"
    preserves_function: ClassVar[bool] = True
    rtol: ClassVar[float] = 1e-4

    @pytest.fixture
    def transform(self) -> Transform:
        _must_override("transform", "an instance of your Transform")
        raise AssertionError  # unreachable

    @pytest.fixture
    def component(self, transform: Transform) -> Transform:
        return transform

    @pytest.fixture
    def observers(self) -> Mapping[str, type[Observer]]:
        """Observer classes by statistic name, for the transform's ``needs``."""
        from qcore.builtin.observers import MinMaxObserver

        return {"minmax": MinMaxObserver}

    @pytest.fixture
    def block_model(self) -> torch.nn.Module:
        """A tiny random Llama (one decoder block, hidden size 32, seeded)."""
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return transformers.LlamaForCausalLM(config).eval()

    @pytest.fixture
    def block_context(self, transform: Transform, block_model: torch.nn.Module,
                      observers: Mapping[str, type[Observer]]) -> Any:
        from qcore.builtin.rtn import RTNQuantizer
        from qcore.calibration import observe
        from qcore.context import BlockContext
        from qcore.model import capture_block_inputs, describe_block, find_blocks

        blocks = find_blocks(block_model)
        vocab = block_model.get_input_embeddings().num_embeddings
        input_ids = torch.randint(0, vocab, (4, 12), generator=_generator(3))
        calls = capture_block_inputs(block_model, blocks, input_ids, batch_size=2)
        block = blocks.blocks[0]
        structure = describe_block(block, *calls[0])
        needed = {name: observers[name] for name in sorted(transform.needs) if name in observers}
        stats = observe(block, calls, structure, structure.groups, needed, torch.device("cpu"))
        return BlockContext(index=0, block=block, structure=structure, inputs=calls,
                            stats=stats, scheme=Scheme(bits=4, group_size=32),
                            quantizer=RTNQuantizer())

    @pytest.fixture
    def block_forward(self) -> Callable[[Any], torch.Tensor]:
        """ctx -> the block's outputs on its calibration inputs, low-rank branches added."""
        def forward(ctx: Any) -> torch.Tensor:
            handles = []
            for name, (down, up) in getattr(ctx, "lowrank", {}).items():
                def add_branch(_m: Any, args: tuple[Any, ...], out: torch.Tensor,
                               down: torch.Tensor = down, up: torch.Tensor = up) -> torch.Tensor:
                    x = args[0]
                    return out + F.linear(F.linear(x, down.to(x)), up.to(x))
                handles.append(ctx.block.get_submodule(name).register_forward_hook(add_branch))
            try:
                outs = ctx.run_block()
            finally:
                for handle in handles:
                    handle.remove()
            return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
        return forward

    def test_declarations(self, transform: Transform) -> None:
        cls = type(transform)
        for what in ("needs", "provides"):
            value = getattr(cls, what)
            assert isinstance(value, frozenset) and all(isinstance(v, str) and v for v in value), (
                f"{what} must be a frozenset of names, got {value!r}")

    def test_function_preserved(self, transform: Transform, block_context: Any,
                                block_forward: Callable[[Any], torch.Tensor]) -> None:
        if not self.preserves_function:
            pytest.skip("preserves_function = False")
        with torch.no_grad():
            before = block_forward(block_context).detach().clone()
            weights = {n: p.detach().clone() for n, p in block_context.block.named_parameters()}
            transform.apply(block_context)
            after = block_forward(block_context).detach()
        changed = [n for n, p in block_context.block.named_parameters()
                   if not torch.equal(p.detach(), weights[n])]
        relative = float((after.float() - before.float()).norm() / before.float().norm())
        assert relative <= self.rtol, (
            f"transform {transform.name!r} changed the block's output by {relative:.3g} "
            f"(relative), over {self.rtol}; parameters it changed: {changed}")
