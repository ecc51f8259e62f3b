"""LoRAM / QLoRAM — Zhang et al. 2025, "Train Small, Infer Large: Memory-Efficient LoRA Training for
Large Language Models" (ICLR 2025, arXiv 2502.13533; official code github.com/junzhang-zj/LoRAM).

LoRA is trained on a structurally pruned (and, for QLoRAM, 4-bit quantized) copy of the model, whose
frozen weights take a fraction of the memory; the trained low-rank matrices are then *recovered* to
the original shapes and used with the original model:

1. **Prune** (:func:`prune_copy`): every block of a copy loses whole key-value head groups (with their
   query heads: q/k/v rows, o columns) and MLP channels (gate/up rows, down column; BERT:
   intermediate row, output column), keeping the fraction ``ratio`` of each. The units are chosen at
   random (LoRAM-Rand) or by LLM-Pruner's first-order Taylor importance Σ|W ⊙ ∂L/∂W| over each
   unit's weights on a few calibration batches (LoRAM-Stru). The pruned units are removed
   (``loraprune.remove_pruned_units``): smaller ``nn.Linear`` layers, fewer heads.
2. **Align** (optional, ``align_data`` / ``align_steps``): a few full-parameter language-modelling
   steps of the pruned copy on general text (the paper's low-cost continual pre-training, done once
   by the model publisher); the output head stays frozen, as in the official script.
3. **Quantize** (optional, ``quantize="nf4"``: QLoRAM): the pruned copy's linears become 4-bit bases.
4. **Train** LoRA (``r``, ``alpha``) on the pruned copy through the one loop (:func:`.finetune.finetune`).
5. **Recover** (:func:`recover_factors`): for a layer whose output rows were pruned, ``B`` gets zero
   rows at the pruned positions (``B_full[kept] = B``, A unchanged); for one whose input columns were
   pruned, ``A`` gets zero columns (``A_full[:, kept] = A``, B unchanged) — the official code's
   ``zeroA`` recovery. The result is a plain LoRA adapter on the original model (same r, α), so
   ``ΔW_full`` restricted to the kept rows/columns is the trained ``ΔW`` and is zero elsewhere; it
   saves, merges and exports to PEFT like any LoRA adapter.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import catalogue, checks
from ..adapters import adapt, adapter_layers, adapter_names, adapter_state
from ..batches import LossFn, loss_of
from ..layout import Block, find_blocks, head_module_names
from ..quant import quantize as quantize_model
from ..targets import Targets, linear_shape
from .finetune import finetune
from .loraprune import BlockState, LoRAPruneState, _input_side, remove_pruned_units

CRITERIA = ("random", "taylor")
PAPER = "Zhang et al. 2025, Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language Models"


@dataclass
class Kept:
    """Which rows (``input_side=False``: output rows) or columns (``True``: input columns) of an
    original layer of shape ``shape`` = (out, in) the pruned copy kept, in order (``index``)."""

    shape: tuple[int, int]
    input_side: bool
    index: torch.Tensor


@dataclass
class LoRAMState:
    """What :func:`loram` did; ``model.rankwise_loram[name]``."""

    name: str
    ratio: float
    criterion: str
    quantize: str | None
    layers: list[str]
    params_original: int  # weights of the pruned blocks' linears, before / after pruning
    params_pruned: int
    kept: dict[str, Kept] = field(default_factory=dict, repr=False)  # per pruned layer: the kept rows / columns
    history: list[dict[str, Any]] = field(default_factory=list)
    align_history: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------- choosing units
def _kept_count(ratio: float, units: int) -> int:
    return min(units, max(1, round(ratio * units)))


@torch.no_grad()
def _unit_scores(block: Block, score: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per key-value group, per MLP channel) sums of the element scores ``score[layer]`` (out×in) over
    each unit's rows (q, k, v, gate/up) and columns (o, down)."""

    def lines(name: str) -> torch.Tensor:
        return score[name].sum(0 if _input_side(block, name) else 1)

    d, g = block.head_dim, block.group
    query = (lines(block.q) + lines(block.o)).view(block.kv_heads, g * d).sum(1)
    groups = query + (lines(block.k) + lines(block.v)).view(block.kv_heads, d).sum(1)
    channels = sum(lines(n) for n in (*block.mlp_out, *block.mlp_in))
    return groups, channels


def taylor_scores(model: nn.Module, blocks: list[Block], data: Iterable, batches: int,
                  loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """LLM-Pruner's first-order element importance |W ⊙ ∂L/∂W| of every block linear, the gradient
    summed over the first ``batches`` batches of ``data`` (the model's flags and gradients are restored)."""
    names = [n for b in blocks for n in b.names]
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {id(p): (p.requires_grad, p.grad) for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in {id(w) for w in weights.values()})
        p.grad = None
    try:
        seen = 0
        for batch in data:
            if seen == batches:
                break
            loss_of(model, batch, loss_fn).backward()
            seen += 1
        if seen == 0:
            raise ValueError("criterion='taylor' needs calibration batches: data holds none")
        return {n: (w.detach() * w.grad).abs().float() for n, w in weights.items()}
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)][0])
            p.grad = flags[id(p)][1]


def choose_units(model: nn.Module, blocks: list[Block], ratio: float, criterion: str, *, data: Iterable | None = None,
                 batches: int = 4, loss_fn: LossFn | None = None, seed: int = 0) -> list[BlockState]:
    """The pruned units of every block: all query heads of the pruned key-value groups and the pruned
    MLP channels, keeping ``round(ratio·count)`` (at least one) of each — the lowest-scoring ones
    pruned (``"taylor"``) or a seeded random choice (``"random"``)."""
    checks.choice("criterion", criterion, CRITERIA)
    generator = torch.Generator().manual_seed(seed)
    scores = taylor_scores(model, blocks, data or [], batches, loss_fn) if criterion == "taylor" else {}
    units = []
    for block in blocks:
        if criterion == "taylor":
            group_score, channel_score = _unit_scores(block, scores)
        else:
            group_score = torch.rand(block.kv_heads, generator=generator)
            channel_score = torch.rand(block.channels, generator=generator)
        drop_groups = torch.argsort(group_score, stable=True)[: block.kv_heads - _kept_count(ratio, block.kv_heads)]
        drop_channels = torch.argsort(channel_score, stable=True)[: block.channels - _kept_count(ratio, block.channels)]
        heads = {int(j) * block.group + i for j in drop_groups for i in range(block.group)}
        units.append(BlockState(heads=heads, channels={int(c) for c in drop_channels}))
    return units


# ------------------------------------------------------------------------------------- prune / recover
def prune_copy(model: nn.Module, blocks: list[Block], units: list[BlockState]) -> tuple[nn.Module, dict[str, Kept]]:
    """A physically pruned deep copy of ``model`` (``units`` removed from ``blocks``) and, per block
    linear, the kept rows / columns of the original layer."""
    pruned = copy.deepcopy(model)
    state = LoRAPruneState(blocks, units)
    masks = state.row_masks()
    kept = {name: Kept(linear_shape(model.get_submodule(name)), _input_side(block, name),
                       torch.nonzero(masks[name]).flatten())
            for block in blocks for name in block.names}
    remove_pruned_units(pruned, state)
    return pruned, kept


def recover_factors(b: torch.Tensor, a: torch.Tensor, kept: Kept) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRAM's recovery of a pruned layer's LoRA factors to the original shape: zero rows of B at the
    pruned output positions, or zero columns of A at the pruned input positions (the kept ones equal
    the trained factors exactly)."""
    out_features, in_features = kept.shape
    if kept.input_side:
        if a.shape[1] != kept.index.numel() or b.shape[0] != out_features:
            raise ValueError(f"factors B {tuple(b.shape)}, A {tuple(a.shape)} do not fit a layer {kept.shape} "
                             f"with {kept.index.numel()} kept input columns")
        full = a.new_zeros(a.shape[0], in_features)
        full[:, kept.index.to(a.device)] = a
        return b.clone(), full
    if b.shape[0] != kept.index.numel() or a.shape[1] != in_features:
        raise ValueError(f"factors B {tuple(b.shape)}, A {tuple(a.shape)} do not fit a layer {kept.shape} "
                         f"with {kept.index.numel()} kept output rows")
    full = b.new_zeros(out_features, b.shape[1])
    full[kept.index.to(b.device)] = b
    return full, a.clone()


@torch.no_grad()
def recover_adapter(model: nn.Module, pruned: nn.Module, kept: dict[str, Kept], name: str,
                    trainable: str | Iterable[str] | None = "auto") -> list[str]:
    """Put the LoRA adapter ``name`` trained on ``pruned`` onto the original ``model`` (same config:
    r, α, dropout), each layer's factors recovered by :func:`recover_factors`; fully trained modules
    (``trainable``, e.g. a classification head, unpruned) are copied. Returns the adapted layers."""
    state = adapter_state(pruned, name)
    layers = dict(adapter_layers(pruned, name))
    adapt(model, "lora", targets=list(layers), name=name, trainable=trainable, **state.config.to_dict())
    target = dict(adapter_layers(model, name))
    for layer_name, layer in layers.items():
        b, a = layer.lora_B.detach(), layer.lora_A.detach()
        if layer_name in kept:
            b, a = recover_factors(b, a, kept[layer_name])
        target[layer_name].lora_B.copy_(b)
        target[layer_name].lora_A.copy_(a)
    original = dict(model.named_parameters())
    for module_name in adapter_state(model, name).trainable_modules:
        for p_name, p in pruned.get_submodule(module_name).named_parameters():
            original[f"{module_name}.{p_name}"].copy_(p)
    return list(layers)


# ------------------------------------------------------------------------------------- the method
def loram(
    model: nn.Module,
    data: Iterable,
    ratio: float = 0.5,
    *,
    steps: int = 100,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    lr: float = 1e-4,
    criterion: str = "random",
    calibration_batches: int = 4,
    quantize: str | None = None,
    align_data: Iterable | None = None,
    align_steps: int = 0,
    align_lr: float = 5e-5,
    blocks: Iterable[int] | None = None,
    targets: Targets = "all-linear",
    trainable: str | Iterable[str] | None = "auto",
    name: str = "loram",
    seed: int = 0,
    loss_fn: LossFn | None = None,
    progress: bool = False,
) -> nn.Module:
    """LoRAM (QLoRAM with ``quantize="nf4"``): train LoRA on a pruned copy of ``model``, recover it to
    ``model`` (in place; returns ``model`` with the LoRA adapter ``name``, a plain LoRA).

    ``ratio``: kept fraction of the key-value head groups and of the MLP channels of every pruned
    block (``blocks``: their indices, default all; the paper leaves the first and last few unpruned).
    ``criterion``: ``"random"`` (LoRAM-Rand, ``seed``) or ``"taylor"`` (LoRAM-Stru: LLM-Pruner's
    first-order importance on the first ``calibration_batches`` batches of ``data``). ``align_data``
    / ``align_steps`` / ``align_lr``: the optional alignment (full-parameter steps of the pruned copy,
    output head frozen). ``quantize``: ``"nf4"`` / ``"fp4"`` 4-bit base for the pruned copy. ``steps``,
    ``lr``, ``r``, ``alpha``, ``dropout``, ``targets``, ``trainable``: the LoRA training on ``data``.
    ``model.rankwise_loram[name]`` is a :class:`LoRAMState` (sizes, histories)."""
    ratio = checks.fraction("ratio", ratio)
    checks.choice("criterion", criterion, CRITERIA)
    checks.integer("steps", steps, 1)
    checks.integer("align_steps", align_steps, 0)
    checks.integer("calibration_batches", calibration_batches, 1)
    checks.positive("lr", lr)
    checks.positive("align_lr", align_lr)
    if align_steps and align_data is None:
        raise ValueError(f"align_steps={align_steps} needs align_data=... (batches of general text)")
    if adapter_names(model):
        raise ValueError(f"model has rankwise adapters {adapter_names(model)}; LoRAM prunes the plain base model")
    found = find_blocks(model, "LoRAM")
    chosen = list(range(len(found))) if blocks is None else sorted(set(blocks))
    for i in chosen:
        checks.integer("blocks", i, 0, len(found) - 1, what=f"block indices in [0, {len(found) - 1}]")
    found = [found[i] for i in chosen]
    units = choose_units(model, found, ratio, criterion, data=data, batches=calibration_batches, loss_fn=loss_fn,
                         seed=seed)
    pruned, kept = prune_copy(model, found, units)
    size = sum(k.shape[0] * k.shape[1] for k in kept.values())
    size_pruned = sum(pruned.get_submodule(n).weight.numel() for n in kept)
    align_history = []
    if align_steps:
        heads = head_module_names(pruned)
        frozen = {id(p) for h in heads for p in pruned.get_submodule(h).parameters()}
        params = [p for p in pruned.parameters() if id(p) not in frozen]
        for p in pruned.parameters():
            p.requires_grad_(id(p) not in frozen)
        align_history = finetune(pruned, params, align_data, align_steps, align_lr, loss_fn, progress)
    if quantize is not None:
        quantize_model(pruned, quantize)
    adapt(pruned, "lora", targets=targets, r=r, alpha=alpha, dropout=dropout, name=name, trainable=trainable,
          seed=seed)
    params = [p for p in pruned.parameters() if p.requires_grad]
    history = finetune(pruned, params, data, steps, lr, loss_fn, progress)
    layers = recover_adapter(model, pruned, kept, name, trainable)
    state = LoRAMState(name, ratio, criterion, quantize, layers, size, size_pruned, kept, history, align_history)
    model.rankwise_loram = {**getattr(model, "rankwise_loram", {}), name: state}  # type: ignore[assignment]
    return model


catalogue.register(catalogue.MethodRecord(
    "loram", "compression", PAPER,
    "LoRA trained on a structurally pruned (QLoRAM: also 4-bit) copy, optionally aligned by a few LM steps; the "
    "factors recovered to the original shapes (zeros at the pruned rows of B / columns of A) and used on the "
    "original model",
    api="train-pruned", config=loram, exports="peft-lora", spec=loram,
    builder=lambda model, **options: loram(model, **options),
))
