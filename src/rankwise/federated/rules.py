"""What each federated method trains on the clients and what the server does with the uploads.

Every method is a LoRA-shaped adapter (``rw.adapt``) whose clients train some tensors and freeze the
others at the value the server broadcast; the server averages the uploaded tensors, and FedSVD then
re-factorizes each layer's product. With the same frozen A on every client, averaging B averages the
clients' updates exactly (B̄·A = mean(Bᵢ·A)); the same holds for Fed-SB's core (B·R̄·A = mean(B·Rᵢ·A)).
Plain FedAvg of both factors does not: mean(Bᵢ)·mean(Aᵢ) ≠ mean(Bᵢ·Aᵢ) once the clients' Aᵢ differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import svd_precision


@dataclass(frozen=True)
class Rule:
    """A federated method: the adapter the clients train (``adapter``, with ``defaults``), the adapter
    parameters they keep frozen at the broadcast value (``frozen``), whether the server re-factorizes
    B·A by SVD after averaging (``refactor``, FedSVD), and whether the method is in the catalogue
    (FedAvg of LoRA is the baseline every paper compares with, not a catalogued method)."""

    name: str
    paper: str
    mechanism: str
    adapter: str
    frozen: tuple[str, ...] = ()
    refactor: bool = False
    catalogued: bool = True


RULES = (
    Rule("fedavg", "McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data "
         "(FedAvg), applied to LoRA's A and B", "clients train LoRA's A and B; the server averages A and B separately",
         "lora", catalogued=False),
    Rule("ffa_lora", "Sun et al. 2024, Improving LoRA in Privacy-preserving Federated Learning (FFA-LoRA)",
         "A frozen at its shared random init, only the zero-initialised B trained and averaged: B̄·A is exactly "
         "the mean of the clients' updates; half of LoRA's upload", "lora", frozen=("lora_A",)),
    Rule("fed_sb", "Singhal et al. 2025, Fed-SB: A Silver Bullet for Extreme Communication Efficiency and "
         "Performance in (Private) Federated LoRA Fine-Tuning",
         "LoRA-SB's frozen B, A (from the estimated first update) shared by all clients; only the r×r core R is "
         "trained and averaged: B·R̄·A is exactly the mean update, r² numbers per layer", "lora_sb"),
    Rule("fedsvd", "Lee et al. 2025, FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA",
         "clients train and send only B; the server averages B, re-factorizes B̄·A_old = UΣVᵀ and broadcasts "
         "A = V_rᵀ (orthonormal rows) and B = U_rΣ_r", "lora", frozen=("lora_A",), refactor=True),
)


@torch.no_grad()
def svd_refactor(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSVD's server step (Lee et al. 2025, Sec. 3): B·A = UΣVᵀ → (B', A') = (U_rΣ_r, V_rᵀ), so
    B'·A' = B·A and A' has orthonormal rows. Computed without forming B·A: B = Q_b R_b, Aᵀ = Q_a R_a,
    R_b R_aᵀ = U_m Σ V_mᵀ, U = Q_b U_m, V = Q_a V_m (fp64)."""
    qb, rb = torch.linalg.qr(svd_precision(b).double())
    qa, ra = torch.linalg.qr(svd_precision(a).double().T)
    um, s, vmh = torch.linalg.svd(rb @ ra.T)
    return ((qb @ um) * s).to(b.dtype), (vmh @ qa.T).to(a.dtype)


def mean_state(uploads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the clients' uploads (equal weights), key by key."""
    return {k: torch.stack([u[k] for u in uploads]).mean(0) for k in uploads[0]}


__all__ = ["RULES", "Rule", "mean_state", "svd_refactor"]
