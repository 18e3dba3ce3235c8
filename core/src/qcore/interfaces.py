"""The component interfaces that plugins implement.

Six kinds of component plug into qcore. Each is a class with a ``name`` (unique within
its kind), a nested frozen dataclass ``Config`` whose fields are its options, and a
declaration of what it needs and makes, so that a pipeline can be checked before any
model is loaded:

=============  ==========================================  ===============================
kind           declares                                    does
=============  ==========================================  ===============================
Observer       ``name`` = the statistic it makes           collects statistics of a
               (``"hessian"``, ``"minmax"``), whether it    linear's inputs (and outputs)
               needs the linear's outputs                  during calibration
Transform      ``needs`` (statistics, products of earlier  edits a block so that its
               steps), ``provides``                        function is unchanged before
                                                           quantization
Quantizer      ``needs``, ``produces`` (a logical format), turns one linear's weight into
               ``supported_bits``, ``supported_act_bits``  a :class:`QuantizedWeight`
Packer         ``format`` it reads, ``layout`` it writes,  maps a logical format to a
               ``op`` its layout is computed with          storage layout and back,
                                                           exactly
KernelProvider ``support`` (:class:`KernelSupport`)        computes an op on a layout
Checkpoint-    ``quant_methods`` it imports                writes quantized layers in a
Format                                                     format other engines read, and
                                                           reads checkpoints other tools
                                                           wrote (contract 1.3)
=============  ==========================================  ===============================

This module imports no torch at run time: a plugin's hooks module can import it and its
component classes cheaply. Numerical work belongs in methods, which import what they need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

if TYPE_CHECKING:
    import torch

    from qcore.context import BlockContext
    from qcore.scheme import Scheme

KINDS: tuple[str, ...] = ("observer", "transform", "quantizer", "packer", "kernel",
                          "checkpoint_format")

JSONScalar = int | float | bool | str | None


class Component:
    """Base of every component: a name, a typed ``Config`` and an instance built from it."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""

    @dataclass(frozen=True)
    class Config:
        """No options."""

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring, for listings."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


# --------------------------------------------------------------------------- observers


class Observer(Component):
    """Collects one statistic of a linear layer during calibration.

    The observer's ``name`` is the statistic's name: a transform or quantizer that lists
    ``"hessian"`` in ``needs`` receives ``stats["hessian"]`` from the observer named
    ``hessian``. The core creates one instance per linear layer and calls
    :meth:`update` once per calibration batch, then :meth:`compute` once.
    """

    kind = "observer"
    #: True if :meth:`update` needs the linear's outputs (else ``outputs`` is None).
    needs_outputs: ClassVar[bool] = False
    #: The dtype the calibration forwards are autocast to (``torch.bfloat16``), or None
    #: when they run in the model's own precision. Set by the core on each instance
    #: before the first :meth:`update`. Under autocast a linear multiplies its inputs
    #: rounded to this dtype, whatever dtype they arrive in (a norm's float32 output
    #: too), so a statistic of the linear's products may round the inputs to it.
    calib_dtype: torch.dtype | None = None

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor | None) -> None:
        """Accumulate one batch. ``inputs`` is ``[tokens, in_features]`` in the dtype the
        block produced it (float32, or bfloat16 when calibration is autocast to bfloat16:
        convert with ``.float()`` where float32 is needed; :attr:`calib_dtype` says which
        dtype the linear itself computes in); ``outputs`` is ``[tokens, out_features]``,
        likewise. Runs outside autocast."""
        raise NotImplementedError

    def compute(self) -> Any:
        """The statistic (a tensor or a dict of tensors) after the last batch."""
        raise NotImplementedError


# -------------------------------------------------------------------------- transforms


class Transform(Component):
    """A function-preserving edit of one decoder block before its linears are quantized.

    Examples: AWQ scales folded into the preceding norm or linear, a Hadamard rotation,
    an SVD low-rank split, a channel reorder. :meth:`apply` receives a
    :class:`~qcore.context.BlockContext` with the block, its structure (input-sharing
    groups and their scale sources), the calibration inputs, the statistics of the
    observers named in ``needs``, the scheme, and the pipeline's quantizer (so a search
    can quantize candidate weights exactly as they will be quantized).
    """

    kind = "transform"
    #: Statistics (observer names) and products of earlier steps this transform needs.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Products later steps may rely on (e.g. ``"rotated"``, ``"lowrank"``).
    provides: ClassVar[frozenset[str]] = frozenset()
    #: True if :meth:`apply` leaves ``ctx.stats`` describing the edited block (AWQ
    #: rescales the statistics of the inputs it scales): a following transform that
    #: needs no other statistics then gets them without another observation pass.
    updates_stats: ClassVar[bool] = False
    #: True for a transform that edits the block *after* its linears are quantized (the
    #: block then holds :class:`~qcore.qlinear.QuantLinear` layers): it runs once the
    #: quantizer's weights are installed, with ``ctx.targets`` set to the unquantized
    #: model's outputs of this block, and may change the layers' stored floating-point
    #: tensors (codebooks, scales) to bring the block's outputs closer to them. Example:
    #: the built-in ``finetune``. Such a transform needs no observer statistics.
    after_quantization: ClassVar[bool] = False
    #: For an after-quantization transform: the logical formats it can edit (None: any).
    #: Pipeline validation refuses a quantizer producing another format.
    formats: ClassVar[frozenset[str] | None] = None

    def apply(self, ctx: BlockContext) -> None:
        """Edit ``ctx.block`` in place. Must leave the unquantized block's function
        unchanged (to float tolerance) unless it registers the difference with the
        context (``ctx.add_lowrank_branch``); an after-quantization transform instead
        edits the quantized layers' stored tensors (see ``after_quantization``)."""
        raise NotImplementedError


# -------------------------------------------------------------------------- quantizers


@dataclass
class QuantizedWeight:
    """One linear's quantized weight in a named logical format.

    ``format`` names the logical format (``"int"``: an integer grid; a codebook method
    names its own). ``shape`` is the dense weight's ``(out_features, in_features)``.
    ``tensors`` holds the format's arrays; ``params`` its JSON-serialisable parameters.

    The ``"int"`` format, produced by the built-in ``rtn`` quantizer and by GPTQ/AWQ:
    ``codes`` uint8 ``[out, in]`` (unsigned, 0 .. 2**bits - 1); ``scales``
    ``[out, n_groups]`` float; ``zeros`` uint8 ``[out, n_groups]`` for asymmetric grids
    (symmetric grids have the implicit zero point ``2**(bits-1)``); optional ``g_idx``
    int32 ``[in]`` (group of each input column, for act-order); optional
    ``input_scale`` float32 scalar (static activation quantization). ``params``: ``bits``,
    ``group_size``, ``symmetric``, ``act_bits``, ``act_dynamic``, and with activations
    (contract 1.4) ``act_group_size`` (-1: per token) and ``act_symmetric``; the
    activation grid is :func:`qcore.grid.fake_quantize_activations`'. The dense weight is
    ``(codes - zero) * scale`` with each column's group from ``g_idx``
    (``column // group_size`` without it).

    The ``"vq"`` format (vector quantization with codebooks, e.g. VPTQ): ``indices`` into
    a float16 ``codebook`` per vector of ``vector_size`` input columns, optional residual
    stage, outlier columns, per-channel ``scale`` and ``offset``; see
    :mod:`qcore.codebook` and ``docs/codebook-format.md``.
    """

    format: str
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    params: dict[str, JSONScalar] = field(default_factory=dict)


class Quantizer(Component):
    """Turns one linear's weight (plus statistics) into a :class:`QuantizedWeight`."""

    kind = "quantizer"
    #: Statistics (observer names) and products of earlier steps the quantizer needs.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: The logical format of the result; a packer for it must exist.
    produces: ClassVar[str] = "int"
    #: Weight bit-widths this quantizer supports.
    supported_bits: ClassVar[frozenset[int]] = frozenset({2, 3, 4, 5, 6, 7, 8})
    #: Activation bit-widths it can calibrate (``None`` = weight-only).
    supported_act_bits: ClassVar[frozenset[int | None]] = frozenset({None})
    #: True if each linear must see the inputs produced by the already-quantized earlier
    #: linears of its block (GPTQ's true-sequential); the core then observes and
    #: quantizes the block stage by stage.
    sequential: ClassVar[bool] = False

    def needs_for(self, scheme: Scheme) -> frozenset[str]:
        """What this quantizer needs under ``scheme`` (default: ``needs``)."""
        return self.needs

    def quantize(
        self, weight: torch.Tensor, stats: Mapping[str, Any], scheme: Scheme
    ) -> QuantizedWeight:
        """Quantize ``weight`` (float32 ``[out, in]``, already transformed) with the
        statistics named in ``needs`` (``stats[name]``). ``stats`` may be shared with other
        linears: never modify it (or ``weight``) in place."""
        raise NotImplementedError

    def quantize_group(
        self, weights: Sequence[torch.Tensor], stats: Mapping[str, Any], scheme: Scheme
    ) -> list[QuantizedWeight]:
        """Quantize the linears of one input-sharing group (q/k/v; gate/up), which share
        ``stats``. The default quantizes them one by one; a quantizer whose work depends
        only on the statistics (GPTQ's inverse Hessian) can do the group at once."""
        return [self.quantize(w, stats, scheme) for w in weights]

    def dequantize(self, qweight: QuantizedWeight) -> torch.Tensor:
        """The dense float32 weight that ``qweight`` stands for. The default asks the
        installed packer of ``qweight.format`` (:meth:`Packer.dequantize`); a quantizer
        producing a format whose packer does not define it overrides this."""
        from qcore.plugins import get_registry

        for reg in get_registry().of_kind("packer"):
            packer_cls = reg.cls
            if (getattr(packer_cls, "format", None) == qweight.format
                    and packer_cls.dequantize is not Packer.dequantize):
                return packer_cls().dequantize(qweight)  # type: ignore[attr-defined]
        raise NotImplementedError(
            f"no installed packer of format {qweight.format!r} defines dequantize(): "
            f"quantizer {self.name!r} must override dequantize()")


# ----------------------------------------------------------------------------- packers


@dataclass
class PackedWeight:
    """A quantized weight in a storage layout: what a checkpoint stores and a kernel reads.

    ``tensors`` are saved in the checkpoint under ``<module>.<key>``; ``params`` (JSON) in
    its ``quantization_config``. ``layout`` names the packer that wrote it.
    """

    layout: str
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    params: dict[str, JSONScalar] = field(default_factory=dict)


class Packer(Component):
    """Maps a logical format to a storage layout, and back exactly."""

    kind = "packer"
    #: Logical format this packer reads (a quantizer's ``produces``).
    format: ClassVar[str] = "int"
    #: Storage layout this packer writes (a kernel provider's ``support.layouts``).
    layout: ClassVar[str] = ""
    #: Kernel op that computes with this layout: ``"linear"`` or ``"lut_linear"``.
    op: ClassVar[str] = "linear"
    #: Among packers of one format, the highest priority is chosen by ``packer = "auto"``.
    priority: ClassVar[int] = 0
    supported_bits: ClassVar[frozenset[int]] = frozenset(range(1, 17))

    def pack(self, qweight: QuantizedWeight) -> PackedWeight:
        raise NotImplementedError

    def unpack(self, packed: PackedWeight) -> QuantizedWeight:
        """Exact inverse of :meth:`pack`."""
        raise NotImplementedError

    def dequantize(self, qweight: QuantizedWeight) -> torch.Tensor:
        """The reference dense float32 weight of a ``format`` weight (logical, not packed).
        Optional (contract 1.2): :meth:`Quantizer.dequantize` uses the one of the
        weight's format, so a quantizer producing that format needs none of its own."""
        raise NotImplementedError


# ------------------------------------------------------------------------------ kernels

#: Ops a kernel provider may implement. ``linear`` and ``lut_linear`` share the signature
#: ``(x, prepared, bias) -> y``; ``selective_scan`` is Mamba's recurrence (see hookspecs),
#: declared for the planned Quamba plugin: no provider implements it yet.
KNOWN_OPS: frozenset[str] = frozenset({"linear", "lut_linear", "selective_scan"})


@dataclass(frozen=True)
class KernelSupport:
    """What a kernel provider supports, as data. ``None`` means any value."""

    ops: frozenset[str]
    layouts: frozenset[str]
    bits: frozenset[int] | None = None
    group_sizes: frozenset[int] | None = None
    symmetric: frozenset[bool] = frozenset({True, False})
    act_bits: frozenset[int | None] = frozenset({None})
    #: Activation scales it handles: per token at run time (True), static per tensor (False).
    act_dynamic: frozenset[bool] = frozenset({True, False})
    #: Activation group sizes it quantizes (dynamic scales per ``[token, group]``; ``-1`` =
    #: one scale per token); ``None`` = any. Contract 1.4.
    act_group_sizes: frozenset[int] | None = frozenset({-1})
    #: Activation grids it handles: symmetric (True), asymmetric with zero points (False).
    act_symmetric: frozenset[bool] = frozenset({True})
    #: Whether its ops compute a layer's low-rank branch themselves (fused). Such a
    #: provider finds the branch in ``prepare``'s ``packed.tensors`` as ``lowrank_down``
    #: ``[rank, in]`` and ``lowrank_up`` ``[out, rank]``, and its op returns
    #: ``x Wᵀ + (x downᵀ) upᵀ + bias``; for any other provider the QuantLinear adds the
    #: branch after the op. Contract 1.4.
    lowrank: bool = False
    act_order: bool = True
    dtypes: frozenset[str] = frozenset({"float32", "float16", "bfloat16"})
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    #: Lowest CUDA compute capability, e.g. ``(8, 0)``; ``None`` = no requirement.
    min_compute_capability: tuple[int, int] | None = None
    in_features_multiple: int = 1
    out_features_multiple: int = 1
    priority: int = 0


@dataclass(frozen=True)
class KernelRequest:
    """What a quantized layer asks a kernel for."""

    op: str
    layout: str
    bits: int
    group_size: int
    symmetric: bool
    in_features: int
    out_features: int
    act_bits: int | None = None
    act_dynamic: bool = True
    act_order: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    compute_capability: tuple[int, int] | None = None
    act_group_size: int = -1
    act_symmetric: bool = True
    #: Rank of the layer's low-rank branch (0 = none); any provider can serve it.
    lowrank_rank: int = 0

    @classmethod
    def for_packed(cls, packed: PackedWeight, op: str, *, dtype: str = "float32",
                   device: str = "cpu",
                   compute_capability: tuple[int, int] | None = None) -> KernelRequest:
        p = packed.params
        return cls(op=op, layout=packed.layout, bits=int(p.get("bits", 0) or 0),
                   group_size=int(p.get("group_size", -1) or -1),
                   symmetric=bool(p.get("symmetric", False)),
                   in_features=packed.shape[1], out_features=packed.shape[0],
                   act_bits=p.get("act_bits"),  # type: ignore[arg-type]
                   act_dynamic=bool(p.get("act_dynamic", True)),
                   act_order="g_idx" in packed.tensors, dtype=dtype, device=device,
                   compute_capability=compute_capability, **act_fields(p))


def act_fields(params: Mapping[str, object]) -> dict[str, Any]:
    """A layer's activation grouping as :class:`KernelRequest` fields, from its format
    params (``act_group_size``, ``act_symmetric``; absent before contract 1.4)."""
    group = params.get("act_group_size")
    return {"act_group_size": -1 if group is None else int(group),  # type: ignore[call-overload]
            "act_symmetric": bool(params.get("act_symmetric", True))}


class KernelProvider(Component):
    """Computes ops on packed weights. Declares ``support``; the core picks the
    highest-priority provider that supports a request and is available, falling back to
    the built-in torch provider."""

    kind = "kernel"
    support: ClassVar[KernelSupport] = KernelSupport(ops=frozenset(), layouts=frozenset())

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this provider cannot run in this environment (e.g. CuPy missing), or None.
        Must be cheap and must not raise."""
        return None

    @classmethod
    def unsupported_reason(cls, request: KernelRequest) -> str | None:
        """Why ``request`` is outside the declared support, or None if it is inside."""
        s = cls.support
        checks: list[tuple[bool, str]] = [
            (request.op in s.ops, f"op {request.op!r} not in {sorted(s.ops)}"),
            (request.layout in s.layouts, f"layout {request.layout!r} not in {sorted(s.layouts)}"),
            (s.bits is None or request.bits in s.bits, f"bits {request.bits} not in {sorted(s.bits or ())}"),
            (s.group_sizes is None or request.group_size in s.group_sizes,
             f"group size {request.group_size} not in {sorted(s.group_sizes or ())}"),
            (request.symmetric in s.symmetric, f"symmetric={request.symmetric} unsupported"),
            (request.act_bits in s.act_bits, f"act_bits={request.act_bits} unsupported"),
            (request.act_bits is None or request.act_dynamic in s.act_dynamic,
             f"{'dynamic' if request.act_dynamic else 'static'} activation scales unsupported"),
            (request.act_bits is None or s.act_group_sizes is None
             or request.act_group_size in s.act_group_sizes,
             f"activation group size {request.act_group_size} not in "
             f"{sorted(s.act_group_sizes or ())}"),
            (request.act_bits is None or request.act_symmetric in s.act_symmetric,
             f"{'symmetric' if request.act_symmetric else 'asymmetric'} activations unsupported"),
            (s.act_order or not request.act_order, "act-order (g_idx) unsupported"),
            (request.dtype in s.dtypes, f"dtype {request.dtype} not in {sorted(s.dtypes)}"),
            (request.device in s.devices, f"device {request.device} not in {sorted(s.devices)}"),
            (request.in_features % s.in_features_multiple == 0,
             f"in_features {request.in_features} not a multiple of {s.in_features_multiple}"),
            (request.out_features % s.out_features_multiple == 0,
             f"out_features {request.out_features} not a multiple of {s.out_features_multiple}"),
        ]
        if s.min_compute_capability is not None:
            cc = request.compute_capability
            checks.append((cc is not None and tuple(cc) >= s.min_compute_capability,
                           f"needs compute capability >= {s.min_compute_capability}, got {cc}"))
        for ok, reason in checks:
            if not ok:
                return reason
        return None

    def prepare(self, packed: PackedWeight, device: torch.device) -> Any:
        """One-time conversion of a packed weight for this provider on ``device`` (layout
        conversion, caching). The result is passed back to the op; default: ``packed``."""
        return packed

    def linear(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """``y = x @ W.T + bias`` with ``W`` the weight that ``prepared`` stands for."""
        raise NotImplementedError(f"kernel provider {self.name!r} does not implement 'linear'")

    def lut_linear(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """Like :meth:`linear` for codebook layouts (weights decoded through a lookup table)."""
        raise NotImplementedError(f"kernel provider {self.name!r} does not implement 'lut_linear'")

    def selective_scan(self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                       B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                       z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                       delta_softplus: bool = False, prepared: Any = None) -> torch.Tensor:
        """Mamba's selective scan: ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t``,
        ``y_t = C_t h_t + D u_t``, times ``silu(z_t)`` when ``z`` is given. Shapes: ``u``,
        ``delta``, ``z`` ``[batch, dim, seq]``; ``A`` ``[dim, state]``; ``B``, ``C``
        ``[batch, state, seq]``; ``D``, ``delta_bias`` ``[dim]``. ``Δ`` is ``delta``
        (+ ``delta_bias``, through softplus if ``delta_softplus``). ``prepared`` carries
        what a quantized scan needs (Quamba: static 8-bit scales of ``u``, ``B``, ``C``).
        Returns ``y`` ``[batch, dim, seq]``."""
        raise NotImplementedError(f"kernel provider {self.name!r} does not implement 'selective_scan'")


def config_fields(component: type[Component]) -> list[dataclasses.Field[Any]]:
    """The option fields of a component's ``Config``."""
    return list(dataclasses.fields(component.Config))


# ---------------------------------------------------------------- checkpoint formats


class CheckpointFormat(Component):
    """A checkpoint format that other engines read (contract 1.3).

    ``qcore export CKPT OUT --format NAME`` writes a qcore checkpoint's quantized linears
    in this format; :func:`qcore.load` (and so ``qcore eval``, ``inspect``, ``generate``)
    reads checkpoints whose ``quantization_config.quant_method`` is in ``quant_methods``.
    The core does everything else: it reads and unpacks the qcore checkpoint, copies the
    float parameters and the tokenizer, writes ``config.json`` and the safetensors files
    atomically, and on import builds the model and packs each imported weight with the
    installed packer of its format.

    ``layers`` below maps module names to the records a qcore checkpoint stores for its
    quantized linears (``quantization_config.layers``), each with ``format``, the logical
    format of its layout, added: ``layout``, ``op``, ``shape`` ``[out, in]``, ``params``,
    ``tensors`` (name -> ``{"dtype", "shape"}``), ``bias``, ``lowrank``.
    """

    kind = "checkpoint_format"
    #: ``quantization_config.quant_method`` values this format imports (empty: export only).
    quant_methods: ClassVar[frozenset[str]] = frozenset()

    def cannot_express(self, layers: Mapping[str, Mapping[str, Any]]) -> str | None:
        """Why ``layers`` cannot be written in this format, naming the layer and what it
        lacks (None: they can). Called before anything is written."""
        raise NotImplementedError

    def export_layer(self, qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
        """One linear's tensors in this format, keyed by the name that follows
        ``"<module>."`` (e.g. ``weight_packed``); the core writes the bias."""
        raise NotImplementedError

    def export_config(
        self, layers: Mapping[str, Mapping[str, Any]], ignore: Sequence[str]
    ) -> dict[str, Any]:
        """The ``quantization_config`` of the exported ``config.json``; ``ignore`` names
        the model's linear modules left unquantized (e.g. ``lm_head``)."""
        raise NotImplementedError

    def import_layers(
        self, qconfig: Mapping[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, QuantizedWeight]:
        """The quantized linears of a checkpoint another tool wrote (module name ->
        weight, in a logical format qcore packs, e.g. ``"int"``), from its
        ``quantization_config`` and tensors. Pop the tensors it consumes (the bias
        stays): what remains loads as float parameters. A field it cannot read raises
        :class:`qcore.errors.CheckpointError` naming the field and its value."""
        raise NotImplementedError

