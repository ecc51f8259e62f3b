"""SLoRA, NLoRA and IntTune (Guo, Chang & Wu 2025, "NLoRA: Nyström-Initiated Low-Rank Adaptation for Large
Language Models", arXiv 2502.14482, EMNLP Findings 2025): ΔW = s·B·M·A with a small r×r intermediate M.

* ``variant="slora"`` (StructuredLoRA): B = 0, A and M ~ U(±1/√fan_in) (the official ``slora_init``, Kaiming
  uniform with a = √5); B, M, A trained; the model starts at the base.
* ``variant="nlora"`` (NyströmLoRA): B = W₀[:, J], A = W₀[I, :], M = W₀[I, J]⁺ for r sampled rows I and
  columns J (``adapters.init.nystrom_init``), so s·B·M·A is the Nyström approximation C·W₀[I, J]⁺·R of W₀,
  with no SVD; B, M, A trained.
* ``variant="inttune"`` (IntermediateTune): the NLoRA init with only M (r² parameters) trained; B and A
  are frozen buffers.

What is the paper's and what is ours: the three-matrix layer, the partition of Fig. 3 (the first r rows /
columns around the r×r block W₀[I, J] initialise A, B and M) and IntTune's M-only training are the
paper's and its official code's. The core M has two readings (``core_init``):

* ``"intersection"`` (default): M = W₀[I, J], exactly the official code's ``nlora_init`` (the code behind
  the paper's numbers). s·C·W₀[I, J]·R is cubic in W₀'s entries, so its size relative to W₀ grows like
  r·σ² (σ the entries' scale): measured ‖C·W₀[I, J]·R‖_F / ‖W₀‖_F = 0.5–0.8 at r = 16 and 1.8–3.9 at
  r = 64 on SmolLM2-135M (layer 10: q, k, gate), not a small perturbation.
* ``"pinv"``: M = W₀[I, J]⁺, so s·B·M·A is the Nyström approximation C·W₀[I, J]⁺·R the paper names. A
  trained weight is far from rank r, and the approximation is then large, not close: measured
  ‖W₀ − C·W₀[I, J]⁺·R‖_F / ‖W₀‖_F = 6–200 on the same SmolLM2 layers at r = 16–64. The residual base it
  needs then loses the signal to rounding in half precision (gradients 30–170% off with a bf16 / fp16
  base in the precision matrix): not the default.

``residual`` (ours, default True): s·B₀·M₀·A₀ moves out of the frozen base, as PiSSA does with its
principal part, so the model starts exactly at W₀ and trains ΔW = s·(B·M·A − B₀·M₀·A₀); the official
code leaves the base as it is (``residual=False``: the model starts at W₀ + s·B₀·M₀·A₀, which the
numbers above show is not W₀). Both give the same gradients for B, M, A at init.

The learned update is a low-rank product: ``factors()`` = (B·M, A, s), exported to PEFT as LoRA (rank 2r
with the residual offset, as PiSSA; rank r without).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..checks import choice
from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterLayer, AlphaScale
from .init import INITS, InitContext
from .registry import MethodSpec, register

VARIANTS = ("nlora", "slora", "inttune")


@dataclass
class NLoRAConfig(AlphaScale):
    """``variant``: "nlora" (Nyström init, B, M, A trained), "slora" (random M, A, B = 0, all trained) or
    "inttune" (Nyström init, only M trained). s = α/r (``alpha=None``: s = 1). Nyström init options:
    ``core_init`` "intersection" (M = W₀[I, J], the official code) or "pinv" (M = W₀[I, J]⁺, s·B·M·A = the
    Nyström approximation); ``sampling`` "first" (rows / columns 0..r−1, the official code) or "uniform"
    (seeded); ``residual``: move s·B₀·M₀·A₀ out of the frozen base so the model starts at W₀ (False: the
    official code, the model starts at W₀ + s·B₀·M₀·A₀)."""

    variant: str = "nlora"
    alpha: float | None = None
    core_init: str = "intersection"
    sampling: str = "first"
    residual: bool = True

    def validate(self) -> None:
        super().validate()
        choice("variant", self.variant, VARIANTS)
        choice("core_init", self.core_init, ("intersection", "pinv"))
        choice("sampling", self.sampling, ("first", "uniform"))
        if not isinstance(self.residual, bool):
            raise ValueError(f"residual={self.residual!r} must be True or False")

    @property
    def nystrom(self) -> bool:
        """Whether the factors start from the Nyström init (NLoRA, IntTune)."""
        return self.variant != "slora"


class NLoRALayer(AdapterLayer):
    """``y = W x + s·B·M·(A x)``: ``nlora_B`` (out × r), ``nlora_M`` (r × r), ``nlora_A`` (r × in); B and A
    are trainable parameters, or frozen buffers for IntTune. With the residual offset, buffers ``init_M``
    (and ``init_B``, ``init_A`` when B, A train) keep what moved out of W₀."""

    method = "nlora"

    def __init__(self, base_layer: nn.Module, config: NLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r, dtype, device = config.r, self.adapter_dtype, self.base_weight.device
        self.scale = config.scale
        self.train_factors = config.variant != "inttune"
        self.moves_base = config.nystrom and config.residual
        self.identity_at_init = self.moves_base or not config.nystrom
        for name, shape in (("A", (r, self.in_features)), ("M", (r, r)), ("B", (self.out_features, r))):
            t = torch.zeros(shape, dtype=dtype, device=device)
            if name == "M" or self.train_factors:
                setattr(self, f"nlora_{name}", nn.Parameter(t))
            else:
                self.register_buffer(f"nlora_{name}", t)
            if self.moves_base and (name == "M" or self.train_factors):
                self.register_buffer(f"init_{name}", torch.zeros_like(t))
        if ctx.skip:
            return
        with torch.no_grad():
            self._initialize(ctx)
        if self.moves_base:
            self.after_load()

    def _initialize(self, ctx: InitContext) -> None:
        cfg: NLoRAConfig = self.config
        if not cfg.nystrom:  # SLoRA: B = 0, A and M as nn.Linear's default init (official slora_init)
            g = layer_generator(cfg.seed, ctx.name)
            kaiming_uniform_(self.nlora_A, generator=g)
            kaiming_uniform_(self.nlora_M, generator=g)
            return
        f = INITS["nlora"].fn(self.base_weight.detach().float(), replace(ctx, config=cfg, r=cfg.r, scale=self.scale))
        assert f.core is not None
        for name, t in (("A", f.right), ("M", f.core), ("B", f.left)):
            getattr(self, f"nlora_{name}").copy_(t)
            if hasattr(self, f"init_{name}"):
                getattr(self, f"init_{name}").copy_(t)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.nlora_B @ self.nlora_M, self.nlora_A, self.scale

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if not self.moves_base:
            return None
        if self.train_factors:
            return self.init_B @ self.init_M, self.init_A, self.scale
        return self.nlora_B @ self.init_M, self.nlora_A, self.scale

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return (b @ a) * s

    def trainable_count(self) -> int:
        r = self.config.r
        return r * r + (r * (self.in_features + self.out_features) if self.train_factors else 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", variant={self.config.variant}, scale={self.scale:g}"


register(
    MethodSpec(
        "nlora",
        "init",
        "Guo, Chang & Wu 2025, NLoRA: Nyström-Initiated Low-Rank Adaptation for Large Language Models",
        NLoRAConfig,
        NLoRALayer,
        summary="ΔW = s·B·M·A with an r×r intermediate M; NLoRA: B, A = first r columns / rows of W₀, M = their "
                "intersection (core_init='pinv': its pseudo-inverse, the Nyström approximation), base offset; "
                "variant='slora' random init, 'inttune' trains only M",
    )
)
