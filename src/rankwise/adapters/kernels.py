"""Fused forward/backward of a frozen linear layer plus a low-rank delta.

``y = x Wᵀ + b + s·(x_d Aᵀ) Bᵀ`` computed with two GEMMs and one ``addmm`` (the scale is folded into
the GEMM's alpha), saving only ``x``, ``x_d`` and the small ``x_d Aᵀ`` (N×r) for backward. Backward:
``g_B = s·gᵀ(x_d Aᵀ)``, ``g_A = (s·g B)ᵀ x_d``, ``g_x = g W + (s·g B) A`` (one more ``addmm`` when
there is no adapter dropout, ``x_d = None``). W and b are frozen: no gradient is formed for them.
Layouts of the skinny GEMMs, chosen by measurement on CPU (``benchmarks/skinny_gemm_layouts.py``, one
thread, SmolLM2's shapes): ``x_d Aᵀ`` is formed as the r×N product ``A x_dᵀ`` while x_d takes at most
2 MiB (1.7–3× faster there), directly as N×r above that (1.05–1.6× faster: the transposed read no
longer stays in cache); ``g B`` is formed as N×r (from on par with ``Bᵀgᵀ`` to 2× faster).
Under ``torch.no_grad()`` the same math runs without the autograd node (no saved tensors, no
Function dispatch: the fast path of unmerged inference).

Mixed precision: W, b and x share the base dtype; A and B may have another (the adapter dtype, e.g.
fp32 factors on a bf16 base). The base GEMM then runs in the base dtype, the low-rank path in the
adapter dtype (``x_d`` is cast to it; the delta is cast back before it is added), and the gradients
of A and B are formed in the adapter dtype from the upcast output gradient.
"""

from __future__ import annotations

import torch


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatcher round trip when it is already that dtype (the common case)."""
    return t if t.dtype == dtype else t.to(dtype)


#: Above this many bytes of x, ``x Aᵀ`` is formed directly as N×r rather than as the transpose of A xᵀ: the
#: per-core L2 cache of the machine it was measured on (the crossover lay between 1.5 and 2.25 MiB of x).
TRANSPOSED_PRODUCT_MAX_BYTES = 2 << 20


def down_project(x2: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``x Aᵀ`` (N×r) for x (N×in) and A (r×in), in the faster layout for x's size (module docstring)."""
    if x2.numel() * x2.element_size() <= TRANSPOSED_PRODUCT_MAX_BYTES:
        return (lora_a @ x2.t()).t()
    return x2 @ lora_a.t()


def low_rank_forward(x, x_d, weight, bias, lora_a, lora_b, scale: float):
    """``(y, x_d as a matrix, x_d Aᵀ)``: the forward's math, shared by the autograd node, the no-grad path
    and DoRA's kernel (its unscaled output u)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xd2 = x2 if x_d is None else x_d.reshape(-1, shape[-1])
    xa = down_project(_cast(xd2, lora_a.dtype), lora_a)  # N×r
    out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    if lora_b.dtype == out.dtype:
        out.addmm_(xa, lora_b.t(), alpha=scale)
    else:  # the delta in the adapter dtype, added in the base dtype
        out.add_(torch.mm(xa, lora_b.t()).mul_(scale).to(out.dtype))
    return out.reshape(*shape[:-1], weight.shape[0]), xd2, xa


class _LowRankLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_a, lora_b, scale: float):
        out, xd2, xa = low_rank_forward(x, x_d, weight, bias, lora_a, lora_b, scale)
        ctx.same_input = x_d is None
        ctx.scale = scale
        ctx.save_for_backward(xd2, xa, weight, lora_a, lora_b)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xd2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_lr = _cast(g, lora_b.dtype)  # the low-rank path's gradients in the adapter dtype
        gb = (g_lr @ lora_b).mul_(s)  # N×r: s·g B
        grad_b = (xa.t() @ g_lr).t().mul_(s) if lora_b.requires_grad else None
        grad_a = gb.t() @ _cast(xd2, lora_a.dtype) if lora_a.requires_grad else None
        grad_x = grad_xd = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if ctx.same_input:
                if lora_a.dtype == grad_x.dtype:
                    grad_x.addmm_(gb, lora_a)
                else:
                    grad_x.add_((gb @ lora_a).to(grad_x.dtype))
            grad_x = grad_x.reshape(ctx.shape)
        if not ctx.same_input and ctx.needs_input_grad[1]:
            grad_xd = _cast(gb @ lora_a, xd2.dtype).reshape(ctx.shape)
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
        return low_rank_forward(x, x_d, weight, bias, lora_a, lora_b, scale)[0]
    return _LowRankLinear.apply(x, x_d, weight, bias, lora_a, lora_b, scale)
