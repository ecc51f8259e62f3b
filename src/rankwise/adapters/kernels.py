"""Fused forward/backward of a frozen linear layer plus a low-rank delta.

``y = x Wᵀ + b + s·(x_d Aᵀ) Bᵀ`` computed with two GEMMs and one ``addmm`` (the scale is folded into
the GEMM's alpha), saving only ``x``, ``x_d`` and the small ``A x_dᵀ`` (r×N) for backward. Backward:
``g_B = s·gᵀ(x_d Aᵀ)``, ``g_A = (s·Bᵀgᵀ) x_d``, ``g_x = g W + (s·Bᵀgᵀ)ᵀ A`` (one more ``addmm`` when
there is no adapter dropout, ``x_d = None``). W and b are frozen: no gradient is formed for them.
The N×r intermediates are formed as r×N products (``A x_dᵀ``, ``Bᵀ gᵀ``): on CPU these skinny GEMMs
run 1.5–3.5× faster in that layout than as ``x_d Aᵀ``, ``g B`` (``benchmarks/adapter_step_time.py``).
Under ``torch.no_grad()`` the same math runs without the autograd node (no saved tensors, no
Function dispatch: the fast path of unmerged inference).

Mixed precision: W, b and x share the base dtype; A and B may have another (the adapter dtype, e.g.
fp32 factors on a bf16 base). The base GEMM then runs in the base dtype, the low-rank path in the
adapter dtype (``x_d`` is cast to it; the delta is cast back before it is added), and the gradients
of A and B are formed in the adapter dtype from the upcast output gradient.
"""

from __future__ import annotations

import torch


def _low_rank_forward(x, x_d, weight, bias, lora_a, lora_b, scale: float):
    """``(y, x_d as a matrix, A x_dᵀ)``: the forward's math, shared by the autograd node and the
    no-grad path."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xd2 = x2 if x_d is None else x_d.reshape(-1, shape[-1])
    ax = lora_a @ xd2.to(lora_a.dtype).t()  # r×N
    out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    if lora_b.dtype == out.dtype:
        out.addmm_(ax.t(), lora_b.t(), alpha=scale)
    else:  # the delta in the adapter dtype, added in the base dtype
        out.add_(torch.mm(ax.t(), lora_b.t()).mul_(scale).to(out.dtype))
    return out.reshape(*shape[:-1], weight.shape[0]), xd2, ax


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_a, lora_b, scale: float):
        out, xd2, ax = _low_rank_forward(x, x_d, weight, bias, lora_a, lora_b, scale)
        ctx.same_input = x_d is None
        ctx.scale = scale
        ctx.save_for_backward(xd2, ax, weight, lora_a, lora_b)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xd2, ax, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_lr = g.to(lora_b.dtype)  # the low-rank path's gradients in the adapter dtype
        bg = (lora_b.t() @ g_lr.t()).mul_(s)  # r×N: s·Bᵀgᵀ
        grad_b = (ax @ g_lr).t().mul_(s) if lora_b.requires_grad else None
        grad_a = bg @ xd2.to(lora_a.dtype) if lora_a.requires_grad else None
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if ctx.same_input:
                if lora_a.dtype == grad_x.dtype:
                    grad_x.addmm_(bg.t(), lora_a)
                else:
                    grad_x.add_((bg.t() @ lora_a).to(grad_x.dtype))
            grad_x = grad_x.reshape(ctx.shape)
        if not ctx.same_input and ctx.needs_input_grad[1]:
            grad_xd = (bg.t() @ lora_a).to(xd2.dtype).reshape(ctx.shape)
        return grad_x, grad_xd, None, None, grad_a, grad_b, None


def low_rank_linear(
    x: torch.Tensor,
    x_d: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x Wᵀ + b + scale·(x_d Aᵀ)Bᵀ`` with frozen W, b; ``x_d`` is ``x`` after adapter dropout, or
    None when there is no dropout (``x_d = x``: one input, so ``torch.compile`` can trace it).

    ``x``, W and b share the base dtype; A and B may have another (the adapter dtype), in which the
    low-rank path is computed. The output has the base dtype."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("low_rank_linear needs a frozen base weight and bias")
    if x_d is x:
        x_d = None
    if not torch.is_grad_enabled():  # inference: the same math without an autograd node
        return _low_rank_forward(x, x_d, weight, bias, lora_a, lora_b, scale)[0]
    return _LowRankLinear.apply(x, x_d, weight, bias, lora_a, lora_b, scale)
