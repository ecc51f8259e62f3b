"""LQ-LoRA (Guo et al. 2024, "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient
Language Model Finetuning", arXiv 2311.12023).

Each frozen W₀ ≈ Q + s·B·A: from Q = 0, alternate s·B·A = rank-r SVD of W₀ − deq(Q) and
Q = q_c(W₀ − s·B·A), ``lq_iter`` times, stopping when the error rises (``init.quantized_low_rank``,
shared with LoftQ). The storage format c of each matrix (bitsandbytes NF4 / FP4, block size, double
quantization: ``quant.QuantConfig``) is chosen by the paper's integer linear program (Sec. 3.2):

    min_c Σ_i ‖W_i − deq(Q_i^c) − s·B_i^c A_i^c‖_F²   s.t.   Σ_i bits(i, c_i) ≤ budget_bits · Σ_i |W_i|,

with bits(i, c) the exact storage of matrix i in format c (``QuantConfig.storage_bits``), solved
exactly (``adapters.knapsack``). Only B, A train over the frozen 4-bit Q (``LoRALayer``). Not
implemented: the paper's Fisher-weighted variant, and its 2- / 3- / 8-bit formats (bitsandbytes'
frozen 4-bit layer is the one quantized base rankwise runs adapters over).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checks import choice, integer, positive
from ..quant import QuantConfig, stash, stored_bits
from ..targets import is_linear4bit, linear_weight
from . import knapsack
from .init import InitContext, quantized_low_rank
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, adapter_layers, adapter_state, register

#: NF4 with every block size from 32 to 512, with and without double quantization: 4.016–5.0 bits.
DEFAULT_CONFIGS: tuple[str, ...] = tuple(
    QuantConfig("nf4", b, dq).name for b in (32, 64, 128, 256, 512) for dq in (True, False)
)


def _config_names(name: str, value: object, optional: bool = False) -> tuple[str, ...] | None:
    """``value`` as a tuple of valid config names (each parsed), or a ValueError naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name}={value!r} must be a non-empty list of quantization configs such as "
                         f"{list(DEFAULT_CONFIGS[:2])}")
    for v in value:
        QuantConfig.parse(v, name)
    return tuple(value)


@dataclass
class LQLoRAConfig(LoRAConfig):
    """LoRA options plus LQ-LoRA's: ``budget_bits`` (average stored bits per quantized weight over
    the adapted matrices, LoRA factors not counted), ``lq_iter`` (alternations T ≥ 1, early stop
    when the error rises), ``quant_configs`` (the candidate formats, ``"<scheme>-b<blocksize>[-dq]"``)
    and ``assignment`` (one config per adapted layer, in target order: set by ``rw.adapt`` to the
    ILP's choice and saved with the adapter; pass it to skip the ILP)."""

    budget_bits: float = 4.25
    lq_iter: int = 5
    quant_configs: tuple[str, ...] = field(default=DEFAULT_CONFIGS)
    assignment: tuple[str, ...] | None = None

    def validate(self) -> None:
        super().validate()
        choice("init", self.init, ("lq_lora",))
        positive("budget_bits", self.budget_bits)
        integer("lq_iter", self.lq_iter, 1)
        self.quant_configs = _config_names("quant_configs", self.quant_configs)
        self.assignment = _config_names("assignment", self.assignment, optional=True)


@dataclass(frozen=True)
class Allocation:
    """The ILP's choice: ``configs[i]`` for matrix i, its ``bits`` and squared ``errors`` (the
    reconstruction error ‖W − deq(Q) − s·B·A‖_F² with that config), the average bits per weight."""

    configs: list[str]
    bits: list[int]
    errors: list[float]
    average_bits: float


def storage_table(numels: Sequence[int], configs: Sequence[str], budget_bits: float) -> list[list[int]]:
    """``bits[i][j]``: the storage of matrix i (``numels[i]`` weights) in ``configs[j]``; a ValueError
    names ``budget_bits`` and the feasible range when even the smallest choice exceeds the budget."""
    bits = [[QuantConfig.parse(c, "quant_configs").storage_bits(n) for c in configs] for n in numels]
    total, lightest = sum(numels), sum(map(min, bits))
    if math.floor(budget_bits * total) < lightest:
        low, high = math.ceil(lightest / total * 1e4) / 1e4, math.ceil(sum(map(max, bits)) / total * 1e4) / 1e4
        raise ValueError(
            f"budget_bits={budget_bits!r} is infeasible with quant_configs {list(configs)}: the adapted matrices "
            f"need at least {low} bits per weight; choose budget_bits in [{low}, {high}] (above that every "
            "matrix gets its most accurate config)"
        )
    return bits


def allocate(
    errors: Sequence[Sequence[float]], numels: Sequence[int], configs: Sequence[str], budget_bits: float
) -> Allocation:
    """One config per matrix (``errors[i][j]``: squared error of matrix i, with ``numels[i]``
    weights, in config ``configs[j]``) minimising the total error with Σ bits ≤ budget_bits·Σ numel
    (exact; module docstring). A budget below the smallest choice is a ValueError naming
    ``budget_bits`` and the feasible range."""
    bits = storage_table(numels, configs, budget_bits)
    total = sum(numels)
    sol = knapsack.solve(errors, bits, math.floor(budget_bits * total))
    return Allocation(
        [configs[j] for j in sol.picks], [bits[i][j] for i, j in enumerate(sol.picks)],
        [float(errors[i][j]) for i, j in enumerate(sol.picks)], sol.weight / total,
    )


def candidate_errors(weight: torch.Tensor, config: LQLoRAConfig, configs: Sequence[str]) -> list[float]:
    """‖W − deq(Q) − s·B·A‖_F² of the LQ-LoRA decomposition of the (out, in) ``weight`` in each config."""
    ctx = InitContext(config=config, r=config.r, scale=config.scale)
    out = []
    for name in configs:
        d = quantized_low_rank(weight, ctx, QuantConfig.parse(name), config.lq_iter, svd_first=True,
                               stop_on_increase=True)
        out.append(d.errors[-1] ** 2)
    return out


@dataclass
class Shared:
    """What ``build_shared`` decided for one ``rw.adapt`` call: each base layer's config."""

    by_layer: dict[nn.Module, QuantConfig]
    config: dict


class LQLoRALayer(LoRALayer):
    """``LoRALayer`` over a 4-bit base in the format the ILP chose for this matrix, initialized from
    the LQ-LoRA decomposition (``init="lq_lora"``); ``quant_config`` names the format and
    ``lq_errors`` holds ‖W₀ − deq(Q_t) − s·B_t·A_t‖_F of the kept alternations."""

    method = "lq_lora"

    @classmethod
    def build_shared(cls, config: LQLoRAConfig, layers: list[nn.Module]) -> Shared:
        """Run the decomposition of every layer in every candidate config and solve the ILP (unless
        ``config.assignment`` fixes the configs); the choice is written to ``config.assignment``."""
        if any(is_linear4bit(m) for m in layers):
            raise ValueError("method 'lq_lora' needs the full-precision weights of the layers it adapts, but some are "
                             "4-bit already: adapt the unquantized model (LQ-LoRA quantizes them itself)")
        if config.assignment is None:
            weights = [linear_weight(m).detach().float() for m in layers]
            storage_table([w.numel() for w in weights], config.quant_configs, config.budget_bits)  # before the work
            errors = [candidate_errors(w, config, config.quant_configs) for w in weights]
            config.assignment = tuple(
                allocate(errors, [w.numel() for w in weights], config.quant_configs, config.budget_bits).configs
            )
        elif len(config.assignment) != len(layers):
            raise ValueError(f"assignment has {len(config.assignment)} configs for {len(layers)} adapted layers; "
                             "give one per target layer (in target order) or None to solve the ILP")
        chosen = {m: QuantConfig.parse(c, "assignment") for m, c in zip(layers, config.assignment, strict=True)}
        return Shared(chosen, config.to_dict())

    def __init__(self, base_layer: nn.Module, config: LQLoRAConfig, ctx: InitContext) -> None:
        shared: Shared = ctx.extra["shared"]
        if config.to_dict() != shared.config:
            raise ValueError(f"method 'lq_lora' chooses every layer's quantization together: overrides of its "
                             f"options for single layers ('{ctx.name}') are not supported")
        ctx.extra["quant_config"] = shared.by_layer[base_layer]
        super().__init__(base_layer, config, ctx)
        self.quant_config: QuantConfig = shared.by_layer[base_layer]
        self.lq_errors: list[float] = ctx.extra.get("lq_errors", [])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", quant_config={self.quant_config.name}"


@dataclass(frozen=True)
class LQReport:
    """Per adapted layer: its config, the bits its 4-bit base really stores (``quant.stored_bits``)
    and its weight count; ``average_bits`` = Σ bits / Σ weights."""

    configs: dict[str, str]
    bits: dict[str, int]
    numels: dict[str, int]
    average_bits: float


def lq_lora_report(model: nn.Module, name: str | None = None) -> LQReport:
    """The quantization configs an ``lq_lora`` adapter chose and the bits its bases store."""
    method = adapter_state(model, name).method
    if method != "lq_lora":
        raise ValueError(f"adapter {name!r} is method {method!r}; lq_lora_report reads an 'lq_lora' adapter")
    configs, bits, numels = {}, {}, {}
    for target, layer in adapter_layers(model, name):
        configs[target] = layer.quant_config.name
        bits[target] = stored_bits(stash(layer.base_layer))
        numels[target] = layer.in_features * layer.out_features
    return LQReport(configs, bits, numels, sum(bits.values()) / sum(numels.values()))


register(
    MethodSpec(
        "lq_lora",
        "quantization",
        "Guo et al. 2024, LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model "
        "Finetuning",
        LQLoRAConfig,
        LQLoRALayer,
        defaults={"init": "lq_lora"},
        summary="W₀ ≈ Q + s·B·A (SVD / 4-bit quantization alternated lq_iter times); an exact ILP picks each "
                "matrix's bitsandbytes format under budget_bits; only B, A train",
    )
)
