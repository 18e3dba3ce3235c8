"""Pipelines: zero or more transforms, one quantizer, one packer, a kernel choice and the
scheme, composed from installed plugins by name and checked before any model loads."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from qcore.errors import ConfigError, KernelNotFoundError, PipelineError, UnknownComponentError
from qcore.interfaces import Component, KernelRequest, Observer, Packer, Quantizer, Transform
from qcore.kernel_select import AUTO, rank_providers, select_kernel
from qcore.options import build_config, config_to_dict
from qcore.registry import KNOWN_PROVIDERS, Registry
from qcore.scheme import Scheme

DEFAULT_QUANTIZER = "rtn"
_SPEC_KEYS = {"transforms", "quantizer", "observers", "packer", "kernel", "scheme"}


@dataclass(frozen=True)
class Step:
    """A component named in a pipeline, with its options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Recorded for a transform that ran after quantization (in a checkpoint's spec), so
    #: that the pipeline reads in its order where that transform is not installed.
    after_quantization: bool = False

    @classmethod
    def parse(cls, value: Any, where: str) -> Step:
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping) and isinstance(value.get("name"), str):
            extra = set(value) - {"name", "options", "after_quantization"}
            if extra:
                raise ConfigError(f"{where}: unexpected key(s) {sorted(extra)}; a step is "
                                  "{name = '...', options = {...}}")
            options = value.get("options") or {}
            if not isinstance(options, Mapping):
                raise ConfigError(f"{where}: options must be a table, got {options!r}")
            return cls(value["name"], dict(options), value.get("after_quantization") is True)
        raise ConfigError(f"{where}: expected a name or {{name = '...', options = {{...}}}}, "
                          f"got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "options": dict(self.options)}
        if self.after_quantization:
            out["after_quantization"] = True
        return out


@dataclass(frozen=True)
class Pipeline:
    """A pipeline as data. Build it with :meth:`from_spec`, :meth:`from_toml` or
    :meth:`from_names`; check it with :meth:`validate`."""

    quantizer: Step = field(default_factory=lambda: Step(DEFAULT_QUANTIZER))
    transforms: tuple[Step, ...] = ()
    scheme: Scheme = field(default_factory=Scheme)
    packer: str = AUTO
    kernel: str = AUTO
    #: Options of observers the steps need (by observer name); observers themselves are
    #: added by what the steps need, not listed here.
    observers: tuple[Step, ...] = ()

    # ---------------------------------------------------------------- building

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Pipeline:
        """From a dict: ``{"transforms": [...], "quantizer": "gptq" | {name, options},
        "packer": "auto", "kernel": "auto", "scheme": {"bits": 4, ...}}``."""
        if not isinstance(spec, Mapping):
            raise ConfigError(f"a pipeline spec is a mapping, got {type(spec).__name__}")
        unknown = sorted(set(spec) - _SPEC_KEYS)
        if unknown:
            raise ConfigError(f"unknown pipeline key(s) {', '.join(unknown)}; valid keys: "
                              f"{', '.join(sorted(_SPEC_KEYS))}")
        transforms = spec.get("transforms", [])
        if isinstance(transforms, (str, Mapping)) or not isinstance(transforms, Sequence):
            raise ConfigError("'transforms' must be a list of steps")
        scheme = spec.get("scheme", {})
        observers = spec.get("observers", [])
        if isinstance(observers, Mapping):  # {"hessian": {options}} is accepted too
            observers = [{"name": k, "options": v} for k, v in observers.items()]
        return cls(
            observers=tuple(Step.parse(o, f"observers[{i}]") for i, o in enumerate(observers)),
            quantizer=Step.parse(spec.get("quantizer", DEFAULT_QUANTIZER), "quantizer"),
            transforms=tuple(Step.parse(t, f"transforms[{i}]") for i, t in enumerate(transforms)),
            scheme=scheme if isinstance(scheme, Scheme) else Scheme.from_dict(scheme),
            packer=_name(spec.get("packer", AUTO), "packer"),
            kernel=_name(spec.get("kernel", AUTO), "kernel"),
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> Pipeline:
        """From a TOML recipe with the keys of :meth:`from_spec`."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"recipe file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"recipe file {path} is not valid TOML: {exc}") from None
        return cls.from_spec(data)

    @classmethod
    def from_names(cls, names: str, scheme: Scheme | None = None,
                   options: Mapping[str, Mapping[str, Any]] | None = None,
                   registry: Registry | None = None, packer: str = AUTO,
                   kernel: str = AUTO) -> Pipeline:
        """From the short form ``"awq,gptq"``: transforms in order, then the quantizer
        (``rtn`` when the list names none), then any after-quantization transforms
        (``"vptq,finetune"`` with qcore-plugin-finetune). ``kind:name`` (``transform:x``, ``quantizer:x``) settles a
        name that is registered as both. ``options`` maps a step's name to its options."""
        registry = registry if registry is not None else _default_registry()
        options = dict(options or {})
        tokens = [t.strip() for t in names.split(",") if t.strip()]
        if not tokens:
            raise ConfigError("the pipeline is empty: name at least a quantizer, e.g. 'rtn' or 'gptq'")
        kinds = [_kind_of(registry, token, last=(i == len(tokens) - 1)) for i, token in enumerate(tokens)]
        steps = [(kind, name) for kind, name in kinds]
        quantizers = [name for kind, name in steps if kind == "quantizer"]
        if len(quantizers) > 1:
            raise ConfigError(f"pipeline {names!r}: name one quantizer (found {quantizers})")
        if quantizers:
            at = steps.index(("quantizer", quantizers[0]))
            before = [name for _, name in steps[at + 1:]
                      if not _after_quantization(registry, name)]
            if before:
                one = len(before) == 1
                raise ConfigError(
                    f"pipeline {names!r}: {', '.join(before)} {'edits' if one else 'edit'} "
                    f"the block before quantization; put {'it' if one else 'them'} before "
                    f"the quantizer {quantizers[0]!r} (only after-quantization transforms "
                    "may follow it)")
        quantizer = quantizers[0] if quantizers else DEFAULT_QUANTIZER
        unused = sorted(set(options) - {name for _, name in steps} - {quantizer})
        if unused:
            raise ConfigError(f"options given for {', '.join(unused)}, which "
                              f"{'is' if len(unused) == 1 else 'are'} not in pipeline {names!r}")
        return cls(
            quantizer=Step(quantizer, dict(options.get(quantizer, {}))),
            transforms=tuple(Step(name, dict(options.get(name, {})))
                             for kind, name in steps if kind == "transform"),
            scheme=scheme or Scheme(), packer=packer, kernel=kernel)

    def to_spec(self) -> dict[str, Any]:
        """JSON-able dict that :meth:`from_spec` reads back."""
        return {
            "transforms": [t.to_dict() for t in self.transforms],
            "quantizer": self.quantizer.to_dict(),
            "observers": [o.to_dict() for o in self.observers],
            "packer": self.packer,
            "kernel": self.kernel,
            "scheme": self.scheme.to_dict(),
        }

    def short_form(self, registry: Registry | None = None) -> str:
        """``"awq,gptq"``: the transforms, the quantizer, then the after-quantization
        transforms (as :meth:`from_names` reads them)."""
        registry = registry if registry is not None else _default_registry()
        after = [t.name for t in self.transforms
                 if t.after_quantization or _after_quantization(registry, t.name)]
        before = [t.name for t in self.transforms if t.name not in after]
        return ",".join([*before, self.quantizer.name, *after])

    # -------------------------------------------------------------- validating

    def validate(self, registry: Registry | None = None) -> ResolvedPipeline:
        """Resolve every name, build every Config, check needs, the scheme against the
        quantizer and packer, and that a kernel exists for the result. Raises
        :class:`~qcore.errors.QcoreError` subclasses with a message for people."""
        registry = registry if registry is not None else _default_registry()
        transforms = [_instantiate(registry, "transform", step) for step in self.transforms]
        quantizer: Quantizer = _instantiate(registry, "quantizer", self.quantizer)  # type: ignore[assignment]
        scheme = self.scheme
        _check_scheme(quantizer, scheme, registry)

        observers: dict[str, ObserverFactory] = {}
        provided: dict[str, str] = {}
        observer_options = {o.name: o for o in self.observers}
        all_steps: list[Transform | Quantizer] = [*transforms, quantizer]
        for transform in transforms:
            _check_after_quantization(transform, quantizer)
        later_provides = {p: s.name for s in all_steps for p in getattr(s, "provides", ())}
        for step in all_steps:
            needs = step.needs_for(scheme) if isinstance(step, Quantizer) else step.needs
            for need in sorted(needs):
                if need in provided:
                    continue
                reg = registry.find("observer", need)
                if reg is not None:
                    step_spec = observer_options.get(need, Step(need))
                    observers[need] = ObserverFactory(
                        reg.cls, build_config(reg.cls, step_spec.options))  # type: ignore[arg-type]
                    continue
                raise PipelineError(_unmet_need(step, need, later_provides))
            for product in getattr(step, "provides", ()):
                provided[product] = step.name

        unused = sorted(set(observer_options) - set(observers))
        if unused:
            needed = ", ".join(sorted(observers)) or "none"
            raise ConfigError(f"options given for observer(s) {', '.join(unused)}, which no step of "
                              f"this pipeline needs (observers it uses: {needed})")
        packer = _resolve_packer(registry, self.packer, quantizer, scheme)
        kernel = _check_kernel(registry, self.kernel, packer, scheme)
        used = [(s.kind, s.name) for s in all_steps] + [("packer", packer.name), ("kernel", kernel)]
        used += [("observer", name) for name in observers]
        distributions = {}
        for kind, name in used:
            origin = registry.get(kind, name).origin
            distributions[origin.distribution] = origin.version
        return ResolvedPipeline(
            pipeline=dataclasses.replace(self, packer=packer.name), scheme=scheme,
            transforms=transforms, quantizer=quantizer, packer=packer, observers=observers,
            kernel=kernel, distributions=dict(sorted(distributions.items())))


@dataclass
class ResolvedPipeline:
    """A validated pipeline: component instances, the observers its steps need, the packer
    chosen for the quantizer's format, and the distributions that take part."""

    pipeline: Pipeline
    scheme: Scheme
    transforms: list[Transform]
    quantizer: Quantizer
    packer: Packer
    observers: dict[str, ObserverFactory]
    #: The provider that serves the layout on CPU in float32 (per-layer choice happens at
    #: run time on the layer's device and dtype).
    kernel: str
    distributions: dict[str, str]

    def needs_of(self, step: Transform | Quantizer) -> frozenset[str]:
        needs = step.needs_for(self.scheme) if isinstance(step, Quantizer) else step.needs
        return frozenset(n for n in needs if n in self.observers)

    def spec(self) -> dict[str, Any]:
        """The pipeline spec with every option filled in (defaults included)."""
        spec = self.pipeline.to_spec()
        for step, instance in zip(spec["transforms"], self.transforms, strict=True):
            step["options"] = config_to_dict(instance.config)
            if instance.after_quantization:
                step["after_quantization"] = True
        spec["quantizer"]["options"] = config_to_dict(self.quantizer.config)
        spec["observers"] = [{"name": name, "options": config_to_dict(factory.config)}
                             for name, factory in self.observers.items()]
        return spec


@dataclass(frozen=True)
class ObserverFactory:
    """Makes one observer instance (per input group) with the pipeline's options."""

    cls: type[Observer]
    config: Any

    @property
    def needs_outputs(self) -> bool:
        return self.cls.needs_outputs

    def __call__(self) -> Observer:
        return self.cls(self.config)


def _default_registry() -> Registry:
    from qcore.plugins import get_registry

    return get_registry()


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a name or 'auto', got {value!r}")
    return value


def _kind_of(registry: Registry, token: str, last: bool) -> tuple[str, str]:
    if ":" in token:
        kind, name = (part.strip() for part in token.split(":", 1))
        if kind not in {"transform", "quantizer"}:
            raise ConfigError(f"{token!r}: a qualifier is 'transform:' or 'quantizer:', not {kind!r}")
        registry.get(kind, name)
        return kind, name
    kinds = [k for k in registry.kinds_of(token) if k in {"transform", "quantizer"}]
    if len(kinds) == 2:
        raise ConfigError(f"{token!r} is both a transform and a quantizer; write "
                          f"'transform:{token}' or 'quantizer:{token}'")
    if kinds:
        return kinds[0], token
    installed_t = ", ".join(registry.names("transform")) or "none"
    installed_q = ", ".join(registry.names("quantizer")) or "none"
    msg = (f"Unknown pipeline step: {token!r}. Installed transforms: {installed_t}; "
           f"installed quantizers: {installed_q}.")
    if token in KNOWN_PROVIDERS:
        msg += f" {token!r} is provided by {KNOWN_PROVIDERS[token]}: pip install {KNOWN_PROVIDERS[token]}"
    raise UnknownComponentError(msg)


def _after_quantization(registry: Registry, name: str) -> bool:
    reg = registry.find("transform", name)
    return reg is not None and bool(getattr(reg.cls, "after_quantization", False))


def _check_after_quantization(transform: Transform, quantizer: Quantizer) -> None:
    if not transform.after_quantization:
        return
    if transform.needs:
        raise PipelineError(f"transform {transform.name!r} runs after quantization and cannot "
                            f"need statistics ({', '.join(sorted(transform.needs))})")
    formats = transform.formats
    if formats is not None and quantizer.produces not in formats:
        raise ConfigError(
            f"transform {transform.name!r} edits weights of format(s) "
            f"{', '.join(sorted(formats))}, but quantizer {quantizer.name!r} produces "
            f"{quantizer.produces!r}: use a quantizer producing "
            f"{' or '.join(repr(f) for f in sorted(formats))}, or drop "
            f"{transform.name!r} from the pipeline")


def _instantiate(registry: Registry, kind: str, step: Step) -> Component:
    cls = registry.get(kind, step.name).cls
    return cls(build_config(cls, step.options))


def _check_scheme(quantizer: Quantizer, scheme: Scheme, registry: Registry) -> None:
    if scheme.bits not in quantizer.supported_bits:
        raise ConfigError(f"quantizer {quantizer.name!r} supports bits "
                          f"{sorted(quantizer.supported_bits)}, not {scheme.bits}")
    if scheme.act_bits not in quantizer.supported_act_bits:
        supported = sorted(quantizer.supported_act_bits, key=lambda b: -1 if b is None else b)
        able = sorted(reg.name for reg in registry.of_kind("quantizer")
                      if scheme.act_bits in reg.cls.supported_act_bits  # type: ignore[attr-defined]
                      and scheme.bits in reg.cls.supported_bits)  # type: ignore[attr-defined]
        raise ConfigError(f"quantizer {quantizer.name!r} does not quantize activations to "
                          f"{scheme.act_bits} bits; it supports act_bits {supported} "
                          "(None = weight-only). "
                          + (f"Quantizers that can: {', '.join(able)}" if able else
                             "No installed quantizer can"))


def _unmet_need(step: Component, need: str, later_provides: Mapping[str, str]) -> str:
    msg = f"{step.kind} {step.name!r} needs {need!r}, which no installed observer makes"
    if need in later_provides and later_provides[need] != step.name:
        return msg + (f"; step {later_provides[need]!r} provides it but comes later: put "
                      f"{later_provides[need]!r} before {step.name!r}")
    msg += " and no earlier step provides"
    if need in KNOWN_PROVIDERS:
        msg += f"; it is provided by {KNOWN_PROVIDERS[need]}: pip install {KNOWN_PROVIDERS[need]}"
    return msg


def _resolve_packer(registry: Registry, name: str, quantizer: Quantizer, scheme: Scheme) -> Packer:
    if name == AUTO:
        candidates = [r.cls for r in registry.of_kind("packer")
                      if r.cls.format == quantizer.produces  # type: ignore[attr-defined]
                      and scheme.bits in r.cls.supported_bits]  # type: ignore[attr-defined]
        if not candidates:
            raise PipelineError(f"no installed packer reads format {quantizer.produces!r} "
                                f"(produced by quantizer {quantizer.name!r}) at {scheme.bits} "
                                "bits; install the plugin that ships its packer")
        candidates.sort(key=lambda c: (-c.priority, c.name))  # type: ignore[attr-defined]
        return candidates[0]()  # type: ignore[return-value]
    cls = registry.get("packer", name).cls
    if cls.format != quantizer.produces:  # type: ignore[attr-defined]
        raise PipelineError(f"packer {name!r} reads format {cls.format!r}, but quantizer "  # type: ignore[attr-defined]
                            f"{quantizer.name!r} produces {quantizer.produces!r}")
    if scheme.bits not in cls.supported_bits:  # type: ignore[attr-defined]
        raise PipelineError(f"packer {name!r} cannot store {scheme.bits}-bit codes")
    return cls()  # type: ignore[return-value]


def _check_kernel(registry: Registry, prefer: str, packer: Packer, scheme: Scheme) -> str:
    """A provider must serve the packed layout somewhere; report the CPU float32 choice."""
    errors = []
    for device, dtype in (("cpu", "float32"), ("cpu", "bfloat16"), ("cuda", "float16")):
        request = KernelRequest(op=packer.op, layout=packer.layout, bits=scheme.bits,
                                group_size=scheme.group_size, symmetric=scheme.symmetric,
                                in_features=0, out_features=0, act_bits=scheme.act_bits,
                                act_dynamic=scheme.act_dynamic,
                                act_group_size=scheme.act_group_size,
                                act_symmetric=scheme.act_symmetric, dtype=dtype, device=device)
        try:
            return select_kernel(registry, request, prefer).name
        except KernelNotFoundError as exc:
            errors.append(str(exc))
            if prefer != AUTO:
                able = sorted({cls.name for cls, why in rank_providers(registry, request)
                               if why is None})
                if able:
                    errors[-1] += f" Providers that can: {', '.join(able)}."
    raise PipelineError(f"no kernel for the result of this pipeline: {errors[0]}")
