"""MoDeGPT — Lin et al. 2025, "MoDeGPT: Modular Decomposition for Large Language Model Compression"
(ICLR 2025, arXiv 2408.09632).

Backprop-free structured compression of Llama-style blocks. Each block is cut into three kinds of
matrix-pair modules, and the inner dimension of each is reduced to a ``ratio`` of its size so that the
module's outputs on calibration data are reconstructed (only forward passes, layer by layer on the
outputs of the already-compressed layers):

* **Type I, MLP** ``f(x) = (σ(x W_gᵀ) ⊙ x W_uᵀ) W_dᵀ`` — Nyström: with ``C = Σ z zᵀ`` the correlation of
  the intermediate activations z, keep the ``k`` channels S with the largest ridge leverage scores
  ``diag(C (C + λI)⁻¹)`` (gate/up rows S) and set ``W_d ← W_d C_{:,S} C_{S,S}⁻¹``: the least-squares
  down projection from the kept channels.
* **Type II, key–query** ``f(x) = RoPE(x W_{q,h}ᵀ) RoPE(x W_{k,h}ᵀ)ᵀ`` — CR decomposition: per head keep
  the ``k`` dimensions with the largest ``‖C_q^{1/2}[:, i]‖·‖C_k^{1/2}[:, i]‖`` (C_q, C_k the query / key
  correlations; the column norm of ``C^{1/2}`` is ``√C_ii``), rows of both W_q and W_k; RoPE rotates
  dimension ``i`` with ``i + d/2``, so the dimensions are kept in such pairs (pair score = the sum of
  its two squared CR scores).
* **Type III, value–output** ``f(x) = x W_{v,h}ᵀ W_{o,h}ᵀ`` — SVD: with ``C_x = Σ x xᵀ`` the attention
  input correlation and ``C_x^{1/2} W_vᵀ W_oᵀ = U Σ Vᵀ``, ``W_vᵀ ← C_x^{-1/2} U_k`` and ``W_oᵀ ← Σ_k V_kᵀ``:
  the best rank-k reconstruction of the module's output on the calibration inputs.

The result is physically smaller: gate/up have ``k`` outputs and down ``k`` inputs, and the attention
(:class:`ModularAttention`) has per-head query/key width ``k_qk`` and value width ``k_v``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

from .. import checks
from ..layout import find_blocks
from .layerwise import GramStats, collect_inputs, process_layerwise
from .resize import set_weight


@dataclass
class MoDeGPTConfig:
    """``ridge``: λ of the MLP's ridge leverage scores as a multiple of the mean eigenvalue of the
    activation correlation; ``eps``: eigenvalues of the input correlation below ``eps·max`` are raised
    to it before ``C_x^{-1/2}`` (value–output SVD)."""

    ridge: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        checks.number("ridge", self.ridge, 0, low_open=True)
        checks.number("eps", self.eps, 0, low_open=True)


class ModularAttention(nn.Module):
    """Llama attention whose heads have query/key width ``qk_dim`` and value width ``v_dim``; the kept
    RoPE pairs of each key-value head (``pairs``, indices below ``head_dim/2``) pick the rotary angles."""

    def __init__(self, attn: nn.Module, heads: int, kv_heads: int, head_dim: int, pairs: torch.Tensor,
                 v_dim: int) -> None:
        super().__init__()
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.scaling = attn.scaling
        self.attention_dropout = attn.attention_dropout
        self.is_causal = True
        self.num_key_value_groups = heads // kv_heads
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qk_dim, self.v_dim = 2 * pairs.shape[1], v_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.register_buffer("rotary_index", rotary_index(pairs, head_dim), persistent=False)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        cos, sin = (t[:, :, index].transpose(1, 2) for t in (cos, sin))  # batch × heads × seq × width
        return x * cos + rotate_half(x) * sin

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*shape, self.heads, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*shape, self.kv_heads, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*shape, self.kv_heads, self.v_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q = self._rope(q, cos, sin, self.rotary_index.repeat_interleave(self.num_key_value_groups, 0))
        k = self._rope(k, cos, sin, self.rotary_index)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                              self.attention_dropout, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*shape, -1).contiguous()), weights


def rotary_index(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per key-value head, the kept dimensions ``[p₁…p_m, p₁+d/2…p_m+d/2]``: the reduced vector's halves
    rotate together as in ``rotate_half``."""
    return torch.cat([pairs, pairs + head_dim // 2], dim=1)


# ------------------------------------------------------------------------------------ the three modules
def leverage_channels(corr: torch.Tensor, k: int, ridge: float) -> torch.Tensor:
    """The ``k`` channels with the largest ridge leverage scores ``diag(C (C + λI)⁻¹)``, λ = ridge·mean eig
    (sorted indices)."""
    values, vectors = torch.linalg.eigh(corr)
    values = values.clamp_min(0)
    lam = ridge * values.mean().clamp_min(1e-30)
    scores = (vectors.square() * (values / (values + lam))).sum(1)
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def nystrom_mlp(gate: nn.Linear, up: nn.Linear, down: nn.Linear, corr: torch.Tensor, k: int, ridge: float) -> None:
    """Type I: keep the leverage-selected channels of gate/up and refit down: ``W_d C_{:,S} C_{S,S}⁻¹``."""
    keep = leverage_channels(corr, k, ridge)
    c_ss = corr[keep][:, keep]
    jitter = 1e-10 * c_ss.diagonal().mean().clamp_min(1e-30) * torch.eye(k, dtype=corr.dtype, device=corr.device)
    refit = torch.linalg.solve(c_ss + jitter, corr[keep] @ down.weight.double().T).T  # d × k
    for lin in (gate, up):
        set_weight(lin, lin.weight.double()[keep])
    set_weight(down, refit)


def cr_pairs(q_weight: torch.Tensor, k_weight: torch.Tensor, corr: torch.Tensor, heads: int, kv_heads: int,
             head_dim: int, pairs: int) -> torch.Tensor:
    """Type II: per key-value head the ``pairs`` RoPE pairs with the largest summed ``C_q,ii·C_k,ii`` over
    its query heads (``C_q = W_q C_x W_qᵀ``); ``kv_heads × pairs`` sorted pair indices."""
    q_energy = ((q_weight.double() @ corr) * q_weight.double()).sum(1).view(kv_heads, heads // kv_heads, head_dim)
    k_energy = ((k_weight.double() @ corr) * k_weight.double()).sum(1).view(kv_heads, 1, head_dim)
    score = (q_energy * k_energy).sum(1).view(kv_heads, 2, head_dim // 2).sum(1)
    return score.topk(pairs, dim=1).indices.sort(dim=1).values


@torch.no_grad()
def cr_query_key(q: nn.Linear, k: nn.Linear, corr: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                 pairs: int) -> torch.Tensor:
    """Keep the selected rows of every query / key head; returns the kept pairs."""
    kept = cr_pairs(q.weight, k.weight, corr, heads, kv_heads, head_dim, pairs)
    index = rotary_index(kept, head_dim)
    k_rows = (index + head_dim * torch.arange(kv_heads, device=index.device)[:, None]).flatten()
    q_index = index.repeat_interleave(heads // kv_heads, 0)
    q_rows = (q_index + head_dim * torch.arange(heads, device=index.device)[:, None]).flatten()
    set_weight(q, q.weight.double()[q_rows])
    set_weight(k, k.weight.double()[k_rows])
    return kept


@torch.no_grad()
def svd_value_output(v: nn.Linear, o: nn.Linear, corr: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                     rank: int, eps: float) -> None:
    """Type III: per key-value head, the rank-``rank`` SVD of ``C_x^{1/2} W_vᵀ [W_o,hᵀ …]`` over its query
    heads, split as ``W_vᵀ ← C_x^{-1/2} U_k``, ``W_oᵀ ← Σ_k V_kᵀ``."""
    values, vectors = torch.linalg.eigh(corr)
    values = values.clamp_min(eps * float(values.max().clamp_min(1e-30)))
    root = (vectors * values.sqrt()) @ vectors.T
    inv_root = (vectors / values.sqrt()) @ vectors.T
    group = heads // kv_heads
    w_v = v.weight.double().view(kv_heads, head_dim, -1)
    w_o = o.weight.double().view(-1, heads, head_dim)
    new_v, new_o = [], [None] * heads
    for g in range(kv_heads):
        outs = [w_o[:, h] for h in range(g * group, (g + 1) * group)]  # each d × head_dim
        joint = w_v[g].T @ torch.cat([m.T for m in outs], dim=1)  # d × (group·d)
        u, s, vt = torch.linalg.svd(root @ joint, full_matrices=False)
        new_v.append((inv_root @ u[:, :rank]).T)
        right = s[:rank, None] * vt[:rank]
        for i, h in enumerate(range(g * group, (g + 1) * group)):
            new_o[h] = right[:, i * joint.shape[1] // group:(i + 1) * joint.shape[1] // group].T
    set_weight(v, torch.cat(new_v))
    set_weight(o, torch.cat(new_o, dim=1))


# ------------------------------------------------------------------------------------ the model
def _check_linears(block_linears: Iterable[nn.Linear]) -> None:
    for lin in block_linears:
        if lin.bias is not None:
            raise ValueError("modegpt supports Llama-style blocks without biases (found a biased linear)")


def modegpt(model: nn.Module, data: Iterable, ratio: float, progress: bool = False,
            **config: Any) -> dict[str, Any]:
    """Compress every Llama-style block of ``model`` in place to ``ratio`` of each module's inner dimension;
    returns the layout :func:`apply_modular_layout` rebuilds (per attention: kept RoPE pairs, value width)."""
    cfg = MoDeGPTConfig(**config)
    blocks = {b.q.rsplit(".self_attn.", 1)[0]: b for b in find_blocks(model, "modegpt")}
    if any(not b.q.endswith("self_attn.q_proj") for b in blocks.values()):
        raise ValueError("modegpt needs Llama-style blocks (self_attn.q_proj ... mlp.down_proj)")
    layout: dict[str, Any] = {}
    targets = {n for b in blocks.values() for n in (b.q, b.mlp_in[0])}

    def process(prefix: str, layer: nn.Module, forward: Any) -> None:
        b = blocks[prefix]
        attn, mlp = layer.self_attn, layer.mlp
        _check_linears([attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                        mlp.down_proj])
        _, stats = collect_inputs(prefix, layer, targets, lambda m: GramStats(m.in_features, m.weight.device),
                                  forward)
        channels = max(1, round(ratio * b.channels))
        pairs = max(1, round(ratio * b.head_dim / 2))
        v_dim = max(1, round(ratio * b.head_dim))
        nystrom_mlp(mlp.gate_proj, mlp.up_proj, mlp.down_proj, stats["mlp.down_proj"].gram, channels, cfg.ridge)
        x_corr = stats["self_attn.q_proj"].gram
        kept = cr_query_key(attn.q_proj, attn.k_proj, x_corr, b.heads, b.kv_heads, b.head_dim, pairs)
        svd_value_output(attn.v_proj, attn.o_proj, x_corr, b.heads, b.kv_heads, b.head_dim, v_dim, cfg.eps)
        layer.self_attn = ModularAttention(attn, b.heads, b.kv_heads, b.head_dim, kept, v_dim)
        layout[f"{prefix}.self_attn"] = {"pairs": kept.tolist(), "v_dim": v_dim, "heads": b.heads,
                                         "kv_heads": b.kv_heads, "head_dim": b.head_dim}

    process_layerwise(model, data, process, "modegpt", progress)
    return layout


def apply_modular_layout(model: nn.Module, layout: Any, where: str = "layout") -> None:
    """Wrap each recorded attention (its linears already resized) in :class:`ModularAttention` with the
    recorded kept RoPE pairs and value width; every value is checked against the model first."""
    if not isinstance(layout, dict):
        raise ValueError(f"{where}: the modular layout must map attention names to their kept pairs")
    for name, spec in layout.items():
        try:
            attn = model.get_submodule(name) if isinstance(name, str) else None
        except AttributeError:
            attn = None
        if attn is None or not hasattr(attn, "q_proj") or not isinstance(spec, dict):
            raise ValueError(f"{where}: {name!r} is not an attention module of this model")
        if set(spec) != {"pairs", "v_dim", "heads", "kv_heads", "head_dim"}:
            raise ValueError(f"{where}[{name!r}] must give pairs, v_dim, heads, kv_heads and head_dim")
        head_dim = checks.integer(f"{where}[{name!r}].head_dim", spec["head_dim"], 2)
        heads = checks.integer(f"{where}[{name!r}].heads", spec["heads"], 1)
        kv_heads = checks.integer(f"{where}[{name!r}].kv_heads", spec["kv_heads"], 1, heads)
        v_dim = checks.integer(f"{where}[{name!r}].v_dim", spec["v_dim"], 1, head_dim)
        pairs = spec["pairs"]
        ok = (isinstance(pairs, list) and len(pairs) == kv_heads and heads % kv_heads == 0
              and all(isinstance(row, list) and row and len(row) == len(pairs[0]) for row in pairs)
              and all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < head_dim // 2
                      for row in pairs for p in row))
        if not ok:
            raise ValueError(f"{where}[{name!r}].pairs must list, per key-value head, the same number of kept "
                             f"RoPE pair indices in [0, {head_dim // 2})")
        index = torch.tensor(pairs, dtype=torch.long, device=attn.q_proj.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ModularAttention(attn, heads, kv_heads, head_dim, index, v_dim))
