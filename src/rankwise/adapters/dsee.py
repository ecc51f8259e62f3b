"""DSEE's adapter — Chen et al. 2023, "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained
Language Models" (ACL 2023, arXiv 2111.00160; official code github.com/VITA-Group/DSEE), Sec. 3:
the *sparsity-embedded update*.

ΔW = s·(B A + S₂) with a rank-r product B A and a sparse S₂ whose support Ω (``nnz`` positions per
matrix, official ``num_sparse``) is fixed before training and only its values are trained. Ω is read
off the pretrained weight: decompose W₀ ≈ L + S with L of low rank and S sparse (GreBsmo in the
paper; here the GoDec-style alternation it approximates: ``L = rank-k SVD of (W₀ − S)``, ``S =
top-nnz entries of |W₀ − L|``) and take the support of S. ``support="random"`` is the paper's
random-support ablation. S₂ and B start at 0, so the adapted model starts equal to the pretrained one.

The layer also holds the keep-mask of DSEE's second sparsity (sparse final weights, ``M ⊙ (W₀ +
ΔW)``), which ``rankwise.compress.dsee`` sets; the method's entry point is ``rw.compress(model,
"dsee")``. The delta is not a low-rank product (the sparse term), so it merges but does not export
to PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import choice, integer
from ..linalg import truncated_svd
from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterLayer, AlphaConfig
from .init import InitContext
from .registry import MethodSpec, register

SUPPORTS = ("decomposition", "random")
STRUCTURES = ("unstructured", "heads")
HEAD_SCORES = ("update", "weight_update")


@dataclass
class DSEEConfig(AlphaConfig):
    """``alpha`` (scale α/r on BA + S₂; None = r), ``nnz`` (non-zeros of S₂ per matrix), ``support``
    ("decomposition" of W₀ or "random"), ``support_rank`` (rank of L in W₀ ≈ L + S; None = r),
    ``support_iters`` (alternations), ``structure`` of the final sparsity ("unstructured" or
    "heads") and ``head_score`` ("update": Σ|ΔW| of a head, or "weight_update": Σ|W₀| + Σ|ΔW|)."""

    nnz: int = 64
    support: str = "decomposition"
    support_rank: int | None = None
    support_iters: int = 3
    structure: str = "unstructured"
    head_score: str = "update"

    def validate(self) -> None:
        super().validate()
        choice("support", self.support, SUPPORTS)
        choice("structure", self.structure, STRUCTURES)
        choice("head_score", self.head_score, HEAD_SCORES)
        integer("nnz", self.nnz, 0)
        integer("support_rank", self.support_rank, 1, optional=True)
        integer("support_iters", self.support_iters, 1)


@torch.no_grad()
def dsee_support(
    weight: torch.Tensor,
    nnz: int,
    support: str = "decomposition",
    rank: int = 8,
    iters: int = 3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Flat indices (sorted, int64) of the ``nnz`` positions of the sparse update.

    ``decomposition``: alternate ``L ← rank-k SVD(W − S)``, ``S ← top-nnz(|W − L|)`` (S starts at 0)
    and return the support of S; ``random``: ``nnz`` positions uniformly without replacement."""
    choice("support", support, SUPPORTS)
    numel = weight.numel()
    if nnz > numel:
        raise ValueError(f"nnz={nnz} exceeds the {numel} entries of a {tuple(weight.shape)} weight")
    if nnz == 0:
        return torch.zeros(0, dtype=torch.long, device=weight.device)
    if support == "random":
        return torch.randperm(numel, generator=generator)[:nnz].sort().values.to(weight.device)
    w = weight.detach().float()
    rank = min(rank, *w.shape)
    sparse = torch.zeros_like(w)
    idx = None
    for _ in range(iters):
        u, s, vh = truncated_svd(w - sparse, rank)
        residual = w - (u * s) @ vh
        idx = residual.abs().flatten().topk(nnz).indices
        sparse = torch.zeros_like(w).flatten()
        sparse[idx] = residual.flatten()[idx]
        sparse = sparse.view_as(w)
    return idx.sort().values


class DSEELayer(AdapterLayer):
    """``y = (M ⊙ (W₀ + s·(BA + S₂))) x + b``; trainable ``lora_A`` (r×in), ``lora_B`` (out×r) and
    ``sparse_values`` (nnz) at the fixed flat positions ``sparse_index``; ``keep_mask`` (out×in,
    bool, all True until :func:`dsee_prune`)."""

    method = "dsee"
    stackable = False  # pruning rewrites the base weight

    def __init__(self, base_layer: nn.Module, config: DSEEConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r, dtype, device = config.r, self.adapter_dtype, self.base_weight.device
        if config.nnz > self.in_features * self.out_features:
            raise ValueError(
                f"nnz={config.nnz} exceeds the {self.out_features}x{self.in_features} entries of '{ctx.name}'"
            )
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.sparse_values = nn.Parameter(torch.zeros(config.nnz, dtype=dtype, device=device))
        self.register_buffer("sparse_index", torch.zeros(config.nnz, dtype=torch.long, device=device))
        self.register_buffer(
            "keep_mask", torch.ones(self.out_features, self.in_features, dtype=torch.bool, device=device)
        )
        # whether keep_mask has a False entry, kept as a Python flag (set by set_mask / after_load) so
        # the forward reads no tensor value (torch.compile traces it without a graph break)
        self.masked = False
        if ctx.skip:
            return
        gen = layer_generator(config.seed, ctx.name)
        kaiming_uniform_(self.lora_A, generator=gen)
        index = dsee_support(self.base_weight, config.nnz, config.support,
                             config.support_rank or config.r, config.support_iters, gen)
        self.sparse_index.copy_(index)

    @property
    def pruned(self) -> bool:
        """Whether ``keep_mask`` prunes any weight (read from the mask itself)."""
        return not bool(self.keep_mask.all())

    def sparse_delta(self) -> torch.Tensor:
        """S₂ as a dense out×in matrix (differentiable in ``sparse_values``)."""
        flat = self.sparse_values.new_zeros(self.out_features * self.in_features)
        return flat.index_add(0, self.sparse_index, self.sparse_values).view(self.out_features, self.in_features)

    def update_weight(self) -> torch.Tensor:
        """The unmasked update ``s·(BA + S₂)``."""
        return (self.lora_B @ self.lora_A + self.sparse_delta()) * self.scale

    def delta_weight(self) -> torch.Tensor:
        delta = self.update_weight()
        return delta * self.keep_mask.to(delta.dtype) if self.masked else delta

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.masked:
            return F.linear(x, self.delta_weight())
        return (F.linear(F.linear(x, self.lora_A), self.lora_B) + F.linear(x, self.sparse_delta())) * self.scale

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        """Install a keep-mask and zero the frozen base weight where it is False."""
        if self.merged:
            raise ValueError("unmerge the model before pruning (rw.unmerge)")
        self.keep_mask.copy_(keep.to(self.keep_mask.device, torch.bool))
        self.after_load()

    @torch.no_grad()
    def after_load(self) -> None:
        """Re-apply the keep-mask (zero the frozen base where it is False) and set ``masked``."""
        self.masked = self.pruned
        if self.masked:
            self._set_base_weight(self.base_weight.masked_fill(~self.keep_mask, 0))

    def trainable_count(self) -> int:
        return self.config.r * (self.in_features + self.out_features) + self.config.nnz

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nnz={self.config.nnz}, scale={self.scale:g}, pruned={self.pruned}"


register(
    MethodSpec(
        "dsee",
        "sparse+low-rank",
        "Chen et al. 2023, DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models",
        DSEEConfig,
        DSEELayer,
        export="none",
        summary="ΔW = s·(BA + S) with S on a fixed support from W₀ ≈ L + S; magnitude-pruned final weights",
        api="compress",
    )
)
