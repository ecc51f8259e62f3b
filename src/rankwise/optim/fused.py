"""Cache-sized chunked updates: the engine's hot loops without full-size temporaries.

The per-element arithmetic of an optimizer step (Adam moments, m/(√v + ε), the update, decoupled
weight decay; the back-projection P·N or N·P and its addition to W) is done over slices of at most
``CHUNK`` elements (whole rows for the back-projection), in the same operation order as the
unchunked code. The results are bit-identical to it (elementwise ops do not depend on how a tensor is
sliced; a row block of a matrix product is the matrix product of the row block), but every temporary
is a small, cache-resident block instead of a full-size tensor: on CPU this saves one or two memory
passes per temporary and, for large tensors (an embedding), the page faults of a fresh allocation.

Only plain, contiguous CPU tensors of one dtype are chunked (:func:`chunkable`); anything else
(DTensors, non-contiguous views, mixed dtypes) keeps the unchunked code, and so do accelerators: there a
caching allocator serves the temporaries and each block would be one more kernel launch per op.
"""

from __future__ import annotations

import torch

from .sharding import is_dtensor

#: Elements per chunk (512 KiB of float32 per operand).
CHUNK = 1 << 17


def chunkable(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a plain (non-DTensor) contiguous CPU tensor of the first one's dtype."""
    first = tensors[0]
    return all(
        not is_dtensor(t) and t.device.type == "cpu" and t.is_contiguous() and t.dtype == first.dtype
        for t in tensors
    )


def adamw_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
    betas: tuple[float, float], eps: float, alpha: float, decay: float | None,
) -> None:
    """In place, chunk by chunk: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², p ← p + α·m/(√v + ε), then
    p ← p + decay·p when ``decay`` is given. The same ops as ``AdamW.update`` + the engine's update
    and weight decay (all tensors the same shape, :func:`chunkable`)."""
    b1, b2 = betas
    P, G, M, V = p.view(-1), g.view(-1), m.view(-1), v.view(-1)
    for s in range(0, P.numel(), CHUNK):
        e = s + CHUNK
        gc, mc, vc, pc = G[s:e], M[s:e], V[s:e], P[s:e]
        mc.mul_(b1).add_(gc, alpha=1.0 - b1)
        vc.mul_(b2).addcmul_(gc, gc, value=1.0 - b2)
        n = vc.sqrt().add_(eps)
        torch.div(mc, n, out=n)
        pc.add_(n, alpha=alpha)
        if decay is not None:
            pc.add_(pc, alpha=decay)


def rows_per_chunk(p: torch.Tensor) -> int:
    """Rows of the 2-D ``p`` in one chunk (at least one)."""
    return max(1, CHUNK // max(1, p.shape[1]))


def back_block(N: torch.Tensor, P: torch.Tensor, side: str, s: int, e: int) -> torch.Tensor:
    """Rows s:e of back(N): P[s:e]·N (left, P m×r) or N[s:e]·P (right, P r×n)."""
    return P[s:e] @ N if side == "left" else N[s:e] @ P


def back_add_(
    p: torch.Tensor, N: torch.Tensor, P: torch.Tensor, side: str, scale: float, alpha: float, decay: float | None
) -> None:
    """In place, a block of rows at a time: p ← p + α·(scale·back(N)), then p ← p + decay·p when given
    (GaLore's update, ``Drop.apply`` + the engine's weight decay)."""
    rows = rows_per_chunk(p)
    for s in range(0, p.shape[0], rows):
        e = s + rows
        u = back_block(N, P, side, s, e).mul_(scale)
        pc = p[s:e]
        pc.add_(u, alpha=alpha)
        if decay is not None:
            pc.add_(pc, alpha=decay)
