"""EigenLoRAx (Kaushik et al. 2025, "EigenLoRAx: Recycling Adapters to Find Principal Subspaces for
Resource-Efficient Adaptation and Inference").

Per adapted layer, the LoRA adapters already on it (the sources) give two sets of vectors: the rows of
their A factors (in ℝ^in) and the columns of their B factors (in ℝ^out), each factor pair balanced as
(√s·B, √s·A) so that the vectors of sources with different scales compare. Each set is stacked into a
matrix X (dim × n), centered by its mean vector, and its top-K left singular vectors (the principal
components, the eigenvectors of the centered covariance) are kept; P pseudo-components (random
vectors orthogonalized against them and each other, the paper's augmentation for scarce adapters)
complete the basis: V_A (in × (K+P)), V_B (out × (K+P)), orthonormal and frozen. The new adapter
learns only coefficients:

    A′ = α·V_Aᵀ (α ∈ ℝ^{r × (K+P)}),  B′ = V_B·β (β ∈ ℝ^{(K+P) × r}),  ΔW = s·B′A′,  s = α_scale/r

so a layer trains 2·r·(K+P) numbers. A source adapter whose vectors lie in the span is reproduced
exactly by the projection coefficients α = A·V_A, β = V_Bᵀ·B (``init_from``, the official code's
"loadings"). With no sources on a layer (a bare model) all K+P components are pseudo-components.
Exported to PEFT as the LoRA pair (B′, A′).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import choice, integer
from ..rng import layer_generator
from ..targets import matrix_shape
from .base import AdapterLayer, AlphaScale
from .init import InitContext
from .registry import MethodSpec, adapter_names, register
from .sources import adapt_from_sources, check_sources_on, held_at

COEF_INITS = ("zero", "uniform")


@dataclass
class EigenLoRAxConfig(AlphaScale):
    """``n_components`` K principal components per side from the sources, ``n_pseudo`` P random
    orthonormal pseudo-components beside them; ``sources``: the adapters read (None: every adapter
    with LoRA factors on each layer); ``init_from``: a source whose projection onto the components
    starts the coefficients (its rank must be r); otherwise ``coef_init`` "zero" (α ~ U(±0.5), β = 0:
    the model starts at the base) or "uniform" (α, β ~ U(±0.5), the official code's); ``alpha`` the
    scale numerator as LoRA's (None: α = r)."""

    n_components: int = 8
    n_pseudo: int = 0
    sources: list[str] | None = None
    init_from: str | None = None
    coef_init: str = "zero"
    alpha: float | None = None

    def validate(self) -> None:
        super().validate()
        integer("n_components", self.n_components, 0)
        integer("n_pseudo", self.n_pseudo, 0)
        if self.n_components + self.n_pseudo < 1:
            raise ValueError(f"n_components + n_pseudo = {self.n_components + self.n_pseudo} must be >= 1")
        if self.sources is not None and (
            isinstance(self.sources, str) or not all(isinstance(s, str) for s in self.sources)
        ):
            raise ValueError(f"sources={self.sources!r} must be a list of adapter names or None (every adapter)")
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise ValueError(f"init_from={self.init_from!r} must be an adapter name or None")
        choice("coef_init", self.coef_init, COEF_INITS)

    @property
    def size(self) -> int:
        """K + P, the number of components per side."""
        return self.n_components + self.n_pseudo


def principal_subspace(vectors: torch.Tensor, k: int, p: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal columns (dim × (k + p)): the top-k left singular vectors of ``vectors`` (dim × n)
    centered by their mean (fewer when n < k), then random columns orthogonalized against those and
    each other (Gram-Schmidt by QR) up to k + p. Computed in float64."""
    dim = vectors.shape[0]
    x = vectors.double()
    if x.shape[1] > 0:
        centered = x - x.mean(dim=1, keepdim=True)
        u, _, _ = torch.linalg.svd(centered, full_matrices=False)
        basis = u[:, : min(k, u.shape[1])]
    else:
        basis = x.new_zeros(dim, 0)
    missing = k + p - basis.shape[1]
    if missing > 0:
        extra = torch.randn(dim, missing, generator=generator, dtype=torch.float64).to(x.device)
        for _ in range(2):  # twice: orthogonal to the principal components to rounding
            extra = extra - basis @ (basis.T @ extra)
        extra, _ = torch.linalg.qr(extra)
        basis = torch.cat([basis, extra], dim=1)
    return basis


def balanced_factors(layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(√s·B, √s·A) of a layer's delta relative to W₀ (s·B·A), or None when it is not low-rank."""
    f = layer.factors_from_original()
    if f is None:
        return None
    b, a, s = f
    root = math.sqrt(abs(float(s)))
    return b.detach().double() * (root if s >= 0 else -root), a.detach().double() * root


def _sources(held: dict[str, AdapterLayer], config: EigenLoRAxConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The balanced factors of the source adapters held by one layer."""
    names = list(held) if config.sources is None else config.sources
    out = {}
    for name in names:
        f = balanced_factors(held[name]) if name in held else None
        if f is not None:
            out[name] = f
    return out


class EigenLoRAxLayer(AdapterLayer):
    """Frozen ``eigen_VA`` ((K+P) × in, orthonormal rows) and ``eigen_VB`` (out × (K+P), orthonormal
    columns); trainable ``eigen_alpha`` (r × (K+P)) and ``eigen_beta`` ((K+P) × r)."""

    method = "eigenlorax"

    def __init__(self, base_layer: nn.Module, config: EigenLoRAxConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r, k, dtype, device = config.r, config.size, self.adapter_dtype, self.base_weight.device
        self.scale = config.scale
        self.register_buffer("eigen_VA", torch.zeros(k, self.in_features, dtype=dtype, device=device))
        self.register_buffer("eigen_VB", torch.zeros(self.out_features, k, dtype=dtype, device=device))
        self.eigen_alpha = nn.Parameter(torch.zeros(r, k, dtype=dtype, device=device))
        self.eigen_beta = nn.Parameter(torch.zeros(k, r, dtype=dtype, device=device))
        self.identity_at_init = config.init_from is None and config.coef_init == "zero"
        if not ctx.skip:
            self._initialize(ctx, config)

    @torch.no_grad()
    def _initialize(self, ctx: InitContext, config: EigenLoRAxConfig) -> None:
        sources = _sources(ctx.extra.get("held", {}), config)
        gen = layer_generator(config.seed, f"eigenlorax/{ctx.extra.get('adapter', 'default')}/{ctx.name}")
        device = self.base_weight.device
        rows = torch.cat([a.T for _, a in sources.values()], dim=1) if sources else torch.zeros(self.in_features, 0)
        cols = torch.cat([b for b, _ in sources.values()], dim=1) if sources else torch.zeros(self.out_features, 0)
        v_a = principal_subspace(rows.to(device), config.n_components, config.n_pseudo, gen)
        v_b = principal_subspace(cols.to(device), config.n_components, config.n_pseudo, gen)
        self.eigen_VA.copy_(v_a.T)
        self.eigen_VB.copy_(v_b)
        if config.init_from is not None:  # the source's projection (least squares, the components being orthonormal)
            b, a = sources[config.init_from]
            self.eigen_alpha.copy_(a @ v_a / math.sqrt(self.scale))
            self.eigen_beta.copy_(v_b.T @ b / math.sqrt(self.scale))
            return
        self.eigen_alpha.copy_(torch.rand(self.eigen_alpha.shape, generator=gen, dtype=torch.float64) - 0.5)
        if config.coef_init == "uniform":
            self.eigen_beta.copy_(torch.rand(self.eigen_beta.shape, generator=gen, dtype=torch.float64) - 0.5)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.eigen_VB @ self.eigen_beta, self.eigen_alpha @ self.eigen_VA, self.scale

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return (b @ a) * s

    def trainable_count(self) -> int:
        """2·r·(K + P): the coefficients of both sides."""
        return 2 * self.config.r * self.config.size

    def extra_repr(self) -> str:
        c = self.config
        return super().extra_repr() + f", components={c.n_components}+{c.n_pseudo}, scale={self.scale:g}"


def check_sources(model: nn.Module, config: EigenLoRAxConfig, targets: list[str]) -> None:
    """Before the model changes: the named sources hold LoRA factors on every target, ``init_from`` is one
    of them with rank r there, and K + P fits every target's dimensions."""
    names = config.sources if config.sources is not None else adapter_names(model)
    if config.init_from is not None and config.init_from not in names:
        raise ValueError(f"init_from={config.init_from!r} must be one of the sources {names}")
    check_sources_on(model, config.sources or [], targets, "sources", "eigenlorax")
    for target in targets:
        limit = min(matrix_shape(model.get_submodule(target)))
        if config.size > limit:
            raise ValueError(f"n_components + n_pseudo = {config.size} exceeds min(in, out) = {limit} of '{target}'")
        if config.init_from is not None:
            held = held_at(model, target)
            f = balanced_factors(held[config.init_from]) if config.init_from in held else None
            if f is None or f[1].shape[0] != config.r:
                rank = None if f is None else f[1].shape[0]
                raise ValueError(f"init_from={config.init_from!r} needs a rank-r={config.r} LoRA factor pair on "
                                 f"'{target}' (found rank {rank})")


def eigenlorax(
    model: nn.Module, sources: list[str] | None = None, *, name: str = "eigenlorax", targets: list[str] | None = None,
    **config: Any,
) -> nn.Module:
    """``rw.adapt(model, "eigenlorax", sources=..., ...)`` on the layers every source adapts (``sources``
    None: all the model's adapters); the sources stay on the model, inactive and frozen (``rw.set_active``)."""
    return adapt_from_sources(model, "eigenlorax", sources, "sources", name=name, targets=targets, **config)


register(
    MethodSpec(
        "eigenlorax",
        "multi-adapter",
        "Kaushik et al. 2025, EigenLoRAx: Recycling Adapters to Find Principal Subspaces for Resource-Efficient "
        "Adaptation and Inference",
        EigenLoRAxConfig,
        EigenLoRAxLayer,
        export="lora",
        summary="B′ = V_B·β, A′ = α·V_Aᵀ over the frozen top-K principal components (centered SVD) of the "
                "model's LoRA adapters' B columns / A rows (+ orthogonal pseudo-components); only α, β train",
        check_model=check_sources,
    )
)
