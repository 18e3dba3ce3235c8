"""The qcore plugin contract: every hook, typed and documented.

A plugin is a module (named by a ``qcore`` entry point) with functions marked
``@qcore.hookimpl``. Registration hooks only register classes; they do no work, so
importing a hooks module and calling its hooks is cheap (no torch import, no kernel
compile). Each hook receives ``register``, a callable that takes one component class of
the hook's kind; every hook implementation is called (none stops the others) and the
return value is ignored.

The classes' interfaces are in :mod:`qcore.interfaces`. Names must be unique within a
kind across all installed plugins: a duplicate is an error naming both distributions.

How the methods behind qcore map onto this contract
---------------------------------------------------

- Round-to-nearest (built-in): quantizer ``rtn`` produces format ``"int"``; packer ``int``
  writes layout ``"int-packed"``; the torch kernel provider computes ``linear`` on it.
- GPTQ: the core's built-in observer ``hessian`` (2·XᵀX running mean, shared with VPTQ
  and SpQR); quantizer ``gptq`` with ``needs = {"hessian"}`` and ``sequential = True``
  (true-sequential: each input group sees the inputs produced by the already-quantized
  earlier groups); ``quantize_group`` solves q/k/v at once since they share a Hessian;
  act-order is the ``"int"`` format's ``g_idx``.
- AWQ: observer of mean activation magnitude; transform ``awq`` scales each input-sharing
  group (``ctx.structure.groups``) and folds ``1/s`` into the group's scale source (the
  preceding norm or linear found by the core), searching α with ``ctx.quantizer`` so that
  ``awq,gptq`` searches with the quantizer that will run; transform ``awq-clip`` for the
  clipping search.
- VPTQ: quantizer ``vptq`` (``needs = {"hessian"}``) produces the core's codebook format
  ``"vq"`` (indices, codebooks, residual and outlier parts; :mod:`qcore.codebook`); the
  built-in packer ``vq`` writes layout ``"vq-packed"`` with ``op = "lut_linear"``, which
  the built-in ``torch-lut`` provider and faster kernel providers implement.
- Fine-tuning (qcore-plugin-finetune): transform ``finetune`` with
  ``after_quantization = True`` and ``formats = {"int", "vq"}`` tunes a quantized block's
  float tensors (codebooks, scales) towards the unquantized block's outputs
  (``ctx.targets``).
- Activation quantization (W8A8, static or dynamic): the scheme's ``act_bits`` and
  ``act_dynamic``; a quantizer lists the act bit-widths it supports in
  ``supported_act_bits``; static scales come from an observer (the built-in ``minmax``)
  and travel as ``input_scale`` in the quantized weight; kernels declare ``act_bits``
  in their :class:`~qcore.interfaces.KernelSupport`; W4A4 (contract 1.4) adds activation
  groups and grids (``act_group_size``, ``act_symmetric``).
- SVDQuant (qcore-plugin-svdquant): observer ``input-sample``; transform ``svdquant``
  smooths each input-sharing group (folded like AWQ's scales), then splits each weight
  into a 16-bit low-rank branch (``ctx.add_lowrank_branch``) and a residual that the
  pipeline's quantizer takes; kernels may fuse the branch (``KernelSupport.lowrank``).
- Formats other engines read (qcore-plugin-interop): checkpoint formats ``compressed-tensors``,
  ``gptq`` and ``awq`` export the ``"int"`` format's layers and import checkpoints of
  those formats as ``"int"`` weights.

Planned, not built yet (no plugin implements them; the contract already carries what they
need, except where marked):

- Quamba (Mamba): a transform applies a Hadamard rotation (folded into weights where the
  algebra allows; where it must run online, it is part of the layer's op) and suppresses
  the selective scan's input outliers; static 8-bit per-tensor scales come from
  observers; kernel providers implement the ``selective_scan`` op (declared; no provider
  implements it yet, and the core does not yet call it from a model).

A plugin may implement any subset of the hooks. pluggy lets an implementation accept
fewer arguments than its spec; hooks grow only by new optional arguments, new needs get
new hooks with new names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

from qcore import PROJECT_NAME

if TYPE_CHECKING:
    from qcore.interfaces import (
        CheckpointFormat,
        KernelProvider,
        Observer,
        Packer,
        Quantizer,
        Transform,
    )

_hookspec = pluggy.HookspecMarker(PROJECT_NAME)

# --------------------------------------------------------------------- registration ---


@_hookspec
def qcore_register_observers(register: Callable[[type[Observer]], None]) -> None:
    """Register observer classes: ``register(MyObserver)`` once per class.

    :param register: takes one subclass of :class:`qcore.interfaces.Observer`. Its
        ``name`` is the statistic it makes, the name steps list in their ``needs``.

    Every implementation is called; the return value is ignored.
    """


@_hookspec
def qcore_register_transforms(register: Callable[[type[Transform]], None]) -> None:
    """Register transform classes: ``register(MyTransform)`` once per class.

    :param register: takes one subclass of :class:`qcore.interfaces.Transform`: a
        function-preserving edit of a decoder block (scales folded into a preceding op,
        a rotation, a low-rank split) that runs before the block is quantized.

    Every implementation is called; the return value is ignored.
    """


@_hookspec
def qcore_register_quantizers(register: Callable[[type[Quantizer]], None]) -> None:
    """Register quantizer classes: ``register(MyQuantizer)`` once per class.

    :param register: takes one subclass of :class:`qcore.interfaces.Quantizer`, which
        turns one linear's weight and statistics into a
        :class:`~qcore.interfaces.QuantizedWeight` of the format it ``produces``.

    Every implementation is called; the return value is ignored.
    """


@_hookspec
def qcore_register_packers(register: Callable[[type[Packer]], None]) -> None:
    """Register packer classes: ``register(MyPacker)`` once per class.

    :param register: takes one subclass of :class:`qcore.interfaces.Packer`, which maps
        one logical ``format`` to one storage ``layout`` and back exactly.

    Every implementation is called; the return value is ignored.
    """


@_hookspec
def qcore_register_kernels(register: Callable[[type[KernelProvider]], None]) -> None:
    """Register kernel provider classes: ``register(MyKernels)`` once per class.

    :param register: takes one subclass of :class:`qcore.interfaces.KernelProvider`, whose
        ``support`` declares the ops (``linear``, ``lut_linear``, ``selective_scan``),
        layouts, bits, group sizes, dtypes, devices and GPU architectures it handles and
        its priority. Selection is by that data; ``unavailable_reason()`` is the only
        run-time check (e.g. CuPy or a GPU missing). Importing the provider's module must
        not import CuPy or compile anything.

    Every implementation is called; the return value is ignored.
    """


@_hookspec
def qcore_register_checkpoint_formats(register: Callable[[type[CheckpointFormat]], None]) -> None:
    """Register checkpoint formats other engines read (contract 1.3):
    ``register(MyFormat)`` once per class.

    :param register: takes one subclass of :class:`qcore.interfaces.CheckpointFormat`.
        Its ``name`` is what ``qcore export --format`` takes; its ``quant_methods`` are
        the ``quantization_config.quant_method`` values :func:`qcore.load` reads with it.

    Every implementation is called; the return value is ignored.
    """


#: Hook name -> component kind it registers.
REGISTRATION_HOOKS: dict[str, str] = {
    "qcore_register_observers": "observer",
    "qcore_register_transforms": "transform",
    "qcore_register_quantizers": "quantizer",
    "qcore_register_packers": "packer",
    "qcore_register_kernels": "kernel",
    "qcore_register_checkpoint_formats": "checkpoint_format",
}
