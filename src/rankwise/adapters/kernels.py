"""Fused forward/backward of a frozen linear layer plus a low-rank delta.

``y = x Wᵀ + b + s·(x_d Aᵀ) Bᵀ`` computed with two GEMMs and one ``addmm`` (the scale is folded into
the GEMM's alpha), saving only ``x``, ``x_d`` and the small ``x_d Aᵀ`` (N×r) for backward. Backward:
``g_B = s·gᵀ(x_d Aᵀ)``, ``g_A = (s·g B)ᵀ x_d``, ``g_x = g W + (s·g B) A`` (one more ``addmm`` when
``x_d`` is ``x``). W and b are frozen: no gradient is formed for them.
"""

from __future__ import annotations

import torch


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_a, lora_b, scale: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd2 = x2 if x_d is x else x_d.reshape(-1, shape[-1])
        xa = xd2 @ lora_a.t()
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        out.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.same_input = x_d is x
        ctx.scale = scale
        ctx.save_for_backward(xd2, xa, weight, lora_a, lora_b)
        ctx.shape = shape
        return out.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        xd2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_xa = (g @ lora_b).mul_(s)  # N×r
        # (xaᵀ g)ᵀ: on CPU much faster than gᵀ xa for a tall-skinny xa
        grad_b = (xa.t() @ g).t().mul_(s) if lora_b.requires_grad else None
        grad_a = g_xa.t() @ xd2 if lora_a.requires_grad else None
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if ctx.same_input:
                grad_x.addmm_(g_xa, lora_a)
            grad_x = grad_x.reshape(ctx.shape)
        if not ctx.same_input and ctx.needs_input_grad[1]:
            grad_xd = (g_xa @ lora_a).reshape(ctx.shape)
        return grad_x, grad_xd, None, None, grad_a, grad_b, None


def low_rank_linear(
    x: torch.Tensor,
    x_d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x Wᵀ + b + scale·(x_d Aᵀ)Bᵀ`` with frozen W, b; ``x_d`` is ``x`` after adapter dropout."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("low_rank_linear needs a frozen base weight and bias")
    return _LowRankLinear.apply(x, x_d, weight, bias, lora_a, lora_b, scale)
