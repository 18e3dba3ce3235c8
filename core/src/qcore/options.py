"""Building a component's frozen ``Config`` from user options, with errors for people."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, Union

from qcore.errors import ConfigError
from qcore.interfaces import Component


def build_config(component: type[Component], options: Mapping[str, Any] | None) -> Any:
    """``component.Config(**options)`` with unknown options and wrong types reported by
    name. Values from TOML or the command line are coerced where unambiguous
    (``"true"`` -> True, ``"3"`` -> 3, a list -> tuple)."""
    options = dict(options or {})
    label = f"{component.kind} {component.name!r}"
    fields = {f.name: f for f in dataclasses.fields(component.Config)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none: it takes no options)"
        raise ConfigError(f"{label} has no option {', '.join(map(repr, unknown))}; "
                          f"valid options: {valid}")
    hints = typing.get_type_hints(component.Config)
    values = {key: _coerce(label, key, value, hints.get(key, Any)) for key, value in options.items()}
    try:
        return component.Config(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: invalid options {values}: {exc}") from exc


def _coerce(label: str, key: str, value: Any, annotation: Any) -> Any:
    try:
        return _coerce_to(value, annotation)
    except (TypeError, ValueError):
        raise ConfigError(f"{label} option {key!r} expects {_type_name(annotation)}, "
                          f"got {value!r}") from None


def _coerce_to(value: Any, annotation: Any) -> Any:
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce_to(value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and str(allowed) == value):
                return allowed
        raise ValueError(value)
    if origin in (tuple, list, frozenset):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise TypeError(value)
        item = args[0] if args else Any
        return (frozenset if origin is frozenset else tuple)(_coerce_to(v, item) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise TypeError(value)
    if annotation is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value)
        raise TypeError(value)
    if annotation is float:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise TypeError(value)
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A Config as JSON-friendly options (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, (tuple, frozenset)) else value
    return out
