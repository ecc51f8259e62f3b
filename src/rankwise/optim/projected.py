"""The projected-optimizer engine: one code path for GaLore, Q-GaLore, Fira, FRUGAL, APOLLO, DCT, OSD, ...

A ``ProjectedOptimizer`` is a plain ``torch.optim.Optimizer``. Param groups that carry ``rank`` are
*projected*: for each 2-D parameter with gradient G (m×n), each step

1. the projector refreshes its subspace when due (every ``update_gap`` steps, counted from step 0 as
   in galore-torch; ``online`` projectors move every step instead),
2. R = proj(G) (r×n or m×r) and the inner update (AdamW, 8-bit AdamW, Adafactor, Lion) gives
   (N, c) with all moments in R's shape,
3. the residual rule applies the update, with G − back(R) dropped / Fira-scaled / sign-SGD /
   APOLLO-scaled (see ``residual.py``),
4. decoupled weight decay W ← W − lr·λ·W (after the update, as galore-torch / apollo-torch).

Groups without ``rank`` use the inner update on the full gradient (embeddings, norms, biases, heads).
Per-group keys: ``rank``, ``update_gap`` (alias ``update_proj_gap``), ``scale``, ``proj_side``
(alias ``proj_type``; std / reverse_std / left / right), ``projector``, ``inner``, ``residual``,
``reproject_moments`` and the options in ``OPTION_KEYS``.

**Non-2-D parameters in a projected group raise ValueError** (put them in a group without ``rank``;
``rankwise.optim.param_groups`` does this for you). All state is tensors / ints / floats, so
``state_dict()`` round-trips through ``torch.save`` + ``torch.load(weights_only=True)``; integer and
packed tensors keep their dtype through ``load_state_dict`` (torch's default casts them to the
parameter dtype, which this class undoes).

``reproject_moments=True`` carries the inner moments into the new basis at each refresh (first moment
M ← P_newᵀP_old·M, second moment by LDAdam's projection-aware rule; see ``inner.py``). Default off.

**Projector default.** ``projector="rsvd"`` (the warm-started randomized range finder) for every
SVD-based optimizer; ``projector="svd"`` is the exact LAPACK SVD (galore-torch's numerics). At each
refresh by a projector with an orthonormal basis the captured gradient energy
e = ‖P·PᵀG‖²/‖G‖² = ‖PᵀG‖²/‖G‖² is kept as ``state["proj_energy"]`` (the exact top-r subspace
maximises it, Eckart-Young); ``captured_energy`` averages it over the parameters.

**State bytes.** ``state_bytes()`` counts every tensor kept between steps, each storage once: the
per-parameter state, tensor options of the groups and the projectors' resident tensors (APOLLO's and
Flora's cached Gaussian matrix, the shared DCT basis); see ``accounting.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..checks import beta_pair, choice, integer, known_options, number
from .accounting import optimizer_bytes
from .conventions import check_lr, float_lr, svd_fallbacks
from .copyable import CopyableOptimizer, restore_state_dtypes
from .inner import INNER_OPTIONS, INNERS, get_inner
from .projectors import (
    POWER_DTYPES,
    PROJECTOR_OPTIONS,
    PROJECTORS,
    SIDES,
    Projector,
    make_projector,
    projector_options,
    resolve_side,
)
from .residual import RESIDUAL_OPTIONS, RESIDUALS, get_residual
from .sharding import FLAT_HINT, full, is_dtensor, is_flat, like, reduced

#: Options a group may carry besides the core keys: what the strategies declare they read
#: (``update_gap`` is a core key that the ``online`` projector also reads).
OPTION_KEYS = tuple(sorted({*PROJECTOR_OPTIONS, *INNER_OPTIONS, *RESIDUAL_OPTIONS} - {"update_gap"}))


def captured_energy(projected: torch.Tensor, G: torch.Tensor) -> float:
    """‖PᵀG‖²/‖G‖² (= ‖P·PᵀG‖²/‖G‖² for an orthonormal P): the share of G's energy in the subspace
    (1.0 for a zero G)."""
    total = float(torch.linalg.vector_norm(G.float()) ** 2)
    return float(torch.linalg.vector_norm(projected.float()) ** 2) / total if total > 0.0 else 1.0


class ProjectedOptimizer(CopyableOptimizer):
    """Memory-efficient optimizer with low-rank (or subspace) projected state; see the module docstring.

    A parameter that is not 2-D inside a group with ``rank`` raises ValueError at construction (it is
    not silently routed to the plain rule); ``rank`` > min(m, n) raises too.

    Args:
        params: parameters or param groups; groups with ``rank`` are projected.
        lr, betas, eps, weight_decay, correct_bias: the inner AdamW hyper-parameters (galore-torch numerics).
        update_gap: refresh period T of the projector (steps).
        scale: α, multiplies the projected-back update.
        proj_side: ``std`` | ``reverse_std`` | ``left`` | ``right`` (galore-torch's ``proj_type``).
        projector, inner, residual: strategy names (``PROJECTORS``, ``INNERS``, ``RESIDUALS``);
            ``projector`` defaults to the fast ``"rsvd"``, ``"svd"`` is the exact SVD.
        reproject_moments: carry moments into the new basis at each refresh.
        seed: base of the per-parameter seeds (parameter k, counted from 1 over all groups, gets seed + k,
            the same numbering as apollo-torch).
        **options: extra keys from ``OPTION_KEYS``.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        update_gap: int = 200,
        scale: float = 1.0,
        proj_side: str = "std",
        projector: str = "rsvd",
        inner: str = "adamw",
        residual: str = "none",
        reproject_moments: bool = False,
        seed: int = 0,
        **options: Any,
    ):
        known_options(options, OPTION_KEYS, type(self).__name__)
        integer("seed", seed)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            update_gap=update_gap, scale=scale, proj_side=proj_side, projector=projector, inner=inner,
            residual=residual, reproject_moments=reproject_moments, **options,
        )
        self._seed_base = seed
        self._param_count = 0
        self._seeds: dict[torch.Tensor, int] = {}  # per-parameter seeds, numbered at construction
        self._projectors: dict[torch.Tensor, Projector] = {}
        self._shared: dict[Any, torch.Tensor] = {}  # tensors the projectors share (the DCT basis)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups, validation, seeds

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if "update_proj_gap" in group:  # galore-torch spelling
            group.setdefault("update_gap", group.pop("update_proj_gap"))
        if "proj_type" in group:
            group.setdefault("proj_side", group.pop("proj_type"))
        super().add_param_group(group)
        group = self.param_groups[-1]
        self._validate_group(group)
        for p in group["params"]:
            self._param_count += 1
            if p.requires_grad:
                # numbered now (apollo-torch's order), written into the state at the first step: the
                # state stays empty until then, as torch.distributed.checkpoint expects of a fresh
                # optimizer (get_state_dict initialises the state of an optimizer whose state is empty)
                self._seeds.setdefault(p, self._seed_base + self._param_count)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        beta_pair("betas", group["betas"])
        number("eps", group["eps"], 0.0)
        number("weight_decay", group["weight_decay"], 0.0)
        choice("projector", group["projector"], PROJECTORS)
        choice("inner", group["inner"], INNERS)
        choice("residual", group["residual"], RESIDUALS)
        if "power_dtype" in group:
            choice("power_dtype", group["power_dtype"], POWER_DTYPES)
        if group["reproject_moments"] and not get_inner(group["inner"]).supports_transition:
            raise ValueError(
                f"reproject_moments=True is not supported with inner={group['inner']!r}; "
                "use 'adamw', 'adamw8bit' or 'lion'"
            )
        if "rank" not in group:
            return
        rank = integer("rank", group["rank"], 1)
        integer("update_gap", group["update_gap"], 1)
        choice("proj_side", group["proj_side"], SIDES)
        number("scale", group["scale"], 0.0, low_open=True)
        for p in group["params"]:
            if p.dim() == 1 or is_flat(p):
                raise ValueError(
                    f"a projected group (with rank={rank}) got a 1-D or flattened parameter of shape "
                    f"{tuple(p.shape)}; only 2-D parameters can be projected and a flattened weight must not "
                    f"silently go unprojected: {FLAT_HINT}. "
                    "Biases and norm weights belong in a group without 'rank' (rankwise.optim.param_groups)"
                )
            if p.dim() != 2:
                raise ValueError(
                    f"a projected group (with rank) got a parameter of shape {tuple(p.shape)}; only 2-D "
                    "parameters can be projected, put the others in a group without 'rank' "
                    "(rankwise.optim.param_groups does this)"
                )
            if rank > min(p.shape):
                raise ValueError(
                    f"rank={rank} is larger than min(m, n)={min(p.shape)} for a parameter of shape {tuple(p.shape)}"
                )

    # ------------------------------------------------------------------ projectors

    def _rank_for(self, p: torch.Tensor, group: dict[str, Any], side: str) -> int:
        return int(group["rank"])

    def _projector_for(self, p: torch.Tensor, group: dict[str, Any]) -> Projector:
        side = resolve_side(group["proj_side"], p.shape)
        rank = self._rank_for(p, group, side)
        key = (group["projector"], rank, side)
        proj = self._projectors.get(p)
        if proj is None or (proj.name, proj.rank, proj.side) != key:
            opts = {k: group[k] for k in projector_options(group["projector"]) if k in group}
            proj = make_projector(
                group["projector"], rank, side, tuple(p.shape), opts, p.device, p.dtype, self._shared
            )
            self._projectors[p] = proj
        return proj

    def _refresh_due(self, proj: Projector, group: dict[str, Any], state: dict[str, Any], step: int) -> bool:
        if not proj.has_basis(state):
            return True
        return proj.periodic and step % int(group["update_gap"]) == 0

    def _refresh(
        self, p: torch.Tensor, G: torch.Tensor, group: dict[str, Any], state: dict[str, Any], proj: Projector
    ) -> torch.Tensor | None:
        """New basis from G (carrying the moments over if asked); returns project(G) when it was
        computed on the way (by the projector, see :meth:`Projector.compute`, or for the energy
        statistic), else None. An orthonormal basis records ``state["proj_energy"]`` = ‖PᵀG‖²/‖G‖²."""
        first = not proj.has_basis(state)
        old = None if first or not group["reproject_moments"] else proj.basis(state)
        # FSDP2: the range finder works on the shards (sharded_refresh), the other projectors on the gathered G
        projected = proj.compute(G if proj.sharded_refresh else full(G), state)
        if is_dtensor(G) and not is_dtensor(projected):
            projected = None  # R must carry G's sharding: project the sharded G below
        if proj.orthonormal:
            if projected is None:
                projected = proj.project(G, state)
            state["proj_energy"] = captured_energy(projected, G)
        if old is not None:
            T = like(proj.basis(state).t() @ old, G)  # replicated on G's mesh under FSDP2
            get_inner(group["inner"]).transition(state, T, proj.side, group)
        self._after_refresh(p, group, state, proj, first)
        return projected

    def _after_refresh(
        self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], proj: Projector, first: bool
    ) -> None:
        """Hook for named optimizers (FRUGAL resets statistics, Q-GaLore adapts the gap)."""

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group = float_lr(group)  # a tensor lr is read once per step
            projected = "rank" in group
            for p in group["params"]:
                if p.requires_grad or p.grad is not None:
                    self._ensure_seed(p)
            if projected:
                self._begin_group(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if projected:
                    self._projected_step(p, group, state)
                else:
                    self._plain_step(p, group, state)
        return loss

    def _ensure_seed(self, p: torch.Tensor) -> None:
        """Write ``p``'s seed into its state (numbered at construction, or next in line for a parameter
        that joined later)."""
        state = self.state[p]
        if "seed" not in state:
            seed = self._seeds.get(p)
            if seed is None:
                self._param_count += 1
                seed = self._seeds[p] = self._seed_base + self._param_count
            state["seed"] = seed

    @staticmethod
    def _decay(p: torch.Tensor, group: dict[str, Any]) -> None:
        """Decoupled weight decay after the update (galore-torch / apollo-torch order): W ← W − lr·λ·W."""
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _begin_group(self, group: dict[str, Any]) -> None:
        """Hook called once per projected group before its parameters (FRUGAL's block selection)."""

    def _plain_step(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        inner = get_inner(group["inner"])
        if inner.fused_step(p, p.grad, state, group):  # update + weight decay in cache-sized chunks
            state["step"] = int(state.get("step", 0)) + 1
            return
        N, c = inner.update(p.grad, state, group, p)
        state["step"] = int(state.get("step", 0)) + 1
        p.add_(N, alpha=-group["lr"] * c)
        self._decay(p, group)

    def _projected_step(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        G = p.grad
        step = int(state.get("step", 0))
        proj = self._projector_for(p, group)
        R = self._refresh(p, G, group, state, proj) if self._refresh_due(proj, group, state, step) else None
        if R is None:
            R = proj.project(G, state)
        R = reduced(R)  # FSDP2: a left projection's partial sums, reduced once (r×n)
        N, c = get_inner(group["inner"]).update(R, state, group, p)
        state["step"] = step + 1
        rule = get_residual(group["residual"])
        decay = -group["lr"] * group["weight_decay"] if group["weight_decay"] > 0.0 else None
        if rule.fused_apply(p, G, R, N, proj, state, group, c, decay):  # update and decay in row blocks
            proj.post_update(G, state)
            return
        rule.apply(p, G, R, N, proj, state, group, c)
        proj.post_update(G, state)
        self._decay(p, group)

    # ------------------------------------------------------------------ state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, then restore tensors whose dtype torch cast (int indices, packed codes, seeds).
        The state may be keyed by position or by parameter name (``torch.distributed.checkpoint``)."""
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)
        self._projectors.clear()

    @property
    def svd_fallbacks(self) -> int:
        """Projector refreshes whose SVD failed over (exact → randomized → previous / first-r basis);
        see ``Projector.robust_basis``. Saved in the state."""
        return svd_fallbacks(self)

    @property
    def captured_energy(self) -> float | None:
        """Mean over the projected parameters of the gradient energy their last refresh captured,
        ‖PᵀG‖²/‖G‖² (1 = all of G in the subspace; the exact top-r SVD basis is the maximum); None
        before the first refresh or for projectors without an orthonormal basis (gaussian, online)."""
        values = [float(st["proj_energy"]) for st in self.state.values() if "proj_energy" in st]
        return sum(values) / len(values) if values else None

    def resident_tensors(self) -> list[torch.Tensor]:
        """Tensors kept between steps outside ``state``: the projectors' caches and shared bases."""
        return [t for proj in self._projectors.values() for t in proj.resident_tensors()]

    def state_bytes(self) -> int:
        """Exact bytes of everything kept between steps (``accounting.optimizer_bytes``): the state
        tensors, tensor options and :meth:`resident_tensors`, each storage once."""
        return optimizer_bytes(self, self.resident_tensors())

    def projector(self, p: torch.Tensor) -> Projector:
        """The projector object of parameter ``p`` (for inspection: ``.matrix(opt.state[p])``)."""
        for group in self.param_groups:
            if any(q is p for q in group["params"]) and "rank" in group:
                return self._projector_for(p, group)
        raise ValueError("parameter is not in a projected group of this optimizer")
