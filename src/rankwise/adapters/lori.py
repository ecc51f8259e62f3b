"""LoRI (Zhang et al. 2025, "LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation").

    ΔW = s·(M ⊙ B)·A,   s = α/r

A (r × in) is a frozen random projection (``nn.Linear``'s U(±1/√in), drawn from the seed, the adapter's
name and the layer's name, so two adapters get independent, nearly orthogonal row spaces: the cross inner
products of their rows are O(1/√in) of their norms); B (out × r) trains, starting at 0; M is a fixed
binary mask. The paper's two stages: LoRI-D trains B dense (M = 1, the state after ``rw.adapt``);
``lori_masks`` then keeps the largest-magnitude entries of the trained B, a share ``density`` of them
ranked over the whole adapter (the paper's default) or per matrix, and restarts B at 0; LoRI-S trains B
under that mask. The forward reads M ⊙ B, so the gradient of B is exactly 0 outside M and B stays 0
there under any optimizer (AdamW's moments stay 0, its weight decay shrinks 0 to 0). Exported to PEFT as
the LoRA pair (M ⊙ B, A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import choice, fraction
from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterLayer, AlphaConfig
from .init import InitContext
from .named import target_modules
from .registry import MethodSpec, adapter_layers, adapter_state, register

MASK_SCOPES = ("model", "matrix")  # where lori_masks ranks |B|: over the whole adapter, or per matrix


@dataclass
class LoRIConfig(AlphaConfig):
    """LoRI hyper-parameters: ``alpha`` (None: α = r, scale 1) as LoRA's."""


class LoRILayer(AdapterLayer):
    """Frozen ``lori_A`` (r × in, saved: it depends on the adapter's name), trainable ``lori_B``
    (out × r) and the bool ``lori_mask`` (out × r, all True until ``lori_masks``)."""

    method = "lori"

    def __init__(self, base_layer: nn.Module, config: LoRIConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r, dtype, device = config.r, self.adapter_dtype, self.base_weight.device
        self.scale = config.scale
        self.register_buffer("lori_A", torch.zeros(r, self.in_features, dtype=dtype, device=device))
        self.lori_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.register_buffer("lori_mask", torch.ones(self.out_features, r, dtype=torch.bool, device=device))
        if not ctx.skip:
            adapter = ctx.extra.get("adapter", "default")
            kaiming_uniform_(self.lori_A, generator=layer_generator(config.seed, f"lori/{adapter}/{ctx.name}"))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lori_B * self.lori_mask, self.lori_A, self.scale

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return (b @ a) * s

    def trainable_count(self) -> int:
        """B's entries (the ones outside the mask stay 0: ``mask_count`` is the effective number)."""
        return self.out_features * self.config.r

    def mask_count(self) -> int:
        """The number of entries of B that train (all of them before ``lori_masks``)."""
        return int(self.lori_mask.sum())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}, mask={self.mask_count()}/{self.lori_mask.numel()}"


def _keep_top(scores: torch.Tensor, density: float) -> torch.Tensor:
    """A bool mask of the ⌈density·n⌉ largest entries of the flat ``scores`` (exactly that many; ties
    broken by position)."""
    k = max(1, math.ceil(density * scores.numel() - 1e-9))
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[torch.topk(scores, k, sorted=False).indices] = True
    return keep


@torch.no_grad()
def lori_masks(
    model: nn.Module, density: float, name: str | None = None, *, scope: str = "model", restart: bool = True
) -> dict[str, torch.Tensor]:
    """LoRI's mask extraction (Zhang et al. 2025, Sec. 3): from the calibration-trained (LoRI-D) B of
    adapter ``name`` keep the ⌈density·n⌉ entries of largest |B| (``scope="model"``: ranked over every
    layer of the adapter, the paper's default; ``"matrix"``: within each B) and set each layer's mask.
    ``restart=True`` (the paper's LoRI-S) sets B to 0, the fresh start it trains from under the mask;
    ``False`` keeps the kept entries' values (M ⊙ B). Build a new optimizer afterwards. Returns
    ``{layer name: mask}``."""
    fraction("density", density, allow_one=True)
    choice("scope", scope, MASK_SCOPES)
    state = adapter_state(model, name)
    if state.method != "lori":
        raise ValueError(f"lori_masks needs a 'lori' adapter; adapter {state.name!r} is '{state.method}'")
    layers = [(t, layer) for t, layer in adapter_layers(model, state.name) if isinstance(layer, LoRILayer)]
    if any(m.merged for _, m in target_modules(model)):
        raise ValueError(f"adapter {state.name!r} is merged; call rw.unmerge(model) before lori_masks")
    scores = [layer.lori_B.detach().abs().float().flatten() for _, layer in layers]
    if scope == "model":
        keep = _keep_top(torch.cat(scores), density).split([s.numel() for s in scores])
    else:
        keep = tuple(_keep_top(s, density) for s in scores)
    masks = {}
    for (target, layer), k in zip(layers, keep, strict=True):
        layer.lori_mask.copy_(k.view_as(layer.lori_mask))
        if restart:
            layer.lori_B.zero_()
        else:
            layer.lori_B.mul_(layer.lori_mask)
        masks[target] = layer.lori_mask.clone()
    return masks


register(
    MethodSpec(
        "lori",
        "multi-adapter",
        "Zhang et al. 2025, LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation",
        LoRIConfig,
        LoRILayer,
        export="lora",
        summary="ΔW = (α/r)·(M ⊙ B)·A, A a frozen seeded random projection per adapter, B trained under a "
                "sparse magnitude mask (rw.adapters.lori_masks)",
    )
)
