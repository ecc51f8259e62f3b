"""LoRAPrune — Zhang et al. 2024, "LoRAPrune: Pruning Meets Low-Rank Parameter-Efficient Fine-Tuning"
(ACL Findings 2024, arXiv 2305.18403; official code github.com/aim-uofa/LoRAPrune).

Structured, iterative pruning of attention heads and MLP channels *during* LoRA fine-tuning, with
importance estimated from LoRA alone — the gradient of the frozen W₀ is never computed:

* LoRA-guided gradient estimate (Sec. 3.2, Eq. 7–8; official ``compute_sensitivity``): one SGD step on
  the factors changes ``BA`` by ``(B − G_B)(A − G_A) − BA``, so ``Ĝ = G_B A + B G_A − G_B G_A``.
* Element importance ``Î = |Ĝ ⊙ (W₀ + s·BA)|`` (first-order Taylor); a unit's importance sums Î
  over its rows (q/k/v, gate/up: output channels) or columns (o, down: input channels), each
  module's vector L2-normalized, summed over the modules of the group, and smoothed across steps
  with a moving average ``Ī ← β Ī + (1 − β) I`` (Eq. 10, β = 0.9).
* Iterative schedule (official ``schedule_sparsity_ratio``, the cubic schedule of Zhu & Gupta
  2017): sparsity 0 during the warm-up fraction, ``s_f (1 − (1 − (t − t₀)/(t₁ − t₀))³)`` in between,
  ``s_f`` from ``t₁ = T(1 − cooldown)`` on; every ``prune_every`` steps (and at ``t₁``) the
  least-important units of every block are masked. Pruned units stay pruned.

Units: a *query head* (its q rows and o_proj columns; with grouped-query attention the k/v rows of
a key-value head go too once all its query heads are pruned; with plain multi-head attention a head
is q, k, v rows + o columns as in the official code) and an *MLP channel* (gate/up rows and down
column; BERT: intermediate row and output column). During the schedule pruned units are masked
(forward hooks), so LoRA stays a standard, mergeable LoRA; at the end LoRA is merged and the pruned
rows/columns are **removed** (:func:`remove_pruned_units`): the model gets smaller ``nn.Linear``
layers and fewer heads, with exactly the outputs of the masked model. Every block gets the same
weight sparsity: heads are pruned at the block's unit fraction (rounded down) and the channel count
makes up the rest of the block's budget (capped before the final step so it never overshoots it),
so the final kept fraction lands on ``ratio``, at most one channel's weights below it.
Differences from the official code: the final sparsity is always applied (the official trainer
skips pruning once the schedule equals the target), the channel count makes up for the rounding of
the head count (the official code prunes the same unit fraction of both), and grouped-query
attention (which the official code does not handle) is pruned so every surviving key-value group
keeps the same number of query heads (see :func:`grow_heads`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import checks
from ..adapters import LoRALayer, adapt, merge_and_unload
from ..batches import LossFn
from ..callbacks import Callback, TrainState
from ..layout import Block, find_blocks
from ..targets import replace_module
from .finetune import finetune
from .resize import sliced_linear


# ------------------------------------------------------------------------------------- schedule
def cubic_sparsity(step: int, total_steps: int, final: float, warmup: float = 0.1, cooldown: float = 0.1) -> float:
    """Zhu & Gupta's cubic schedule as in the official trainer: 0 until ``t₀ = warmup·T``, the final
    value from ``t₁ = T(1 − cooldown)`` on (at the latest the last step), ``s_f(1 − (1 − (t−t₀)/(t₁−t₀))³)``
    in between."""
    t0 = warmup * total_steps
    t1 = min(total_steps * (1.0 - cooldown), total_steps - 1)
    if step >= t1:
        return final
    if step <= t0:
        return 0.0
    coeff = 1.0 - (step - t0) / (t1 - t0)
    return final * (1.0 - coeff**3)


def first_final_step(total_steps: int, cooldown: float) -> int:
    """The step at which :func:`cubic_sparsity` first returns the final sparsity."""
    return math.ceil(min(total_steps * (1.0 - cooldown), total_steps - 1))


# ------------------------------------------------------------------------------------- state
@dataclass
class BlockState:
    """Pruned units of one block and their smoothed importance."""

    heads: set[int] = field(default_factory=set)
    channels: set[int] = field(default_factory=set)
    head_importance: torch.Tensor | None = None
    channel_importance: torch.Tensor | None = None

    def pruned_kv(self, block: Block) -> list[int]:
        g = block.group
        return [j for j in range(block.kv_heads) if all(j * g + i in self.heads for i in range(g))]

    def pruned_weights(self, block: Block) -> int:
        return (len(self.heads) * block.head_weights + len(self.pruned_kv(block)) * block.kv_weights
                + len(self.channels) * block.channel_weights)


@dataclass
class LoRAPruneState:
    blocks: list[Block]
    units: list[BlockState]

    @property
    def total(self) -> int:
        return sum(b.total for b in self.blocks)

    def kept_fraction(self) -> float:
        return 1.0 - sum(u.pruned_weights(b) for b, u in zip(self.blocks, self.units, strict=True)) / self.total

    def row_masks(self) -> dict[str, torch.Tensor]:
        """Per module: a bool keep-mask over output rows (q, k, v, gate/up) or input columns (o, down)."""
        masks = {}
        for block, units in zip(self.blocks, self.units, strict=True):
            d = block.head_dim
            head_keep = torch.ones(block.heads, dtype=torch.bool)
            head_keep[list(units.heads)] = False
            kv_keep = torch.ones(block.kv_heads, dtype=torch.bool)
            kv_keep[units.pruned_kv(block)] = False
            chan_keep = torch.ones(block.channels, dtype=torch.bool)
            chan_keep[list(units.channels)] = False
            masks[block.q] = head_keep.repeat_interleave(d)
            masks[block.o] = head_keep.repeat_interleave(d)
            masks[block.k] = kv_keep.repeat_interleave(d)
            masks[block.v] = kv_keep.repeat_interleave(d)
            for n in (*block.mlp_out, *block.mlp_in):
                masks[n] = chan_keep
        return masks

    def to_dict(self) -> dict:
        return {
            "kept_fraction": self.kept_fraction(),
            "blocks": [
                {"q": b.q, "pruned_heads": sorted(u.heads), "pruned_kv_heads": u.pruned_kv(b),
                 "pruned_channels": len(u.channels), "heads": b.heads, "channels": b.channels}
                for b, u in zip(self.blocks, self.units, strict=True)
            ],
        }


def _input_side(block: Block, name: str) -> bool:
    return name == block.o or name in block.mlp_in


# ------------------------------------------------------------------------------------- importance
@torch.no_grad()
def lora_importance(layer: LoRALayer, input_side: bool) -> torch.Tensor:
    """Per-row (or per-column, ``input_side``) sum of ``|Ĝ ⊙ (W₀ + s·BA)|`` with the LoRA-guided
    ``Ĝ = G_B A + B G_A − G_B G_A``; reads only LoRA gradients (W₀ has none)."""
    a, b = layer.lora_A, layer.lora_B
    if a.grad is None or b.grad is None:
        raise ValueError("LoRA factors have no gradient; call loss.backward() before estimating importance")
    ga, gb = a.grad.float(), b.grad.float()
    af, bf = a.detach().float(), b.detach().float()
    g_hat = gb @ af + bf @ ga - gb @ ga
    weight = layer.base_weight.float() + layer.scale * (bf @ af)
    imp = (g_hat * weight).abs()
    return imp.sum(0) if input_side else imp.sum(1)


def _normalized(v: torch.Tensor) -> torch.Tensor:
    return v / (torch.linalg.vector_norm(v) + 1e-8)


@torch.no_grad()
def block_importance(model: nn.Module, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's (head, channel) importance of one block: each module's per-unit vector is
    L2-normalized and the vectors of a group are summed (k/v per key-value head, shared evenly by
    its query heads)."""
    def imp(name: str) -> torch.Tensor:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALayer):
            raise ValueError(f"'{name}' carries no LoRA adapter")
        return lora_importance(layer, _input_side(block, name))

    d, g = block.head_dim, block.group
    heads = (
        _normalized(imp(block.q).view(block.heads, d).sum(1))
        + _normalized(imp(block.o).view(block.heads, d).sum(1))
    )
    kv = (
        _normalized(imp(block.k).view(block.kv_heads, d).sum(1))
        + _normalized(imp(block.v).view(block.kv_heads, d).sum(1))
    )
    heads = heads + kv.repeat_interleave(g) / g
    channels = sum(_normalized(imp(n)) for n in (*block.mlp_out, *block.mlp_in))
    return heads, channels


def update_importance(model: nn.Module, state: LoRAPruneState, beta: float) -> None:
    """``Ī ← β Ī + (1 − β) I`` for every block (skipped when this step's importance is not finite)."""
    fresh = [block_importance(model, b) for b in state.blocks]
    if any(not (torch.isfinite(h).all() and torch.isfinite(c).all()) for h, c in fresh):
        return
    for units, (h, c) in zip(state.units, fresh, strict=True):
        units.head_importance = (
            (1 - beta) * h if units.head_importance is None else beta * units.head_importance + (1 - beta) * h
        )
        units.channel_importance = (
            (1 - beta) * c if units.channel_importance is None else beta * units.channel_importance + (1 - beta) * c
        )


def _least_important(importance: torch.Tensor | None, pruned: set[int], count: int, size: int) -> set[int]:
    """``pruned`` plus the lowest-importance other units, up to ``count`` units in total."""
    extra = count - len(pruned)
    if extra <= 0:
        return set(pruned)
    scores = importance.clone() if importance is not None else torch.zeros(size)
    order = [int(i) for i in torch.argsort(scores, stable=True) if int(i) not in pruned]
    return set(pruned) | set(order[:extra])


def kept_per_group(block: Block, heads: set[int]) -> int:
    """Query heads kept by every surviving key-value group of ``block`` when ``heads`` are pruned.
    ValueError when no query head is left or the surviving groups keep different numbers (then
    ``repeat_kv`` cannot map the kept query heads to their key-value heads)."""
    g = block.group
    kept = {sum(j * g + i not in heads for i in range(g)) for j in range(block.kv_heads)} - {0}
    if not kept:
        raise ValueError(f"every query head of '{block.q}' is pruned; at least one must be kept")
    if len(kept) > 1:
        raise ValueError(
            f"the key-value groups of '{block.q}' keep different numbers of query heads {sorted(kept)}; "
            "grouped-query attention needs the same number in every surviving group"
        )
    return kept.pop()


def _uniform_candidate(
    block: Block, pruned: set[int], drop_groups: int, per_group: int, score: list[float]
) -> set[int]:
    """The cheapest superset of the uniform ``pruned`` with ``drop_groups`` more whole key-value
    groups removed and ``per_group`` query heads pruned in every other surviving group: a surviving
    group either loses its least important kept heads (cost: their importance) or all of them, and
    the groups where removing costs the least extra are removed."""
    g = block.group
    kept = {j: sorted((h for h in range(j * g, (j + 1) * g) if h not in pruned), key=lambda h: (score[h], h))
            for j in range(block.kv_heads)}
    alive = [j for j in kept if kept[j]]
    partial = {j: kept[j][: per_group - (g - len(kept[j]))] for j in alive}
    extra = {j: sum(score[h] for h in kept[j]) - sum(score[h] for h in partial[j]) for j in alive}
    dropped = set(sorted(alive, key=lambda j: (extra[j], j))[:drop_groups])
    out = set(pruned)
    for j in alive:
        out.update(kept[j] if j in dropped else partial[j])
    return out


def grow_heads(block: Block, units: BlockState, count: int) -> set[int]:
    """``units.heads`` grown to as many pruned query heads as possible, at most ``count``, such that
    every surviving key-value group keeps the same number of query heads — so the shrunk attention
    is still standard grouped-query attention (query head i uses key-value head ``i // kept_per_group``)
    and a whole group's k/v rows go once its last query head goes. The reachable layouts are
    ``r`` whole groups removed and ``p`` heads pruned in each of the others (``r·g + (kv − r)·p``
    heads, at least one head kept); among those pruning the most heads, the one whose newly pruned
    heads have the least summed smoothed importance wins. With multi-head attention (one query head
    per group) this is exactly the ``count`` least important heads."""
    g, kv = block.group, block.kv_heads
    importance = units.head_importance if units.head_importance is not None else torch.zeros(block.heads)
    score = [float(x) for x in importance]
    removed = kv - len({h // g for h in range(block.heads) if h not in units.heads})
    pruned_per_group = g - kept_per_group(block, units.heads)
    best, best_key = set(units.heads), (len(units.heads), 0.0)
    for r in range(removed, kv):
        for p in range(pruned_per_group, g):
            n = r * g + (kv - r) * p
            if n > count:
                break
            candidate = _uniform_candidate(block, units.heads, r - removed, p, score)
            key = (n, -sum(score[h] for h in candidate - units.heads))
            if key > best_key:
                best, best_key = candidate, key
    return best


def _head_budget(block: Block, sparsity: float) -> tuple[float, int]:
    """(weights to free, query heads to prune) at ``sparsity``: heads at the block's unit fraction
    ``budget / (heads·head_weights + channels·channel_weights)``, rounded down, at least one kept."""
    budget = sparsity * block.total
    prunable = block.heads * block.head_weights + block.channels * block.channel_weights
    unit_fraction = min(1.0, budget / prunable)
    return budget, min(block.heads - 1, math.floor(block.heads * unit_fraction + 1e-9))


def _most_freed_by_heads(block: Block, count: int) -> int:
    """The most weights any uniform head layout (see :func:`grow_heads`) with at most ``count``
    pruned query heads frees (q rows + o columns, k/v rows of removed groups)."""
    g, kv = block.group, block.kv_heads
    return max(
        n * block.head_weights + r * block.kv_weights
        for r in range(kv) for p in range(g) if (n := r * g + (kv - r) * p) <= count
    )


def _channels_for(block: Block, budget: float, freed: int) -> int:
    """MLP channels that free the rest of ``budget`` (rounded up)."""
    return max(0, math.ceil((budget - freed) / block.channel_weights - 1e-9))


def prune_to(state: LoRAPruneState, sparsity: float, final: float) -> None:
    """Grow every block's pruned set to weight sparsity ``sparsity`` (of the schedule ending at
    ``final``): heads at the block's unit fraction (rounded down, at least one head kept, key-value
    groups kept uniform by :func:`grow_heads`), then MLP channels up to the block's budget (rounded
    up, at least one channel kept). Before the final sparsity the channel count is capped at the
    least the final step can need (its budget minus the most any final head layout frees), so the
    channels pruned to make up for coarse head steps never overshoot the final target: the final
    kept fraction lands within one channel's weights below ``1 − final``. Pruned units are never
    revived."""
    for block, units in zip(state.blocks, state.units, strict=True):
        budget, n_heads = _head_budget(block, sparsity)
        units.heads = grow_heads(block, units, n_heads)
        freed = len(units.heads) * block.head_weights + len(units.pruned_kv(block)) * block.kv_weights
        n_chan = _channels_for(block, budget, freed)
        if sparsity < final:
            final_budget, final_heads = _head_budget(block, final)
            n_chan = min(n_chan, _channels_for(block, final_budget, _most_freed_by_heads(block, final_heads)))
        units.channels = _least_important(units.channel_importance, units.channels,
                                          min(block.channels - 1, n_chan), block.channels)


# ------------------------------------------------------------------------------------- masks
class _Masks:
    """Forward hooks that zero pruned output rows / input columns of the LoRA-adapted modules."""

    def __init__(self, model: nn.Module, state: LoRAPruneState) -> None:
        self.model, self.state, self.handles = model, state, []
        self.masks: dict[str, torch.Tensor] = {}
        self.input_side = {n: _input_side(b, n) for b in state.blocks for n in b.names}
        self.refresh()
        for name, side in self.input_side.items():
            module = model.get_submodule(name)
            if side:
                self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            else:
                self.handles.append(module.register_forward_hook(self._post(name)))

    def refresh(self) -> None:
        device = next(self.model.parameters()).device
        self.masks = {n: m.to(device) for n, m in self.state.row_masks().items()}

    def _pre(self, name: str):
        def hook(module, args):
            return (args[0] * self.masks[name].to(args[0].dtype), *args[1:])
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            return output * self.masks[name].to(output.dtype)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ------------------------------------------------------------------------------------- removal
def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _head_attributes(block: Block, units: BlockState) -> dict[str, int]:
    """The head-count attributes of transformers' attention modules for the kept heads:
    ``num_key_value_groups`` (Llama's ``repeat_kv`` factor), ``num_attention_heads`` and
    ``all_head_size`` (BERT)."""
    heads = block.heads - len(units.heads)
    return {"num_key_value_groups": kept_per_group(block, units.heads), "num_attention_heads": heads,
            "all_head_size": heads * block.head_dim}


@torch.no_grad()
def remove_pruned_units(model: nn.Module, state: LoRAPruneState) -> dict[str, dict]:
    """Physically remove the pruned heads and channels from a model whose LoRA is merged: every
    block linear is replaced by a smaller ``nn.Linear`` holding only the kept output rows (q/k/v,
    gate/up, intermediate; with their bias entries) or input columns (o, down, output), and the
    attention / MLP modules get the kept head counts (``num_key_value_groups``,
    ``num_attention_heads``, ``all_head_size``, ``intermediate_size``, where the module has them).
    transformers reshapes with ``(*input_shape, -1, head_dim)``, so the forward then equals the
    masked model's exactly (a masked head's o columns are zero, so it contributes nothing).

    Grouped-query attention stays standard because :func:`grow_heads` keeps the same number ``m``
    of query heads in every surviving key-value group: the kept query heads, in order, come in runs
    of ``m`` per kept key-value head, so ``repeat_kv`` by ``m`` maps them right, and no k/v row is
    duplicated (the parameter count drops by exactly the pruned weights plus their bias entries).
    Returns the layout ``{"linears": {name: {"in_features", "out_features", "bias"}},
    "attributes": {module: {attribute: value}}}`` that :func:`.resize.apply_layout` rebuilds."""
    sizes: dict[str, dict[str, int]] = {}
    for block, units in zip(state.blocks, state.units, strict=True):  # validate every block before changing any
        if len(units.channels) >= block.channels:
            raise ValueError(f"every MLP channel of the block at '{block.q}' is pruned; at least one must be kept")
        sizes[_parent(block.q)] = _head_attributes(block, units)
        sizes[_parent(block.mlp_out[0])] = {"intermediate_size": block.channels - len(units.channels)}
    linears, attributes = {}, {}
    masks = state.row_masks()
    for block in state.blocks:
        for name in block.names:
            new = sliced_linear(model.get_submodule(name), masks[name], _input_side(block, name))
            replace_module(model, name, new)
            linears[name] = {"in_features": new.in_features, "out_features": new.out_features,
                             "bias": new.bias is not None}
    for module_name, attrs in sizes.items():
        module = model.get_submodule(module_name)
        present = {k: v for k, v in attrs.items() if hasattr(module, k)}
        for key, value in present.items():
            setattr(module, key, value)
        if present:
            attributes[module_name] = present
    return {"linears": linears, "attributes": attributes}


# ------------------------------------------------------------------------------------- the loop
@dataclass
class LoRAPruneConfig:
    """LoRA (``r``, ``alpha``, ``dropout``), optimizer (``lr``), schedule (``prune_every``,
    ``warmup``, ``cooldown`` as fractions of the steps), importance smoothing ``beta``."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lr: float = 1e-4
    prune_every: int = 10
    warmup: float = 0.1
    cooldown: float = 0.1
    beta: float = 0.9

    def __post_init__(self) -> None:
        checks.rank("r", self.r)
        checks.integer("prune_every", self.prune_every, 1)
        for name in ("warmup", "cooldown", "beta"):
            checks.fraction(name, getattr(self, name), allow_zero=True, allow_one=False)
        if self.warmup + self.cooldown >= 1.0:
            raise ValueError(f"warmup + cooldown = {self.warmup + self.cooldown} must be < 1")
        checks.positive("lr", self.lr)
        checks.positive("alpha", self.alpha)


class _PruneSchedule(Callback):
    """LoRAPrune's schedule in the loop: after every backward the importance is updated from the LoRA
    gradients and the masks grow on the cubic schedule (before the optimizer step, as the official
    trainer does); after the step that reaches the final sparsity ``on_target(model, step)`` runs once
    on the masked LoRA model (in eval mode). Steps are counted from 0."""

    def __init__(self, model: nn.Module, pruning: LoRAPruneState, masks: _Masks, cfg: LoRAPruneConfig, steps: int,
                 final_sparsity: float, on_target: Callable[[nn.Module, int], None] | None) -> None:
        self.model, self.pruning, self.masks, self.cfg = model, pruning, masks, cfg
        self.steps, self.final, self.on_target = steps, final_sparsity, on_target
        self.reached = False

    def _target(self, step: int) -> float:
        return cubic_sparsity(step, self.steps, self.final, self.cfg.warmup, self.cfg.cooldown)

    def on_after_backward(self, state: TrainState) -> None:
        step = state.step
        update_importance(self.model, self.pruning, self.cfg.beta)
        target = self._target(step)
        if target > 0 and (step % self.cfg.prune_every == 0 or target >= self.final):
            prune_to(self.pruning, target, self.final)
            self.masks.refresh()
        state.log.update(target_sparsity=target, kept_fraction=self.pruning.kept_fraction())

    def on_step_end(self, state: TrainState) -> None:
        step = state.step - 1
        if self.reached or self._target(step) < self.final:
            return
        self.reached = True
        if self.on_target is not None:
            self.model.eval()
            self.on_target(self.model, step)
            self.model.train()


def _prune_while_training(
    model: nn.Module,
    state: LoRAPruneState,
    data: Iterable,
    steps: int,
    cfg: LoRAPruneConfig,
    final_sparsity: float,
    loss_fn: LossFn | None,
    trainable: str | Iterable[str] | None,
    on_target: Callable[[nn.Module, int], None] | None,
    progress: bool,
) -> list[dict]:
    """LoRA on every block linear, trained under the pruning masks while the cubic schedule grows
    them; then LoRA is merged (the model is plain but still dense-shaped)."""
    names = [n for b in state.blocks for n in b.names]
    adapt(model, "lora", targets=names, r=cfg.r, alpha=float(cfg.alpha), dropout=cfg.dropout, trainable=trainable)
    masks = _Masks(model, state)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        schedule = _PruneSchedule(model, state, masks, cfg, steps, final_sparsity, on_target)
        history = finetune(model, params, data, steps, cfg.lr, loss_fn, progress, [schedule])
    finally:
        masks.remove()
    merge_and_unload(model)
    return history


def loraprune(
    model: nn.Module,
    data: Iterable,
    ratio: float,
    steps: int,
    loss_fn: LossFn | None = None,
    trainable: str | Iterable[str] | None = "auto",
    on_target: Callable[[nn.Module, int], None] | None = None,
    progress: bool = False,
    **config: object,
) -> tuple[LoRAPruneState, list[dict], dict[str, dict]]:
    """Fine-tune LoRA on all block linears for ``steps`` steps while pruning heads and channels on
    the cubic schedule until the blocks keep ``ratio`` of their weights; then merge LoRA and remove
    the pruned units (in place: ``model`` ends as a plain, physically smaller model).
    ``on_target(model, step)`` runs once, right after the final sparsity is reached (on the masked
    LoRA model). Returns the pruning state, the per-step history and the layout of
    :func:`remove_pruned_units`."""
    ratio = checks.fraction("ratio", ratio)
    cfg = LoRAPruneConfig(**config)
    checks.integer("steps", steps, 1)  # LoRAPrune estimates importance while training
    blocks = find_blocks(model, "LoRAPrune")
    state = LoRAPruneState(blocks, [BlockState() for _ in blocks])
    history = _prune_while_training(model, state, data, steps, cfg, 1.0 - ratio, loss_fn, trainable, on_target,
                                    progress)
    layout = remove_pruned_units(model, state)
    return state, history, layout


def loraprune_recover(
    model: nn.Module,
    targets: Iterable[str],
    data: Iterable,
    steps: int,
    loss_fn: LossFn | None = None,
    trainable: str | Iterable[str] | None = "auto",
    progress: bool = False,
    **config: object,
) -> list[dict]:
    """More LoRA fine-tuning of a pruned (already shrunk) model on the linears ``targets``, then
    merge: no masks are needed because the pruned units no longer exist. LoRA options (``r``,
    ``alpha``, ``dropout``, ``lr``) as in :class:`LoRAPruneConfig`."""
    cfg = LoRAPruneConfig(**config)
    checks.integer("steps", steps, 1)
    adapt(model, "lora", targets=list(targets), r=cfg.r, alpha=float(cfg.alpha), dropout=cfg.dropout,
          trainable=trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    history = finetune(model, params, data, steps, cfg.lr, loss_fn, progress)
    merge_and_unload(model)
    return history
