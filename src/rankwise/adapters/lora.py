"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and rsLoRA.

ΔW = s·B·A with A ∈ ℝ^{r×k}, B ∈ ℝ^{d×r}; s = α/r (LoRA) or α/√r (rsLoRA, Kalajdzievski 2023,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"). Default init: A ~ U(±1/√k)
(``nn.Linear``'s), B = 0, so the adapted model starts equal to the base. Other initializations
(PiSSA, OLoRA, LoRA-GA, ...) are functions in ``adapters.init`` selected by ``init``.

QLoRA (Dettmers et al. 2023) is this layer over a 4-bit base: over a base already quantized by
``rw.quantize`` any LoRA method is QLoRA; method ``qlora`` (``QLoRAConfig``) quantizes the layers it
adapts itself. LoftQ (``init="loftq"``, method ``loftq``) chooses the 4-bit base and the factors
together from the full-precision W₀ (``adapters.init.loftq_init``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..checks import choice, integer
from ..quant import SCHEMES, to_linear4bit
from ..rng import kaiming_uniform_, layer_generator
from ..shards import full, write_full_
from ..targets import is_linear4bit, linear_weight
from .base import AdapterConfig, AdapterLayer, RsAlphaConfig, check_base
from .experts import ExpertLoRALayer
from .init import INITS, Factors, InitContext, lora_inits
from .registry import MethodSpec, register


@dataclass
class LoRAConfig(RsAlphaConfig):
    """LoRA hyper-parameters. ``alpha=None`` means α = r (scale 1 for plain LoRA). ``target_parameters``:
    names / suffixes of 3-D MoE expert parameters that get one LoRA pair per expert (``adapters.experts``)."""

    init: str = "default"
    init_iters: int = 0  # power iterations for randomized SVD inits (0 = exact SVD)
    target_parameters: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        if isinstance(self.target_parameters, tuple):  # JSON-friendly (find_parameters checks the names)
            self.target_parameters = list(self.target_parameters)
        choice("init", self.init, lora_inits())
        integer("init_iters", self.init_iters, 0)


@dataclass
class QLoRAConfig(LoRAConfig):
    """LoRA over a 4-bit base that the layer quantizes itself when it is in full precision (QLoRA,
    Dettmers et al. 2023; bitsandbytes, blocks of 64): ``quant_type`` "nf4" or "fp4",
    ``double_quant`` (quantized block scales), and LoftQ's number of alternations ``loftq_iter`` ≥ 1
    (read by ``init="loftq"`` only)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    loftq_iter: int = 1

    def validate(self) -> None:
        super().validate()
        choice("quant_type", self.quant_type, SCHEMES)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} must be True or False")
        integer("loftq_iter", self.loftq_iter, 1)


class LoRALayer(AdapterLayer):
    """``y = W x + s·B(A x)``; trainable ``lora_A`` (r×in) and ``lora_B`` (out×r).

    Over an ``nn.Embedding`` (out, in) = (embedding_dim, num_embeddings), so ``lora_A`` (r,
    num_embeddings) and ``lora_B`` (dim, r) are PEFT's ``lora_embedding_A`` / ``lora_embedding_B``;
    over a convolution (out, in) = (out_channels, in_channels·kernel) and ``lora_A`` / ``lora_B``
    are PEFT's conv weights flattened (``AdapterLayer.factor_map`` runs them as convolutions)."""

    method = "lora"
    base_kinds = ("linear", "embedding", "conv")
    # the inits that only read W₀ work on any kind's (out, in) matrix
    ANY_KIND_INITS = ("default", "pissa", "olora")

    @classmethod
    def supported_kinds(cls, config: AdapterConfig) -> tuple[str, ...]:
        """All ``base_kinds`` for the inits that only read W₀ in full precision; linear layers only for
        QLoRA (a 4-bit base) and inits needing a gradient or quantizing (LoRA-GA, LoftQ)."""
        if isinstance(config, QLoRAConfig) or getattr(config, "init", "default") not in cls.ANY_KIND_INITS:
            return ("linear",)
        return cls.base_kinds

    @classmethod
    def needs_grad(cls, config: LoRAConfig) -> bool:
        return INITS[config.init].needs_grad

    @classmethod
    def parameter_layer(cls, config: AdapterConfig) -> type[AdapterLayer] | None:
        """Per-expert LoRA (``ExpertLoRALayer``) for plain LoRA / rsLoRA: this class itself (not DoRA's),
        the default init, a full-precision base."""
        plain = cls is LoRALayer and type(config) is LoRAConfig and config.init == "default"
        return ExpertLoRALayer if plain else None

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, ctx: InitContext) -> None:
        check_base(type(self), config, base_layer, ctx.name)  # before a base is quantized
        base_layer, chosen = self._quantized_base(base_layer, config, ctx)
        super().__init__(base_layer, config)
        self.identity_at_init = INITS[config.init].identity
        r, dtype, device = config.r, self.adapter_dtype, self.base_weight.device
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.moves_base = INITS[config.init].moves_base
        if self.moves_base:
            # initial factors, kept to recover W₀ = W_base + s·B₀A₀ (export, unload, reload)
            self.register_buffer("init_A", torch.zeros_like(self.lora_A))
            self.register_buffer("init_B", torch.zeros_like(self.lora_B))
        if ctx.skip:
            return
        self._initialize(ctx, chosen)

    @classmethod
    def replaces_base(cls, config: AdapterConfig, base_layer: nn.Module) -> bool:
        return INITS[config.init].quantizes or (isinstance(config, QLoRAConfig) and not is_linear4bit(base_layer))

    @staticmethod
    def _quantized_base(
        base_layer: nn.Module, config: LoRAConfig, ctx: InitContext
    ) -> tuple[nn.Module, Factors | None]:
        """The base this layer wraps: a 4-bit one for ``QLoRAConfig`` (the given layer quantized
        unless it is 4-bit already) and for an init that chooses the 4-bit base (LoftQ: run here, on
        the full-precision W₀, also when the tensors come from a checkpoint, since the base is not
        saved with the adapter; the factors are returned to initialize with)."""
        spec = INITS[config.init]
        scheme = getattr(config, "quant_type", "nf4")
        double_quant = getattr(config, "double_quant", True)
        if spec.quantizes:
            if is_linear4bit(base_layer):
                raise ValueError(
                    f"init='{config.init}' needs the full-precision weight of '{ctx.name}', but it is 4-bit "
                    "already: adapt the unquantized model (LoftQ quantizes the layers it adapts itself)"
                )
            w = linear_weight(base_layer).detach()
            f = spec.fn(w.float(), replace(ctx, config=config, r=config.r, scale=config.scale))
            return to_linear4bit(base_layer, scheme, double_quant, w.dtype, quantized=f.base), f
        if isinstance(config, QLoRAConfig) and not is_linear4bit(base_layer):
            return to_linear4bit(base_layer, scheme, double_quant), None
        return base_layer, None

    @torch.no_grad()
    def _initialize(self, ctx: InitContext, chosen: Factors | None = None) -> None:
        cfg: LoRAConfig = self.config
        if cfg.init == "default" and self.base_kind == "embedding":
            # PEFT's embedding init: A = 0, B ~ N(0, 1) (a uniform A over num_embeddings inputs is tiny)
            self.lora_B.copy_(torch.randn(self.lora_B.shape, generator=layer_generator(cfg.seed, ctx.name)))
            return
        if cfg.init == "default":
            kaiming_uniform_(self.lora_A, generator=layer_generator(cfg.seed, ctx.name))
            return
        if chosen is None:
            w = self.base_weight.detach().float()
            chosen = INITS[cfg.init].fn(w, replace(ctx, config=cfg, r=cfg.r, scale=self.scale))
        b, a = chosen.left, chosen.right
        self.lora_B.copy_(b)
        self.lora_A.copy_(a)
        if self.moves_base:
            self.init_A.copy_(a)
            self.init_B.copy_(b)
            self.after_load()

    def after_load(self) -> None:
        """The offset moves out of the base (``AdapterLayer.after_load``), except for an init that
        chose the base itself (LoftQ's base Q_T was set at construction)."""
        if not INITS[self.config.init].quantizes:
            super().after_load()

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return (self.init_B, self.init_A, self.scale) if self.moves_base else None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_B, self.lora_A, self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def restart_(self, generator: torch.Generator) -> None:
        """Fold the update into the base and start afresh: W ← W + s·B·A, then A ← Kaiming-uniform drawn from
        ``generator`` and B ← 0, so the output is unchanged (ReLoRA's merge, COLA's next link). On FSDP2 shards
        the product is of the gathered factors and each rank keeps its rows of W and of the new A."""
        w = full(self.base_weight.detach())
        delta = (full(self.lora_B.detach()) @ full(self.lora_A.detach())) * self.scale
        self._set_base_weight(w + delta.to(w.dtype))
        a = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype, device=self.lora_A.device)
        write_full_(self.lora_A, kaiming_uniform_(a, generator=generator))
        self.lora_B.zero_()

    def trainable_count(self) -> int:
        return self.config.r * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}, init={self.config.init}"


register(
    MethodSpec(
        "lora",
        "adapter",
        "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models",
        LoRAConfig,
        LoRALayer,
        summary="ΔW = (α/r)·B·A, B = 0 at init",
    )
)
register(
    MethodSpec(
        "rslora",
        "training-dynamics",
        "Kalajdzievski 2023, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
        LoRAConfig,
        LoRALayer,
        defaults={"use_rslora": True},
        summary="LoRA with scale α/√r",
    )
)
register(
    MethodSpec(
        "qlora",
        "quantization",
        "Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs",
        QLoRAConfig,
        LoRALayer,
        summary="LoRA over a frozen 4-bit NF4 base (bitsandbytes, double-quantized scales), fp32 adapters",
    )
)
