"""QuantLinear: a linear layer that holds packed tensors and calls the selected kernel."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qcore.interfaces import KernelProvider, KernelRequest, PackedWeight
from qcore.kernel_select import AUTO, select_kernel

LOWRANK_DOWN = "lowrank_down"
LOWRANK_UP = "lowrank_up"


class QuantLinear(nn.Module):
    """Replaces an ``nn.Linear`` (or GPT-2's ``Conv1D``): ``y = op(x, W) + bias``, with
    ``W`` held packed and computed by a kernel provider chosen per device and dtype (the
    highest-priority one that supports the layer, or the one named by ``kernel``).

    Optional low-rank branch (SVDQuant): ``y += (x @ lowrank_down.T) @ lowrank_up.T`` on
    the unquantized input, in the input's dtype. A provider declaring
    ``KernelSupport.lowrank`` computes it inside its op (it receives the two tensors with
    the packed weight); for any other provider this layer adds it after the op.
    The packed tensors are buffers, so ``state_dict()`` holds exactly what a checkpoint
    stores.
    """

    def __init__(self, packed: PackedWeight, op: str = "linear", bias: torch.Tensor | None = None,
                 kernel: str = AUTO, lowrank: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.layout = packed.layout
        self.op = op
        self.params = dict(packed.params)
        self.kernel = kernel
        self.tensor_names = tuple(packed.tensors)
        for key, tensor in packed.tensors.items():
            self.register_buffer(key, tensor)
        self.register_buffer("bias", bias)
        if lowrank is not None:
            down, up = lowrank
            self.register_buffer(LOWRANK_DOWN, down)
            self.register_buffer(LOWRANK_UP, up)
        else:
            self.lowrank_down = None
            self.lowrank_up = None
        self._providers: dict[tuple[torch.device, torch.dtype], tuple[KernelProvider, Any]] = {}
        #: (device, dtype) keys whose provider computes the low-rank branch itself
        self._fused: set[tuple[torch.device, torch.dtype]] = set()
        self._prepared_state: dict[tuple[torch.device, torch.dtype],
                                   tuple[tuple[int, int], ...]] = {}

    # ---------------------------------------------------------------- weights

    def packed(self) -> PackedWeight:
        return PackedWeight(layout=self.layout, shape=(self.out_features, self.in_features),
                            tensors={k: getattr(self, k) for k in self.tensor_names},
                            params=dict(self.params))

    def replace_tensors(self, values: Mapping[str, torch.Tensor]) -> None:
        """Replace stored tensors by name (each cast to its buffer's dtype and device, as
        a new tensor: the old one may be an inference tensor); every kernel prepares again
        on the next forward. For methods that edit a quantized layer's float tensors."""
        unknown = sorted(set(values) - set(self.tensor_names))
        if unknown:
            raise KeyError(f"{', '.join(unknown)}: not stored by this layer "
                           f"(it stores {', '.join(self.tensor_names)})")
        with torch.no_grad():
            for key, value in values.items():
                old = self._buffers[key]
                setattr(self, key, value.detach().to(old.device, old.dtype).clone())
        self._providers.clear()

    def request(self, device: torch.device, dtype: torch.dtype) -> KernelRequest:
        cc = None
        if device.type == "cuda":
            cc = torch.cuda.get_device_capability(device)
        request = KernelRequest.for_packed(self.packed(), self.op,
                                           dtype=str(dtype).removeprefix("torch."),
                                           device=device.type, compute_capability=cc)
        down = self._buffers.get(LOWRANK_DOWN)
        if down is not None:
            request = dataclasses.replace(request, lowrank_rank=int(down.shape[0]))
        return request

    def provider_for(self, device: torch.device, dtype: torch.dtype) -> tuple[KernelProvider, Any]:
        """The kernel provider (and its prepared weight) for inputs on ``device``/``dtype``.
        Prepared again when a stored tensor was replaced or changed in place since
        (``load_state_dict``, ``copy_``): a provider's prepared weight is a conversion of the
        tensors, which would otherwise go stale silently."""
        key = (device, dtype)
        state = self._tensor_state()
        states = self.__dict__.setdefault("_prepared_state", {})  # (modules pickled before it)
        cached = self._providers.get(key)
        if cached is None or states.get(key) != state:
            from qcore.plugins import get_registry

            cls = select_kernel(get_registry(), self.request(device, dtype), self.kernel)
            provider = cls()
            packed = self.packed()
            fused = self.__dict__.setdefault("_fused", set())
            fused.discard(key)
            if cls.support.lowrank and self._buffers.get(LOWRANK_DOWN) is not None:
                packed.tensors[LOWRANK_DOWN] = self._buffers[LOWRANK_DOWN]
                packed.tensors[LOWRANK_UP] = self._buffers[LOWRANK_UP]
                fused.add(key)
            cached = (provider, provider.prepare(packed, device))
            self._providers[key] = cached
            states[key] = state
        return cached

    def _tensor_state(self) -> tuple[tuple[int, int], ...]:
        """Each stored tensor's storage address and in-place version counter (an inference
        tensor, made under ``torch.inference_mode``, has none: its address alone)."""
        buffers = self._buffers  # not getattr: nn.Module's lookup is slow on every forward
        tensors = [buffers[k] for k in self.tensor_names]
        if buffers.get(LOWRANK_DOWN) is not None:  # a fused provider prepares the branch too
            tensors += [buffers[LOWRANK_DOWN], buffers[LOWRANK_UP]]
        return tuple([(t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors])

    @property
    def provider_name(self) -> str | None:
        """Name of the provider of the most recent forward (None before the first)."""
        if not self._providers:
            return None
        return next(reversed(self._providers.values()))[0].name

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        provider, prepared = self.provider_for(x.device, x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        buffers = self._buffers  # the per-call path avoids nn.Module's attribute lookup
        y = getattr(provider, self.op)(x2, prepared, buffers["bias"])
        down = buffers.get(LOWRANK_DOWN)
        if down is not None and (x.device, x.dtype) not in self.__dict__.get("_fused", ()):
            y = y + (x2 @ down.to(x.dtype).T) @ buffers[LOWRANK_UP].to(x.dtype).T
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:  # type: ignore[override]
        self._providers.clear()  # device or dtype changes: prepare again
        self.__dict__.get("_fused", set()).clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        p = self.params
        bits = p.get("bits")
        kernel = self.provider_name or f"{self.kernel} (not yet run)"
        if "vector_size" in p:
            from qcore.codebook import describe_vq

            extras = (f", low-rank r{self.lowrank_down.shape[0]}"
                      if self.lowrank_down is not None else "")
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"layout={self.layout}, W{bits} {describe_vq(p)}{extras}, kernel={kernel}")
        act = f"A{p['act_bits']}" if p.get("act_bits") else ""
        group = p.get("group_size")
        group_label = "per-channel" if group == -1 else f"g{group}"
        sym = "sym" if p.get("symmetric") else "asym"
        extras = ""
        if p.get("act_bits") and p.get("act_group_size", -1) != -1:
            extras += f" act-g{p['act_group_size']}"
        if p.get("act_bits") and not p.get("act_symmetric", True):
            extras += " act-asym"
        extras += ", act-order" if "g_idx" in self.tensor_names else ""
        if self.lowrank_down is not None:
            extras += f", low-rank r{self.lowrank_down.shape[0]}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"layout={self.layout}, W{bits}{act} {group_label} {sym}{extras}, kernel={kernel}")
