"""EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", arXiv 2410.07170).

A data-driven LoRA init. For every adapted layer, the inputs X (tokens × in) it sees on a few batches
are decomposed by an incremental SVD (incremental PCA, Ross et al. 2008: the running mean is removed
and each batch is folded into the kept components); A = the top right-singular vectors V_rᵀ of the
centred X (the principal directions of the layer's inputs), B = 0, so the model starts at the base.

Ranks are redistributed (Sec. 3.2): every layer l gets up to r_l·ρ components; all layers' explained
variance ratios λ_{l,i} = σ²_{l,i} / Σ_j Var(X_l)_j are pooled and the budget Σ_l r_l goes to the
largest ones, so layer l's new rank is the number of its components among the top-budget ratios
(ρ = 1: no redistribution; a layer that gets no component is not adapted). The SVD runs over the data
(cycled) until, for every layer, the components it needs have converged: their cosine similarity to
the previous batch's components is at least τ. With ``adjust_scaling_factors`` the layer's α is scaled
by r_l'/r_l (its α/r stays the LoRA one). Tokens are those of the attention mask and, with
``use_label_mask``, whose label is not ``label_mask_value``; layers fed the same input (q, k, v) share
one SVD (found by comparing their inputs on the first batch). ``whiten``: A's rows divided by √σᵢ.
A batch with fewer rows than a layer's components (BERT's pooler sees one token per sequence) is held
and joined to the next batch's rows (PEFT skips such batches, so that layer would never converge).

Same procedure as PEFT's ``initialize_lora_eva_weights`` (``init_lora_weights="eva"``; its SVD is
randomized, rankwise's exact); the per-layer ranks and α are overrides, exported to PEFT as
``rank_pattern`` / ``alpha_pattern``. Use: ``rw.adapt(model, "eva", r=8, init_data=batches)``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import call_model, model_device, move_batch
from ..checks import fraction, integer, number
from ..targets import matrix_shape
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, register


@dataclass
class EVAConfig(LoRAConfig):
    """LoRA options plus EVA's: ``rho`` (≥ 1; a layer gets at most round(r·ρ) components), ``tau``
    (cosine threshold of convergence, in [0, 1]), ``use_label_mask`` / ``label_mask_value`` (leave out
    tokens whose label is that value), ``whiten``, ``adjust_scaling_factors`` (α_l = α·r_l'/r_l) and
    ``max_steps`` (batches the SVD may take before it is an error; the data is cycled)."""

    init: str = "eva"
    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True
    max_steps: int = 1000

    def validate(self) -> None:
        super().validate()
        if self.init != "eva":
            raise ValueError(f"init={self.init!r} is not allowed for method 'eva'; choose 'eva'")
        number("rho", self.rho, 1.0)
        fraction("tau", self.tau, allow_zero=True)
        integer("max_steps", self.max_steps, 1)
        integer("label_mask_value", self.label_mask_value)
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")


class IncrementalSVD:
    """Incremental PCA of row batches (Ross et al. 2008, as scikit-learn's ``partial_fit``): keeps the
    top-k components V (k × d), singular values σ, the mean and the total sum of squared deviations.
    A new batch X (n × d) is folded in by the SVD of [diag(σ)·V; X − x̄_batch; √(m·n/(m+n))·(μ − x̄_batch)]
    (m rows seen before), the exact SVD of all rows seen when nothing was truncated. Signs: the largest
    entry of each component is positive."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.sq = torch.zeros(())  # Σ over columns of the squared deviations from the mean
        self.components: torch.Tensor | None = None
        self.sigma: torch.Tensor | None = None
        self.converged = torch.zeros(k, dtype=torch.bool)

    def update(self, x: torch.Tensor, tau: float) -> None:
        x = x.float()
        n = x.shape[0]
        batch_mean = x.mean(0)
        centred = x - batch_mean
        batch_sq = centred.pow(2).sum()
        if self.components is None:
            stacked, mean, sq = centred, batch_mean, batch_sq
        else:
            assert self.mean is not None and self.sigma is not None
            total = self.count + n
            shift = self.mean - batch_mean
            correction = (self.count * n / total) ** 0.5 * shift
            stacked = torch.cat([self.sigma[:, None] * self.components, centred, correction[None]])
            mean = self.mean + (batch_mean - self.mean) * (n / total)
            sq = self.sq + batch_sq + shift.pow(2).sum() * (self.count * n / total)
        _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        rows = vh.abs().argmax(dim=1)
        vh = vh * torch.sign(vh[torch.arange(vh.shape[0]), rows])[:, None]
        previous = self.components
        self.components, self.sigma = vh[: self.k], s[: self.k]
        self.mean, self.sq, self.count = mean, sq, self.count + n
        if previous is not None:
            sim = torch.nn.functional.cosine_similarity(self.components, previous, dim=1)
            self.converged = sim >= tau

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        """σᵢ² / Σ_j Var_j·N: the share of the inputs' total variance along each component."""
        assert self.sigma is not None
        return self.sigma.pow(2) / self.sq


def _token_mask(batch: Any, config: EVAConfig) -> torch.Tensor | None:
    """The tokens whose layer inputs enter the SVD: the attention mask (all tokens without one) and,
    with ``use_label_mask``, labels of the same shape that are not ``label_mask_value``; None for a
    batch without ``input_ids`` (every row of every layer input is used)."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        return None
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    labels = batch.get("labels")
    if config.use_label_mask and torch.is_tensor(labels) and labels.shape == mask.shape:
        mask = mask & (labels != config.label_mask_value)
    return mask


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer input as (tokens × in): the masked tokens when the mask matches its leading dims."""
    if mask is not None and x.shape[:-1] == mask.shape:
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


class _Inputs:
    """Forward pre-hooks that hand each target layer's masked input to ``sink(name, rows)``."""

    def __init__(self, model: nn.Module, names: list[str], sink: Any) -> None:
        self.mask: torch.Tensor | None = None
        self.handles = [
            model.get_submodule(n).register_forward_pre_hook(self._hook(n, sink)) for n in names
        ]

    def _hook(self, name: str, sink: Any) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            sink(name, _rows(args[0].detach(), self.mask))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def distribute_ranks(
    ratios: dict[str, torch.Tensor], groups: dict[str, str], budget: int, max_components: dict[str, int]
) -> dict[str, int]:
    """EVA's redistribution: every layer contributes the explained variance ratios of its group's SVD
    (``groups``: layer → the layer whose SVD it shares), at most ``max_components`` of them; the
    ``budget`` largest over all layers are kept and each layer's rank is its count among them. Ties keep
    the layers' order (the SVD-owning layers first), and within a group the owner gets the largest rank."""
    order = [n for n in groups if groups[n] == n] + [n for n in groups if groups[n] != n]
    keys = [n for n in order for _ in range(min(max_components[n], ratios[groups[n]].numel()))]
    values = torch.cat([ratios[groups[n]][: min(max_components[n], ratios[groups[n]].numel())] for n in order])
    top = torch.sort(values, descending=True, stable=True).indices[:budget]
    counts = Counter(keys[int(i)] for i in top)
    ranks = {n: counts.get(n, 0) for n in groups}
    for n, owner in groups.items():
        if ranks[owner] < ranks[n]:
            ranks[owner], ranks[n] = ranks[n], ranks[owner]
    return ranks


@torch.no_grad()
def eva_components(
    model: nn.Module, layer_cfgs: dict[str, EVAConfig], data: Iterable
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """EVA's data pass: ``({layer: A (r_l' × in)}, {layer: r_l'})`` for the layers in ``layer_cfgs``
    (rank 0 included in the second dict, without an A). Runs the model in eval mode, cycling ``data``."""
    cfg = next(iter(layer_cfgs.values()))
    batches = iter(itertools.cycle(data))
    first = next(iter(data), None)
    if first is None:
        raise ValueError("init_data yielded no batch (EVA needs a few batches of inputs)")
    names = list(layer_cfgs)
    device = model_device(model)
    shapes = {n: matrix_shape(model.get_submodule(n)) for n in names}
    max_components = {n: min(round(layer_cfgs[n].r * layer_cfgs[n].rho), *shapes[n]) for n in names}
    budget = sum(layer_cfgs[n].r for n in names)

    was_training = model.training
    model.eval()
    try:
        # layers fed the same input share one SVD (PEFT compares hashes of the first batch's inputs)
        seen: dict[str, torch.Tensor] = {}
        hooks = _Inputs(model, names, lambda n, x: seen.__setitem__(n, x.cpu()))
        hooks.mask = _token_mask(first, cfg)
        try:
            call_model(model, move_batch(first, device))
        finally:
            hooks.remove()
        unused = [n for n in names if n not in seen]
        if unused:
            raise ValueError(f"EVA: layers {unused[:3]} received no input in a forward of the first init_data batch; "
                             "leave them out of targets")
        groups: dict[str, str] = {}
        for n in names:
            groups[n] = next((o for o in groups if groups[o] == o and seen[o].shape == seen[n].shape
                              and torch.equal(seen[o], seen[n])), n)
        owners = [n for n in names if groups[n] == n]
        for n in names:
            max_components[groups[n]] = max(max_components[groups[n]], max_components[n])
        for n in names:
            max_components[n] = max_components[groups[n]]
        svds = {n: IncrementalSVD(max_components[n]) for n in owners}

        active = set(owners)
        held: dict[str, torch.Tensor] = {}

        def sink(name: str, rows: torch.Tensor) -> None:
            if name not in active:
                return
            if name in held:
                rows = torch.cat([held.pop(name), rows])
            if rows.shape[0] < svds[name].k:  # too few rows for k components: wait for the next batch's
                held[name] = rows
                return
            svds[name].update(rows, cfg.tau)

        ranks = dict(max_components)
        hooks = _Inputs(model, owners, sink)
        try:
            for step in itertools.count():
                active = {n for n in owners if not bool(svds[n].converged[: ranks[n]].all())}
                if not active:
                    break
                if step >= cfg.max_steps:
                    raise ValueError(
                        f"EVA's SVD did not converge in max_steps={cfg.max_steps} batches (tau={cfg.tau}, layers "
                        f"{sorted(active)[:3]}); raise max_steps, lower tau or pass more varied init_data"
                    )
                batch = next(batches)
                hooks.mask = _token_mask(batch, cfg)
                call_model(model, move_batch(batch, device))
                if all(svds[n].components is not None for n in owners):
                    ratios = {n: svds[n].explained_variance_ratio for n in owners}
                    ranks = distribute_ranks(ratios, groups, budget, max_components)
        finally:
            hooks.remove()
    finally:
        model.train(was_training)
    out = {}
    for n in names:
        if ranks[n] == 0:
            continue
        svd = svds[groups[n]]
        assert svd.components is not None and svd.sigma is not None
        a = svd.components[: ranks[n]].clone()
        if cfg.whiten:
            a = a / svd.sigma[: ranks[n]].sqrt()[:, None]
        out[n] = a
    return out, ranks


def eva_plan(
    model: nn.Module, layer_cfgs: dict[str, Any], init_data: Iterable | None, init_batches: int
) -> dict[str, tuple[dict[str, Any], Any]]:
    """``MethodSpec.plan`` of ``eva``: per kept layer, its rank (and α) overrides and its A. ``init_batches``
    is not used: EVA cycles ``init_data`` until its SVDs converge (at most ``max_steps`` batches)."""
    if init_data is None:
        raise ValueError("method 'eva' initializes from layer inputs and needs init_data "
                         "(an iterable of batches, e.g. a DataLoader)")
    components, ranks = eva_components(model, layer_cfgs, init_data)
    plan: dict[str, tuple[dict[str, Any], Any]] = {}
    for n, a in components.items():
        c = layer_cfgs[n]
        fields: dict[str, Any] = {}
        if ranks[n] != c.r:
            fields["r"] = ranks[n]
            alpha = c.alpha
            if c.adjust_scaling_factors and alpha is not None:
                fields["alpha"] = alpha * ranks[n] / c.r
            elif not c.adjust_scaling_factors:
                fields["alpha"] = float(c.r if alpha is None else alpha)
        plan[n] = (fields, a)
    return plan


class EVALayer(LoRALayer):
    """The LoRA layer; its A comes from EVA's data pass (``eva_plan``)."""

    @classmethod
    def needs_grad(cls, config: Any) -> bool:
        """True: EVA needs ``init_data`` (its layer inputs, not a gradient: ``MethodSpec.plan`` reads it)."""
        return True


register(
    MethodSpec(
        "eva",
        "init",
        "Paischer et al. 2024, One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation",
        EVAConfig,
        EVALayer,
        defaults={"init": "eva"},
        summary="A = top right-singular vectors of each layer's inputs (incremental SVD over init_data), B = 0; "
                "ranks redistributed by explained variance (rho)",
        plan=eva_plan,
    )
)
