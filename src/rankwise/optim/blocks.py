"""Block and layer sampling optimizers: BAdam, LISA, OwLore and IST.

All three train the *full* parameters of a model while only a few transformer layers are awake at a
time. Awake parameters have ``requires_grad=True``; every other parameter has ``requires_grad=False``,
so autograd computes, stores and (under DDP) all-reduces no gradient for it, and only awake
parameters own optimizer state. That is where the memory goes down.

* **BAdam** (Luo, Yu & Li 2024, "BAdam: A Memory Efficient Full Parameter Optimization Method for
  Large Language Models", Alg. 1): block coordinate descent. The parameters are partitioned into D
  blocks, one per transformer layer; the active block runs K Adam steps with fresh moments, then the
  next block (ascending, descending, or a random permutation per block-epoch) takes over.
* **LISA** (Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
  Model Fine-Tuning", Alg. 1): AdamW on the embedding and the head at every step plus γ middle layers
  drawn without replacement (uniformly by default), redrawn every K steps.
* **OwLore** (Li, Yin, Gao & Liu 2024, "OwLore: Outlier-weighed Layerwise Sampled Low-Rank
  Projection for Memory-Efficient LLM Fine-tuning", Sec. 3): LISA whose layer probabilities are the
  layerwise outlier ratios of OWL (p_ℓ = D_ℓ / Σ D), and whose sampled layers' matrices are updated
  with GaLore's low-rank projected Adam.
* **IST** (Yao et al. 2024, "Layer-wise Importance Matters: Less Memory for Better Performance in
  Parameter-efficient Fine-tuning of Large Language Models", Sec. 3): every step γ layers are drawn
  with weights sigmoid(−s_ℓ) from per-layer scores s; every T steps the scores are re-estimated by
  response suppression: K random sets of layers (weights sigmoid(s)) have their PEFT modules' output
  scaled down, the loss L_k of each suppressed model gives a reward exp(−L_k) − mean, and
  s_ℓ += η·r_k·σ(s_ℓ)(1 − σ(s_ℓ)) for ℓ in the k-th set (a layer whose suppression costs little gains
  score and is trained less).

Our own code, written from the papers and the authors' reference code (github.com/Ledzy/BAdam
``BlockOptimizer``; LMFlow's ``LISATrainer``; github.com/pixeli99/OwLore ``finetuner.py``;
github.com/antgroup/importance-aware-sparse-tuning-IST-paper ``ist.py``). Each
optimizer is a ``torch.optim.Optimizer`` whose ``param_groups`` hold every parameter it may train (so
LR schedulers work unchanged) and whose ``state_dict`` is complete: per-parameter state plus the
sampler (global step, awake blocks, remaining order, generator state as a uint8 tensor).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..batches import call_model, loss_of
from ..checks import beta_pair, choice, integer, number
from ..layout import EMBEDDING, HEAD, layer_list, transformer_blocks, unwrap
from .accounting import optimizer_bytes
from .conventions import check_lr, svd_fallbacks
from .copyable import CopyableOptimizer, restore_state_dtypes
from .sharding import full

__all__ = ["IST", "BAdam", "LISA", "OwLore", "outlier_ratios"]

ORDERS = ("ascending", "descending", "random")


# --------------------------------------------------------------------------------------------------
# shared machinery


class _SampledBlocks(CopyableOptimizer):
    """An optimizer that keeps a few 'units' (layers / blocks) awake and swaps them every K steps.

    Subclasses define the units (lists of parameters), the parameters that are always awake, how
    the next selection is drawn (``_next``), which state survives a swap (``_kept_on_switch``) and
    the inner optimizer run on the awake parameters (``_make_inner``). The inner optimizer's
    ``state`` *is* ``self.state``, so ``state_dict()`` holds exactly the awake parameters' state.
    """

    _synced = ("lr", "betas", "eps", "weight_decay")

    def __init__(
        self,
        units: list[list[nn.Parameter]],
        always: list[nn.Parameter],
        frozen: list[nn.Parameter],
        extra_groups: list[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        switch_every: int,
        seed: int,
    ):
        lr = check_lr(lr, low_open=True)
        betas = beta_pair("betas", betas)
        eps = number("eps", eps, 0.0)
        weight_decay = number("weight_decay", weight_decay, 0.0)
        self.switch_every = integer("switch_every", switch_every, 1)
        seed = integer("seed", seed, 0)
        # parameters frozen before the optimizer was built stay frozen (e.g. a base model under adapters)
        units = [[p for p in unit if p.requires_grad] for unit in units]
        always = [p for p in always if p.requires_grad]
        self._units = units
        self._always = always
        candidates: list[nn.Parameter] = []
        seen: set[int] = set()
        for p in [q for unit in units for q in unit] + always:
            if id(p) not in seen:
                seen.add(id(p))
                candidates.append(p)
        self._candidates = candidates
        special = {id(p) for g in extra_groups for p in g["params"]}
        # no weight decay on biases and norm weights (1-D), as the HF Trainer groups LISA/OwLore use
        decay = [p for p in candidates if p.ndim >= 2 and id(p) not in special]
        no_decay = [p for p in candidates if p.ndim < 2 and id(p) not in special]
        groups = [dict(g) for g in extra_groups]
        if decay:
            groups.append({"params": decay, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        for p in frozen:
            if id(p) not in seen:
                p.requires_grad_(False)
                p.grad = None
        self._generator = torch.Generator().manual_seed(seed)
        self.global_step = 0
        self._current: list[int] = []
        self._inner: Optimizer | None = None
        self._inner_groups: list[int] = []
        self._activate(self._first(), keep=set())

    # ---- what subclasses provide
    def _first(self) -> list[int]:
        raise NotImplementedError

    def _next(self) -> list[int]:
        raise NotImplementedError

    def _kept_on_switch(self) -> set[int]:
        """ids of parameters whose optimizer state survives a swap."""
        return set()

    def _make_inner(self, groups: list[dict[str, Any]]) -> Optimizer:
        return torch.optim.AdamW(groups)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; after construction the group's parameters are always awake
        (trained at every step, with the group's own options, like ``always_active``) and take part
        from the next ``step()``. Re-add the same groups before ``load_state_dict`` on resume."""
        super().add_param_group(param_group)
        if "_current" not in self.__dict__:  # torch's __init__ adding the constructor's groups
            return
        known = {id(p) for p in self._candidates}
        for p in self.param_groups[-1]["params"]:
            if id(p) not in known:
                known.add(id(p))
                self._always.append(p)
                self._candidates.append(p)
        self._activate(self._current, keep=None)

    # ---- swapping
    def _awake_ids(self, selection: list[int]) -> set[int]:
        return {id(p) for p in self._always} | {id(p) for i in selection for p in self._units[i]}

    def _activate(self, selection: list[int], keep: set[int] | None) -> None:
        """Wake the units in ``selection``; drop optimizer state of parameters not in ``keep``
        (``keep=None`` keeps all state, used after loading a checkpoint)."""
        awake = self._awake_ids(selection)
        for p in self._candidates:
            on = id(p) in awake
            p.requires_grad_(on)
            if not on:
                p.grad = None
        if keep is not None:
            for p in list(self.state):
                if id(p) not in keep:
                    del self.state[p]
        inner_groups, index = [], []
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if id(p) in awake]
            if params:
                inner_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
                index.append(i)
        self._current = list(selection)
        self._inner = self._make_inner(inner_groups)
        for p, st in self._inner.state.items():  # whatever the inner optimizer set up at construction
            for key, value in st.items():
                self.state[p].setdefault(key, value)
        self._inner.state = self.state
        self._inner_groups = index

    def _switch(self) -> None:
        self._activate(self._next(), keep=self._kept_on_switch())

    @property
    def awake_parameters(self) -> list[nn.Parameter]:
        """Parameters updated by the next ``step()`` (the others have ``requires_grad=False``)."""
        awake = self._awake_ids(self._current)
        return [p for p in self._candidates if id(p) in awake]

    @property
    def svd_fallbacks(self) -> int:
        """Projector refreshes (OwLore's GaLore) whose SVD failed over; see ``Projector.robust_basis``."""
        return svd_fallbacks(self)

    def _sampler_tensors(self) -> list[torch.Tensor]:
        """Tensors the sampler itself keeps (LISA's layer probabilities, OwLore's outlier ratios)."""
        return []

    def resident_tensors(self) -> list[torch.Tensor]:
        """Tensors kept between steps outside ``state``: the sampler's own and the inner optimizer's
        (OwLore's projector caches)."""
        inner = getattr(self._inner, "resident_tensors", None)
        return [*self._sampler_tensors(), *(inner() if callable(inner) else [])]

    def state_bytes(self) -> int:
        """Exact bytes kept between steps (``accounting.optimizer_bytes``): the awake parameters' state
        (a swap drops the rest) and :meth:`resident_tensors`, each storage once."""
        return optimizer_bytes(self, self.resident_tensors())

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One inner step on the awake parameters; swap the awake units after every K-th step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        assert self._inner is not None
        for inner_group, i in zip(self._inner.param_groups, self._inner_groups, strict=True):
            for key in self._synced:
                if key in self.param_groups[i]:
                    inner_group[key] = self.param_groups[i][key]
        self._inner.step()
        self.global_step += 1
        if self.global_step % self.switch_every == 0:
            self._switch()
        return loss

    # ---- checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Torch's optimizer state dict plus ``"sampler"``: step, awake units, order, RNG state."""
        out = super().state_dict()
        out["sampler"] = {
            "global_step": self.global_step,
            "current": list(self._current),
            "rng": self._generator.get_state(),
            **self._extra_state(),
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        if "sampler" not in state_dict:
            raise ValueError(
                f"state_dict has no 'sampler' entry; it was not saved by {type(self).__name__}.state_dict() "
                "(torch.distributed.checkpoint's get_state_dict drops it: save and load with "
                "rankwise.optim.checkpoint.save / load)"
            )
        sampler = state_dict.pop("sampler")
        current = [int(i) for i in sampler["current"]]
        if any(not 0 <= i < len(self._units) for i in current):
            raise ValueError(f"state_dict['sampler']['current']={current} does not fit {len(self._units)} blocks")
        super().load_state_dict(state_dict)
        # torch casts every state tensor to its parameter's dtype: undo it for integer / packed state
        restore_state_dtypes(self, state_dict)
        self.global_step = int(sampler["global_step"])
        self._generator.set_state(sampler["rng"])
        self._load_extra_state(sampler)
        self._activate(current, keep=None)


def _named_blocks(model: nn.Module, layers: str | None) -> tuple[list[str], list[list[nn.Parameter]]]:
    blocks = transformer_blocks(model, layers)
    return [name for name, _ in blocks], [list(module.parameters()) for _, module in blocks]


def _prefixed(model: nn.Module, prefixes: Sequence[str], field: str) -> list[nn.Parameter]:
    if isinstance(prefixes, str) or not all(isinstance(x, str) for x in prefixes):
        raise ValueError(f"{field}={prefixes!r} must be a list of parameter-name prefixes")
    found = []
    for prefix in prefixes:
        match = [p for n, p in unwrap(model).named_parameters() if n.startswith(prefix)]
        if not match:
            raise ValueError(f"{field}: prefix {prefix!r} matches no parameter of the model")
        found.extend(match)
    return found


# --------------------------------------------------------------------------------------------------
# BAdam


class BAdam(_SampledBlocks):
    """BAdam: block coordinate descent with Adam (Luo, Yu & Li 2024, Alg. 1 "BAdam").

    The parameters are partitioned into D blocks, one per transformer layer (plus the embedding and
    the head as extra blocks when ``include_embedding`` / ``include_head``; both are frozen by
    default, as in the official ``BlockOptimizer``). At any time exactly one block is trainable and
    owns AdamW state; after every ``switch_every`` (K) steps the state is dropped and the next block
    in ``order`` becomes active: ``"ascending"`` (input to output), ``"descending"``, or
    ``"random"`` (a fresh random permutation of the D blocks per block-epoch, "random reshuffling").
    ``always_active`` lists parameter-name prefixes trained at every step (e.g. a freshly initialized
    classifier, the official ``active_modules``).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        switch_every: int = 50,
        order: str = "random",
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        include_embedding: bool = False,
        include_head: bool = False,
        always_active: Sequence[str] = (),
        start_block: int | None = None,
        seed: int = 0,
        layers: str | None = None,
    ):
        choice("order", order, ORDERS)
        names, params = _named_blocks(model, layers)
        keep = [
            i for i, n in enumerate(names)
            if (n != EMBEDDING or include_embedding) and (n != HEAD or include_head)
            and any(p.requires_grad for p in params[i])
        ]
        if not keep:
            raise ValueError("BAdam found no block with a trainable parameter")
        self.block_names = [names[i] for i in keep]
        self.order = order
        if start_block is not None:
            if order == "random":
                raise ValueError("start_block is only allowed with order='ascending' or 'descending'")
            integer("start_block", start_block, 0)
            if start_block >= len(keep):
                raise ValueError(f"start_block={start_block} must be < the number of blocks ({len(keep)})")
        self._start = start_block
        self._pending: list[int] = []  # the rest of the current random permutation
        always = _prefixed(model, always_active, "always_active")
        units = [params[i] for i in keep]
        super().__init__(
            units, always, list(unwrap(model).parameters()), [],
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, switch_every=switch_every, seed=seed,
        )

    def _permutation(self) -> list[int]:
        return torch.randperm(len(self._units), generator=self._generator).tolist()

    def _first(self) -> list[int]:
        if self.order == "ascending":
            return [self._start or 0]
        if self.order == "descending":
            return [len(self._units) - 1 if self._start is None else self._start]
        self._pending = self._permutation()
        return [self._pending.pop(0)]

    def _next(self) -> list[int]:
        (i,) = self._current
        if self.order == "ascending":
            return [(i + 1) % len(self._units)]
        if self.order == "descending":
            return [(i - 1) % len(self._units)]
        if not self._pending:
            self._pending = self._permutation()
        return [self._pending.pop(0)]

    def _extra_state(self) -> dict[str, Any]:
        return {"pending": torch.tensor(self._pending, dtype=torch.long)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._pending = [int(i) for i in state["pending"]]

    @property
    def active_block(self) -> int:
        """Index (into ``block_names``) of the block the next ``step()`` updates."""
        return self._current[0]


# --------------------------------------------------------------------------------------------------
# LISA


class LISA(_SampledBlocks):
    """LISA: layerwise importance sampled AdamW (Pan et al. 2024, Alg. 1).

    The embedding and the head (every parameter outside the transformer layers: embeddings, final
    norm, LM head / classifier) are trained at every step. Of the N_L middle layers, γ = ``n_layers``
    are drawn without replacement with probabilities ``probs`` (uniform, p_ℓ = γ/N_L inclusion, by
    default) at step 0 and every K = ``switch_every`` steps; only they are unfrozen in between. As in
    LMFlow's ``LISATrainer``, the optimizer is rebuilt at each redraw: the AdamW state of the
    embedding and head is kept, the state of the middle layers is dropped (also for a layer drawn
    again). ``seed`` drives a private generator; use the same seed on every DDP rank.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        n_layers: int = 2,
        switch_every: int = 20,
        *,
        probs: Sequence[float] | torch.Tensor | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
        layers: str | None = None,
    ):
        names, params = _named_blocks(model, layers)
        body = [i for i, n in enumerate(names) if n not in (EMBEDDING, HEAD)]
        self.layer_names = [names[i] for i in body]
        n_body = len(body)
        self.n_layers = integer("n_layers", n_layers, 1)
        if probs is None:
            weights = torch.ones(n_body, dtype=torch.float64)
        else:
            weights = torch.as_tensor(probs, dtype=torch.float64).flatten()
            if weights.numel() != n_body or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError(f"probs must hold {n_body} finite non-negative numbers (one per layer), got {probs!r}")
        if int((weights > 0).sum()) < self.n_layers:
            raise ValueError(
                f"n_layers={n_layers} must be <= the number of layers with non-zero probability "
                f"({int((weights > 0).sum())} of {n_body})"
            )
        self.probs = weights / weights.sum()
        always = [p for i, n in enumerate(names) if n in (EMBEDDING, HEAD) for p in params[i]]
        units = [params[i] for i in body]
        super().__init__(
            units, always, [], self._special_groups(units),
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, switch_every=switch_every, seed=seed,
        )

    def _special_groups(self, units: list[list[nn.Parameter]]) -> list[dict[str, Any]]:
        """Param groups with their own options (OwLore's projected matrices); none for LISA."""
        return []

    def _sampler_tensors(self) -> list[torch.Tensor]:
        return [self.probs]

    def _draw(self) -> list[int]:
        picked = torch.multinomial(self.probs, self.n_layers, replacement=False, generator=self._generator)
        return sorted(picked.tolist())

    def _first(self) -> list[int]:
        return self._draw()

    def _next(self) -> list[int]:
        return self._draw()

    def _kept_on_switch(self) -> set[int]:
        return {id(p) for p in self._always}

    @property
    def active_layers(self) -> list[int]:
        """Indices (into ``layer_names``) of the middle layers the next ``step()`` updates."""
        return list(self._current)


# --------------------------------------------------------------------------------------------------
# OwLore: outlier ratios + low-rank projected Adam


def _input_norms(
    model: nn.Module, linears: list[list[nn.Linear]], calibration: Iterable[Any], max_batches: int | None
) -> dict[int, torch.Tensor]:
    """‖X_j‖₂ of every input feature j of every Linear over the calibration tokens, by ``id(module)``."""
    squares: dict[int, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, module.in_features).double()
        squares[id(module)] = squares.get(id(module), 0) + (x * x).sum(0)

    handles = [m.register_forward_pre_hook(record) for group in linears for m in group]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in calibration:
            call_model(model, batch)
            seen += 1
            if max_batches is not None and seen >= max_batches:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not squares:
        raise ValueError("calibration produced no batch; pass a non-empty iterable of model inputs")
    return {k: v.sqrt() for k, v in squares.items()}


def _outlier_ratio(group: list[nn.Linear], threshold: float, norms: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """D_ℓ of one layer: the fraction of scores A_ij over all its Linears above M·mean(A_ℓ)."""
    scores = []
    for m in group:
        score = full(m.weight.detach()).abs().double()  # FSDP2: the gathered weight, same on every rank
        if norms is not None:
            if id(m) not in norms:
                raise ValueError("a Linear of the transformer layers received no input during calibration")
            score = score * norms[id(m)].to(score.device)[None, :]
        scores.append(score.flatten())
    flat = torch.cat(scores)
    return (flat > threshold * flat.mean()).double().mean()


@torch.no_grad()
def outlier_ratios(
    model: nn.Module,
    threshold: float = 13.0,
    calibration: Iterable[Any] | None = None,
    *,
    layers: str | None = None,
    max_batches: int | None = None,
) -> torch.Tensor:
    """Layerwise outlier ratio D_ℓ of OWL (Yin et al. 2024, Sec. 3.2), as OwLore uses it (Sec. 3).

    For every linear weight W of layer ℓ, A_ij = |W_ij|·‖X_j‖₂ (Wanda's score; X_j = input feature j
    over the calibration tokens); D_ℓ = #{A_ij > M·mean(A_ℓ)} / #A_ℓ, the mean taken over all linear
    weights of the layer together, M = ``threshold`` (13 in OwLore's released ratios). Without
    ``calibration`` the weight-only score A_ij = |W_ij| is used (‖X_j‖ taken as constant). Returns a
    float64 tensor with one ratio in [0, 1] per transformer layer.
    """
    threshold = number("threshold", threshold, 0.0, low_open=True)
    integer("max_batches", max_batches, 1, optional=True)
    model = unwrap(model)
    _, repeated = layer_list(model, layers)
    linears = [[m for m in layer.modules() if isinstance(m, nn.Linear)] for layer in repeated]
    if any(not group for group in linears):
        raise ValueError("every transformer layer must contain at least one nn.Linear to measure outliers")
    norms = None if calibration is None else _input_norms(model, linears, calibration, max_batches)
    return torch.stack([_outlier_ratio(group, threshold, norms) for group in linears]).cpu()


class OwLore(LISA):
    """OwLore: outlier-weighed layerwise sampling + low-rank projected Adam (Li et al. 2024, Sec. 3).

    Layer ℓ is drawn with probability p_ℓ = D_ℓ / Σ_k D_k, D_ℓ its outlier ratio
    (:func:`outlier_ratios`; pass ``calibration`` batches for the paper's |W|·‖X‖ score, otherwise
    the weight-only |W| score is used, or pass precomputed ``ratios``). γ = ``n_layers`` layers are
    drawn without replacement every K = ``switch_every`` steps; the embedding and head are always
    trained. Every ``nn.Linear`` weight of a sampled layer is updated by GaLore
    (:class:`rankwise.optim.GaLoreAdamW`, galore-torch numerics, ``proj_side='std'``) at ``rank``:
    Adam state r×n (m < n) or m×r, projector refreshed every ``update_gap`` steps, update scaled by
    ``scale``; all other trained parameters get the same Adam unprojected, as the official code
    passes every parameter to ``GaLoreAdamW``. ``projector`` is GaLore's: the fast warm-started
    ``"rsvd"`` (default) or the exact ``"svd"`` (the official code's). Defaults follow the released scripts (γ=5, K=50,
    r=256, gap 100, scale 1, M=13, ε=1e-6). Sampled-layer state is dropped at each redraw, as in
    LISA.
    """

    _synced = ("lr", "betas", "eps", "weight_decay", "rank", "update_gap", "scale")

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        rank: int = 256,
        n_layers: int = 5,
        switch_every: int = 50,
        *,
        update_gap: int = 100,
        scale: float = 1.0,
        projector: str = "rsvd",
        outlier_threshold: float = 13.0,
        calibration: Iterable[Any] | None = None,
        ratios: Sequence[float] | torch.Tensor | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        seed: int = 0,
        layers: str | None = None,
    ):
        self.rank = integer("rank", rank, 1)
        gap = integer("update_gap", update_gap, 1)
        scale = number("scale", scale, 0.0, low_open=True)
        _, repeated = layer_list(unwrap(model), layers)
        matrices = [m.weight for layer in repeated for m in layer.modules() if isinstance(m, nn.Linear)]
        smallest = min(min(w.shape) for w in matrices) if matrices else rank
        if rank > smallest:
            raise ValueError(f"rank={rank} is larger than the smallest layer matrix dimension ({smallest})")
        if ratios is None:
            ratios = outlier_ratios(model, outlier_threshold, calibration, layers=layers)
        self.ratios = torch.as_tensor(ratios, dtype=torch.float64).flatten()
        if float(self.ratios.sum()) <= 0:
            raise ValueError(
                f"no layer has outliers at outlier_threshold={outlier_threshold}: every ratio is 0; "
                "lower outlier_threshold or pass calibration data / ratios"
            )
        self._matrices = {id(w) for w in matrices}
        self._projection = {
            "rank": self.rank, "update_gap": gap, "scale": scale, "proj_side": "std",
            "projector": choice("projector", projector, ("rsvd", "svd")),
        }
        super().__init__(
            model, lr, n_layers, switch_every, probs=self.ratios, betas=betas, eps=eps,
            weight_decay=weight_decay, seed=seed, layers=layers,
        )

    def _special_groups(self, units: list[list[nn.Parameter]]) -> list[dict[str, Any]]:
        params = [p for unit in units for p in unit if id(p) in self._matrices]
        return [{"params": params, **self._projection}] if params else []

    def _sampler_tensors(self) -> list[torch.Tensor]:
        return [self.probs, self.ratios]

    def _make_inner(self, groups: list[dict[str, Any]]) -> Optimizer:
        from .galore import GaLoreAdamW  # the shared projected engine

        return GaLoreAdamW(groups)


# --------------------------------------------------------------------------------------------------
# IST: importance-aware sparse tuning


def ist_rewards(losses: Sequence[float]) -> list[float]:
    """IST's rewards: r_k = exp(−L_k) − mean_j exp(−L_j) for the losses of the K suppressed models."""
    values = [math.exp(-float(loss)) for loss in losses]
    mean = sum(values) / len(values)
    return [v - mean for v in values]


def ist_update(scores: torch.Tensor, selections: Sequence[Sequence[int]], losses: Sequence[float], lr: float) -> None:
    """IST's score update, in place: with p = σ(s) taken before it, s_ℓ += η·r_k·p_ℓ(1 − p_ℓ) for every
    suppressed set k that contains ℓ (the gradient of log σ(s_ℓ) weighted by the centred reward)."""
    p = scores.sigmoid()
    for selection, reward in zip(selections, ist_rewards(losses), strict=True):
        idx = torch.as_tensor(list(selection), dtype=torch.long)
        scores[idx] += lr * reward * (p[idx] * (1.0 - p[idx]))


def _suppress_adapter(factor: float, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """A PEFT layer's output base(x) + Δ(x) with its response scaled: base(x) + factor·Δ(x) (rankwise's
    adapter layers expose Δ as ``delta_output``)."""
    if not getattr(module, "enabled", True):
        return out
    return out - (1.0 - factor) * module.delta_output(args[0], out.dtype)


def _suppress_block(factor: float, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
    """A layer without PEFT modules (full-parameter training): its residual update h_out − h_in scaled."""
    h = args[0] if args else kwargs["hidden_states"]
    if isinstance(out, tuple):
        return (h + factor * (out[0] - h), *out[1:])
    return h + factor * (out - h)


class IST(_SampledBlocks):
    """IST: importance-aware sparse tuning (Yao et al. 2024, Sec. 3 and Alg. 1; official ``ISTCallback``).

    Trains the parameters of γ = ``n_layers`` transformer layers per step (of an adapted model: their
    PEFT modules; the other trainable parameters, e.g. a classifier, at every step), drawn without
    replacement with weights sigmoid(−s_ℓ) and redrawn every ``switch_every`` (1) steps. Every
    ``importance_every`` (T = 10) steps, before the draw, the scores s (zeros at the start) are
    updated from ``rl_steps`` (K = 3) distinct sets of ``n_suppressed`` layers drawn with weights
    sigmoid(s): the PEFT modules of a set have their output scaled by ``suppression`` (0.25) and the
    loss L_k of that model on a batch (eval mode, no gradient) gives the reward exp(−L_k) − mean;
    s_ℓ += ``rl_lr`` (η = 10)·r_k·σ(s_ℓ)(1 − σ(s_ℓ)) for ℓ in set k (:func:`ist_update`). The batch is
    the next of ``data`` (cycled; the loss ``loss_fn(model, batch)``, default ``model(**batch).loss``) or,
    without ``data``, the last training batch the model was called with (its output's ``.loss``).
    Layers with no PEFT module (full-parameter training) are suppressed by scaling their residual
    update. Defaults follow the official code: γ = L/4 and L/2 suppressed layers (at least 1). As
    there, the AdamW state of a layer is kept while it sleeps (the optimizer is not rebuilt); the
    saving is the gradients and backward of the sleeping layers. Under ``torch.distributed`` the
    suppressed losses are averaged over the ranks, so every rank keeps the same scores and draws.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        n_layers: int | None = None,
        switch_every: int = 1,
        *,
        importance_every: int = 10,
        n_suppressed: int | None = None,
        rl_steps: int = 3,
        rl_lr: float = 10.0,
        suppression: float = 0.25,
        data: Iterable[Any] | None = None,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 0,
        layers: str | None = None,
    ):
        blocks = transformer_blocks(model, layers)
        body = [(n, m) for n, m in blocks if n not in (EMBEDDING, HEAD)]
        self.layer_names = [n for n, _ in body]
        self._layers = [m for _, m in body]
        count = len(body)
        self.n_layers = integer("n_layers", max(1, count // 4) if n_layers is None else n_layers, 1)
        self.n_suppressed = integer("n_suppressed", max(1, count // 2) if n_suppressed is None else n_suppressed, 1)
        for name, value in (("n_layers", self.n_layers), ("n_suppressed", self.n_suppressed)):
            if value > count:
                raise ValueError(f"{name}={value} must be <= the number of layers ({count})")
        self.importance_every = integer("importance_every", importance_every, 1)
        if importance_every % integer("switch_every", switch_every, 1):
            raise ValueError(f"importance_every={importance_every} must be a multiple of switch_every={switch_every}")
        self.rl_steps = integer("rl_steps", rl_steps, 1)
        self.rl_lr = number("rl_lr", rl_lr, 0.0, low_open=True)
        self.suppression = number("suppression", suppression, 0.0, 1.0)
        self.scores = torch.zeros(count, dtype=torch.float64)
        self._model = model
        self._data: Iterator[Any] | None = None if data is None else itertools.cycle(data)
        self._loss_fn = loss_fn
        self._last_call: tuple[tuple, dict] | None = None
        self._scoring = False
        self.last_scoring: tuple[list[list[int]], list[float]] = ([], [])  # suppressed sets and their losses
        # a bound method (not a handle): a deepcopy or pickle of the optimizer carries the model and
        # this hook along, bound to the copy
        unwrap(model).register_forward_pre_hook(self._capture, with_kwargs=True)
        units = [list(m.parameters()) for m in self._layers]
        always = [p for n, m in blocks if n in (EMBEDDING, HEAD) for p in m.parameters()]
        super().__init__(
            units, always, [], [],
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, switch_every=switch_every, seed=seed,
        )

    # ---- the training draw
    def _draw(self, weights: torch.Tensor, count: int) -> list[int]:
        picked = torch.multinomial(weights, count, replacement=False, generator=self._generator)
        return sorted(picked.tolist())

    def _first(self) -> list[int]:
        return self._draw((-self.scores).sigmoid(), self.n_layers)

    def _next(self) -> list[int]:
        if self.global_step % self.importance_every == 0:
            self.update_importance()
        return self._draw((-self.scores).sigmoid(), self.n_layers)

    def _kept_on_switch(self) -> set[int]:
        return {id(p) for p in self._candidates}

    @property
    def active_layers(self) -> list[int]:
        """Indices (into ``layer_names``) of the layers the next ``step()`` updates."""
        return list(self._current)

    @property
    def keeps_last_batch(self) -> bool:
        """Whether it holds the last training call's inputs between steps (its scoring batch without ``data``)."""
        return self._data is None

    # ---- importance
    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: remember the last call made with gradients on (a training step's; for the
        scoring without ``data``)."""
        if not self._scoring and torch.is_grad_enabled():
            self._last_call = (args, kwargs)

    @contextmanager
    def _suppressed(self, selection: Sequence[int]) -> Iterator[None]:
        handles = []
        for i in selection:
            adapters = [m for m in self._layers[i].modules() if callable(getattr(m, "delta_output", None))]
            for m in adapters:
                handles.append(m.register_forward_hook(functools.partial(_suppress_adapter, self.suppression)))
            if not adapters:
                handles.append(self._layers[i].register_forward_hook(
                    functools.partial(_suppress_block, self.suppression), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _loss(self, batch: Any) -> float:
        if self._data is not None:
            loss = loss_of(self._model, batch, self._loss_fn)
        else:
            args, kwargs = batch
            loss = getattr(self._model(*args, **kwargs), "loss", None)
            if loss is None:
                raise ValueError("IST scores layers by the loss: the model's output has no .loss; pass data= "
                                 "(batches) and loss_fn= (or batches with labels)")
        loss = full(loss.detach()).double().reshape(())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                torch.distributed.all_reduce(loss)
                loss = loss / world
        return float(loss)

    @torch.no_grad()
    def update_importance(self) -> None:
        """One scoring round (see the class docstring); records ``last_scoring``."""
        batch = next(self._data) if self._data is not None else self._last_call
        if batch is None:
            return  # no training call seen yet (e.g. right after a resume, before any forward)
        rounds = min(self.rl_steps, math.comb(len(self._layers), self.n_suppressed))
        selections: list[list[int]] = []
        for _ in range(rounds):
            selection = self._draw(self.scores.sigmoid(), self.n_suppressed)
            for _ in range(100):  # distinct sets, as the official code (bounded: a few sets may dominate)
                if selection not in selections:
                    break
                selection = self._draw(self.scores.sigmoid(), self.n_suppressed)
            selections.append(selection)
        was_training, self._scoring = self._model.training, True
        self._model.eval()
        try:
            losses = []
            for selection in selections:
                with self._suppressed(selection):
                    losses.append(self._loss(batch))
        finally:
            self._model.train(was_training)
            self._scoring = False
        ist_update(self.scores, selections, losses, self.rl_lr)
        self.last_scoring = (selections, losses)

    # ---- accounting and checkpoints
    def _sampler_tensors(self) -> list[torch.Tensor]:
        kept = [] if self._last_call is None else [*self._last_call[0], *self._last_call[1].values()]
        return [self.scores, *(t for t in kept if torch.is_tensor(t))]

    def _extra_state(self) -> dict[str, Any]:
        return {"scores": self.scores.clone()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.scores.copy_(state["scores"])
