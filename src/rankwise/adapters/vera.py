"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024).

One pair of frozen random matrices A (r × k_max) and B (d_max × r) is shared by every adapted layer
and regenerated from ``seed``; each layer trains only two scaling vectors (paper Eq. 1):

    ΔW = Λ_b · B · Λ_d · A ,    b ∈ ℝ^out initialised to 0,  d ∈ ℝ^r initialised to ``d_initial``

Layers narrower than the largest one use the top-left slices ``A[:, :in]`` and ``B[:out, :]``
(as PEFT does). A and B use PEFT's generator sequence (Kaiming-uniform, gain √2, fan-in mode: A
first, then B, from ``torch.Generator().manual_seed(seed)``), so they equal PEFT's ``vera_A`` /
``vera_B`` for ``projection_prng_key = seed`` bit for bit. ΔW is a rank-r product, exported to
PEFT LoRA as B′ = Λ_b·B·Λ_d, A′ = A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import positive
from ..targets import linear_shape, linear_weight
from .base import AdapterConfig, AdapterLayer
from .init import InitContext
from .registry import MethodSpec, register


@dataclass
class VeRAConfig(AdapterConfig):
    """VeRA hyper-parameters: ``d_initial`` is the initial value of every entry of d (paper Sec. 3)."""

    d_initial: float = 0.1

    def validate(self) -> None:
        super().validate()
        positive("d_initial", self.d_initial)


def kaiming_fan_in_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(±√(6 / fan_in)) with fan_in = shape[1]: Kaiming-uniform with gain √2 (PEFT's VeRA init)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(seed: int, r: int, in_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared fp32 pair (A: r × in_max, B: out_max × r), a pure function of ``seed`` and the shapes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = kaiming_fan_in_uniform((r, in_max), g)
    b = kaiming_fan_in_uniform((out_max, r), g)
    return a, b


class VeRALayer(AdapterLayer):
    """Trainable ``vera_lambda_b`` (out,) and ``vera_lambda_d`` (r,); shared frozen ``vera_A``/``vera_B``."""

    method = "vera"

    @classmethod
    def build_shared(cls, config: VeRAConfig, layers: list[nn.Module]) -> dict[str, torch.Tensor]:
        in_max = max(linear_shape(lin)[1] for lin in layers)
        out_max = max(linear_shape(lin)[0] for lin in layers)
        a, b = vera_projections(config.seed, config.r, in_max, out_max)
        w = linear_weight(layers[0])
        dtype = config.dtype_for(w.dtype)
        return {"A": a.to(device=w.device, dtype=dtype), "B": b.to(device=w.device, dtype=dtype)}

    def __init__(self, base_layer: nn.Module, config: VeRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        shared = ctx.extra.get("shared")
        if shared is None:
            a, b = vera_projections(config.seed, config.r, self.in_features, self.out_features)
            w = self.base_weight
            shared = {"A": a.to(device=w.device, dtype=self.adapter_dtype),
                      "B": b.to(device=w.device, dtype=self.adapter_dtype)}
        if shared["A"].shape[0] != config.r:
            raise ValueError(
                f"r={config.r} differs from the r={shared['A'].shape[0]} of the projections shared by all "
                "VeRA layers; per-layer r overrides are not supported by vera"
            )
        # the same tensor objects in every layer; regenerated from the seed, so not saved
        self.register_buffer("vera_A", shared["A"], persistent=False)
        self.register_buffer("vera_B", shared["B"], persistent=False)
        w, dtype = self.base_weight, self.adapter_dtype
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=w.device))
        self.vera_lambda_d = nn.Parameter(
            torch.full((config.r,), float(config.d_initial), dtype=dtype, device=w.device)
        )

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices A[:, :in] (r × in) and B[:out, :] (out × r) of the shared pair."""
        return self.vera_A[:, : self.in_features], self.vera_B[: self.out_features, :]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, b = self.projections()
        return self.vera_lambda_b.unsqueeze(1) * b * self.vera_lambda_d.unsqueeze(0), a, 1.0

    def delta_weight(self) -> torch.Tensor:
        a, b = self.projections()
        return (self.vera_lambda_b.unsqueeze(1) * b) @ (self.vera_lambda_d.unsqueeze(1) * a)

    def trainable_count(self) -> int:
        return self.out_features + self.config.r

    def extra_repr(self) -> str:
        return super().extra_repr() + f", d_initial={self.config.d_initial:g}"


register(
    MethodSpec(
        "vera",
        "adapter",
        "Kopiczko et al. 2024, VeRA: Vector-based Random Matrix Adaptation",
        VeRAConfig,
        VeRALayer,
        export="lora",
        summary="ΔW = Λ_b B Λ_d A, shared frozen seeded A, B; only b (0 at init) and d trained",
    )
)
