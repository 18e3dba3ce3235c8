"""One test per hook: a plugin implementing it registers a component that appears in the
registry, attributed to the plugin's distribution and version."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest

from qcore import hookimpl, hookspecs
from qcore.interfaces import (
    CheckpointFormat,
    KernelProvider,
    KernelSupport,
    Observer,
    Packer,
    Quantizer,
    Transform,
)
from qcore.registry import Origin
from qcore.testing import make_plugin


class SampleObserver(Observer):
    """Counts tokens."""

    name = "token-count"


class SampleTransform(Transform):
    """Does nothing, declares a product."""

    name = "noop-rotate"
    provides = frozenset({"rotated"})


class SampleQuantizer(Quantizer):
    """Needs the sample observer's statistic."""

    name = "sample-q"
    needs = frozenset({"token-count"})

    @dataclass(frozen=True)
    class Config:
        damp: float = 0.01


class SamplePacker(Packer):
    """A layout of its own."""

    name = "sample-pack"
    format = "int"
    layout = "sample-layout"


class SampleKernels(KernelProvider):
    """Serves the sample layout."""

    name = "sample-kernels"
    support = KernelSupport(ops=frozenset({"linear"}), layouts=frozenset({"sample-layout"}),
                            priority=10)


class SampleFormat(CheckpointFormat):
    """Reads a made-up quant_method."""

    name = "sample-format"
    quant_methods = frozenset({"sample"})


#: Hook -> a class its implementation registers. A new hook needs an entry (and a test).
SAMPLES = {
    "qcore_register_observers": SampleObserver,
    "qcore_register_transforms": SampleTransform,
    "qcore_register_quantizers": SampleQuantizer,
    "qcore_register_packers": SamplePacker,
    "qcore_register_kernels": SampleKernels,
    "qcore_register_checkpoint_formats": SampleFormat,
}


def hooks_module(hook_name: str, cls: type) -> object:
    module = make_plugin("sample")

    def register_hook(register):
        register(cls)

    register_hook.__name__ = hook_name
    setattr(module, hook_name, hookimpl(register_hook))
    return module


def test_every_hook_has_a_sample() -> None:
    specs = {name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
             if name.startswith("qcore_")}
    assert specs == set(hookspecs.REGISTRATION_HOOKS) == set(SAMPLES)


@pytest.mark.parametrize("hook_name", sorted(SAMPLES))
def test_hook_registers_a_component_attributed_to_its_distribution(qcore_plugin_manager,
                                                                   hook_name: str) -> None:
    cls = SAMPLES[hook_name]
    kind = hookspecs.REGISTRATION_HOOKS[hook_name]
    assert cls.kind == kind
    qcore_plugin_manager.register_module(hooks_module(hook_name, cls), "sample",
                                         "qcore-plugin-sample", "2.0.1")
    qcore_plugin_manager.raise_errors()
    registration = qcore_plugin_manager.checked_registry().get(kind, cls.name)
    assert registration.cls is cls
    assert registration.origin == Origin("sample", "qcore-plugin-sample", "2.0.1")
    assert qcore_plugin_manager.distribution_of(kind, cls.name) == ("qcore-plugin-sample", "2.0.1")
    info = qcore_plugin_manager.plugins["sample"]
    assert info.hooks == [hook_name]
    assert info.components == {kind: [cls.name]}
    report = {p["name"]: p for p in qcore_plugin_manager.report()}
    assert report["sample"]["components"] == {kind: [cls.name]}
    # The built-ins are untouched.
    assert qcore_plugin_manager.registry.find("quantizer", "rtn") is not None


@pytest.mark.parametrize("hook_name", sorted(SAMPLES))
def test_hook_refuses_a_class_of_another_kind(qcore_plugin_manager, hook_name: str) -> None:
    kind = hookspecs.REGISTRATION_HOOKS[hook_name]
    wrong = SampleObserver if kind != "observer" else SampleQuantizer
    qcore_plugin_manager.register_module(hooks_module(hook_name, wrong), "sample",
                                         "qcore-plugin-sample", "2.0.1")
    message = str(qcore_plugin_manager.errors[0])
    assert f"registered {wrong!r} as a {kind}" in message
    assert "qcore-plugin-sample" in message


def test_one_plugin_may_implement_every_hook(qcore_plugin_manager) -> None:
    module = make_plugin("everything", observers=[SampleObserver], transforms=[SampleTransform],
                         quantizers=[SampleQuantizer], packers=[SamplePacker],
                         kernels=[SampleKernels], checkpoint_formats=[SampleFormat])
    qcore_plugin_manager.register_module(module, "everything", "qcore-plugin-everything", "1.0")
    info = qcore_plugin_manager.plugins["everything"]
    assert info.hooks == sorted(SAMPLES)
    assert info.components == {cls.kind: [cls.name] for cls in SAMPLES.values()}
    for cls in SAMPLES.values():
        assert qcore_plugin_manager.registry.get(cls.kind, cls.name).origin.plugin == "everything"


def test_a_hook_may_take_fewer_arguments_than_its_spec(qcore_plugin_manager) -> None:
    # pluggy's rule: hooks grow by new optional arguments, old implementations keep working.
    calls = []
    module = make_plugin("quiet")

    @hookimpl
    def qcore_register_packers():
        calls.append("called")

    module.qcore_register_packers = qcore_register_packers
    qcore_plugin_manager.register_module(module, "quiet", "qcore-plugin-quiet", "1.0")
    assert qcore_plugin_manager.errors == [] and calls == ["called"]
    assert qcore_plugin_manager.plugins["quiet"].components == {}


def test_hook_with_an_unknown_argument_is_refused(qcore_plugin_manager) -> None:
    module = make_plugin("greedy")

    @hookimpl
    def qcore_register_packers(register, registry):
        raise AssertionError("never called")

    module.qcore_register_packers = qcore_register_packers
    qcore_plugin_manager.register_module(module, "greedy", "qcore-plugin-greedy", "1.0")
    message = str(qcore_plugin_manager.errors[0])
    assert "plugin 'greedy' from qcore-plugin-greedy 1.0 is invalid" in message
    assert "registry" in message


def test_registered_components_compose_into_a_pipeline(qcore_plugin_manager) -> None:
    from qcore.pipeline import Pipeline

    module = make_plugin("everything", observers=[SampleObserver], transforms=[SampleTransform],
                         quantizers=[SampleQuantizer], packers=[SamplePacker],
                         kernels=[SampleKernels], checkpoint_formats=[SampleFormat])
    qcore_plugin_manager.register_module(module, "everything", "qcore-plugin-everything", "1.0")
    resolved = Pipeline.from_spec({
        "transforms": ["noop-rotate"], "quantizer": {"name": "sample-q", "options": {"damp": 0.1}},
        "packer": "sample-pack"}).validate()
    assert {n: f.cls for n, f in resolved.observers.items()} == {"token-count": SampleObserver}
    assert resolved.kernel == "sample-kernels"
    assert resolved.quantizer.config == SampleQuantizer.Config(damp=0.1)
    assert resolved.distributions == {"qcore-plugin-everything": "1.0"}  # no built-in took part
