"""LoRA on 3-D mixture-of-experts parameters (``rw.adapt(..., target_parameters=[...])``, PEFT's
``target_parameters``).

transformers stores the experts of an MoE block as 3-D parameters of one module (Mixtral / Qwen-MoE:
``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I), expert e applying ``F.linear(x, W[e])``; a module
with ``is_transposed`` stores (E, in, out)). Each expert gets its own LoRA pair (Hu et al. 2021, "LoRA:
Low-Rank Adaptation of Large Language Models"):

    ΔW[e] = s·B[e]·A[e],   A (E, r, in), B (E, out, r),   s = α/r (α/√r with rsLoRA),

written into the parameter's own layout ((B[e]A[e])ᵀ when transposed). The forward runs the experts
module unchanged with W + ΔW in place of W (``torch.func.functional_call``), so the router and the
expert dispatch are the base model's own; the stored W is never written (merge adds ΔW, unmerge
subtracts it). As PEFT's ``ParamWrapper``, dropout is refused (x cannot be factored out of the expert
matmul) and the update is formed as a dense tensor the size of the targeted parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

from ..rng import kaiming_uniform_, layer_generator
from .base import KeepsBaseLayer

if TYPE_CHECKING:
    from .init import InitContext
    from .lora import LoRAConfig


def expert_weight(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter ``name`` of an experts module as (E, out, in) (a transposed view when the module is
    ``is_transposed``, i.e. stores (E, in, out))."""
    w = getattr(module, name)
    return w.transpose(1, 2) if getattr(module, "is_transposed", False) else w


def check_expert_config(config: Any, name: str, module: nn.Module, parameters: list[str]) -> None:
    """ValueError unless ``config`` fits every targeted parameter of module ``name``: no dropout, and
    r ≤ min(out, in) of each expert matrix."""
    if config.dropout:
        raise ValueError(
            f"dropout={config.dropout} is not supported with target_parameters ('{name}'): dropout cannot be "
            "factored out of the experts' matmul (as in PEFT); use dropout=0"
        )
    for p in parameters:
        limit = min(expert_weight(module, p).shape[1:])
        if config.r > limit:
            raise ValueError(f"r={config.r} is larger than min(out, in)={limit} of the experts of "
                             f"'{name}.{p}'; choose r <= {limit}")


class ExpertLoRALayer(KeepsBaseLayer):
    """One LoRA pair per expert for each targeted 3-D parameter of an experts module: ``lora_A[p]``
    (E, r, in), ``lora_B[p]`` (E, out, r); ΔW_p[e] = s·B[e]·A[e]. A starts as ``nn.Linear``'s init
    (U(±1/√in), per parameter and layer seed), B = 0, so the model starts unchanged."""

    method = "lora"
    base_kinds = ("experts",)

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, ctx: InitContext, parameters: list[str]) -> None:
        nn.Module.__init__(self)
        check_expert_config(config, ctx.name, base_layer, parameters)
        self._adopt(base_layer, config, "experts")
        self.parameter_names = list(parameters)
        self.scale = config.scale
        first = expert_weight(base_layer, parameters[0])
        self.num_experts, self.out_features, self.in_features = (int(n) for n in first.shape)
        self._init_dtype = config.dtype_for(first.dtype)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for p in parameters:
            e, out_features, in_features = expert_weight(base_layer, p).shape
            a = torch.zeros(e, config.r, in_features, dtype=self._init_dtype, device=first.device)
            if not ctx.skip:  # the (E·r, in) rows as one nn.Linear's weight (PEFT's lora_A layout)
                kaiming_uniform_(a.view(-1, in_features), generator=layer_generator(config.seed, f"{ctx.name}.{p}"))
            self.lora_A[p] = nn.Parameter(a)
            self.lora_B[p] = nn.Parameter(torch.zeros(e, out_features, config.r, dtype=self._init_dtype,
                                                      device=first.device))

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(iter(self.lora_A.values())).dtype

    def expert_delta(self, name: str) -> torch.Tensor:
        """ΔW of parameter ``name`` as (E, out, in): s·B[e]·A[e] for every expert e (adapter dtype)."""
        return torch.bmm(self.lora_B[name], self.lora_A[name]) * self.scale

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """``{parameter: ΔW}`` in each parameter's own layout and dtype (what merge adds)."""
        out = {}
        for p in self.parameter_names:
            w, delta = getattr(self.base_layer, p), self.expert_delta(p)
            out[p] = (delta.transpose(1, 2) if getattr(self.base_layer, "is_transposed", False) else delta).to(w.dtype)
        return out

    def delta_weight(self) -> torch.Tensor:
        raise ValueError(
            f"the experts adapter on {self.parameter_names} has one ΔW per 3-D parameter, not an (out, in) "
            "matrix; use delta_weights()"
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.batch_names is not None:
            raise ValueError("per-example adapters (adapter_names=...) are not supported on expert parameters "
                             "(target_parameters)")
        if self.merged or not self.enabled:
            return self.base_layer(*args, **kwargs)
        weights = {p: getattr(self.base_layer, p) + d for p, d in self.delta_weights().items()}
        return functional_call(self.base_layer, weights, args, kwargs)

    @torch.no_grad()
    def merge(self) -> None:
        """W_p ← W_p + ΔW_p for every targeted parameter."""
        if not self.merged:
            for p, d in self.delta_weights().items():
                getattr(self.base_layer, p).add_(d)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W_p ← W_p − ΔW_p (the frozen parameters back, up to rounding)."""
        if self.merged:
            for p, d in self.delta_weights().items():
                getattr(self.base_layer, p).sub_(d)
            self.merged = False

    def trainable_count(self) -> int:
        return sum(a.numel() + b.numel() for a, b in zip(self.lora_A.values(), self.lora_B.values(), strict=True))

    def extra_repr(self) -> str:
        return (f"method={self.method}, parameters={self.parameter_names}, experts={self.num_experts}, "
                f"r={self.config.r}, scale={self.scale:g}")


# ---------------------------------------------------------------------------------------- PEFT layout
def peft_nesting(parameters: list[str]) -> dict[str, str]:
    """Where PEFT keeps each targeted parameter's tensors under the module's name: one ``ParamWrapper``
    per parameter, in the module's registration order, each wrapping the previous one, so the last
    parameter's ``lora_A`` / ``lora_B`` sit at the module and each earlier one a ``.base_layer`` deeper."""
    return {p: ".base_layer" * (len(parameters) - 1 - i) for i, p in enumerate(parameters)}


def to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``lora_A`` (E·r, in), rows expert-major (row e·r + k is A[e, k]), and ``lora_B`` (out, r·E),
    columns expert-minor (column k·E + e is B[e, :, k]), from A (E, r, in), B (E, out, r)."""
    e, out_features, r = b.shape
    return a.reshape(e * r, -1), b.permute(1, 2, 0).reshape(out_features, r * e)


def from_peft(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (E, r, in), B (E, out, r) from PEFT's ``lora_A`` (E·r, in), ``lora_B`` (out, r·E) (``to_peft``'s inverse)."""
    return a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
