"""S²FT — Yang et al. 2024, "S²FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured
Sparsity" (NeurIPS 2024; official code github.com/Infini-AI-Lab/S2FT), Sec. 3: select sparsely, compute densely.

In every transformer block S²FT selects ``r`` MLP channels (the paper's default, uniformly at random)
and optionally ``heads`` attention units, and trains only the output projections' columns that read them
(``down_proj`` / BERT's ``output.dense`` for channels, ``o_proj`` / ``attention.output.dense`` for heads).
The coupled matrices are co-permuted so the selected units come first: the producers' rows (``gate_proj``,
``up_proj`` / ``intermediate.dense``; ``q``, ``k``, ``v`` for heads) and the consumer's columns, by the
same permutation, which leaves the model's function unchanged. The trainable block is then the dense,
contiguous slice W[:, :k] of the consumer (k = selected units × their width), its update a small dense
(out × k) matrix added as ``x[..., :k] Bᵀ``, and its gradient the full gradient restricted to those
columns; only the first k input activations are saved for it.

On grouped-query attention (``num_key_value_heads < num_attention_heads``) a unit is one key-value head
with its query heads (a head cannot be moved away from the key-value head it reads); on multi-head
attention a unit is one head. Every layer of a block is an :class:`S2FTLayer` that derives the block's
permutation from (``seed``, its block key), so ``load_adapter`` rebuilds it on a fresh base; ``unload`` and
``merge_and_unload`` give the original order back (the delta then sits in the selected columns).

Departures: the paper samples the selected units over all blocks together (counts vary by block); here
each block gets the same count. The paper can also train selected rows of q / v / up; here only the
output projections' columns train (its main setting).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import choice, integer
from ..layout import Block, find_blocks
from ..rng import layer_generator
from .base import AdapterConfig, AdapterLayer
from .init import InitContext
from .registry import MethodSpec, register

SIDES = ("rows", "cols")


@dataclass
class S2FTConfig(AdapterConfig):
    """``r``: MLP channels selected per block; ``heads``: attention units selected per block (0: the MLP
    only). Set per layer by ``rw.adapt`` (saved with the adapter): ``side`` ("rows": a producer, permuted
    only; "cols": a consumer, permuted and trained in its first ``selected``·``unit`` columns), ``unit``
    (rows / columns per unit in this layer), ``units`` (units in the block), ``selected`` and ``key``
    (the block part whose layers share one permutation)."""

    heads: int = 0
    side: str = "cols"
    unit: int = 1
    units: int = 0
    selected: int = 0
    key: str = ""

    def validate(self) -> None:
        super().validate()
        integer("heads", self.heads, 0)
        choice("side", self.side, SIDES)
        integer("unit", self.unit, 1)
        integer("units", self.units, 0)
        integer("selected", self.selected, 0)


def unit_order(seed: int, key: str, units: int, selected: int) -> torch.Tensor:
    """The ``selected`` units drawn uniformly (seeded by ``seed`` and ``key``), ascending, then the others."""
    chosen = torch.randperm(units, generator=layer_generator(seed, key))[:selected].sort().values
    rest = torch.ones(units, dtype=torch.bool)
    rest[chosen] = False
    return torch.cat([chosen, rest.nonzero().flatten()])


def expand(order: torch.Tensor, width: int) -> torch.Tensor:
    """Unit order → index order when each unit spans ``width`` consecutive rows / columns."""
    return (order[:, None] * width + torch.arange(width)).flatten()


def _fields(side: str, unit: int, units: int, selected: int, key: str) -> dict[str, Any]:
    return {"side": side, "unit": unit, "units": units, "selected": selected, "key": key}


def block_plan(block: Block, channels: int, heads: int) -> dict[str, dict[str, Any]]:
    """``{layer: config fields}`` of one block: its MLP (``channels`` selected) and, with ``heads`` > 0, its
    attention (units: key-value heads with their query heads)."""
    if channels > block.channels:
        raise ValueError(f"r={channels} exceeds the {block.channels} MLP channels of '{block.mlp_in[0]}'")
    if heads > block.kv_heads:
        raise ValueError(f"heads={heads} exceeds the {block.kv_heads} attention units (key-value heads) of "
                         f"'{block.o}'")
    mlp = block.mlp_in[0] + "#mlp"
    plan = {n: _fields("rows", 1, block.channels, channels, mlp) for n in block.mlp_out}
    plan.update({n: _fields("cols", 1, block.channels, channels, mlp) for n in block.mlp_in})
    if heads:
        att, q_width = block.o + "#heads", block.group * block.head_dim
        plan[block.q] = _fields("rows", q_width, block.kv_heads, heads, att)
        plan[block.k] = _fields("rows", block.head_dim, block.kv_heads, heads, att)
        plan[block.v] = _fields("rows", block.head_dim, block.kv_heads, heads, att)
        plan[block.o] = _fields("cols", q_width, block.kv_heads, heads, att)
    return plan


def s2ft_plan(model: nn.Module, layer_cfgs: dict[str, AdapterConfig], init_data: Iterable | None,
              init_batches: int) -> dict[str, tuple[dict[str, Any], Any]]:
    """Every block's coupled layers with their fields; the targets must include them all (other targets,
    e.g. a pooler, are left out)."""
    cfg = cast(S2FTConfig, next(iter(layer_cfgs.values())))
    plan: dict[str, dict[str, Any]] = {}
    for block in find_blocks(model, "method 's2ft'"):
        plan.update(block_plan(block, cfg.r, cfg.heads))
    missing = sorted(set(plan) - set(layer_cfgs))
    if missing:
        raise ValueError(f"method 's2ft' co-permutes every block's coupled layers, but targets= leaves out "
                         f"{missing[:4]}; use targets='all-linear'")
    return {n: (fields, None) for n, fields in plan.items()}


class S2FTLayer(AdapterLayer):
    """A producer (``side="rows"``: base rows and bias permuted, nothing trained) or a consumer (``side="cols"``:
    base columns permuted, ``s2ft_block`` (out × k) trained: ΔW = [B | 0], y = W x + b + x[..., :k] Bᵀ)."""

    method = "s2ft"
    stackable = False  # the base is permuted

    def __init__(self, base_layer: nn.Module, config: S2FTConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        self.rows = config.side == "rows"
        size = self.out_features if self.rows else self.in_features
        if config.units * config.unit != size:
            raise ValueError(f"'{ctx.name}': {config.units} units of width {config.unit} do not cover its "
                             f"{size} {config.side}")
        self.register_buffer("order", expand(unit_order(config.seed, config.key, config.units, config.selected),
                                             config.unit).to(self.base_weight.device), persistent=False)
        self.width = 0 if self.rows else config.selected * config.unit
        if not self.rows:
            self.s2ft_block = nn.Parameter(torch.zeros(self.out_features, self.width, dtype=self.adapter_dtype,
                                                       device=self.base_weight.device))
        self._permute(inverse=False)

    @torch.no_grad()
    def _permute(self, inverse: bool) -> None:
        """Put the base (weight, and a producer's bias) in the S²FT order, or back (``inverse``)."""
        order = self.order.argsort() if inverse else self.order
        w = self.base_weight
        self._set_base_weight(w[order] if self.rows else w[:, order])
        bias = self.base_layer.bias
        if self.rows and bias is not None:
            bias.copy_(bias[order])

    def delta_weight(self) -> torch.Tensor:
        if self.rows:
            return self.base_weight.new_zeros(self.shape, dtype=self.adapter_dtype)
        return F.pad(self.s2ft_block, (0, self.in_features - self.width))

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., :k] Bᵀ for a consumer; zeros for a producer (its ΔW is 0: it only reorders the base's outputs)."""
        if self.rows:
            return x.new_zeros(*x.shape[:-1], self.out_features, dtype=self.adapter_dtype)
        return F.linear(x[..., : self.width].contiguous(), self.s2ft_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows:  # a producer only reorders its outputs
            return cast(torch.Tensor, self.base_layer(x))
        return super().forward(x)

    def original_weight(self) -> torch.Tensor:
        w = self.frozen_weight().detach()
        inverse = self.order.argsort()
        return (w[inverse] if self.rows else w[:, inverse]).clone()

    @torch.no_grad()
    def unload(self) -> nn.Module:
        self._set_base_weight(self.frozen_weight())
        self.merged = False
        self._permute(inverse=True)
        return self.base_layer

    @torch.no_grad()
    def merged_linear(self) -> nn.Module:
        self.merge()
        self._permute(inverse=True)
        self.merged = False
        return self.base_layer

    def trainable_count(self) -> int:
        return self.out_features * self.width

    def extra_repr(self) -> str:
        return super().extra_repr() + f", side={self.config.side}, trained_columns={self.width}"


register(
    MethodSpec(
        "s2ft",
        "sparse-finetuning",
        "Yang et al. 2024, S²FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity",
        S2FTConfig,
        S2FTLayer,
        export="none",
        summary="r MLP channels (+ heads) per block co-permuted to the front; the output projections' first "
                "k columns train as one dense block",
        plan=s2ft_plan,
    )
)
