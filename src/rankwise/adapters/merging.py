"""The per-layer math of merging adapters: plain tensors in, plain tensors out.

* :func:`combine_deltas` merges the dense updates ΔWᵢ of several adapters into one ΔW (``linear``, ``ties``,
  ``dare_linear``, ``dare_ties``, ``magnitude_prune``), with PEFT 0.21.2's ``merge_utils`` semantics.
* :func:`concat_factors` merges low-rank factors exactly by stacking them (rank Σ rᵢ).
* :func:`truncate_delta` turns a merged dense ΔW back into rank-r factors by truncated SVD.

Half-precision inputs are merged in fp32 and returned in their own dtype; fp32 / fp64 stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import choice, fraction, is_number
from ..checks import rank as check_rank
from ..linalg import svd_precision, truncated_svd

__all__ = ["MAJORITY_SIGNS", "MERGE_METHODS", "combine_deltas", "concat_factors", "dare_drop", "magnitude_trim",
           "truncate_delta"]

MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
MAJORITY_SIGNS = ("total", "frequency")


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``k = floor(density · numel)`` largest-magnitude entries set to zero
    (the "trim" step of TIES, Yadav et al. 2023; k counted as PEFT does). ``density=1`` keeps everything."""
    if density >= 1.0:
        return delta
    keep = torch.topk(delta.abs().flatten(), int(density * delta.numel()), largest=True).indices
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[keep] = True
    return delta * mask.view(delta.shape)


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE (Yu et al. 2024, "Language Models are Super Mario"): keep each entry with probability
    ``density`` and rescale the kept ones, ``m ⊙ ΔW / density`` with ``m ~ Bernoulli(density)``, so
    E[result] = ΔW. The mask is ``torch.bernoulli(full_like(delta, density), generator=generator)``
    (the global RNG when ``generator`` is None, as PEFT draws it); ``density=1`` draws nothing."""
    if density >= 1.0:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def _elect_and_merge(tasks: torch.Tensor, weights: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES sign election + disjoint mean over the stacked (trimmed or dropped) ``tasks`` (dim 0).

    The sign is elected on the UNweighted values (``total``: sgn Σᵢ tᵢ, ``frequency``: sgn Σᵢ sgn tᵢ; a
    tie elects +); the result is Σ over agreeing entries of wᵢ tᵢ divided by the number of agreeing
    nonzero entries (at least 1). Weights enter after the election and before the mean, as in PEFT."""
    signs = tasks.sign()
    score = tasks.sum(dim=0) if majority_sign == "total" else signs.sum(dim=0)
    elected = torch.where(score >= 0, 1.0, -1.0).to(tasks.dtype)
    agree = signs == elected  # zeros have sign 0 and never agree
    weighted = tasks * weights.view((-1,) + (1,) * (tasks.dim() - 1))
    count = agree.sum(dim=0).clamp(min=1)
    return (weighted * agree).sum(dim=0) / count


def _check_deltas(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if not isinstance(deltas, list | tuple) or not deltas:
        raise ValueError(f"deltas must be a non-empty list of tensors, got {type(deltas).__name__}")
    for i, d in enumerate(deltas):
        if not isinstance(d, torch.Tensor) or not d.is_floating_point():
            raise ValueError(f"deltas[{i}] must be a floating-point tensor, got {type(d).__name__}")
        ref = deltas[0]
        if d.shape != ref.shape or d.dtype != ref.dtype or d.device != ref.device:
            raise ValueError(f"deltas[{i}] is {tuple(d.shape)} {d.dtype} on {d.device} but deltas[0] is "
                             f"{tuple(ref.shape)} {ref.dtype} on {ref.device}; every delta must match")
    if not isinstance(weights, list | tuple) or len(weights) != len(deltas):
        raise ValueError(f"weights={weights!r} must be a list with one number per delta ({len(deltas)})")
    for i, w in enumerate(weights):
        if not is_number(w):
            raise ValueError(f"weights[{i}]={w!r} must be a finite number")


def combine_deltas(
    deltas: list[torch.Tensor],
    weights: list[float],
    how: str,
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One dense ΔW from the per-layer ΔWᵢ of several adapters, with per-adapter weights wᵢ:

    * ``linear``: Σ wᵢ ΔWᵢ (task arithmetic).
    * ``magnitude_prune``: Σ wᵢ trim(ΔWᵢ), trim = keep the top-``density`` fraction by magnitude.
    * ``ties`` (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"):
      tᵢ = trim(ΔWᵢ); elect a sign per entry from the unweighted tᵢ (``majority_sign``); return
      Σ_{agreeing i} wᵢ tᵢ / #agreeing (the disjoint mean).
    * ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, "Language Models are Super Mario"): as
      ``linear`` / ``ties`` with trim replaced by :func:`dare_drop` (random keep-with-p=``density`` and
      rescale by 1/``density``), one draw per delta in list order from ``generator``.

    ``density`` is ignored by ``linear``; ``majority_sign`` only matters for the two TIES methods. The
    inputs are detached; the result has the deltas' dtype. Matches ``peft.utils.merge_utils`` (0.21.2) bit for
    bit in fp32 (with fp64 deltas the weights stay fp64, where PEFT's ``torch.tensor(weights)`` is fp32).
    """
    choice("how", how, MERGE_METHODS)
    _check_deltas(deltas, weights)
    density = fraction("density", density)
    choice("majority_sign", majority_sign, MAJORITY_SIGNS)

    out_dtype = deltas[0].dtype
    work = [svd_precision(d) for d in deltas]  # detached; half precisions in fp32
    w = torch.tensor([float(x) for x in weights], dtype=work[0].dtype, device=work[0].device)
    if how == "magnitude_prune" or how == "ties":
        work = [magnitude_trim(d, density) for d in work]
    elif how.startswith("dare_"):
        work = [dare_drop(d, density, generator) for d in work]
    tasks = torch.stack(work, dim=0)
    if how.endswith("ties"):
        merged = _elect_and_merge(tasks, w, majority_sign)
    else:
        merged = (tasks * w.view((-1,) + (1,) * (tasks.dim() - 1))).sum(dim=0)
    return merged.to(out_dtype)


def concat_factors(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of low-rank adapters ΔWᵢ = sᵢ Bᵢ Aᵢ by stacking: ``B = [w₁s₁B₁ | w₂s₂B₂ | …]``,
    ``A = [A₁; A₂; …]``, so ``B @ A = Σ wᵢ sᵢ Bᵢ Aᵢ`` with rank Σ rᵢ (PEFT's ``cat``; PEFT puts wᵢsᵢ on the
    A side instead, the product is the same). The whole factor wᵢsᵢ goes on B, not √ on each side, so a
    negative weight needs no complex root. Each ``Bᵢ`` is (out, rᵢ) and each ``Aᵢ`` is (rᵢ, in)."""
    if not isinstance(factors, list | tuple) or not factors:
        raise ValueError("factors must be a non-empty list of (B, A, scale) tuples")
    if not isinstance(weights, list | tuple) or len(weights) != len(factors):
        raise ValueError(f"weights={weights!r} must be a list with one number per factor ({len(factors)})")
    b0, a0 = factors[0][0], factors[0][1]
    bs, as_ = [], []
    for i, (item, w) in enumerate(zip(factors, weights, strict=True)):
        if not isinstance(item, tuple | list) or len(item) != 3:
            raise ValueError(f"factors[{i}] must be a (B, A, scale) tuple")
        b, a, s = item
        if not is_number(w):
            raise ValueError(f"weights[{i}]={w!r} must be a finite number")
        if not is_number(s):
            raise ValueError(f"factors[{i}] scale={s!r} must be a finite number")
        if not (isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor) and b.dim() == 2 and a.dim() == 2):
            raise ValueError(f"factors[{i}] must hold 2-D tensors B (out, r) and A (r, in)")
        if b.shape[1] != a.shape[0] or b.shape[0] != b0.shape[0] or a.shape[1] != a0.shape[1]:
            raise ValueError(f"factors[{i}] has B {tuple(b.shape)} and A {tuple(a.shape)}; need B (out, r), A (r, in) "
                             f"with out={b0.shape[0]} and in={a0.shape[1]} as in factors[0]")
        if b.dtype != b0.dtype or a.dtype != a0.dtype:
            raise ValueError(f"factors[{i}] dtypes ({b.dtype}, {a.dtype}) differ from factors[0]'s "
                             f"({b0.dtype}, {a0.dtype})")
        bs.append(b.detach() * (float(w) * float(s)))
        as_.append(a.detach())
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def truncate_delta(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of a 2-D ``delta`` (out, in) by truncated SVD (Eckart–Young): ``B = U_r Σ_r``
    (out, r), ``A = V_rᵀ`` (r, in, orthonormal rows), so ‖ΔW − BA‖_F² = Σ_{i>r} σᵢ². The SVD runs in
    fp32 (fp64 for fp64 input); the factors come back in ``delta``'s dtype."""
    if not isinstance(delta, torch.Tensor) or delta.dim() != 2 or not delta.is_floating_point():
        shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"delta must be a 2-D floating-point tensor (out, in), got {shape}")
    r = check_rank("rank", rank, limit=min(delta.shape))
    u, s, vh = truncated_svd(svd_precision(delta), r)
    return (u * s).to(delta.dtype), vh.to(delta.dtype)
