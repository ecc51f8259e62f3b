"""Core-matrix adapters: ΔW = s·B·C·A with frozen B (out × r), A (r × in) and a trainable core C.

One layer class (``CoreLayer``); each method is that layer plus its initialization function (the
``INITS`` of ``init.py``, the one init contract):

* ``lora_xs`` — LoRA-XS (Bałazy et al. 2024, arXiv 2405.17604, Sec. 3): B = U_r, A = S_r V_rᵀ from
  the truncated SVD of W₀; full r×r core R ~ N(0, σ²), σ = 1e-5 as in the official code (so the
  output equals the base up to that noise). No base offset.
* ``lora_sb`` — LoRA-SB (Ponkshe et al. 2024, arXiv 2411.19557, Sec. 4 and official code): the
  first full fine-tuning update is estimated as ΔW₁ = −η·sign(Ḡ) (one Adam step; ``update="sgd"``:
  −η·Ḡ); its truncated SVD U_r S_r V_rᵀ gives B = U_r, R = S_r / s, A = V_rᵀ, so at init s·B·R·A is
  the best rank-r approximation of ΔW₁. The base is *not* offset: the model starts at W₀ + [ΔW₁]_r,
  as in the paper (W = W₀ + sBRA) and the official code.
* ``loldu`` — LoLDU (Shi et al. 2024, arXiv 2410.13618, Sec. 3 / Fig. 3 and official code): LDU with
  partial pivoting W₀ = P·L·D·U; B = P·L_r (unit lower-triangular L_r), A = U_r (unit
  upper-triangular), trainable diagonal z initialised to D_r, fixed scale σ = α/r (official default
  α = 1; the official ``get_loldu_params`` trains z only, so r parameters per layer);
  W_res = W₀ − σ·P·L_r·diag(D_r)·U_r, so the output equals the base at init.
* ``svfit`` — SVFit (Sun et al. 2024, arXiv 2409.05926, Sec. III): W₀ = W_r + W_e with W_r =
  U_r diag(σ) V_rᵀ; the top-r singular values σ are trainable (initialised to the true ones), U_r,
  V_r and W_e are frozen. ``energy=0.99`` picks r per layer as the smallest rank with
  Σ_{i≤r} σᵢ² ≥ 0.99·Σσᵢ² (the paper's "over 99% of the matrix's information").
* ``pmss`` — PMSS (Wang et al. 2024, arXiv 2409.16722): B = C = W₀[:, J], A = R = W₀[I, :] are exact
  skeleton columns / rows of W₀ and only the r×r core U is trained (r² parameters per layer, so r, the
  number of skeletons, can be far larger than a LoRA rank at the same cost: a high-rank update). The
  skeletons are chosen by DEIM on W₀'s top-r singular vectors and U₀ = C⁺W₀R⁺ (our reading, see
  ``init.pmss_init``); s·C·U₀·R moves out of the base, so the output equals the base at init.

All five are low-rank products, so ``factors()`` returns (P·B·C, A, s) and PEFT export is direct;
inits that moved s·B·C₀·A out of W₀ (LoLDU, SVFit) keep C₀ in the ``core_init`` buffer and declare
it through ``base_offset_factors``. B, A (and LoLDU's row permutation) are persistent buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from ..checks import choice, fraction, integer, non_negative, positive
from ..linalg import energy_rank
from .base import AdapterConfig, AdapterLayer, AlphaConfig
from .init import INITS, Factors, InitContext
from .registry import MethodSpec, register


# ---------------------------------------------------------------------- configs
@dataclass
class CoreConfig(AdapterConfig):
    """Options shared by the core-matrix methods; ``init_name`` says which init the method uses."""

    init_name: ClassVar[str] = ""

    @property
    def scale(self) -> float:
        return 1.0

    def rank(self, weight: torch.Tensor) -> int:
        """The adapter rank for this (fp32, original) weight: ``r`` unless a rule picks it per layer."""
        return self.r


@dataclass
class LoRAXSConfig(AlphaConfig, CoreConfig):
    """LoRA-XS: s = α/r (``alpha=None``: α = r, s = 1); the r×r core starts ~ N(0, init_std²)."""

    init_name: ClassVar[str] = "lora_xs"
    init_std: float = 1e-5

    def validate(self) -> None:
        super().validate()
        non_negative("init_std", self.init_std)


@dataclass
class LoRASBConfig(CoreConfig):
    """LoRA-SB: ΔW₁ = −init_lr·sign(G) (``update="adam"``, official code) or −init_lr·G (``"sgd"``)."""

    init_name: ClassVar[str] = "lora_sb"
    init_lr: float = 1e-3
    update: str = "adam"

    def validate(self) -> None:
        super().validate()
        positive("init_lr", self.init_lr)
        choice("update", self.update, ("adam", "sgd"))


@dataclass
class LoLDUConfig(AlphaConfig, CoreConfig):
    """LoLDU: fixed scale σ = α/r on P·L_r·diag(z)·U_r (official code's default α = 1)."""

    init_name: ClassVar[str] = "loldu"
    alpha: float = 1.0
    alpha_optional: ClassVar[bool] = False


@dataclass
class SVFitConfig(CoreConfig):
    """SVFit: ``energy=None`` trains the top ``r`` singular values; ``energy=e`` ignores ``r`` and
    takes, per layer, the smallest rank whose singular values keep a share ≥ e of Σσ²."""

    init_name: ClassVar[str] = "svfit"
    energy: float | None = None

    def validate(self) -> None:
        super().validate()
        fraction("energy", self.energy, optional=True, what="in (0, 1]")

    def rank(self, weight: torch.Tensor) -> int:
        if self.energy is None:
            return self.r
        return energy_rank(torch.linalg.svdvals(weight), float(self.energy))


# ---------------------------------------------------------------------- the layer
class CoreLayer(AdapterLayer):
    """``y = W x + s·(P·B)·C·(A x)``; frozen buffers ``frozen_B``, ``frozen_A`` (and ``row_perm``),
    trainable ``core`` (r×r, or r for a diagonal core)."""

    method = "core"

    @classmethod
    def needs_grad(cls, config: CoreConfig) -> bool:
        return INITS[config.init_name].needs_grad

    def __init__(self, base_layer: nn.Module, config: CoreConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        spec = INITS[config.init_name]
        self.method = config.init_name
        self.identity_at_init = spec.identity
        self.diagonal, self.moves_base = spec.core == "diagonal", spec.moves_base
        self.scale = config.scale
        dtype, device = self.adapter_dtype, self.base_weight.device
        weight = self.base_weight.detach().float()
        r = config.rank(weight)
        if ctx.skip:  # shapes only; the tensors come from a checkpoint
            f = Factors(
                torch.zeros(self.out_features, r),
                torch.zeros(r, self.in_features),
                torch.zeros(r) if self.diagonal else torch.zeros(r, r),
                torch.arange(self.out_features) if spec.permuted else None,
            )
        else:
            f = spec.fn(weight, replace(ctx, config=config, r=r, scale=self.scale))
        self.r = f.core.shape[0]
        self.register_buffer("frozen_B", f.left.to(device=device, dtype=dtype).contiguous())
        self.register_buffer("frozen_A", f.right.to(device=device, dtype=dtype).contiguous())
        self.register_buffer("row_perm", None if f.row_perm is None else f.row_perm.to(device=device, dtype=torch.long))
        self.core = nn.Parameter(f.core.to(device=device, dtype=dtype).clone())
        if self.moves_base:
            self.register_buffer("core_init", f.core.to(device=device, dtype=dtype).clone())
            if not ctx.skip:
                self.after_load()

    def _left_times(self, core: torch.Tensor) -> torch.Tensor:
        """(P·B)·C as an out × r matrix."""
        left = self.frozen_B if self.row_perm is None else self.frozen_B[self.row_perm]
        return left * core if self.diagonal else left @ core

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self._left_times(self.core), self.frozen_A, self.scale

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return (self._left_times(self.core_init), self.frozen_A, self.scale) if self.moves_base else None

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return (b @ a) * s

    def trainable_count(self) -> int:
        return self.r if self.diagonal else self.r * self.r

    def extra_repr(self) -> str:
        core = "diag" if self.diagonal else "full"
        return (
            f"method={self.method}, in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"core={core}, scale={self.scale:g}"
        )


@dataclass
class PMSSConfig(CoreConfig):
    """PMSS: ``r`` skeleton rows and columns (DEIM on the top-r singular vectors of W₀), r×r trained core;
    ``init_iters=k``: a randomized SVD (k power iterations) for the singular vectors."""

    init_name: ClassVar[str] = "pmss"
    init_iters: int = 0

    def validate(self) -> None:
        super().validate()
        integer("init_iters", self.init_iters, 0)


register(
    MethodSpec(
        "lora_xs",
        "adapter",
        "Bałazy et al. 2024, LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters",
        LoRAXSConfig,
        CoreLayer,
        summary="ΔW = s·U_r·R·S_r·V_rᵀ, frozen SVD factors of W₀, r×r trainable R",
    )
)
register(
    MethodSpec(
        "lora_sb",
        "init",
        "Ponkshe et al. 2024, Initialization using Update Approximation is a Silver Bullet for "
        "Extremely Efficient Low-Rank Fine-Tuning",
        LoRASBConfig,
        CoreLayer,
        summary="B·R·A = best rank-r approx. of the estimated first update (needs init_data); r×r trainable R",
    )
)
register(
    MethodSpec(
        "loldu",
        "init",
        "Shi et al. 2024, LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for "
        "Parameter-Efficient Fine-Tuning",
        LoLDUConfig,
        CoreLayer,
        summary="W₀ = P·L·D·U; frozen L_r, U_r, trainable diagonal (r per layer), base offset",
    )
)
register(
    MethodSpec(
        "svfit",
        "init",
        "Sun et al. 2024, SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
        SVFitConfig,
        CoreLayer,
        summary="trainable top-r singular values of W₀ (energy=0.99: per-layer r), frozen U_r, V_r",
    )
)
register(
    MethodSpec(
        "pmss",
        "init",
        "Wang et al. 2024, PMSS: Pretrained Matrices Skeleton Selection for LLM Fine-tuning",
        PMSSConfig,
        CoreLayer,
        summary="ΔW = C·(U − U₀)·R: C, R = r skeleton columns / rows of W₀ (DEIM on its singular vectors), "
                "only the r×r core U trained (U₀ = C⁺W₀R⁺, base offset)",
    )
)
