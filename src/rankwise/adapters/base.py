"""AdapterLayer: a frozen base linear layer plus a trainable delta ΔW.

The base is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2), whose weight is stored
transposed, (in, out). Every method reads and writes the base weight through ``base_weight``, the
(out, in) view (``Conv1D.weight.T``, the same storage), so inits, ``delta_weight``, merge / unmerge
/ unload, the fused kernel and DoRA's norms run on the (out, in) math unchanged and writes land in
the Conv1D's own layout; ``unload`` / ``merged_linear`` give back the base module itself.

Methods that declare it (``base_kinds``) also wrap ``nn.Embedding`` ((out, in) = ``weight.T``, the map
one-hot(id) → vector) and ``nn.Conv1d`` / ``nn.Conv2d`` ((out, in) = ``weight.reshape(out, -1)``); the
forward applies the (out, in) matrices through ``base_map`` / ``factor_map`` (a lookup, a convolution).

``y = W₀x + b + ΔW·dropout(x)``. A subclass defines ``delta_weight()`` (dense ΔW, used to merge)
and, when ΔW is a rank-r product, ``factors()`` returning ``(B, A, scale)`` so that the forward
computes ``scale · B(A x)`` without forming ΔW and PEFT export writes ``B, A`` directly.

Some initializations (PiSSA, OLoRA, LoRA-GA) move part of W₀ into the adapter: the frozen base
then holds ``W₀ − base_offset()``. ``base_offset()`` returns that part so that unloading, PEFT
export and re-loading can always recover the untouched W₀.

Precision: the adapter's tensors (trainable parameters and frozen factor buffers) live in the
config's ``adapter_dtype`` (float32 by default, whatever the base dtype), like PEFT's
``autocast_adapter_dtype``. The base GEMM runs in the base dtype, the delta in the adapter dtype
(``x`` is cast to it for the delta and the delta cast back), and the output has the base dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import fraction, positive, rank
from ..quant import Quantized, dequantize, dequantize_tensor, requantize_, restore_, stash
from ..shards import write_full_
from ..targets import KIND_LABELS, is_conv1d, is_factorized, is_linear4bit, kind_label, layer_kind, linear_weight
from .batched import mixed_forward
from .kernels import low_rank_linear

if TYPE_CHECKING:
    from .init import InitContext



#: dtype names ``adapter_dtype`` accepts (or the torch.dtype itself); None / "base" = the base dtype
ADAPTER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}


def adapter_dtype_name(value: Any) -> str | None:
    """The canonical name of an ``adapter_dtype`` value (None for the base dtype), or a ValueError."""
    if value is None or value == "base":
        return None
    name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype | str) else None
    if name in ADAPTER_DTYPES:
        return name
    raise ValueError(
        f"adapter_dtype={value!r} is not allowed; choose one of {[*ADAPTER_DTYPES, 'base', None]} "
        "(or the matching torch.dtype; None and 'base' mean the base layer's dtype)"
    )


@dataclass
class AdapterConfig:
    """Fields every adapter shares. Subclasses add their own and extend ``validate``.

    ``adapter_dtype``: dtype of the adapter's tensors, "float32" by default on any base (a
    torch.dtype or its name; None or "base": the base layer's dtype, e.g. bf16 adapters on a bf16
    model). Stored by name, so it is saved with the config."""

    r: int = 8
    dropout: float = 0.0
    seed: int = 0
    adapter_dtype: str | None = "float32"

    def validate(self) -> None:
        rank("r", self.r)
        fraction("dropout", self.dropout, allow_zero=True, allow_one=False, what="in [0, 1)")
        adapter_dtype_name(self.adapter_dtype)

    def __post_init__(self) -> None:
        self.adapter_dtype = adapter_dtype_name(self.adapter_dtype)
        self.validate()

    def dtype_for(self, base_dtype: torch.dtype) -> torch.dtype:
        """The adapter dtype over a base layer of ``base_dtype``."""
        return base_dtype if self.adapter_dtype is None else ADAPTER_DTYPES[self.adapter_dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class AlphaScale(AdapterConfig):
    """A config with LoRA's scale s = α/r, ``alpha=None`` meaning α = r (s = 1) (Hu et al. 2021). The
    config declares ``alpha: float | None = None`` where it stands in its fields, or inherits ``AlphaConfig``;
    one that sets ``alpha_optional = False`` requires a number (its own default α, e.g. 1)."""

    alpha: float | None
    alpha_optional: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        positive("alpha", self.alpha, optional=self.alpha_optional)

    @property
    def alpha_value(self) -> float:
        """α (r when ``alpha`` is None)."""
        return float(self.r if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.alpha_value / self.r


@dataclass
class AlphaConfig(AlphaScale):
    """The shared fields, then ``alpha`` (None: α = r) with s = α/r."""

    alpha: float | None = None


@dataclass
class RsAlphaConfig(AlphaConfig):
    """``alpha`` and ``use_rslora``: s = α/√r (rsLoRA, Kalajdzievski 2023) instead of α/r."""

    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha_value / math.sqrt(self.r) if self.use_rslora else self.alpha_value / self.r


def recomputing() -> bool:
    """Whether this forward runs inside autograd's backward, i.e. activation checkpointing recomputing a forward
    that already ran (torch's own test, as FSDP2 and its module tracker use): running statistics must not be
    updated a second time for the same batch. Inside ``torch.compile`` it is False (the query returns no tensor,
    which dynamo cannot trace; compiled graphs are not re-entered from backward by checkpointing)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class AdapterLayer(nn.Module):
    """Frozen ``base_layer`` + trainable delta. Subclasses set ``method`` and build their tensors."""

    method: ClassVar[str] = "adapter"
    wraps_base_layer: ClassVar[bool] = True  # targets.base_modules sees it as its base layer
    # Whether the layer can share its base with other named adapters (False: it rewrites the base)
    stackable: ClassVar[bool] = True
    # Whether the adapted model's output equals the base model's right after initialization.
    identity_at_init: ClassVar[bool] = True
    # Whether other layers read this layer's trainable tensors (LoTR's shared factors, ResLoRA's chains):
    # FSDP2 must then keep the whole model in one group instead of one per transformer layer.
    crosses_layers: ClassVar[bool] = False
    # Buffers the training forward updates (running statistics, like BatchNorm's; PRILoRA's input norms):
    # the only non-parameter tensors of an adapter that change while it trains. They are updated when
    # ``updates_statistics`` (training, and not a checkpointing recompute of a forward that already ran).
    running_statistics: ClassVar[tuple[str, ...]] = ()
    # The base-layer kinds (``targets.layer_kind``) the method supports: "linear" (nn.Linear, Conv1D,
    # 4-bit), "embedding" (nn.Embedding), "conv" (nn.Conv1d / nn.Conv2d). The one declaration
    # ``rw.adapt`` checks (``check_base``); a config may narrow it (``supported_kinds``).
    base_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, ctx: InitContext | None = None) -> None:
        """Every layer is built as ``LayerClass(base_layer, config, ctx)`` by ``rw.adapt``; the base class
        itself needs no init context (subclasses initialize their tensors from ``ctx``).
        ``base_layer``: an ``nn.Linear`` or a transformers ``Conv1D``."""
        super().__init__()
        self._adopt(base_layer, config, check_base(type(self), config, base_layer))
        self.out_features, self.in_features = (int(n) for n in self.base_weight.shape)
        self._init_dtype = config.dtype_for(self.base_weight.dtype)

    def _adopt(self, base_layer: nn.Module, config: AdapterConfig, kind: str) -> None:
        """Take ``base_layer`` (of base kind ``kind``) as this layer's frozen base, and set the state every
        adapter layer has (config, dropout, merge / enable flags, adapter name); subclasses with a base
        that is not a weight matrix (``experts.ExpertLoRALayer``) call it instead of ``__init__``."""
        self.base_kind = kind
        self.base_layer = base_layer
        # a Python flag, not a tensor test, so forward code stays traceable by torch.compile
        self.base_transposed = is_conv1d(base_layer)
        self.base_quantized = is_linear4bit(base_layer)  # a 4-bit base: see _set_base_weight
        self.base_factorized = is_factorized(base_layer)  # U·V (rw.compress): read-only, see _set_base_weight
        self.requant_error: float | None = None  # of the last write into a 4-bit base (see _set_base_weight)
        self.merge_delta_error: float | None = None
        self._merge_stash: Quantized | None = None
        self.config = config
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True
        self.adapter_name = "default"  # its name among the model's named adapters
        # in an AdapterStack: the base holds the untouched W₀ (no init offset is moved out of it)
        self.shares_base = False
        self.batch_names: list[str | None] | None = None  # per-example adapters (named.batch_adapters)
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------- what subclasses define
    @classmethod
    def supported_kinds(cls, config: AdapterConfig) -> tuple[str, ...]:
        """The base-layer kinds this method supports with ``config`` (``base_kinds`` unless an option
        narrows it, e.g. an init that needs a gradient)."""
        return cls.base_kinds

    @classmethod
    def needs_grad(cls, config: AdapterConfig) -> bool:
        """Whether initialization needs an estimated full gradient of W₀ (``ctx.grad``)."""
        return False

    @classmethod
    def replaces_base(cls, config: AdapterConfig, base_layer: nn.Module) -> bool:
        """Whether the layer wraps a new base instead of ``base_layer`` (QLoRA / LoftQ quantize it)."""
        return False

    @classmethod
    def build_shared(cls, config: AdapterConfig, layers: list[nn.Module]) -> Any:
        """Tensors shared by all adapted layers (e.g. VeRA's random bases), passed as ``ctx.extra["shared"]``."""
        return None

    @classmethod
    def parameter_layer(cls, config: AdapterConfig) -> type[AdapterLayer] | None:
        """The layer class that adapts 3-D expert parameters (``rw.adapt(..., target_parameters=...)``)
        for this method with ``config``, or None when the method's math does not apply to them."""
        return None

    @classmethod
    def companions(cls, model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module, type[AdapterLayer]]]:
        """``(module name, module, layer class)`` for the layers the method adapts beside its targets,
        found again on every ``rw.adapt`` / ``load_adapter`` (ConvLoRA: AdaBN statistics for every
        BatchNorm); they are not listed among the adapter's target layers."""
        return []

    def peft_module_state(self) -> dict[str, torch.Tensor] | None:
        """The base module's state as the adapter changes it, when PEFT can hold the adapter only as a
        ``modules_to_save`` copy of that module (ConvLoRA's AdaBN statistics), else None."""
        return None

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW with the base weight's shape (out, in)."""
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(B, A, scale)`` with ΔW = scale·B·A when the delta is a low-rank product, else None."""
        return None

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(B₀, A₀, s)`` when initialization moved s·B₀·A₀ out of the frozen base (PiSSA, OLoRA, ...)."""
        return None

    def base_offset(self) -> torch.Tensor | None:
        """The part of the original W₀ that initialization moved out of the frozen base (or None)."""
        f = self.base_offset_factors()
        if f is None:
            return None
        b0, a0, s = f
        return (b0.float() @ a0.float()) * s

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x, through the low-rank factors when there are some (``x`` from ``adapter_input``)."""
        f = self.factors()
        if f is not None:
            b, a, scale = f
            return self.factor_map(x, b, a) * scale
        return self.base_map(x, self.delta_weight())

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the delta reads: dropout(x) in the adapter dtype; an embedding's token ids unchanged
        (no dropout on ids, as PEFT's LoRA embedding)."""
        return x if self.base_kind == "embedding" else self.dropout(x).to(self.adapter_dtype)

    def delta_output(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """What this adapter adds to the frozen base layer's output ``W x + b`` (``x`` in the base
        dtype, the result in ``out_dtype``): ΔW·dropout(x), computed in the adapter dtype."""
        return self.delta_forward(self.adapter_input(x)).to(out_dtype)

    def offset_output(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor | None:
        """O·x for the part O of W₀ that initialization moved out of the frozen base (None if none):
        what a switched-off adapter adds so that the layer gives the original W₀'s output."""
        offset = self.base_offset()
        if offset is None:
            return None
        dtype = self.adapter_dtype if self.base_kind == "embedding" else out_dtype
        return self.base_map(x if self.base_kind == "embedding" else x.to(dtype), offset.to(dtype)).to(out_dtype)

    # ----------------------------------------------------------------- the base layer's map, for any kind
    def base_map(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """An (out, in) matrix ``w`` applied to ``x`` the way the base applies its weight, without bias:
        ``x wᵀ`` (linear), the lookup of rows of ``wᵀ`` (embedding: never a one-hot product), or the
        base's convolution with ``w`` reshaped to its kernel."""
        if self.base_kind == "embedding":
            return self._embed(x, w.t())
        if self.base_kind == "conv":
            return self._conv(x, w.reshape(w.shape[0], *self.base_layer.weight.shape[1:]), self.base_layer)
        return F.linear(x, w)

    def factor_map(self, x: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """B(A x) for factors B (out, r), A (r, in) without forming B·A: two linear maps; for an
        embedding the lookup of rows of Aᵀ times Bᵀ; for a convolution A as the base's convolution
        with r output channels (its kernel, stride, padding, dilation) and B as a 1×1 convolution
        (PEFT's ``lora_A`` / ``lora_B`` conv pair)."""
        if self.base_kind == "embedding":
            return self._embed(x, a.t()) @ b.t()
        if self.base_kind == "conv":
            kernel = self.base_layer.weight.shape[1:]
            h = self._conv(x, a.reshape(a.shape[0], *kernel), self.base_layer)
            return self._conv(h, b.reshape(*b.shape, *(1,) * (len(kernel) - 1)), None)
        return F.linear(F.linear(x, a), b)

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``table`` with the base embedding's options (``padding_idx`` keeps its row
        without gradient); a scaled embedding's ``embed_scale`` (Gemma's) multiplies it as the base's."""
        e = self.base_layer
        out = F.embedding(ids, table, e.padding_idx, None, e.norm_type, e.scale_grad_by_freq, e.sparse)
        scale = getattr(e, "embed_scale", None)
        return out if scale is None else out * scale

    @staticmethod
    def _conv(x: torch.Tensor, weight: torch.Tensor, like: nn.Module | None) -> torch.Tensor:
        """``x`` convolved with ``weight`` (no bias) with the stride, padding and dilation of ``like``
        (None: a 1×1 convolution)."""
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        if like is None:
            return conv(x, weight)
        return conv(x, weight, None, like.stride, like.padding, like.dilation)

    def output_term(self, x: torch.Tensor, out_dtype: torch.dtype, active: bool) -> torch.Tensor | None:
        """What this adapter adds to its base layer's output (None: nothing). Alone, the base holds
        W₀ − O: an active adapter adds ΔW·x, an inactive one O·x. Sharing the base (a stack), the
        base holds W₀: an active adapter adds (ΔW − O)·x, an inactive one nothing."""
        if not self.shares_base:
            return self.delta_output(x, out_dtype) if active else self.offset_output(x, out_dtype)
        if not active:
            return None
        delta, offset = self.delta_output(x, out_dtype), self.offset_output(x, out_dtype)
        return delta if offset is None else delta - offset

    def factors_from_original(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(B, A, s)`` with s·B·A = ΔW relative to the original W₀ (None when ΔW is not low-rank):
        ``factors()``, with an init offset s₀·B₀·A₀ appended as a negative block (rank r + r₀)."""
        f = self.factors()
        return None if f is None else with_offset(f, self.base_offset_factors())

    def update_weight(self) -> torch.Tensor:
        """What ``merge`` adds to the base weight: ΔW (relative to the frozen base)."""
        return self.delta_weight()

    def delta_from_original(self) -> torch.Tensor:
        """ΔW relative to the original W₀: ``delta_weight() − base_offset()``."""
        delta, offset = self.delta_weight(), self.base_offset()
        return delta if offset is None else delta - offset.to(delta.dtype)

    # ----------------------------------------------------------------- shared behaviour
    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen base weight as an (out, in) matrix: ``nn.Linear.weight``, or the view
        ``Conv1D.weight.T`` (in-place writes to it land in the Conv1D's (in, out) storage); for a 4-bit
        base (bitsandbytes ``Linear4bit``) a dequantized copy in its compute dtype. Every read of the
        base weight by a method goes through this accessor, every write through ``_set_base_weight``."""
        if self.base_quantized:
            return dequantize(self.base_layer)
        if self.base_factorized:
            return linear_weight(self.base_layer)
        w = cast(torch.Tensor, self.base_layer.weight)
        if self.base_kind == "embedding":  # the map one-hot(id) → vector: (embedding_dim, num_embeddings)
            return w.t()
        if self.base_kind == "conv":  # (out, in·k…), a view of the kernel (writes: _set_base_weight)
            return w.reshape(w.shape[0], -1)
        return w.t() if self.base_transposed else w

    @property
    def weight(self) -> torch.Tensor:
        """The base module's own weight parameter, in its own layout (so code that reads
        ``module.weight`` keeps working; (in, out) for a Conv1D). Methods use ``base_weight``."""
        return cast(torch.Tensor, self.base_layer.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def adapter_dtype(self) -> torch.dtype:
        """dtype of the adapter's own tensors and of the delta's compute (the base GEMM runs in the
        base dtype): the config's ``adapter_dtype`` at construction, then the dtype the layer's own
        parameters have (so it follows a later ``model.to(dtype)``)."""
        for p in self._parameters.values():
            if p is not None:
                return p.dtype
        return self._init_dtype

    @property
    def updates_statistics(self) -> bool:
        """Whether this forward updates the ``running_statistics``: in training mode, once per batch (not when
        activation checkpointing recomputes the forward during backward)."""
        return self.training and not recomputing()

    @property
    def dropout_active(self) -> bool:
        """Whether adapter dropout changes ``x`` in this forward (decided from module state, not
        from tensors, so ``torch.compile`` sees a constant)."""
        return self.training and not isinstance(self.dropout, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_names is not None:
            return mixed_forward(self.base_layer, {self.adapter_name: self}, x, self.batch_names, self.merged)
        if self.enabled and not self.merged:
            fused = self._fused_forward(x)
            if fused is not None:
                return fused
        out = self.base_layer(x)
        if self.merged:
            return out
        if not self.enabled:  # the original base model: give back what init moved out of W₀
            offset = self.offset_output(x, out.dtype)
            return out if offset is None else out + offset
        return out + self.delta_output(x, out.dtype)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Base GEMM (base dtype) + low-rank delta (adapter dtype) in one autograd node
        (``kernels.low_rank_linear``), when possible (not under autocast: the plain path lets
        autocast pick each matmul's dtype). A method whose delta is the dense ΔW (no factors, the default
        ``delta_forward``) of the base's dtype and without adapter dropout runs one GEMM with W + ΔW instead of
        two (the base's and the delta's), in forward and in the input's gradient."""
        if self.base_quantized or self.base_factorized or self.base_kind != "linear":  # the base's own GEMM(s)
            return None
        f = self.factors()
        w, bias = self.base_weight, self.base_layer.bias
        if w.requires_grad or (bias is not None and bias.requires_grad) or x.dtype != w.dtype:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        if f is None:
            dense = type(self).delta_forward is AdapterLayer.delta_forward and not self.dropout_active
            return F.linear(x, w + self.delta_weight(), bias) if dense and self.adapter_dtype == w.dtype else None
        b, a, scale = f
        if a.dtype != b.dtype:
            return None
        return low_rank_linear(x, self.dropout(x) if self.dropout_active else None, w, bias, a, b, scale)

    def _init_label(self) -> str:
        """``", init NAME"`` when the config names a non-default initialization (PiSSA is LoRA with init pissa)."""
        init = getattr(self.config, "init", "default")
        return "" if init in ("default", None) else f", init {init}"

    @torch.no_grad()
    def _set_base_weight(self, w: torch.Tensor, *, merging: bool = False) -> None:
        """The one write path of the base weight: ``w`` (out, in) is copied into it in place, or, on a
        4-bit base, quantized into it (dequantize → change → requantize, by the caller and
        ``quant.requantize_``), and the relative Frobenius error ‖deq(Q(w)) − w‖_F / ‖w‖_F of that
        write is kept in ``requant_error``. ``merging``: keep the 4-bit codes it replaces, so
        ``unmerge`` puts them back bit for bit (no second requantization), and keep the same error
        relative to the change instead, ‖deq(Q(w)) − w‖_F / ‖w − W_before‖_F, in ``merge_delta_error``
        (≈ 1 when the update is below the 4-bit grid's resolution and the merge loses it)."""
        if self.base_factorized:
            raise ValueError(
                f"adapter '{self.adapter_name}' ({self.method}{self._init_label()}) would write the base weight, but "
                "the base is a factorized layer (FactorizedLinear from rw.compress: U·V cannot hold a dense "
                "weight); adapters over it must stay unmerged (merge, and inits that move part of W₀ out of the "
                "base, need a dense or 4-bit base)"
            )
        if not self.base_quantized:  # full w: on FSDP2 shards each rank keeps its rows
            if self.base_kind == "conv":
                write_full_(self.base_layer.weight, w.reshape(self.base_layer.weight.shape))
            else:
                write_full_(self.base_weight, w)
            return
        if merging:
            self._merge_stash = stash(self.base_layer)
            change = float((w - self.base_weight).float().norm())
        self.requant_error = requantize_(self.base_layer, w)
        if merging:
            self.merge_delta_error = self.requant_error * float(w.float().norm()) / max(change, 1e-30)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight (``W ← W + ΔW``); the forward then skips the delta. On a 4-bit
        base ``W + ΔW`` is requantized and ``requant_error`` says how far the merged weight is from it."""
        if self.merged:
            return
        w = self.base_weight
        self._set_base_weight(w + self.delta_weight().to(w.dtype), merging=True)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: the base weight goes back to ``frozen_weight()`` (a 4-bit base gets its
        codes from before the merge back, exactly)."""
        if not self.merged:
            return
        if self._merge_stash is not None:
            restore_(self.base_layer, self._merge_stash)
            self._merge_stash = None
        else:
            self._set_base_weight(self.frozen_weight())
        self.merged = False

    def frozen_weight(self) -> torch.Tensor:
        """The frozen base weight, recovered from the merged weight when merged (``W − ΔW`` for an
        additive delta, exact up to rounding; methods whose merge is not additive override this; a
        merged 4-bit base gives its codes from before the merge)."""
        if self.merged and self._merge_stash is not None:
            return dequantize_tensor(self._merge_stash).to(self.base_weight.dtype)
        w = self.base_weight
        return w - self.delta_weight().to(w.dtype) if self.merged else w

    @torch.no_grad()
    def original_weight(self) -> torch.Tensor:
        """W₀ as it was before adaptation (undoing a merge and any initialization offset)."""
        w = self.frozen_weight().detach().clone()
        offset = self.base_offset()
        if offset is not None:
            w += offset.to(w.dtype)
        return w

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """Return the base module (``nn.Linear`` / ``Conv1D`` / 4-bit ``Linear4bit``) holding the
        original W₀ (the adapter is dropped; a 4-bit base is written only when an init moved part of
        W₀ out of it, then W₀ is requantized)."""
        if self.base_quantized or self.base_factorized:
            self.unmerge()
            if self.base_offset() is not None:
                self._set_base_weight(self.original_weight())
            return self.base_layer
        self._set_base_weight(self.original_weight())
        self.merged = False
        return self.base_layer

    @torch.no_grad()
    def merged_linear(self) -> nn.Module:
        """Return the base module (``nn.Linear`` / ``Conv1D``) with ΔW folded in (the adapter is dropped)."""
        self.merge()
        return self.base_layer

    def trainable_count(self) -> int:
        """Expected number of trainable parameters for this layer (checked against the real count)."""
        raise NotImplementedError

    def finish_warmup(self) -> None:
        """Move a delta that a training-time warm-up scales (SingLoRA's ramp u(t)) to the warm-up's end, as a
        finished training leaves it; nothing to do for the other methods. Tests that perturb the trainable
        tensors to get ΔW ≠ 0 call it."""

    @torch.no_grad()
    def after_load(self) -> None:
        """Run after the layer's tensors were set (initialized or loaded): move the init's offset O out
        of the frozen base (W ← W − O; PiSSA, OLoRA, LoLDU, ...), unless the base is shared."""
        offset = self.base_offset()
        if offset is not None and not self.shares_base:
            w = self.base_weight
            self._set_base_weight(w - offset.to(w.dtype))

    def extra_repr(self) -> str:
        base = f", base={kind_label(self.base_layer).removeprefix('transformers ')}" if self.base_transposed or (
            self.base_kind != "linear") else ""
        return f"method={self.method}, in={self.in_features}, out={self.out_features}, r={self.config.r}{base}"


class KeepsBaseLayer(AdapterLayer):
    """An adapter layer whose ``unmerge`` exactly undoes ``merge`` and that never moves anything out of its
    base (per-expert LoRA on 3-D parameters, AdaBN statistics): ``unload`` is unmerge + the base module,
    ``merged_linear`` merge + the base module, and loading needs no after-step."""

    @torch.no_grad()
    def unload(self) -> nn.Module:
        self.unmerge()
        return self.base_layer

    @torch.no_grad()
    def merged_linear(self) -> nn.Module:
        self.merge()
        return self.base_layer

    def after_load(self) -> None:
        """Nothing moves out of the base."""


def check_base(
    cls: type[AdapterLayer], config: AdapterConfig, base_layer: nn.Module, name: str = "", method: str | None = None
) -> str:
    """The kind of ``base_layer`` (``targets.layer_kind``) after checking that layer class ``cls``
    supports it with ``config`` and that the layer is one the kind's math covers; else a ValueError
    naming the method (``method``, default ``cls.method``), the layer type and what is supported.
    ``rw.adapt`` runs it on every target first."""
    kind = layer_kind(base_layer)
    where = f" ('{name}')" if name else ""
    supported = cls.supported_kinds(config)
    if kind not in supported:
        raise ValueError(
            f"method '{method or cls.method}' does not support {kind_label(base_layer)} layers{where}; supported: "
            f"{', '.join(KIND_LABELS[k] for k in supported)}"
        )
    if kind == "conv" and base_layer.groups != 1:
        raise ValueError(
            f"{kind_label(base_layer)}{where} has groups={base_layer.groups}; adapters support convolutions "
            "with groups=1 only"
        )
    if kind == "conv" and base_layer.padding_mode != "zeros":
        raise ValueError(
            f"{kind_label(base_layer)}{where} has padding_mode={base_layer.padding_mode!r}; adapters support "
            "padding_mode='zeros' only"
        )
    if kind == "embedding" and base_layer.max_norm is not None:
        raise ValueError(
            f"nn.Embedding{where} has max_norm={base_layer.max_norm} (it rewrites its weight in forward); "
            "adapters support embeddings without max_norm"
        )
    return cast(str, kind)


def with_offset(
    factors: tuple[torch.Tensor, torch.Tensor, float], offset: tuple[torch.Tensor, torch.Tensor, float] | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, s)`` of s·B·A − s₀·B₀·A₀: the offset factors appended as a block scaled by −s₀/s
    (unchanged when there is no offset or s = 0)."""
    b, a, s = factors[0], factors[1], float(factors[2])
    if offset is None or s == 0.0:
        return b, a, s
    b0, a0, s0 = offset
    return torch.cat([b, b0.to(b.dtype) * (-float(s0) / s)], dim=1), torch.cat([a, a0.to(a.dtype)], dim=0), s
