"""ResLoRA, block-shortcut variant (Shi et al. 2024, "ResLoRA: Identity Residual Mapping in Low-Rank
Adaption", Sec. 3, ResLoRA_bs).

The LoRA blocks of one module type (``q_proj`` of every transformer layer, …) are chained in model
order, and each block also runs the LoRA blocks of the ``pre_num`` preceding ones on its own input:

    h_l = W_l x_l + s · Σ_{i=0}^{pre_num} B_{l−i} A_{l−i} x_l

so the gradient of B_{l−i}, A_{l−i} reaches them through layer l as well (the residual paths), with no
parameters beyond LoRA's. A block links to its predecessor only when their shapes match, as in the
authors' code. Because every term acts on x_l the paths merge exactly: at inference
W_l ← W_l + s·Σᵢ B_{l−i}A_{l−i} and the graph is plain LoRA's. ΔW_l is the low-rank product
[B_l, B_{l−1}, …]·[A_l; A_{l−1}; …] (rank (pre_num + 1)·r): PEFT LoRA export. The input- and
middle-shortcut variants, whose merges are approximate, are not implemented.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import integer
from .init import INITS, InitContext
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, register


@dataclass
class ResLoRAConfig(LoRAConfig):
    """LoRA plus ``pre_num``: how many preceding blocks of the same module type each block also runs
    (the residual paths)."""

    pre_num: int = 1

    def validate(self) -> None:
        super().validate()
        integer("pre_num", self.pre_num, 1)
        if INITS[self.init].quantizes:
            raise ValueError(f"init={self.init!r} picks a quantized base per layer, which a chain of blocks "
                             "cannot share; choose a full-precision init")


def module_type(name: str) -> str:
    """The layer's name with its block indices replaced by ``*`` (the blocks of one type share it)."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", name)


def _chained(
    blocks: tuple[LoRALayer, ...], left: str, right: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """([X_l, X_{l−1}, …], [Y_l; Y_{l−1}; …], s) for the factor names (``left``, ``right``) of the blocks."""
    return (torch.cat([getattr(b, left) for b in blocks], dim=1),
            torch.cat([getattr(b, right) for b in blocks], dim=0), scale)


class ResLoRALayer(LoRALayer):
    """LoRA's ``lora_A``, ``lora_B``, plus (unregistered) references to the preceding blocks it runs."""

    method = "reslora"
    crosses_layers = True  # see AdapterLayer.crosses_layers (FSDP2 groups)
    base_kinds = ("linear",)  # the authors chain nn.Linear blocks only
    previous: tuple[ResLoRALayer, ...] = ()  # until linked (LoRA's init runs first)

    @classmethod
    def build_shared(cls, config: ResLoRAConfig, layers: list[nn.Module]) -> dict[str, list[ResLoRALayer]]:
        """The chains, filled by the layers as they are built: module type → its blocks in model order."""
        return {}

    def __init__(self, base_layer: nn.Module, config: ResLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config, ctx)
        chain = ctx.extra.get("shared", {}).setdefault(module_type(ctx.name), [])
        previous: list[ResLoRALayer] = []
        for block in reversed(chain):  # the nearest first, while the shapes link
            if len(previous) == config.pre_num or (block.out_features, block.in_features) != (
                    self.out_features, self.in_features):
                break
            previous.append(block)
        chain.append(self)
        self.previous = tuple(previous)  # plain references: their parameters stay theirs
        if self.moves_base and previous and not ctx.skip:  # LoRA's init moved only this block's offset
            with torch.no_grad():
                b, a, s = _chained(previous, "init_B", "init_A", self.scale)
                self._set_base_weight(self.base_weight - ((b @ a) * s).to(self.base_weight.dtype))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return _chained((self, *self.previous), "lora_B", "lora_A", self.scale)

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """A base-moving init (PiSSA, …) offsets the chained initial factors, so the model starts at W₀."""
        return _chained((self, *self.previous), "init_B", "init_A", self.scale) if self.moves_base else None

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return (b @ a) * s

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shortcuts={len(self.previous)}"


register(
    MethodSpec(
        "reslora",
        "adapter",
        "Shi et al. 2024, ResLoRA: Identity Residual Mapping in Low-Rank Adaption",
        ResLoRAConfig,
        ResLoRALayer,
        summary="block shortcut: layer l also runs the LoRA blocks of its pre_num predecessors of the same "
                "module type on its input; merged exactly at inference",
    )
)
