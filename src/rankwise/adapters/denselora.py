"""DenseLoRA (Mu et al. 2025, "DenseLoRA: Dense Low-Rank Adaptation of Large Language Models", ACL 2025).

One Encoder–Decoder pair, shared by every adapted layer of a module type, compresses the hidden
representation to r dimensions and reconstructs it; each layer trains only a dense r×r matrix M
between them:

    Δh = (α/r) · GELU(Dec · M · GELU(Enc · x)),    Enc ∈ ℝ^{r×in}, Dec ∈ ℝ^{out×r} shared,  M ∈ ℝ^{r×r}

As in the authors' code (``LoraModel`` holds one ``lora_encoder_*`` / ``lora_decoder_*`` pair per target
module name, q/k/v/up/down, and hands the same ``nn.Linear`` objects to every block): the layers of one
module type (the name with its block indices replaced by ``*``) and shape share one Enc and one Dec
``nn.Parameter``, registered in every such layer, so a step sums the gradients of all of them; Enc, Dec
and M all train. The non-linearity is GELU after Enc and after Dec (theirs). Init: Enc and M as
``nn.Linear`` (U(±1/√fan_in)), Dec = 0, so Δh = 0 at start; drawn from ``seed`` and the module type.
The update depends non-linearly on x: there is no ΔW, no merge and no PEFT export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterLayer, AlphaConfig
from .init import InitContext
from .registry import MethodSpec, register
from .reslora import module_type

Shared = dict[tuple[str, int, int], tuple[nn.Parameter, nn.Parameter]]


@dataclass
class DenseLoRAConfig(AlphaConfig):
    """DenseLoRA: ``r`` the width of the shared code, ``alpha`` the scale numerator (α/r; None: 2r, the
    authors' example run r = 16, α = 32)."""

    @property
    def alpha_value(self) -> float:
        return 2.0 * self.r if self.alpha is None else float(self.alpha)


def encoder_decoder(seed: int, key: str, r: int, out_features: int, in_features: int, like: torch.Tensor,
                    dtype: torch.dtype) -> tuple[nn.Parameter, nn.Parameter]:
    """One trainable (Enc: r × in, U(±1/√in); Dec: out × r, 0) pair, drawn from ``seed`` and ``key``."""
    enc = kaiming_uniform_(torch.empty(r, in_features), generator=layer_generator(seed, key))
    return (nn.Parameter(enc.to(device=like.device, dtype=dtype)),
            nn.Parameter(torch.zeros(out_features, r, device=like.device, dtype=dtype)))


class DenseLoRALayer(AdapterLayer):
    """Shared trainable ``dense_encoder`` (r × in) and ``dense_decoder`` (out × r); its own ``dense_M`` (r × r)."""

    method = "denselora"
    crosses_layers = True  # see AdapterLayer.crosses_layers (FSDP2 groups)

    @classmethod
    def build_shared(cls, config: DenseLoRAConfig, layers: list[nn.Module]) -> Shared:
        """The pairs, filled by the layers as they are built: (module type, out, in) → (Enc, Dec)."""
        return {}

    def __init__(self, base_layer: nn.Module, config: DenseLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        shared: Shared = ctx.extra.get("shared", {})
        kind = module_type(ctx.name)
        key = (kind, self.out_features, self.in_features)
        if key not in shared:
            shared[key] = encoder_decoder(config.seed, kind, config.r, self.out_features, self.in_features,
                                          self.base_weight, self.adapter_dtype)
        enc, dec = shared[key]
        if enc.shape[0] != config.r:
            raise ValueError(
                f"r={config.r} differs from the r={enc.shape[0]} of the encoder shared by the {kind} layers; "
                "per-layer r overrides are not supported by denselora"
            )
        self.dense_encoder, self.dense_decoder = enc, dec  # the same Parameter objects in every such layer
        m = kaiming_uniform_(torch.empty(config.r, config.r), generator=layer_generator(config.seed, ctx.name))
        self.dense_M = nn.Parameter(m.to(device=enc.device, dtype=enc.dtype))
        self.scale = config.scale

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(α/r)·GELU(Dec·M·GELU(Enc·x))."""
        code = F.gelu(F.linear(x, self.dense_encoder))
        return F.gelu(F.linear(F.linear(code, self.dense_M), self.dense_decoder)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        raise ValueError(
            f"adapter '{self.adapter_name}' (denselora) applies GELU inside its update, which is no weight "
            "matrix ΔW: it cannot be merged or exported to PEFT (save it with rw.save_adapter)"
        )

    def trainable_count(self) -> int:
        """The parameters this layer trains: its M plus the shared Enc, Dec (counted in every layer)."""
        r = self.config.r
        return r * r + r * (self.out_features + self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}"


register(
    MethodSpec(
        "denselora",
        "adapter",
        "Mu et al. 2025, DenseLoRA: Dense Low-Rank Adaptation of Large Language Models",
        DenseLoRAConfig,
        DenseLoRALayer,
        export="none",
        mergeable=False,
        summary="Δh = (α/r)·GELU(Dec·M·GELU(Enc·x)): Enc, Dec trained and shared by the layers of one module "
                "type (authors' code: GELU, per-type pairs), a per-layer dense r×r M; not mergeable",
    )
)
