"""Choosing a kernel provider for a request, by declared support and priority."""

from __future__ import annotations

from qcore.errors import KernelNotFoundError
from qcore.interfaces import KernelProvider, KernelRequest
from qcore.registry import Registry

AUTO = "auto"


def rank_providers(registry: Registry, request: KernelRequest) -> list[tuple[type[KernelProvider], str | None]]:
    """Every provider with the reason it cannot serve ``request`` (None = it can),
    best first: supported before unsupported, then by priority, then by name."""
    ranked = []
    for reg in registry.of_kind("kernel"):
        cls: type[KernelProvider] = reg.cls  # type: ignore[assignment]
        reason = cls.unsupported_reason(request)
        if reason is None:
            reason = cls.unavailable_reason()
            if reason is not None:
                reason = f"unavailable: {reason}"
        ranked.append((cls, reason))
    ranked.sort(key=lambda item: (item[1] is not None, -item[0].support.priority, item[0].name))
    return ranked


def select_kernel(registry: Registry, request: KernelRequest, prefer: str = AUTO) -> type[KernelProvider]:
    """The provider that serves ``request``: the named one (``prefer``), which must
    support it, or with ``"auto"`` the highest-priority provider that does."""
    if prefer != AUTO:
        cls: type[KernelProvider] = registry.get("kernel", prefer).cls  # type: ignore[assignment]
        reason = cls.unsupported_reason(request) or cls.unavailable_reason()
        if reason is not None:
            raise KernelNotFoundError(
                f"kernel provider {prefer!r} cannot run {describe(request)}: {reason}. "
                "Use kernel 'auto' to let qcore pick one that can.")
        return cls
    ranked = rank_providers(registry, request)
    if ranked and ranked[0][1] is None:
        return ranked[0][0]
    reasons = "; ".join(f"{cls.name}: {reason}" for cls, reason in ranked) or "no providers installed"
    raise KernelNotFoundError(f"no kernel provider supports {describe(request)} ({reasons})")


def describe(request: KernelRequest) -> str:
    act = f"A{request.act_bits}" if request.act_bits else ""
    return (f"{request.op} on layout {request.layout!r} W{request.bits}{act} group "
            f"{request.group_size} {request.dtype} on {request.device} "
            f"[{request.out_features}x{request.in_features}]")
