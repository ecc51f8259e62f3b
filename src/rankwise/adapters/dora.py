"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024).

The adapted weight is split into a trainable magnitude and a LoRA-updated direction (paper Eq. 5):

    W′ = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖_c ,    m initialised to ‖W₀‖_c

where ‖·‖_c is the norm of each output row of the (out × in) weight (PEFT's ``torch.linalg.norm(W,
dim=1)``; the paper's "column" of the (in × out) matrix). Following Sec. 4.3 of the paper the norm is
treated as a constant in backward (detached), so gradients reach m, A and B only through the
numerator. The magnitude scaling makes ΔW = W′ − W₀ full rank, so there are no ``factors()``; the
layer keeps the ``lora_A``/``lora_B``/``magnitude`` names that PEFT's DoRA format needs.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer
from .init import InitContext
from .kernels import down_project, low_rank_forward
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, register


@torch.no_grad()
def row_norm(weight: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor, scale: float) -> torch.Tensor:
    """‖W + s·B·A‖ per output row (length ``out``), without gradient (DoRA Sec. 4.3) and without
    forming W + s·B·A: ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i (A Aᵀ) B_iᵀ, one r×in×out GEMM and r×r work
    instead of an out×in temporary (W Aᵀ in the kernels' faster layout, ``down_project``)."""
    wa = down_project(weight, lora_a)  # out×r
    sq = torch.linalg.vector_norm(weight, dim=1).square_()
    sq.add_((lora_b * wa).sum(1), alpha=2 * scale)
    sq.add_(((lora_b @ (lora_a @ lora_a.t())) * lora_b).sum(1), alpha=scale * scale)
    return sq.clamp_(min=0).sqrt_()


class _DoRALinear(torch.autograd.Function):
    """``y = g ⊙ (W x + s·B A x) + b``, g = m / ‖W + s·B·A‖_c (the norm constant), W, b frozen.

    The LoRA kernel's GEMMs and layouts (``kernels``: the base GEMM, then the skinny low-rank GEMMs)
    with the output rescaled per channel; the norm comes from ``row_norm`` without the merged weight.
    Saves x, x Aᵀ (N×r) and u = W x + s·B A x (N × out). With ∂ŷ = ∂y ⊙ g, backward forms exactly the
    gradients DoRA needs:

        g_x = ∂ŷ W + (s·∂ŷ B) A,   g_B = s·∂ŷᵀ (x Aᵀ),   g_A = (s·∂ŷ B)ᵀ x,   g_m = Σ_N ∂y ⊙ u / ‖·‖_c

    (g_m because y = m ⊙ u / ‖·‖_c with the norm constant). Keeping u rather than y makes g_m exact
    for rows with m = 0 too, with no data-dependent branch (so ``torch.compile`` traces it whole).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, scale: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        u, _, xa = low_rank_forward(x2, None, weight, None, lora_a, lora_b, scale)  # W x + s·B A x, x Aᵀ (N×r)
        norm = row_norm(weight, lora_b, lora_a, scale)
        g = magnitude / norm
        out = torch.addcmul(bias, u, g) if bias is not None else u * g
        ctx.save_for_backward(x2, xa, u, weight, lora_a, lora_b, g, norm)
        ctx.scale, ctx.shape = scale, shape
        return out.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2, xa, u, weight, lora_a, lora_b, g, norm = ctx.saved_tensors
        s = ctx.scale
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        gyg = gy * g
        gb = (gyg @ lora_b).mul_(s)  # N×r: s·∂ŷ B
        grad_x = grad_a = grad_b = grad_m = None
        if ctx.needs_input_grad[0]:
            grad_x = (gyg @ weight).addmm_(gb, lora_a).reshape(ctx.shape)
        if ctx.needs_input_grad[4]:
            grad_b = (xa.t() @ gyg).t().mul_(s)
        if ctx.needs_input_grad[3]:
            grad_a = gb.t() @ x2
        if ctx.needs_input_grad[5]:
            grad_m = (gy * u).sum(0).div_(norm)
        return grad_x, None, None, grad_a, grad_b, grad_m, None


class WeightDecomposed(AdapterLayer):
    """The magnitude / direction split over a low-rank direction update (mixin, before the layer class):
    W′ = m ⊙ (W₀ + s·B·A)/‖W₀ + s·B·A‖_c with (B, A) = ``direction_factors()`` and a trainable
    ``magnitude`` m; ``init_magnitude()`` makes m = ‖W₀ + s·B·A‖_c. Merge keeps the norm so that unmerge
    can invert it. Used by DoRA (B, A the LoRA factors) and EDoRA (B·R, A with frozen SVD factors)."""

    scale: float

    def direction_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of the direction update s·B·A."""
        raise NotImplementedError

    def init_magnitude(self, ctx: InitContext) -> None:
        """The trainable ``magnitude`` (out,), ‖W₀ + s·B·A‖_c unless the tensors come from a checkpoint."""
        w = self.base_weight
        self.magnitude = nn.Parameter(torch.ones(self.out_features, dtype=self.adapter_dtype, device=w.device))
        # ‖W₀ + sBA‖ at merge time: unmerge needs it, it cannot be recomputed from the merged weight
        self.register_buffer("merge_norm", None, persistent=False)
        if not ctx.skip:
            with torch.no_grad():
                self.magnitude.copy_(self._norm(w))

    def factors(self) -> None:
        return None

    # ------------------------------------------------------------------ weights
    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + sBA‖ per row, computed in the adapter dtype (W upcast when the base is narrower)."""
        b, a = self.direction_factors()
        return row_norm(weight.to(self.adapter_dtype), b, a, self.scale)

    @torch.no_grad()
    def frozen_weight(self) -> torch.Tensor:
        """The W₀ of the DoRA formula (the frozen base), recovered from the merged weight if merged."""
        w = self.base_weight
        if not self.merged:
            return w
        b, a = self.direction_factors()
        return (w.to(b.dtype) * (self.merge_norm / self.magnitude).unsqueeze(1) - (b @ a) * self.scale).to(w.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = m/‖W₀+sBA‖ ⊙ (W₀+sBA) − W₀ (the whole merged weight minus the frozen base), in the
        adapter dtype."""
        w0 = self.frozen_weight().to(self.adapter_dtype)
        b, a = self.direction_factors()
        v = torch.addmm(w0, b, a, alpha=self.scale)
        norm = self.merge_norm if self.merged else self._norm(w0)
        return v * (self.magnitude / norm).unsqueeze(1) - w0

    @torch.no_grad()
    def merge(self) -> None:
        """W ← m/‖W₀+sBA‖ ⊙ (W₀+sBA); the norm is kept (non-persistent) so that unmerge can invert it."""
        if self.merged:
            return
        w = self.base_weight
        norm = self._norm(w)
        b, a = self.direction_factors()
        v = torch.addmm(w.to(self.adapter_dtype), b, a, alpha=self.scale)
        self._set_base_weight(v * (self.magnitude / norm).unsqueeze(1), merging=True)
        self.merge_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W₀ = W′ · ‖W₀+sBA‖/m − sBA (PEFT's ``DoraLinearVariant.unmerge``), via ``frozen_weight``."""
        super().unmerge()
        self.merge_norm = None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One fused node (``_DoRALinear``: the base GEMM once, then the direction's skinny GEMMs) on a linear base
        of one dtype, without adapter dropout or autocast; else the additive form (``delta_output``)."""
        if self.merged or not self.enabled or self.batch_names is not None or self.base_kind != "linear":
            return super().forward(x)
        w, bias = self.base_weight, self.base_layer.bias
        if not self.dropout_active and not w.requires_grad and (bias is None or not bias.requires_grad):
            (b, a), m = self.direction_factors(), self.magnitude
            if a.dtype == b.dtype == m.dtype == w.dtype == x.dtype and not torch.is_autocast_enabled(x.device.type):
                return _DoRALinear.apply(x, w, bias, a, b, m, self.scale)
        # general path (adapter dropout, mixed dtypes, autocast, named adapters)
        out = self.base_layer(x)
        return out + self.delta_output(x, out.dtype)

    def delta_output(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """PEFT's additive form of DoRA: (g − 1)·W x_d + g·s·B A x_d with x_d = dropout(x), g = m / ‖W +
        sBA‖_c, so that W x + b plus this is the DoRA output; in the adapter dtype (W upcast to it, as
        PEFT does), returned in ``out_dtype``. ``g`` scales the output channel: the last dim of a
        linear or embedding output, dim 1 of a convolution's (N, out, …)."""
        w = self.base_weight
        x_d = self.adapter_input(x)
        g = self.magnitude / self._norm(w)
        if self.base_kind == "conv":
            g = g.reshape(-1, *(1,) * (self.base_layer.weight.dim() - 2))
        base_d = self.base_map(x_d, w.to(self.adapter_dtype))
        b, a = self.direction_factors()
        lora = self.factor_map(x_d, b, a) * self.scale
        return ((g - 1) * base_d + g * lora).to(out_dtype)


class DoRALayer(WeightDecomposed, LoRALayer):
    """LoRA direction (``lora_A``, ``lora_B``, scale s) plus a trainable ``magnitude`` (out,)."""

    method = "dora"

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config, ctx)
        self.init_magnitude(ctx)

    def direction_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B, self.lora_A

    def trainable_count(self) -> int:
        return self.config.r * (self.in_features + self.out_features) + self.out_features


register(
    MethodSpec(
        "dora",
        "adapter",
        "Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation",
        LoRAConfig,
        DoRALayer,
        export="dora",
        summary="W′ = m ⊙ (W₀+sBA)/‖W₀+sBA‖_c, m = ‖W₀‖_c at init, norm detached",
    )
)
