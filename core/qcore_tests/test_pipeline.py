"""Pipelines: building from dicts, TOML and the short form; validate() and its errors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import torch

from qcore.builtin.int_packer import IntPacker
from qcore.builtin.observers import MinMaxObserver
from qcore.builtin.rtn import RTNQuantizer
from qcore.errors import ConfigError, PipelineError, UnknownComponentError
from qcore.interfaces import Packer, Quantizer, Transform
from qcore.pipeline import Pipeline, Step
from qcore.scheme import Scheme
from qcore.testing import make_plugin


class Smooth(Transform):
    """A transform named like a quantizer."""

    name = "smooth"


class SmoothQ(RTNQuantizer):
    """A quantizer named like a transform."""

    name = "smooth"


class Tuned(RTNQuantizer):
    """Options of every type."""

    name = "tuned"

    @dataclass(frozen=True)
    class Config:
        iters: int = 3
        damp: float = 0.01
        act_order: bool = False
        mode: Literal["mse", "minmax"] = "minmax"
        skip: tuple[str, ...] = ()
        note: str | None = None


class NeedsAbsMean(RTNQuantizer):
    name = "needs-absmean"
    needs = frozenset({"act_absmean"})

    def needs_for(self, scheme: Scheme) -> frozenset[str]:
        return self.needs


class Rotate(Transform):
    name = "rotate"
    provides = frozenset({"rotated"})


class NeedsRotated(Transform):
    name = "needs-rotated"
    needs = frozenset({"rotated"})


class WeightOnly(RTNQuantizer):
    name = "weight-only"
    supported_bits = frozenset({4})
    supported_act_bits = frozenset({None})


class Codebook(Quantizer):
    name = "codebook-q"
    produces = "codebook"


class Polish(Transform):
    """An after-quantization transform (like qcore-plugin-finetune's ``finetune``)."""

    name = "polish"
    after_quantization = True
    formats = frozenset({"int", "vq"})

    @dataclass(frozen=True)
    class Config:
        epochs: int = 4

        def __post_init__(self) -> None:
            if self.epochs < 1:
                raise ValueError(f"epochs must be >= 1, got {self.epochs}")


class OrphanLayoutPacker(IntPacker):
    name = "orphan"
    layout = "orphan-layout"
    priority = 5


@pytest.fixture
def registry(qcore_register_plugin) -> Any:
    manager = qcore_register_plugin(make_plugin(
        "extras", transforms=[Smooth, Rotate, NeedsRotated, Polish], observers=[],
        quantizers=[SmoothQ, Tuned, NeedsAbsMean, WeightOnly, Codebook]),
        distribution="qcore-plugin-extras", version="0.5")
    return manager.registry


# ------------------------------------------------------------------------- the happy path


def test_default_pipeline_is_rtn_int_torch(qcore_registry) -> None:
    resolved = Pipeline.from_spec({}).validate()
    assert isinstance(resolved.quantizer, RTNQuantizer)
    assert isinstance(resolved.packer, IntPacker)
    assert resolved.kernel == "torch"
    assert resolved.observers == {}
    assert resolved.distributions == {"qcore": "0.1.0"}
    assert resolved.pipeline.packer == "int"  # 'auto' resolved
    assert resolved.spec()["quantizer"] == {"name": "rtn", "options": {"scale_dtype": "float16"}}


def test_static_activation_scales_need_the_minmax_observer(qcore_registry) -> None:
    resolved = Pipeline(scheme=Scheme(bits=8, act_bits=8, act_dynamic=False)).validate()
    assert {n: f.cls for n, f in resolved.observers.items()} == {"minmax": MinMaxObserver}
    assert resolved.needs_of(resolved.quantizer) == {"minmax"}
    dynamic = Pipeline(scheme=Scheme(bits=8, act_bits=8, act_dynamic=True)).validate()
    assert dynamic.observers == {}


def test_resolved_pipeline_runs_on_a_weight(qcore_registry) -> None:
    resolved = Pipeline.from_names("rtn", scheme=Scheme(bits=4, group_size=32)).validate()
    weight = torch.randn(24, 80, generator=torch.Generator().manual_seed(0))
    qweight = resolved.quantizer.quantize(weight, {}, resolved.scheme)
    packed = resolved.packer.pack(qweight)
    kernel = qcore_registry.get("kernel", resolved.kernel).cls()
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(1))
    y = kernel.linear(x, kernel.prepare(packed, torch.device("cpu")), None)
    dense = resolved.quantizer.dequantize(qweight)
    torch.testing.assert_close(y, x @ dense.T, rtol=1e-5, atol=1e-5)
    assert float((y - x @ weight.T).norm() / (x @ weight.T).norm()) < 0.15


# ------------------------------------------------------------------------- unknown names


def test_unknown_quantizer_lists_installed_and_the_distribution_to_install(qcore_registry) -> None:
    with pytest.raises(UnknownComponentError) as raised:
        Pipeline.from_spec({"quantizer": "gptq"}).validate()
    assert str(raised.value) == ("Unknown quantizer: 'gptq'. Installed quantizers: rtn. 'gptq' "
                                 "is provided by qcore-plugin-gptq: pip install qcore-plugin-gptq")


def test_unknown_transform_in_the_short_form(registry) -> None:
    with pytest.raises(UnknownComponentError) as raised:
        Pipeline.from_names("awq,rtn", registry=registry)
    message = str(raised.value)
    assert "Unknown pipeline step: 'awq'" in message
    assert "Installed transforms: needs-rotated, polish, rotate, smooth" in message
    assert ("installed quantizers: codebook-q, needs-absmean, rtn, smooth, tuned, "
            "weight-only") in message
    assert "pip install qcore-plugin-awq" in message


def test_unknown_name_without_a_known_distribution(qcore_registry) -> None:
    with pytest.raises(UnknownComponentError) as raised:
        Pipeline.from_spec({"transforms": ["spinquant"]}).validate()
    assert str(raised.value) == "Unknown transform: 'spinquant'. Installed transforms: none."


def test_name_of_another_kind_says_so(registry) -> None:
    with pytest.raises(UnknownComponentError, match=r"'rotate' is installed as a transform"):
        Pipeline.from_spec({"quantizer": "rotate"}).validate(registry)


def test_unknown_packer_and_kernel(qcore_registry) -> None:
    with pytest.raises(UnknownComponentError,
                       match="Unknown packer: 'marlin'. Installed packers: int"):
        Pipeline(packer="marlin").validate()
    with pytest.raises(UnknownComponentError,
                       match=r"Unknown kernel: 'cupy'.*qcore-kernels\[cuda\]"):
        Pipeline(kernel="cupy").validate()


# ------------------------------------------------------------------------------- options


def test_unknown_option_names_the_valid_ones(qcore_registry) -> None:
    spec = {"quantizer": {"name": "rtn", "options": {"scale_dtyp": "float16"}}}
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_spec(spec).validate()
    assert str(raised.value) == ("quantizer 'rtn' has no option 'scale_dtyp'; valid options: "
                                 "scale_dtype")


def test_option_of_a_component_without_options(registry) -> None:
    with pytest.raises(ConfigError, match=r"valid options: \(none: it takes no options\)"):
        Pipeline.from_names("rotate,rtn", options={"rotate": {"seed": 1}},
                            registry=registry).validate(registry)


@pytest.mark.parametrize("options,message", [
    ({"scale_dtype": "float64"},
     "quantizer 'rtn' option 'scale_dtype' expects one of 'float16', 'bfloat16', 'float32', "
     "got 'float64'"),
    ({"scale_dtype": 16}, "expects one of 'float16', 'bfloat16', 'float32', got 16"),
])
def test_wrong_option_value_for_a_literal(qcore_registry, options, message) -> None:
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_spec({"quantizer": {"name": "rtn", "options": options}}).validate()
    assert message in str(raised.value)


@pytest.mark.parametrize("key,value,expects", [
    ("iters", "three", "int"), ("iters", True, "int"), ("iters", 2.5, "int"),
    ("damp", "high", "float"), ("act_order", "maybe", "bool"), ("act_order", 1, "bool"),
    ("mode", "gptq", "one of 'mse', 'minmax'"),
])
def test_wrong_option_types_are_reported_by_name(registry, key, value, expects) -> None:
    spec = {"quantizer": {"name": "tuned", "options": {key: value}}}
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_spec(spec).validate(registry)
    assert str(raised.value) == f"quantizer 'tuned' option {key!r} expects {expects}, got {value!r}"


def test_options_from_text_are_coerced(registry) -> None:
    # What the CLI and TOML hand over: strings and lists.
    options = {"iters": "5", "damp": "0.1", "act_order": "true", "skip": "lm_head,gate",
               "note": None}
    spec = {"quantizer": {"name": "tuned", "options": options}}
    resolved = Pipeline.from_spec(spec).validate(registry)
    assert resolved.quantizer.config == Tuned.Config(iters=5, damp=0.1, act_order=True,
                                                     skip=("lm_head", "gate"), note=None)


def test_malformed_specs(qcore_registry) -> None:
    cases = [
        ({"quantiser": "rtn"}, "unknown pipeline key(s) quantiser; valid keys: kernel, observers, "
                               "packer, quantizer, scheme, transforms"),
        ({"transforms": "awq"}, "'transforms' must be a list of steps"),
        ({"quantizer": {"name": "rtn", "opts": {}}}, "quantizer: unexpected key(s) ['opts']"),
        ({"quantizer": {"name": "rtn", "options": [1]}}, "quantizer: options must be a table"),
        ({"quantizer": 4}, "quantizer: expected a name or {name = '...', options = {...}}, got 4"),
        ({"packer": ""}, "packer must be a name or 'auto', got ''"),
        ({"scheme": {"bitz": 4}}, "unknown scheme option(s) bitz; valid options: act_bits, "
                                  "act_dynamic, act_group_size, act_symmetric, bits, group_size, "
                                  "symmetric"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError) as raised:
            Pipeline.from_spec(spec)
        assert message in str(raised.value), (spec, str(raised.value))


# ------------------------------------------------------------------------------- schemes


def test_bits_outside_what_the_quantizer_supports(qcore_registry) -> None:
    with pytest.raises(ConfigError) as raised:
        Pipeline(scheme=Scheme(bits=9)).validate()
    assert str(raised.value) == "quantizer 'rtn' supports bits [2, 3, 4, 5, 6, 7, 8], not 9"


@pytest.mark.parametrize("scheme,message", [
    ({"bits": 17}, "bits=17 is out of range"),
    ({"bits": 0}, "bits=0 is out of range"),
    ({"bits": "4"}, "bits='4' is out of range"),
    ({"group_size": 0}, "group_size=0 is invalid: use a positive integer (e.g. 64 or 128) or -1"),
    ({"group_size": -2}, "group_size=-2 is invalid"),
    ({"act_bits": 1}, "act_bits=1 is invalid"),
])
def test_scheme_out_of_range(scheme, message) -> None:
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_spec({"scheme": scheme})
    assert message in str(raised.value)


def test_activation_bits_the_quantizer_cannot_calibrate(registry) -> None:
    with pytest.raises(ConfigError) as raised:
        Pipeline(quantizer=Step("weight-only"), scheme=Scheme(act_bits=8)).validate(registry)
    assert str(raised.value) == ("quantizer 'weight-only' does not quantize activations to 8 "
                                 "bits; it supports act_bits [None] (None = weight-only). "
                                 "Quantizers that can: needs-absmean, rtn, smooth, tuned")


# ---------------------------------------------------------------------------- short form


def test_short_form_orders_transforms_then_the_quantizer(registry) -> None:
    pipeline = Pipeline.from_names("rotate,needs-rotated,tuned", registry=registry,
                                   options={"tuned": {"iters": 7}})
    assert [t.name for t in pipeline.transforms] == ["rotate", "needs-rotated"]
    assert pipeline.quantizer == Step("tuned", {"iters": 7})
    assert pipeline.short_form() == "rotate,needs-rotated,tuned"
    assert Pipeline.from_names("rotate", registry=registry).quantizer.name == "rtn"


def test_after_quantization_transforms_follow_the_quantizer(registry) -> None:
    for names in ("rotate,codebook-q,polish", "rotate,polish,codebook-q"):
        pipeline = Pipeline.from_names(names, registry=registry,
                                       options={"polish": {"epochs": 2}})
        assert [t.name for t in pipeline.transforms] == names.replace(",codebook-q", "").split(",")
        assert pipeline.quantizer.name == "codebook-q"
        assert pipeline.short_form() == "rotate,codebook-q,polish"
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_names("codebook-q,polish", registry=registry).validate(registry)
    assert str(raised.value) == (
        "transform 'polish' edits weights of format(s) int, vq, but quantizer 'codebook-q' "
        "produces 'codebook': use a quantizer producing 'int' or 'vq', or drop 'polish' "
        "from the pipeline")
    assert Pipeline.from_names("rtn,polish", registry=registry).validate(registry)
    # A checkpoint's spec marks the step, so it reads in place where it is not installed.
    spec = Pipeline.from_names("rtn,polish", registry=registry).validate(registry).spec()
    assert spec["transforms"] == [{"name": "polish", "options": {"epochs": 4},
                                   "after_quantization": True}]
    spec["transforms"][0]["name"] = "not-installed"
    assert Pipeline.from_spec(spec).short_form(registry) == "rtn,not-installed"
    with pytest.raises(ConfigError, match=r"transform 'polish': invalid options .*"
                                          r"epochs must be >= 1, got 0"):
        Pipeline.from_names("rtn,polish", registry=registry,
                            options={"polish": {"epochs": "0"}}).validate(registry)


def test_short_form_ambiguity_needs_a_qualifier(registry) -> None:
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_names("smooth", registry=registry)
    assert str(raised.value) == ("'smooth' is both a transform and a quantizer; write "
                                 "'transform:smooth' or 'quantizer:smooth'")
    as_transform = Pipeline.from_names("transform:smooth,rtn", registry=registry)
    assert [t.name for t in as_transform.transforms] == ["smooth"]
    assert as_transform.quantizer.name == "rtn"
    as_quantizer = Pipeline.from_names("quantizer:smooth", registry=registry)
    assert as_quantizer.transforms == () and as_quantizer.quantizer.name == "smooth"
    assert isinstance(as_quantizer.validate(registry).quantizer, SmoothQ)


def test_short_form_errors(registry) -> None:
    with pytest.raises(ConfigError,
                       match="qualifier is 'transform:' or 'quantizer:', not 'packer'"):
        Pipeline.from_names("packer:int", registry=registry)
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_names("rtn,rotate", registry=registry)
    assert str(raised.value) == (
        "pipeline 'rtn,rotate': rotate edits the block before quantization; put it before "
        "the quantizer 'rtn' (only after-quantization transforms may follow it)")
    with pytest.raises(ConfigError, match=r"name one quantizer \(found \['rtn', 'tuned'\]\)"):
        Pipeline.from_names("rtn,tuned", registry=registry)
    with pytest.raises(ConfigError, match="the pipeline is empty"):
        Pipeline.from_names(" , ", registry=registry)
    with pytest.raises(ConfigError, match="options given for gptq, which is not in pipeline"):
        Pipeline.from_names("rtn", options={"gptq": {}}, registry=registry)
    with pytest.raises(UnknownComponentError, match="Unknown transform: 'nope'"):
        Pipeline.from_names("transform:nope,rtn", registry=registry)


# --------------------------------------------------------------------------------- needs


def test_unmet_need_names_the_distribution_that_provides_it(registry) -> None:
    with pytest.raises(PipelineError) as raised:
        Pipeline(quantizer=Step("needs-absmean")).validate(registry)
    assert str(raised.value) == (
        "quantizer 'needs-absmean' needs 'act_absmean', which no installed observer makes and "
        "no earlier step provides; it is provided by qcore-plugin-awq: pip install "
        "qcore-plugin-awq")


def test_need_provided_by_a_later_step_says_to_reorder(registry) -> None:
    pipeline = Pipeline.from_names("needs-rotated,rotate,rtn", registry=registry)
    with pytest.raises(PipelineError) as raised:
        pipeline.validate(registry)
    assert ("step 'rotate' provides it but comes later: put 'rotate' before "
            "'needs-rotated'") in str(raised.value)
    Pipeline.from_names("rotate,needs-rotated,rtn", registry=registry).validate(registry)


# ----------------------------------------------------------------------- packers, kernels


def test_no_packer_for_the_format(registry) -> None:
    with pytest.raises(PipelineError, match="no installed packer reads format 'codebook' "
                                            r"\(produced by quantizer 'codebook-q'\) at 4 bits"):
        Pipeline(quantizer=Step("codebook-q")).validate(registry)


def test_named_packer_must_read_the_quantizers_format(registry) -> None:
    class CodebookPacker(Packer):
        name = "cb"
        format = "codebook"
        layout = "cb-layout"

    registry.add("packer", CodebookPacker, registry.get("quantizer", "tuned").origin)
    with pytest.raises(PipelineError, match="packer 'cb' reads format 'codebook', but quantizer "
                                            "'rtn' produces 'int'"):
        Pipeline(packer="cb").validate(registry)


def test_a_layout_no_kernel_serves_is_refused(qcore_register_plugin) -> None:
    manager = qcore_register_plugin(make_plugin("orphan", packers=[OrphanLayoutPacker]))
    with pytest.raises(PipelineError) as raised:
        Pipeline().validate(manager.registry)  # 'auto' picks the higher-priority packer
    assert "no kernel for the result of this pipeline" in str(raised.value)
    assert "layout 'orphan-layout' not in ['int-packed']" in str(raised.value)
    assert Pipeline(packer="int").validate(manager.registry).kernel == "torch"


def test_named_kernel_that_cannot_serve(qcore_register_plugin) -> None:
    from qcore.builtin.torch_kernels import TorchKernels
    from qcore.interfaces import KernelSupport

    class Fp16Only(TorchKernels):
        name = "fp16-only"
        support = KernelSupport(ops=frozenset({"linear"}), layouts=frozenset({"int-packed"}),
                                bits=frozenset({4}), devices=frozenset({"cuda"}),
                                dtypes=frozenset({"float16"}), priority=50)

    manager = qcore_register_plugin(make_plugin("fast", kernels=[Fp16Only]))
    assert Pipeline(kernel="fp16-only").validate(manager.registry).kernel == "fp16-only"
    with pytest.raises(PipelineError, match=re.escape(
            "kernel provider 'fp16-only' cannot run linear on layout 'int-packed' W3 group 64")):
        Pipeline(kernel="fp16-only", scheme=Scheme(bits=3)).validate(manager.registry)
    # 'auto' falls back to the torch provider where the fast one does not apply.
    assert Pipeline(scheme=Scheme(bits=3)).validate(manager.registry).kernel == "torch"


# ----------------------------------------------------------------------------- recipes


RECIPE = """\
packer = "auto"
kernel = "auto"

[[transforms]]
name = "rotate"

[[transforms]]
name = "needs-rotated"

[quantizer]
name = "tuned"
options = { iters = 5, damp = 0.05, skip = ["lm_head"], mode = "mse" }

[scheme]
bits = 3
group_size = 128
symmetric = true
"""


def to_toml(spec: dict[str, Any]) -> str:
    """Just enough TOML for a pipeline spec (tomllib only reads)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            items = (f"{k} = {value(x)}" for k, x in v.items() if x is not None)
            return "{ " + ", ".join(items) + " }"
        raise TypeError(v)

    lines = [f"packer = {value(spec['packer'])}", f"kernel = {value(spec['kernel'])}"]
    for step in spec["transforms"]:
        lines += ["", "[[transforms]]", f"name = {value(step['name'])}",
                  f"options = {value(step['options'])}"]
    lines += ["", "[quantizer]", f"name = {value(spec['quantizer']['name'])}",
              f"options = {value(spec['quantizer']['options'])}", "", "[scheme]"]
    lines += [f"{k} = {value(v)}" for k, v in spec["scheme"].items() if v is not None]
    return "\n".join(lines) + "\n"


def test_toml_recipe_round_trip(registry, tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    pipeline = Pipeline.from_toml(path)
    assert pipeline.short_form() == "rotate,needs-rotated,tuned"
    assert pipeline.scheme == Scheme(bits=3, group_size=128, symmetric=True)
    resolved = pipeline.validate(registry)
    assert resolved.quantizer.config == Tuned.Config(iters=5, damp=0.05, skip=("lm_head",),
                                                     mode="mse")

    # Spec -> TOML -> Pipeline gives the same pipeline, and the filled-in spec (what a
    # checkpoint records) validates to the same components.
    again = tmp_path / "again.toml"
    again.write_text(to_toml(pipeline.to_spec()))
    assert Pipeline.from_toml(again) == Pipeline.from_spec(pipeline.to_spec())
    assert Pipeline.from_toml(again).to_spec() == pipeline.to_spec()
    full = tmp_path / "full.toml"
    full.write_text(to_toml(resolved.spec()))
    reresolved = Pipeline.from_toml(full).validate(registry)
    assert reresolved.spec() == resolved.spec()
    assert reresolved.quantizer.config == resolved.quantizer.config


def test_recipe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Pipeline.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[quantizer\nname = 'rtn'\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        Pipeline.from_toml(bad)


def test_observer_options_reach_the_observers_and_unused_ones_are_errors(qcore_register_plugin):
    from dataclasses import dataclass as _dataclass

    from qcore.builtin.observers import MinMaxObserver as _MinMax
    from qcore.builtin.rtn import RTNQuantizer as _RTN
    from qcore.errors import ConfigError as _ConfigError
    from qcore.testing import make_plugin as _make_plugin

    class ClippedMinMax(_MinMax):
        name = "clipped-minmax"

        @_dataclass(frozen=True)
        class Config:
            clip: float = 1.0

    class NeedsClipped(_RTN):
        name = "needs-clipped"
        needs = frozenset({"clipped-minmax"})

        def needs_for(self, scheme):
            return self.needs

    qcore_register_plugin(_make_plugin("clip", observers=[ClippedMinMax], quantizers=[NeedsClipped]))
    spec = {"quantizer": "needs-clipped", "observers": {"clipped-minmax": {"clip": 0.5}}}
    resolved = Pipeline.from_spec(spec).validate()
    assert resolved.observers["clipped-minmax"]().config.clip == 0.5
    assert resolved.spec()["observers"] == [{"name": "clipped-minmax", "options": {"clip": 0.5}}]
    assert Pipeline.from_spec(resolved.spec()).validate().observers["clipped-minmax"]().config.clip == 0.5
    with pytest.raises(_ConfigError, match="observer\\(s\\) minmax, which no step of this pipeline needs"):
        Pipeline.from_spec({"quantizer": "rtn", "observers": {"minmax": {}}}).validate()
    with pytest.raises(_ConfigError, match="has no option 'clp'; valid options: clip"):
        Pipeline.from_spec({"quantizer": "needs-clipped",
                            "observers": {"clipped-minmax": {"clp": 1}}}).validate()
