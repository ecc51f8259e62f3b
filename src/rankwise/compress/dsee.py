"""DSEE — Chen et al. 2023, "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language
Models" (ACL 2023, arXiv 2111.00160; official code github.com/VITA-Group/DSEE).

Two sparsities (Sec. 3):

1. *Sparsity-embedded update*: ΔW = s·(B A + S₂) with a rank-r product B A and a sparse S₂ whose
   support Ω (``nnz`` positions per matrix, official ``num_sparse``) is fixed before training and
   only its values are trained. Ω is read off the pretrained weight: decompose W₀ ≈ L + S with L of
   low rank and S sparse (GreBsmo in the paper; here the GoDec-style alternation it approximates:
   ``L = rank-k SVD of (W₀ − S)``, ``S = top-nnz entries of |W₀ − L|``) and take the support of S.
   ``support="random"`` is the paper's random-support ablation. S₂ and B start at 0, so the adapted
   model starts equal to the pretrained one.
2. *Sparse final weights*, then further tuning of B, A, S₂ under the mask; the merged weight is
   ``M ⊙ (W₀ + ΔW)``, exactly 0 where pruned. Two patterns (``structure``):

   * ``"unstructured"``: global magnitude pruning of the effective weights ``W₀ + ΔW`` over all
     adapted matrices (official ``prune.global_unstructured(L1Unstructured)``);
   * ``"heads"``: the structured variant (official ``run_glue_prune_with_WAB_heads.py``): in every
     attention block the ``round(sparsity·heads)`` heads of least importance are removed. A head's
     importance is the ℓ1 norm of the weight *update* over the head's slice of the attention
     projections, ``Σ |ΔW|`` over its q/k/v rows and o columns (official ``prune_mode=ABS``, the
     one its scripts use; the official code adapts only q and v, so only those terms appear there);
     ``head_score="weight_update"`` adds ``Σ |W₀|`` over the same slices (official ``WABS``). With
     grouped-query attention a key-value head's k/v terms are shared equally by its query heads.
     Pruned heads are *zeroed, not removed* (the dense shapes are kept): the head's q rows and
     o columns are exactly 0, and its k/v rows too (with grouped-query attention: once every query
     head of the key-value group is pruned). q/k/v bias entries are left (with the o columns at 0
     they have no effect). Needs DSEE adapters on q, k, v and o of every attention block (e.g.
     ``targets="all-linear"``) so that the head masks live in the adapters' keep-masks.

Pruning zeroes W₀ in place at the pruned positions (the keep-mask is a persistent buffer, so
``load_adapter`` re-applies it); ``unload`` after pruning gives the pruned base. The delta is not a
low-rank product (the sparse term), so it merges but does not export to PEFT.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import HEAD_SCORES, DSEELayer, adapter_layers
from ..batches import LossFn
from ..callbacks import Callback, TrainState
from ..checks import choice, fraction, integer
from ..layout import attention_layout, check_head_layout
from .finetune import finetune


def dsee_layers(model: nn.Module) -> list[tuple[str, DSEELayer]]:
    layers = [(n, m) for n, m in adapter_layers(model) if isinstance(m, DSEELayer)]
    if not layers:
        raise ValueError("model has no DSEE adapters (call rw.adapt(model, 'dsee', ...) first)")
    return layers


@torch.no_grad()
def dsee_prune(model: nn.Module, sparsity: float) -> int:
    """Prune the effective weights ``W₀ + ΔW`` of the DSEE layers with the adapters' ``structure``:
    ``"unstructured"`` masks the ``round(sparsity·N)`` smallest-magnitude entries (N = all adapted
    weights) and returns that count; ``"heads"`` removes ``round(sparsity·heads)`` heads per
    attention block (:func:`prune_heads`) and returns the number of heads pruned."""
    fraction("sparsity", sparsity, allow_zero=True, allow_one=False)
    layers = dsee_layers(model)
    config = layers[0][1].config
    if config.structure == "heads":
        return prune_heads(model, sparsity, config.head_score)
    effective = [layer.base_weight.float() + layer.delta_weight().float() for _, layer in layers]
    magnitudes = torch.cat([(w.abs().flatten()) for w in effective])
    count = round(sparsity * magnitudes.numel())
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    if count > 0:
        keep[magnitudes.topk(count, largest=False).indices] = False
    start = 0
    for (_, layer), w in zip(layers, effective, strict=True):
        n = w.numel()
        layer.set_mask(keep[start : start + n].view_as(w) & layer.keep_mask)
        start += n
    return count


# ------------------------------------------------------------------------------ structured: heads
@dataclass(frozen=True)
class AttentionBlock:
    """The DSEE layers on one attention block's q/k/v/o projections and its head layout."""

    prefix: str
    q: DSEELayer
    k: DSEELayer
    v: DSEELayer
    o: DSEELayer
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key-value head."""
        return self.heads // self.kv_heads


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Every Llama-style (``self_attn.{q,k,v,o}_proj``) or BERT-style (``attention.self.{query,key,
    value}``, ``attention.output.dense``) attention block; ValueError when there is none, when one
    of its projections has no DSEE adapter, or when the head layout does not match the config."""
    layers = dict(dsee_layers(model))
    layout = attention_layout(model, "structure='heads'", "Llama-style (self_attn.q_proj, ...) or BERT-style "
                              "(attention.self.query, ...) attention block")
    blocks = []
    for style, prefix, heads, kv_heads, cfg_head_dim in layout:
        members = {}
        for key in ("q", "k", "v", "o"):
            full = prefix + style[key]
            if full not in layers:
                raise ValueError(
                    f"structure='heads' needs DSEE adapters on q, k, v and o of every attention block; "
                    f"'{full}' has none (adapt with targets='all-linear' or list all four projections)"
                )
            members[key] = layers[full]
        head_dim = check_head_layout(prefix, members["q"], members["k"], members["o"], heads, kv_heads, cfg_head_dim)
        blocks.append(AttentionBlock(prefix, **members, heads=heads, kv_heads=kv_heads, head_dim=head_dim))
    return blocks


def _l1(layer: DSEELayer, dim: int, head_score: str) -> torch.Tensor:
    """``Σ |ΔW|`` (plus ``Σ |W₀|`` for "weight_update") along ``dim`` (1: per row, 0: per column)."""
    magnitude = layer.delta_weight().float().abs()
    if head_score == "weight_update":
        magnitude = magnitude + layer.base_weight.float().abs()
    return magnitude.sum(dim)


@torch.no_grad()
def head_importance(block: AttentionBlock, head_score: str = "update") -> torch.Tensor:
    """Per query head: the ℓ1 norm of the update over its q rows and o columns, plus its equal share
    (``1/group``) of its key-value head's k and v rows (DSEE's structured criterion, module docstring)."""
    choice("head_score", head_score, HEAD_SCORES)
    d = block.head_dim
    q = _l1(block.q, 1, head_score).view(block.heads, d).sum(1)
    o = _l1(block.o, 0, head_score).view(block.heads, d).sum(1)
    kv = (_l1(block.k, 1, head_score) + _l1(block.v, 1, head_score)).view(block.kv_heads, d).sum(1)
    return q + o + kv.repeat_interleave(block.group) / block.group


@torch.no_grad()
def prune_heads(model: nn.Module, sparsity: float, head_score: str = "update") -> int:
    """In every attention block, zero the ``round(sparsity·heads)`` heads of least
    :func:`head_importance` (q rows, o columns, and k/v rows of fully pruned key-value groups) via
    the DSEE keep-masks. Returns the number of heads pruned over all blocks."""
    fraction("sparsity", sparsity, allow_zero=True, allow_one=False)
    choice("head_score", head_score, HEAD_SCORES)
    pruned = 0
    for block in attention_blocks(model):
        count = round(sparsity * block.heads)
        if count == 0:
            continue
        keep = torch.ones(block.heads, dtype=torch.bool)
        keep[head_importance(block, head_score).argsort(stable=True)[:count].cpu()] = False
        kv_keep = keep.view(block.kv_heads, block.group).any(1)
        q_rows = keep.repeat_interleave(block.head_dim).to(block.q.keep_mask.device)
        kv_rows = kv_keep.repeat_interleave(block.head_dim).to(block.k.keep_mask.device)
        block.q.set_mask(block.q.keep_mask & q_rows[:, None])
        block.k.set_mask(block.k.keep_mask & kv_rows[:, None])
        block.v.set_mask(block.v.keep_mask & kv_rows[:, None])
        block.o.set_mask(block.o.keep_mask & q_rows.to(block.o.keep_mask.device)[None, :])
        pruned += count
    return pruned


class _PruneAt(Callback):
    """DSEE's one pruning in the loop: :func:`dsee_prune` right after optimizer step ``prune_step``
    (counted from 1); every step's record says whether it trained under the mask (``pruned``)."""

    def __init__(self, model: nn.Module, prune_step: int, sparsity: float) -> None:
        self.model, self.prune_step, self.sparsity = model, prune_step, sparsity

    def on_after_backward(self, state: TrainState) -> None:
        state.log["pruned"] = state.step >= self.prune_step

    def on_step_end(self, state: TrainState) -> None:
        if state.step == self.prune_step:
            dsee_prune(self.model, self.sparsity)


def dsee_finetune(
    model: nn.Module,
    data: Iterable,
    steps: int,
    sparsity: float,
    prune_at: float = 0.5,
    lr: float = 1e-3,
    loss_fn: LossFn | None = None,
    progress: bool = False,
) -> list[dict]:
    """Train the DSEE update for ``steps`` AdamW steps; after ``round(prune_at·steps)`` steps prune
    with :func:`dsee_prune` at ``sparsity`` (of the weights, or of each block's heads for
    ``structure="heads"``) and keep tuning under the mask (with ``steps=0`` it just prunes).
    Returns per-step losses."""
    integer("steps", steps, 0)
    fraction("prune_at", prune_at, allow_zero=True)
    dsee_layers(model)
    prune_step = round(prune_at * steps)
    if prune_step == 0:  # before the first step (or at once when steps == 0)
        dsee_prune(model, sparsity)
    if steps == 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    return finetune(model, params, data, steps, lr, loss_fn, progress, [_PruneAt(model, prune_step, sparsity)])
