"""LoRA-LEGO (Zhao et al. 2024, "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to
Extremes Through Rank-Wise Clustering"): merge LoRAs by clustering their rank-1 units.

Each rank j of an input LoRA ΔWᵢ = cᵢ Bᵢ Aᵢ (cᵢ = weight × scale) is a Minimal Semantic Unit
(bⱼ, aⱼ) = (±√|cᵢ| Bᵢ[:, j], √|cᵢ| Aᵢ[j, :]), so Σ_units bⱼ aⱼᵀ = Σ cᵢ BᵢAᵢ (the paper's
concatenation-summation equivalence) and the units of one LoRA can be listed in any order
(permutation invariance). All units of a layer are clustered by k-means on [bⱼ; aⱼ] (Euclidean,
seeded k-means++ start, Lloyd iterations; the units are put in a canonical order first, so the
result does not depend on how ranks are ordered inside a LoRA); the k centroids (b̄_c, ā_c) are the
units of the merged rank-k LoRA. Dual reweighting of its scale:

* parameter reweighting (averaging shrinks a centroid's norm, "norm decay"): each centroid part is
  rescaled to the mean norm of its members, b̄_c ← b̄_c · mean_{j∈c}‖bⱼ‖ / ‖b̄_c‖ (the same for ā_c);
* output reweighting (the output variance of a sum of k rank-1 terms grows with k, "variance
  expansion"): the merged update is scaled by √(r̄ / k), r̄ the mean rank of the input LoRAs,

    ΔW = √(r̄/k) · Σ_c b̄_c ā_cᵀ.

So with k = the number of units (every unit its own cluster) the merge is Σ cᵢBᵢAᵢ / √N for N
LoRAs of one rank: between the sum (concatenation) and the mean. The two reweightings are written
from the paper's description of what each corrects; see docs/named-adapters.md.
"""

from __future__ import annotations

import math

import torch

from ..checks import integer, is_number

__all__ = ["kmeans", "lego_factors", "rank_units"]


def rank_units(factors: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Minimal Semantic Units of LoRAs ``(B, A, scale)`` with ``weights``: ``(b, a)`` with b
    (n, out) and a (n, in), one row per rank of every LoRA, Σ_rows bⱼ aⱼᵀ = Σ wᵢ sᵢ Bᵢ Aᵢ."""
    bs, as_ = [], []
    for (b, a, s), w in zip(factors, weights, strict=True):
        if not is_number(w) or not is_number(s):
            raise ValueError(f"weight {w!r} and scale {s!r} must be finite numbers")
        c = float(w) * float(s)
        root = math.sqrt(abs(c))
        bs.append(b.detach().float().T * (root if c >= 0 else -root))
        as_.append(a.detach().float() * root)
    return torch.cat(bs, 0), torch.cat(as_, 0)


def _canonical(points: torch.Tensor) -> torch.Tensor:
    """``points`` sorted lexicographically by their coordinates (a canonical order of a set of rows)."""
    rows = points.tolist()
    return points[sorted(range(len(rows)), key=rows.__getitem__)]


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> torch.Tensor:
    """Cluster index (n,) of each row of ``points`` (n, d) into ``k`` clusters: k-means++ seeding
    (Arthur & Vassilvitskii 2007) from ``generator``, then Lloyd steps until the assignment is
    stable (at most ``iters``); an emptied cluster is re-seeded with the point farthest from its centre."""
    n = points.shape[0]
    k = integer("k", k, 1, n)
    centres = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(1, k):
        d2 = torch.cdist(points, points[centres]).min(dim=1).values.pow(2)
        if float(d2.sum()) == 0.0:  # fewer distinct points than k: take any unchosen one
            centres.append(next(i for i in range(n) if i not in centres))
            continue
        centres.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=generator)))
    means = points[centres].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(points, means)
        new = dist.argmin(dim=1)
        for c in range(k):
            if not bool((new == c).any()):
                far = int(dist.gather(1, new[:, None]).squeeze(1).argmax())
                new[far] = c
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            means[c] = points[labels == c].mean(dim=0)
    return labels


def lego_factors(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float], k: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged rank-k LoRA ``(B, A)`` (out×k, k×in), ΔW = B·A (module docstring: units, k-means,
    parameter and output reweighting). ``k`` is capped at the number of units."""
    b, a = rank_units(factors, weights)
    out_features = b.shape[1]
    units = _canonical(torch.cat([b, a], dim=1))
    k = min(integer("rank", k, 1), units.shape[0])
    labels = kmeans(units, k, generator)
    b, a = units[:, :out_features], units[:, out_features:]
    mean_rank = sum(int(f[1].shape[0]) for f in factors) / len(factors)
    out_scale = math.sqrt(mean_rank / k)
    new_b, new_a = [], []
    for c in range(k):
        members = labels == c
        new_b.append(_keep_norm(b[members]))
        new_a.append(_keep_norm(a[members]))
    dtype = factors[0][0].dtype
    return (torch.stack(new_b, 1) * out_scale).to(dtype), torch.stack(new_a, 0).to(dtype)


def _keep_norm(members: torch.Tensor) -> torch.Tensor:
    """The centroid of ``members`` (m, d) rescaled to their mean norm (parameter reweighting)."""
    centroid = members.mean(dim=0)
    norm = centroid.norm()
    target = members.norm(dim=1).mean()
    return centroid * (target / norm) if float(norm) > 0.0 else centroid
