"""MeteoRA (Xu et al. 2024, "MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models").

Existing LoRA adapters become frozen experts of a mixture of experts in every adapted layer; a gate per
layer (a linear map W_g ∈ ℝ^{E × in}, the only trainable tensor) routes each token to its top-k experts:

    g(x) = softmax(TopK(W_g x, k)),   y = W₀x + b + Σ_{i ∈ TopK} g_i(x) · s_i·B_i A_i x

(the softmax over the k selected logits; the others weigh 0). The experts' factors are copied into the
layer (``meteora_A`` (E, r, in), ``meteora_B`` (E, out, r) with s_i folded in, ranks below the slot r
zero-padded), so the adapter is self-contained (saved and loaded without its sources, which
``rw.meteora`` leaves on the model inactive and frozen). All experts run as two matrix products over
the stacked ranks with the gate weights in between (one pass, however many experts). The delta
depends on the input, so there is no ΔW: merging and PEFT export are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import integer
from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterConfig, AdapterLayer
from .init import InitContext
from .registry import MethodSpec, adapter_layers, adapter_names, register
from .sources import adapt_from_sources, check_sources_on, held_at


@dataclass
class MeteoRAConfig(AdapterConfig):
    """``experts``: the names of the LoRA adapters (on the model when adapting) that become the
    experts, in gate order (required by ``rw.adapt``); ``top_k``: experts per token; ``r``: the rank
    slot, at least every expert's rank (``rw.meteora`` sets it to the largest)."""

    experts: list[str] | None = None
    top_k: int = 2

    def validate(self) -> None:
        super().validate()
        if self.experts is None:  # required by rw.adapt (check_experts), not by the config itself
            integer("top_k", self.top_k, 1)
            return
        if (not isinstance(self.experts, list | tuple) or not self.experts
                or not all(isinstance(n, str) for n in self.experts)):
            raise ValueError(f"experts={self.experts!r} must be a non-empty list of adapter names (the LoRA "
                             "adapters on the model that become the experts)")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"experts={self.experts!r} names an adapter twice")
        self.experts = list(self.experts)
        integer("top_k", self.top_k, 1, len(self.experts), what=f"an integer in [1, {len(self.experts)}] "
                "(at most the number of experts)")


class MeteoRALayer(AdapterLayer):
    """Frozen expert stacks ``meteora_A`` (E, r, in) and ``meteora_B`` (E, out, r), trainable gate
    ``meteora_gate`` (E, in)."""

    method = "meteora"
    identity_at_init = False  # the experts run from the start, mixed by the initial gate

    def __init__(self, base_layer: nn.Module, config: MeteoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        e, r, dtype, device = len(config.experts or ()), config.r, self.adapter_dtype, self.base_weight.device
        self.top_k = config.top_k
        self.register_buffer("meteora_A", torch.zeros(e, r, self.in_features, dtype=dtype, device=device))
        self.register_buffer("meteora_B", torch.zeros(e, self.out_features, r, dtype=dtype, device=device))
        self.meteora_gate = nn.Parameter(torch.zeros(e, self.in_features, dtype=dtype, device=device))
        if not ctx.skip:
            self._initialize(ctx, config)

    @torch.no_grad()
    def _initialize(self, ctx: InitContext, config: MeteoRAConfig) -> None:
        held = ctx.extra.get("held", {})
        for i, name in enumerate(config.experts):
            b, a, s = held[name].factors_from_original()
            self.meteora_A[i, : a.shape[0]] = a
            self.meteora_B[i, :, : b.shape[1]] = b * s
        kaiming_uniform_(self.meteora_gate, generator=layer_generator(
            config.seed, f"meteora/{ctx.extra.get('adapter', 'default')}/{ctx.name}"))

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """W_g x: one logit per expert and token."""
        return F.linear(x, self.meteora_gate)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """softmax over the top-k logits, 0 for the other experts: (..., E)."""
        logits = self.gate_logits(x)
        top, index = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, index, torch.softmax(top, dim=-1))

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        e, out, r = self.meteora_B.shape
        h = F.linear(x, self.meteora_A.reshape(e * r, self.in_features))  # every expert's A x: (..., E·r)
        g = self.gate_weights(x).repeat_interleave(r, dim=-1)
        return F.linear(h * g, self.meteora_B.permute(1, 0, 2).reshape(out, e * r))

    def factors(self) -> None:
        return None  # per-token routing: no fixed low-rank ΔW

    def delta_weight(self) -> torch.Tensor:
        raise ValueError(
            f"adapter '{self.adapter_name}' (meteora) routes every token to its own experts: it has no fixed ΔW, "
            "so it cannot be merged or exported to PEFT (save it with rw.save_adapter; rw.set_active one of its "
            "experts to merge that one)"
        )

    def trainable_count(self) -> int:
        """E·in: the gate."""
        return self.meteora_gate.shape[0] * self.in_features

    def extra_repr(self) -> str:
        return super().extra_repr() + f", experts={self.config.experts}, top_k={self.top_k}"


def check_experts(model: nn.Module, config: MeteoRAConfig, targets: list[str]) -> None:
    """Before the model changes: every expert is an adapter on the model holding LoRA factors of rank
    <= r on every target."""
    if config.experts is None:
        raise ValueError(f"meteora needs experts=[...]: the LoRA adapters that become its experts (the model's "
                         f"adapters are {adapter_names(model)}); rw.meteora(model) takes all of them")
    check_sources_on(model, config.experts, targets, "experts", "meteora")
    for target in targets:
        for name, layer in held_at(model, target).items():
            rank = layer.factors_from_original()[1].shape[0] if name in config.experts else 0
            if rank > config.r:
                raise ValueError(f"expert adapter {name!r} has rank {rank} on '{target}', above the slot r={config.r}; "
                                 "pass r >= the largest expert rank")


def meteora(
    model: nn.Module, experts: list[str] | None = None, *, top_k: int = 2, name: str = "meteora",
    targets: list[str] | None = None, **config: Any,
) -> nn.Module:
    """``rw.adapt(model, "meteora", experts=...)`` on the layers every expert adapts, with r the largest
    expert rank; the experts stay on the model, inactive and frozen, and only the gate trains
    (``rw.set_active(model, name)``). ``experts`` None: every adapter on the model."""
    if "r" not in config:
        names = adapter_names(model) if experts is None else list(experts)
        ranks = [f[1].shape[0] for n in names if n in adapter_names(model) for _, layer in adapter_layers(model, n)
                 if (f := layer.factors_from_original()) is not None]
        config["r"] = max(ranks, default=1)
    return adapt_from_sources(model, "meteora", experts, "experts", name=name, targets=targets, top_k=top_k,
                              **config)


register(
    MethodSpec(
        "meteora",
        "multi-adapter",
        "Xu et al. 2024, MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models",
        MeteoRAConfig,
        MeteoRALayer,
        export="none",
        mergeable=False,
        summary="the model's LoRA adapters as frozen experts of a per-layer, per-token top-k gate "
                "softmax(TopK(W_g x)); only W_g trains",
        check_model=check_experts,
        needs_adapters=True,
    )
)
