"""RandLoRA (Albert et al. 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of large
models", ICLR 2025).

A full-rank update built from n = ⌈min(d, k)/r⌉ frozen random rank-r bases shared by all layers
(paper Sec. 4, "RandLoRA"): with d ≥ k (k the smaller side),

    ΔW = s · Σᵢ₌₁ⁿ Bᵢ Λᵢ A Γᵢ ,    s = α / r

Bᵢ (d × r) are random and distinct per term, A (r × k) is one shared random matrix, and only the
diagonals Λᵢ (r × r, ``randlora_lambda[:, i]``) and Γᵢ (k × k, ``randlora_gamma[i]``) are trained.
The trainable diagonals always sit on the smaller side k; for a wide layer (in > out) the update is
the transpose, as in PEFT 0.21.2 (``peft/tuners/randlora``). Λ = 0 and Γ = 1/max(n, k) at init, so
ΔW = 0. Bases are Kaiming-uniform then divided by their standard deviation, or ternary sparse
(Bingham & Mannila 2001 / Li et al. 2006: P(±1) = 1/(2s) each with s = 3 for ``sparse``, s = √k for
``very_sparse``, then divided by their std), all regenerated from ``seed``.

Like PEFT, the r·n rank-one terms pair column ``j`` of the flattened B (d × n·r, ordered (term, rank))
with row ``j`` of the flattened scaled A (n·r × k, ordered (rank, term)); B's columns are i.i.d., so
this is the paper's sum with the columns of B relabelled, and it keeps outputs equal to PEFT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import choice
from ..targets import linear_shape, linear_weight
from .base import AdapterLayer, AlphaConfig
from .init import InitContext
from .registry import MethodSpec, register

SPARSITY = ("none", "sparse", "very_sparse")
ROUTES = ("auto", "dense", "factored")


@dataclass
class RandLoRAConfig(AlphaConfig):
    """RandLoRA hyper-parameters. ``alpha=None`` means α = 20·r (scale 20, PEFT's advice).

    ``sparse``: random bases are dense ("none") or ternary sparse ("sparse", "very_sparse").
    """

    sparse: str = "none"

    def validate(self) -> None:
        super().validate()
        choice("sparse", self.sparse, SPARSITY)

    @property
    def scale(self) -> float:
        return (20.0 * self.r if self.alpha is None else float(self.alpha)) / self.r


def num_bases(min_dim: int, r: int) -> int:
    """n = ⌈min(d, k) / r⌉ bases of rank r, enough for a full-rank sum."""
    return -(-min_dim // r)


def _ternary(u: torch.Tensor, s: float) -> torch.Tensor:
    """−1 where u < 1/(2s), +1 where u > 1 − 1/(2s), else 0 (u ~ U[0, 1))."""
    t = torch.zeros_like(u)
    t[u < 1 / (2 * s)] = -1
    t[u > 1 - 1 / (2 * s)] = 1
    return t


def randlora_bases(
    seed: int, r: int, max_dim: int, min_dim: int, sparse: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared fp32 bases A (r × min_dim) and B (max_dim × n × r), a pure function of the arguments."""
    choice("sparse", sparse, SPARSITY)
    n = num_bases(min_dim, r)
    g = torch.Generator(device="cpu").manual_seed(seed)
    if sparse == "none":
        # Kaiming-uniform (a = √5): U(±1/√fan_in); fan_in = min_dim for A, r for each Bᵢ
        a = torch.empty(r, min_dim).uniform_(-1 / math.sqrt(min_dim), 1 / math.sqrt(min_dim), generator=g)
        b = torch.cat(
            [torch.empty(max_dim, 1, r).uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r), generator=g) for _ in range(n)],
            dim=1,
        )
    else:
        s = 3.0 if sparse == "sparse" else math.sqrt(min_dim)
        a = _ternary(torch.rand((r, min_dim), generator=g), s)
        b = _ternary(torch.rand((max_dim, n, r), generator=g), s)
    return a / a.std(), b / b.std()


class RandLoRALayer(AdapterLayer):
    """Trainable ``randlora_lambda`` (r × n) and ``randlora_gamma`` (n × k); shared frozen bases.

    ``route`` picks how the forward applies ΔW: "factored" (x → n·r → out, never forming ΔW),
    "dense" (one GEMM with W₀ + ΔW) or "auto" (whichever costs fewer multiply-adds for this batch).
    """

    method = "randlora"
    route: str = "auto"

    @classmethod
    def build_shared(cls, config: RandLoRAConfig, layers: list[nn.Module]) -> dict[str, torch.Tensor]:
        out_max = max(linear_shape(lin)[0] for lin in layers)
        in_max = max(linear_shape(lin)[1] for lin in layers)
        a, b = randlora_bases(config.seed, config.r, max(out_max, in_max), min(out_max, in_max), config.sparse)
        w = linear_weight(layers[0])
        dtype = config.dtype_for(w.dtype)
        return {"A": a.to(device=w.device, dtype=dtype), "B": b.to(device=w.device, dtype=dtype)}

    def __init__(self, base_layer: nn.Module, config: RandLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        shared = ctx.extra.get("shared")
        if shared is None:
            shared = self.build_shared(config, [base_layer])
        if shared["A"].shape[0] != config.r:
            raise ValueError(
                f"r={config.r} differs from the r={shared['A'].shape[0]} of the bases shared by all "
                "RandLoRA layers; per-layer r overrides are not supported by randlora"
            )
        self.min_dim = min(self.in_features, self.out_features)
        self.max_dim = max(self.in_features, self.out_features)
        self.n = num_bases(self.min_dim, config.r)
        self.scale = config.scale
        # the same tensor objects in every layer; regenerated from the seed, so not saved
        self.register_buffer("randlora_A", shared["A"], persistent=False)
        self.register_buffer("randlora_B", shared["B"], persistent=False)
        w, dtype = self.base_weight, self.adapter_dtype
        self.randlora_lambda = nn.Parameter(torch.zeros(config.r, self.n, dtype=dtype, device=w.device))
        self.randlora_gamma = nn.Parameter(
            torch.full((self.n, self.min_dim), 1.0 / max(self.n, self.min_dim), dtype=dtype, device=w.device)
        )

    # ------------------------------------------------------------------ the update
    def scaled_bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B̃: max_dim × n·r, Ã: n·r × min_dim) with ΔW = s·B̃Ã (in ≤ out) or s·(B̃Ã)ᵀ (in > out).

        Ã[(k, i), j] = λ[k, i] · A[k, j] · γ[i, j]: the diagonals Λᵢ, Γᵢ applied to the shared A.
        """
        r = self.config.r
        a = self.randlora_A[:, : self.min_dim]
        b = self.randlora_B[: self.max_dim, : self.n, :].reshape(self.max_dim, self.n * r)
        scaled_a = self.randlora_lambda.unsqueeze(2) * a.unsqueeze(1) * self.randlora_gamma.unsqueeze(0)
        return b, scaled_a.reshape(r * self.n, self.min_dim)

    def delta_weight(self) -> torch.Tensor:
        b, a = self.scaled_bases()
        m = (b @ a) * self.scale
        return m if self.in_features <= self.out_features else m.t()

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """s·ΔW x through the n·r-wide bottleneck, without forming ΔW."""
        b, a = self.scaled_bases()
        if self.in_features <= self.out_features:
            return F.linear(F.linear(x, a), b) * self.scale
        return F.linear(F.linear(x, b.t()), a.t()) * self.scale

    def _dense_is_cheaper(self, x: torch.Tensor) -> bool:
        if self.route != "auto":
            choice("route", self.route, ROUTES)
            return self.route == "dense"
        tokens = x.numel() // self.in_features
        # factored: tokens·width·(in+out);  dense: width·in·out to form ΔW (the base GEMM is shared);
        # width = r·n multiplies both sides, so it cancels from the comparison
        return tokens * (self.in_features + self.out_features) >= self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled or self.batch_names is not None:
            return super().forward(x)
        w, bias = self.base_weight, self.base_layer.bias
        dense = self._dense_is_cheaper(x)
        if dense and not self.dropout_active and self.adapter_dtype == w.dtype:
            return F.linear(x, w + self.delta_weight(), bias)
        out = self.base_layer(x)  # the delta in the adapter dtype, added in the base dtype
        x_d = self.dropout(x).to(self.adapter_dtype)
        delta = F.linear(x_d, self.delta_weight()) if dense else self.delta_forward(x_d)
        return out + delta.to(out.dtype)

    def trainable_count(self) -> int:
        return self.n * (self.config.r + self.min_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bases={self.n}, scale={self.scale:g}, sparse={self.config.sparse}"


register(
    MethodSpec(
        "randlora",
        "adapter",
        "Albert et al. 2025, RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
        RandLoRAConfig,
        RandLoRALayer,
        export="none",
        summary="ΔW = (α/r)·Σᵢ Bᵢ Λᵢ A Γᵢ over ⌈min(d,k)/r⌉ shared seeded random bases; only Λ, Γ trained",
    )
)
